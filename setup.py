"""Build of the compiled step kernels (metadata lives in pyproject.toml).

    pip install --no-build-isolation .        # or: pip install --no-build-isolation -e .
    python setup.py build_ext --inplace       # development build in the checkout

Extensions (sources and flags from csrc/build_config.json, shared with CMakeLists.txt):

* ``diffflow_ext._C``       C++ CPU kernels, always built (portable baseline ISA);
* ``diffflow_ext._C_avx2``  the same kernels with ATen's AVX2 vectors (x86-64; loaded instead of ``_C``
  when torch reports AVX2/AVX512 support; ``DIFFFLOW_CPU_ISA=default`` forces ``_C``);
* ``diffflow_ext._C_cuda``  CUDA kernels, built whenever nvcc and a CUDA build of torch are present
  (no GPU needed).

Environment switches:

* ``DIFFFLOW_SKIP_CUDA=1``   never build the CUDA extension;
* ``DIFFFLOW_FORCE_CUDA=1``  build it or fail loudly (instead of silently skipping it);
* ``TORCH_CUDA_ARCH_LIST``   CUDA architectures (default: ``default_cuda_arch_list`` of the config, "9.0");
* ``CUDA_HOME``              CUDA toolkit (default: /usr/local/cuda when it has bin/nvcc);
* ``DIFFFLOW_CPU_NATIVE=1``  add -march=native to the CPU build (not portable; no ISA variants);
* ``MAX_JOBS``               parallel compile jobs (ninja).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIG = json.loads((ROOT / "csrc" / "build_config.json").read_text())


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# Must happen before torch.utils.cpp_extension is imported: it resolves CUDA_HOME at import time and
# otherwise guesses from the nvcc on PATH (a /usr/local/bin/nvcc wrapper makes it pick /usr/local,
# where linking fails with "cannot find -lcudart").
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    os.environ["TORCH_CUDA_ARCH_LIST"] = CONFIG["default_cuda_arch_list"]

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _log(msg: str) -> None:
    print(f"[diffflow_ext setup] {msg}", file=sys.stderr)


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def _cuda_build() -> tuple[bool, str]:
    if _env_flag("DIFFFLOW_SKIP_CUDA"):
        return False, "DIFFFLOW_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME
    nvcc = Path(home, "bin", "nvcc") if home else None
    if nvcc is None or not nvcc.exists():
        return False, f"nvcc not found (CUDA_HOME={home!r}, nvcc on PATH: {shutil.which('nvcc')})"
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    return True, f"nvcc {nvcc}, torch CUDA {torch.version.cuda}, TORCH_CUDA_ARCH_LIST={archs}"


def _extensions() -> list:
    include_dirs = [str(ROOT / d) for d in CONFIG["include_dirs"]]
    cxx = list(CONFIG["cxx_flags"])
    if _env_flag("DIFFFLOW_CPU_NATIVE"):
        cxx += CONFIG["cxx_native_flags"]
    exts = [
        CppExtension(
            CONFIG["cpu_module"],
            CONFIG["cpu_sources"],
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
        )
    ]
    # The same CPU kernels compiled for a wider ISA (ATen's AVX2 Vectorized), as separate modules:
    # diffflow_ext loads one only when torch reports a CPU capability that can run it.
    if _is_x86() and not _env_flag("DIFFFLOW_CPU_NATIVE"):
        for variant in CONFIG.get("cpu_isa_variants", []):
            exts.append(
                CppExtension(
                    CONFIG["cpu_module"] + variant["module_suffix"],
                    CONFIG["cpu_sources"],
                    include_dirs=include_dirs,
                    extra_compile_args={"cxx": cxx + variant["flags"]},
                )
            )
    ok, why = _cuda_build()
    if ok:
        _log(f"building the CUDA extension: {why}")
        exts.append(
            CUDAExtension(
                CONFIG["cuda_module"],
                CONFIG["cuda_sources"],
                include_dirs=include_dirs,
                extra_compile_args={"cxx": list(CONFIG["cxx_flags"]), "nvcc": list(CONFIG["nvcc_flags"])},
            )
        )
    elif _env_flag("DIFFFLOW_FORCE_CUDA"):
        raise RuntimeError(f"DIFFFLOW_FORCE_CUDA=1 but the CUDA extension cannot be built: {why}")
    else:
        _log(f"skipping the CUDA extension: {why} (CPU kernels only)")
    return exts


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
