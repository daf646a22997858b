#!/usr/bin/env bash
# One-command GPU check of the fused kernels (H100/H200; < 9.5 min, GPU_CHECK_BUDGET_S):
#   1. check torch (pip install torch==2.14.1 if it cannot be imported),
#   2. build the C++/CUDA extensions in place (DIFFFLOW_FORCE_CUDA=1: fail if CUDA cannot be built),
#   3. run the CUDA tests (tests/test_cuda.py, marker "cuda"),
#   4. train + evaluate MNIST on the GPU for a few minutes (scripts/gpu_mnist.sh, when present;
#      GPU_CHECK_MNIST=0 skips it, GPU_CHECK_MNIST_MINUTES sets its training minutes, default 2),
#   5. run benchmarks/step_throughput.py on the GPU with the time that is left.
# Results (logs, junit xml, benchmark json, summary.json) go to ${OUT:-gpu_results}.
# Usage: bash scripts/gpu_check.sh        (from anywhere; runs in the repository root)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET_S:-560}"   # total seconds for everything (a device command may run 10 min)
START=$SECONDS
log() { echo "[gpu_check $((SECONDS - START))s] $*" | tee -a "$OUT/gpu_check.log"; }
left() { echo $((BUDGET - (SECONDS - START))); }
declare -A RC

# 1. environment --------------------------------------------------------------------------------
log "repository: $ROOT; results: $OUT"
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
if ! "$PY" -c 'import torch' > /dev/null 2>&1; then
    log "torch cannot be imported: pip install torch==2.14.1"
    timeout 180 "$PY" -m pip install "torch==2.14.1" > "$OUT/pip_torch.log" 2>&1 || log "pip install torch failed (see pip_torch.log)"
fi
"$PY" - > "$OUT/env.json" 2>&1 <<'PYEOF'
import json, platform, shutil, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "nvcc": shutil.which("nvcc")}
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = list(torch.cuda.get_device_capability(0))
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:  # noqa: BLE001
    info["triton"] = f"unavailable: {e}"
print(json.dumps(info, indent=1))
PYEOF
RC[env]=$?
cat "$OUT/env.json" | tee -a "$OUT/gpu_check.log"

# 2. build ----------------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # the device's own architecture (e.g. 9.0 on H100/H200), else the build default
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}")' 2>/dev/null || true)"
    [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
log "building (CUDA_HOME=${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
T0=$SECONDS
# CPU kernels for this machine only (-march=native, no ISA variants): one CPU module less to compile.
DIFFFLOW_FORCE_CUDA=1 DIFFFLOW_CPU_NATIVE=1 timeout "$(left)" "$PY" setup.py build_ext --inplace -j 4 \
    > "$OUT/build.log" 2>&1
RC[build]=$?
BUILD_S=$((SECONDS - T0))
log "build rc=${RC[build]} in ${BUILD_S}s"
"$PY" -c 'import json, diffflow_ext; print(json.dumps(diffflow_ext.available_backends(), indent=1))' \
    > "$OUT/backends.json" 2>&1
cat "$OUT/backends.json" | tee -a "$OUT/gpu_check.log"

# 3. CUDA tests -----------------------------------------------------------------------------------
T0=$SECONDS
timeout "$(( $(left) > 240 ? 240 : $(left) ))" "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider \
    -o addopts="" --junitxml="$OUT/test_cuda.xml" > "$OUT/test_cuda.log" 2>&1
RC[tests]=$?
TEST_S=$((SECONDS - T0))
log "CUDA tests rc=${RC[tests]} in ${TEST_S}s: $(tail -n 1 "$OUT/test_cuda.log")"

# 4. MNIST on the GPU (scripts/gpu_mnist.sh: training it/s, peak memory, fused-vs-reference step times, bits/dim) --
RC[mnist]=-1
if [ "${GPU_CHECK_MNIST:-1}" != "0" ] && [ -f scripts/gpu_mnist.sh ]; then
    T0=$SECONDS
    M_MIN="${GPU_CHECK_MNIST_MINUTES:-2}"
    M_S=$(( $(left) - 150 ))   # leave ~2.5 min for the benchmark
    if [ "$M_S" -gt 120 ]; then
        OUT="$OUT" timeout "$M_S" bash scripts/gpu_mnist.sh --minutes "$M_MIN" > "$OUT/gpu_mnist_run.log" 2>&1
        RC[mnist]=$?
    else
        log "not enough time left for scripts/gpu_mnist.sh (${M_S}s)"
    fi
    log "MNIST rc=${RC[mnist]} in $((SECONDS - T0))s"
fi

# 5. benchmark ------------------------------------------------------------------------------------
RC[bench]=-1
if [ -f benchmarks/step_throughput.py ]; then
    T0=$SECONDS
    B=$(left); B=$(( B - 20 ))
    if [ "$B" -gt 120 ]; then
        timeout "$B" "$PY" benchmarks/step_throughput.py --device cuda --json "$OUT/step_throughput.json" \
            > "$OUT/step_throughput.log" 2>&1
        RC[bench]=$?
    fi
    if [ "${RC[bench]}" -ne 0 ] && [ "$(left)" -gt 40 ]; then
        log "full benchmark rc=${RC[bench]}; quick run without torch.compile"
        timeout "$(( $(left) - 10 ))" "$PY" benchmarks/step_throughput.py --device cuda --quick --no-compile \
            --json "$OUT/step_throughput_quick.json" > "$OUT/step_throughput_quick.log" 2>&1
        RC[bench]=$?
    fi
    log "benchmark rc=${RC[bench]} in $((SECONDS - T0))s"
else
    log "benchmarks/step_throughput.py not found: no benchmark"
fi

# summary -----------------------------------------------------------------------------------------
cat > "$OUT/summary.json" <<JSON
{"build_rc": ${RC[build]}, "build_s": $BUILD_S, "tests_rc": ${RC[tests]}, "tests_s": $TEST_S,
 "mnist_rc": ${RC[mnist]}, "bench_rc": ${RC[bench]}, "total_s": $((SECONDS - START))}
JSON
cat "$OUT/summary.json" | tee -a "$OUT/gpu_check.log"
[ "${RC[build]}" -eq 0 ] && [ "${RC[tests]}" -eq 0 ]
