#!/usr/bin/env python
"""Hostile-input probe of ``diffflow train|sample|eval`` and the Python API (issue 10).

Runs a few hundred bad (and a few good) inputs, each in a forked child of one pre-imported process (so a
case costs its own work, not an interpreter start), in its own temporary folder, under a timeout, and
classifies each outcome:

* ``clean``      -- non-zero exit with one error line naming what to change (CLI), or a ValueError/TypeError
                    (or the library's own error classes) with a one-line message naming the argument (API);
                    for good inputs: it worked and the check on the result passed;
* ``traceback``  -- a Python traceback reached the user (CLI) / an internal exception type escaped (API);
* ``unclear``    -- a clean-looking error that does not name the flag/argument/file (the expected words);
* ``late``       -- the error came only after training had started;
* ``hang``       -- the case ran past its timeout;
* ``lost_file``  -- a file that existed before the run was changed or removed;
* ``half``       -- a failed run left new files or folders behind;
* ``silent``     -- bad input accepted (exit 0 / no exception), or a good run whose result check failed
                    (NaN samples, ignored option, ...).

Usage::

    python scripts/probe_cli.py                    # everything, summary + per-case table
    python scripts/probe_cli.py --only ckpt -v     # cases whose id contains "ckpt", with stderr of failures
    python scripts/probe_cli.py --json out.json    # machine-readable results

Each case id is a reproducer: ``--only ID -v`` prints the exact argv / call and the output.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import diffflow_ext  # noqa: E402,F401
from diffflow_ext import cli  # noqa: E402

CLEAN_API_ERRORS: tuple[type, ...] = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
try:  # the library's own error classes
    from diffflow_ext.checkpoint import CheckpointError
    from diffflow_ext.data import DataFileError

    CLEAN_API_ERRORS += (CheckpointError, DataFileError)
except ImportError:  # pragma: no cover
    pass
# ValueError subclasses that mean "internal" rather than "your argument", and anything torch raises from C++
INTERNAL_ERRORS = (UnicodeDecodeError, json.JSONDecodeError)

FAST = ["--iters", "2", "-b", "64", "--hidden", "8", "--depth", "1", "--final-samples", "100", "--final-ode", "0",
        "--eval-every", "0", "--no-progress"]
FAST_N = FAST + ["-N", "3"]


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    id: str
    kind: str  # "cli" | "api"
    argv: list[str] | None = None  # cli
    fn: Callable | None = None  # api: fn(tmp: Path) -> result
    setup: Callable[[Path], None] | None = None
    expect: str = "error"  # "error" | "ok"
    words: tuple[str, ...] = ()  # an error must mention one of these (case-insensitive)
    check: Callable[[Path, object], str | None] | None = None  # ok-case result check -> problem or None
    timeout: float = 60.0
    note: str = ""
    signal: tuple[int, float] | None = None  # (signal, seconds after start): interrupt the run
    owned: tuple[str, ...] = ()  # path prefixes the command may rewrite (the run folder it continues)


CASES: list[Case] = []


def cli_case(id, argv, *, words=(), expect="error", setup=None, check=None, timeout=60.0, note="", sig=None):
    CASES.append(Case(id, "cli", argv=list(argv), setup=setup, expect=expect, words=tuple(words), check=check,
                      timeout=timeout, note=note, signal=sig))


def api_case(id, fn, *, words=(), expect="error", setup=None, check=None, timeout=30.0, note=""):
    CASES.append(Case(id, "api", fn=fn, setup=setup, expect=expect, words=tuple(words), check=check, timeout=timeout,
                      note=note))


# ----------------------------------------------------------------------------- fixtures

BASE_RUN: Path | None = None  # a tiny trained run, made once, copied into each case folder that needs it
IMG_RUN: Path | None = None  # the same for an image data set (sklearn's 8x8 digits, MLP networks)


def make_base_run(root: Path) -> Path:
    out = root / "base"
    rc = cli.main(["train", "checkerboard", *FAST_N, "--out", str(out)])
    if rc != 0 or not (out / "checkpoint.safetensors").is_file():
        raise SystemExit("probe: cannot make the base run")
    return out


def make_img_run(root: Path) -> Path:
    out = root / "img"
    rc = cli.main(["train", "digits", "--iters", "2", "-b", "16", "--network", "mlp", "--width", "16", "--depth", "1",
                   "-N", "3", "--final-samples", "16", "--final-ode", "0", "--eval-every", "0", "--no-progress",
                   "--out", str(out)])
    if rc != 0:
        raise SystemExit("probe: cannot make the image run")
    return out


def with_run(tmp: Path, name: str = "run") -> Path:
    dst = tmp / name
    shutil.copytree(BASE_RUN, dst)
    return dst


def ckpt_bytes() -> bytes:
    return (BASE_RUN / "checkpoint.safetensors").read_bytes()


def split_st(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join_st(header: dict, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def recompute_digest(header: dict, data: bytes) -> None:
    """What an attacker who knows the format does: recompute the checksum after editing."""
    from diffflow_ext import checkpoint as C

    md = header["__metadata__"]
    tensors = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        dt = {"F32": torch.float32, "F64": torch.float64, "U8": torch.uint8, "I64": torch.int64}[v["dtype"]]
        tensors[k] = torch.frombuffer(bytearray(data[a:b]), dtype=dt).reshape(v["shape"]) if b > a else \
            torch.empty(v["shape"], dtype=dt)
    if hasattr(C, "_digest"):
        md["sha256"] = C._digest(tensors, md)
    else:
        md["sha256"] = C._payload_digest(tensors)


def write_crafted(path: Path, edit: Callable[[dict], None], *, recompute: bool = True) -> None:
    header, data = split_st(ckpt_bytes())
    meta = json.loads(header["__metadata__"]["meta"])
    edit(meta)
    header["__metadata__"]["meta"] = json.dumps(meta)
    if recompute:
        recompute_digest(header, data)
    path.write_bytes(join_st(header, data))


def write_crafted_header(path: Path, edit: Callable[[dict], None], *, recompute: bool = False) -> None:
    header, data = split_st(ckpt_bytes())
    edit(header)
    if recompute:
        recompute_digest(header, data)
    path.write_bytes(join_st(header, data))


def ck_case(id, make: Callable[[Path], None], *, words=("checkpoint",), cmds=("sample", "eval", "resume"), api=True):
    """A damaged/crafted checkpoint fed to sample, eval and train --resume, plus the API loader."""
    def setup(tmp):
        make(tmp / "bad.safetensors")

    if "sample" in cmds:
        cli_case(f"ckpt-{id}-sample", ["sample", "bad.safetensors", "-n", "10", "--png", "none", "--out", "s.npy"],
                 words=words, setup=setup)
    if "eval" in cmds:
        cli_case(f"ckpt-{id}-eval", ["eval", "bad.safetensors", "--n-samples", "50", "--n-heldout", "50",
                                     "--n-nll", "20", "--n-ode", "0"], words=words, setup=setup)
    if "resume" in cmds:
        cli_case(f"ckpt-{id}-resume", ["train", "--resume", "bad.safetensors", "--iters", "4", "--out", "r2",
                                       "--no-progress", "--final-samples", "50", "--final-ode", "0"],
                 words=words, setup=setup)

    def load(tmp):
        from diffflow_ext.checkpoint import load_checkpoint

        ck = load_checkpoint(tmp / "bad.safetensors")
        ck.build_model()
        return ck

    if api:
        api_case(f"ckpt-{id}-api", load, words=words, setup=setup)


def mkfifo(p: Path) -> None:
    os.mkfifo(p)


# ----------------------------------------------------------------------------- result checks


def samples_finite(path: str):
    def check(tmp: Path, _):
        p = tmp / path
        if not p.is_file():
            return f"{path} not written"
        a = np.load(p)
        if not np.isfinite(a).all():
            return f"{path} holds non-finite samples"
        return None
    return check


def _sample_scale_ok(tmp: Path, scale: float) -> str | None:
    """Sample the trained run; the samples must be finite, not all zero, and of the data's order of magnitude."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["sample", str(tmp / "r"), "-n", "50", "--png", "none", "--out", str(tmp / "s.npy")])
    if rc != 0:
        return f"sample failed rc={rc}"
    a = np.load(tmp / "s.npy").astype(np.float64)
    if not np.isfinite(a).all():
        return "non-finite samples"
    m = np.abs(a).mean()
    if not (scale * 0.3 < m < scale * 30):
        return f"samples of mean |x| {m:.3g} for data of scale {scale:g} (stored as {np.load(tmp / 's.npy').dtype})"
    return None


def trained_n(expected_n: int):
    def check(tmp: Path, _):
        from diffflow_ext.checkpoint import load_checkpoint

        ck = load_checkpoint(tmp / "r" / "checkpoint.safetensors")
        n = ck.model_config.get("num_steps")
        return None if n == expected_n else f"model has num_steps={n}, asked for {expected_n}"
    return check


# ----------------------------------------------------------------------------- CLI cases


def build_cli_cases() -> None:
    # -- numeric options of train: bad values
    int_flags = {  # flag: (bad values, words)
        "-N": (["0", "-1", "abc", "1.5", "100000000"], ("-N", "--num-steps")),
        "--hidden": (["0", "-1", "abc", "10000000000"], ("--hidden",)),
        "--depth": (["-1", "abc", "100000"], ("--depth",)),
        "-b": (["0", "-1", "abc", "100000000000"], ("-b", "--batch-size")),
        "--iters": (["-1", "abc"], ("--iters",)),
        "--lr-decay-every": (["-1", "abc"], ("--lr-decay-every",)),
        "--seed": (["-1", "abc", "1" + "0" * 30], ("--seed",)),
        "--shards": (["0", "-1", "3"], ("--shards",)),
        "--eval-every": (["-1"], ("--eval-every",)),
        "--eval-samples": (["0", "-1"], ("--eval-samples",)),
        "--final-samples": (["0", "-1", "10000000000"], ("--final-samples",)),
        "--final-ode": (["-1"], ("--final-ode",)),
        "--ckpt-every": (["-1"], ("--ckpt-every",)),
        "--eval-seed": (["-1", "1" + "0" * 30], ("--eval-seed",)),
        "--threads": (["-1", "100000"], ("--threads",)),
    }
    for flag, (vals, words) in int_flags.items():
        for v in vals:
            base = FAST if flag == "-N" else FAST_N
            argv = ["train", "checkerboard", *base, "--out", "r", flag, v]
            if flag in ("-b",):
                argv = ["train", "checkerboard", *[a for a in base], "--out", "r", flag, v]
            cli_case(f"train{flag}={v}", argv, words=words)
    float_flags = {
        "--lr": (["0", "-1", "nan", "inf", "abc"], ("--lr",)),
        "--lr-decay": (["0", "-0.5", "1.5", "nan"], ("--lr-decay",)),
        "--ema": (["1", "-0.1", "nan", "2"], ("--ema",)),
        "--clip": (["-1", "nan"], ("--clip",)),
        "--g": (["0", "-1", "nan", "inf"], ("--g", "--diffusion")),
        "--t-start": (["0", "-1", "nan", "0.5"], ("--t-start",)),
        "--t-end": (["0", "-1", "nan", "inf", "1e-9"], ("--t-end",)),
        "--time-exponent": (["0", "-1", "nan", "inf"], ("--time-exponent",)),
        "--holdout": (["1", "-0.1", "nan", "0.99999999"], ("--holdout",)),
        "--eval-lam": (["-1", "nan", "inf"], ("--eval-lam",)),
    }
    for flag, (vals, words) in float_flags.items():
        for v in vals:
            cli_case(f"train{flag}={v}", ["train", "checkerboard", *FAST_N, "--out", "r", flag, v], words=words)
    for flag, v, words in [("--grid", "bogus", ("--grid",)), ("--gradient", "bogus", ("--gradient",)),
                           ("--backend", "bogus", ("--backend",)), ("--backend", "cuda", ("--backend", "cuda")),
                           ("--backend", "triton", ("--backend", "triton")), ("--dtype", "float16", ("--dtype",))]:
        cli_case(f"train{flag}={v}", ["train", "checkerboard", *FAST_N, "--out", "r", flag, v], words=words)
    for spec in ["5", "30:5", "a:b", "0:5", "5:30:-1", "5:1000000000", "5:30:1:2", ""]:
        cli_case(f"train--progressive={spec!r}", ["train", "checkerboard", *FAST, "--out", "r", "--progressive", spec],
                 words=("--progressive",))
    # conflicts and ignored options
    cli_case("train-N20+progressive", ["train", "checkerboard", *FAST, "--out", "r", "-N", "20", "--progressive",
                                       "5:30"], words=("-N", "--progressive"))
    cli_case("train-lr-diverges", ["train", "checkerboard", *FAST_N, "--out", "r", "--lr", "1e30", "--iters", "5",
                                   "--clip", "0"], words=("non-finite", "nan", "diverg", "--lr"),
             note="must stop with a clear message, not write a NaN model")
    cli_case("train-iters0", ["train", "checkerboard", *FAST_N, "--out", "r", "--iters", "0"],
             words=("--iters",), note="an untrained run must not be written as if trained")
    cli_case("train-ok-N5", ["train", "checkerboard", *FAST, "--out", "r", "-N", "5"], expect="ok",
             check=trained_n(5))
    cli_case("train-unknown-data", ["train", "nosuchdata", *FAST_N, "--out", "r"], words=("nosuchdata",))
    cli_case("train-missing-file", ["train", "missing.npy", *FAST_N, "--out", "r"], words=("missing.npy",))

    # -- output folder
    def existing_file(tmp):
        (tmp / "r").write_text("user file\n")

    cli_case("train-out-is-file", ["train", "checkerboard", *FAST_N, "--out", "r"], setup=existing_file,
             words=("--out", "r"))

    def user_dir(tmp):
        (tmp / "r").mkdir()
        (tmp / "r" / "notes.txt").write_text("precious\n")

    cli_case("train-out-user-dir", ["train", "checkerboard", *FAST_N, "--out", "r"], setup=user_dir,
             words=("--out", "r", "exists"))
    cli_case("train-out-user-dir-overwrite", ["train", "checkerboard", *FAST_N, "--out", "r", "--overwrite"],
             setup=user_dir, words=("--out",), note="--overwrite must not delete files the run did not create")

    def data_in_out(tmp):
        (tmp / "mydata").mkdir()
        np.save(tmp / "mydata" / "samples.npy", np.random.default_rng(0).normal(size=(200, 2)))

    cli_case("train-data-file-in-out", ["train", "mydata/samples.npy", *FAST_N, "--out", "mydata"], setup=data_in_out,
             words=("--out", "mydata", "samples.npy"))

    def run_with_notes(tmp):
        with_run(tmp)
        (tmp / "run" / "notes.txt").write_text("the user's notes\n")

    cli_case("train-overwrite-keeps-foreign-files", ["train", "checkerboard", *FAST_N, "--out", "run", "--overwrite"],
             setup=run_with_notes, expect="either", words=("--out", "--overwrite", "notes.txt"),
             check=lambda tmp, out: None if (tmp / "run" / "notes.txt").is_file() else "--overwrite deleted notes.txt")
    CASES[-1].owned = ("run/checkpoint", "run/log", "run/metrics", "run/samples", "run/trajectories")

    def run_with_data(tmp):
        with_run(tmp)
        np.save(tmp / "run" / "pts.npy", np.random.default_rng(0).normal(size=(200, 2)))

    cli_case("train-overwrite-data-inside-out", ["train", "run/pts.npy", *FAST_N, "--out", "run", "--overwrite"],
             setup=run_with_data, expect="either", words=("--out", "pts.npy", "run"),
             note="--overwrite may replace the old run's outputs, never the data file inside the folder")
    CASES[-1].owned = ("run/checkpoint", "run/log", "run/metrics", "run/samples", "run/trajectories")
    cli_case("sample-overwrite-onto-checkpoint", ["sample", "run", "-n", "10", "--png", "none", "--out",
                                                  "run/checkpoint.safetensors", "--overwrite"],
             setup=lambda tmp: with_run(tmp), words=("--out", "checkpoint"))

    def dangling_link(tmp):
        with_run(tmp)
        os.symlink(tmp / "elsewhere" / "target.npy", tmp / "link.npy")

    cli_case("sample-out-dangling-symlink", ["sample", "run", "-n", "10", "--png", "none", "--out", "link.npy"],
             setup=dangling_link, expect="either", words=("--out", "link.npy"),
             check=lambda tmp, out: None if not (tmp / "elsewhere").exists() else "wrote through a dangling symlink")

    def ro_dir(tmp):
        (tmp / "ro").mkdir()
        os.chmod(tmp / "ro", 0o500)

    if os.geteuid() != 0:
        cli_case("train-out-readonly", ["train", "checkerboard", *FAST_N, "--out", "ro/r"], setup=ro_dir,
                 words=("--out", "ro"))
    cli_case("train-out-devnull", ["train", "checkerboard", *FAST_N, "--out", "/dev/null"], words=("--out",))
    cli_case("train-out-empty", ["train", "checkerboard", *FAST_N, "--out", ""], words=("--out",))
    cli_case("train-out-proc", ["train", "checkerboard", *FAST_N, "--out", "/proc/probe_r"], words=("--out",))

    # -- data files
    rng = np.random.default_rng(0)
    good = rng.normal(size=(300, 2))

    def npy(name, arr, **kw):
        def setup(tmp):
            np.save(tmp / name, arr, **kw)
        return setup

    def text(name, s):
        def setup(tmp):
            (tmp / name).write_text(s)
        return setup

    def raw(name, b):
        def setup(tmp):
            (tmp / name).write_bytes(b)
        return setup

    def npy_claim(tmp):  # header claims 1e11 rows, file holds 16 bytes of data
        hdr = {"descr": "<f8", "fortran_order": False, "shape": (10**11, 2)}
        (tmp / "huge.npy").write_bytes(_npy_with_header(hdr, b"\0" * 16))

    data_cases = [
        ("npy-1d", npy("d.npy", good[:, 0]), "d.npy", ("d.npy",)),
        ("npy-3d", npy("d.npy", good.reshape(150, 2, 2)), "d.npy", ("d.npy",)),
        ("npy-0cols", npy("d.npy", np.zeros((10, 0))), "d.npy", ("d.npy",)),
        ("npy-1row", npy("d.npy", good[:1]), "d.npy", ("d.npy",)),
        ("npy-empty", npy("d.npy", np.zeros((0, 2))), "d.npy", ("d.npy",)),
        ("npy-scalar", npy("d.npy", np.float64(1.0)), "d.npy", ("d.npy",)),
        ("npy-object", npy("d.npy", np.array([[1, "a"], [2, "b"]], dtype=object), allow_pickle=True), "d.npy",
         ("d.npy",)),
        ("npy-complex", npy("d.npy", good.astype(np.complex128)), "d.npy", ("d.npy",)),
        ("npy-structured", npy("d.npy", np.zeros(10, dtype=[("a", "f8"), ("b", "f8")])), "d.npy", ("d.npy",)),
        ("npy-strings", npy("d.npy", np.array([["1", "2"], ["3", "4"]])), "d.npy", ("d.npy",)),
        ("npy-nan", npy("d.npy", np.where(np.arange(600).reshape(300, 2) == 77, np.nan, good)), "d.npy",
         ("d.npy",)),
        ("npy-inf", npy("d.npy", np.where(np.arange(600).reshape(300, 2) == 77, np.inf, good)), "d.npy",
         ("d.npy",)),
        ("npy-outlier-1e30", npy("d.npy", np.where(np.arange(600).reshape(300, 2) == 77, 1e30, good)), "d.npy",
         ("d.npy",)),
        ("npy-f32-overflow", npy("d.npy", np.where(np.arange(600).reshape(300, 2) == 77, 1e300, good)), "d.npy",
         ("d.npy",)),
        ("npy-constant-col", npy("d.npy", np.c_[good[:, 0], np.ones(300)]), "d.npy", ("d.npy",)),
        ("npy-huge-header", npy_claim, "huge.npy", ("huge.npy",)),
        ("npy-truncated", raw("d.npy", _npy_bytes(good)[:-100]), "d.npy", ("d.npy",)),
        ("npy-garbage", raw("d.npy", b"not a numpy file at all" * 10), "d.npy", ("d.npy",)),
        ("npy-pickle", raw("d.npy", pickle.dumps(good)), "d.npy", ("d.npy",)),
        ("npy-empty-file", raw("d.npy", b""), "d.npy", ("d.npy",)),
        ("npz-two", lambda tmp: np.savez(tmp / "d.npz", a=good, b=good), "d.npz", ("d.npz",)),
        ("csv-typo-first-row", text("d.csv", "0.5,1.2x\n" + "\n".join(f"{a},{b}" for a, b in good) + "\n"),
         "d.csv", ("d.csv",)),
        ("csv-typo-mid", text("d.csv", "\n".join(f"{a},{b}" for a, b in good[:50]) + "\n1.0,abc\n"), "d.csv",
         ("d.csv",)),
        ("csv-ragged", text("d.csv", "\n".join(f"{a},{b}" for a, b in good[:50]) + "\n1.0\n"), "d.csv",
         ("d.csv",)),
        ("csv-empty-cell", text("d.csv", "\n".join(f"{a},{b}" for a, b in good[:50]) + "\n1.0,\n"), "d.csv",
         ("d.csv",)),
        ("csv-empty", text("d.csv", ""), "d.csv", ("d.csv",)),
        ("csv-header-only", text("d.csv", "x,y\n"), "d.csv", ("d.csv",)),
        ("csv-two-headers", text("d.csv", "x,y\nu,v\n1,2\n3,4\n5,6\n"), "d.csv", ("d.csv",)),
        ("csv-nan", text("d.csv", "\n".join(f"{a},{b}" for a, b in good[:50]) + "\nnan,1\n"), "d.csv", ("d.csv",)),
        ("csv-outlier", text("d.csv", "\n".join(f"{a},{b}" for a, b in good[:50]) + "\n1e30,1\n"), "d.csv",
         ("d.csv",)),
        ("csv-binary", raw("d.csv", bytes(range(256)) * 4), "d.csv", ("d.csv",)),
        ("data-dir", lambda tmp: (tmp / "d.npy").mkdir(), "d.npy", ("d.npy",)),
        ("data-fifo", lambda tmp: mkfifo(tmp / "d.npy"), "d.npy", ("d.npy",)),
        ("data-fifo-csv", lambda tmp: mkfifo(tmp / "d.csv"), "d.csv", ("d.csv",)),
        ("data-devzero", None, "/dev/zero", ("/dev/zero",)),
        ("data-ext", text("d.json", "[[1,2],[3,4]]"), "d.json", ("d.json",)),
    ]
    for cid, setup, name, words in data_cases:
        cli_case(f"data-{cid}", ["train", name, *FAST_N, "--out", "r"], setup=setup, words=words, timeout=40)

    def good_csv_header(tmp):
        (tmp / "d.csv").write_text("x,y\n" + "\n".join(f"{a},{b}" for a, b in good) + "\n")

    cli_case("data-csv-header-ok", ["train", "d.csv", *FAST_N, "--out", "r"], setup=good_csv_header, expect="ok")
    cli_case("data-npy-fortran-ok", ["train", "d.npy", *FAST_N, "--out", "r"],
             setup=npy("d.npy", np.asfortranarray(good)), expect="ok")

    # -- resume
    def run_setup(tmp):
        with_run(tmp)

    cli_case("resume-missing", ["train", "--resume", "nope.safetensors", "--iters", "4", "--out", "r2"],
             words=("nope.safetensors",))
    cli_case("resume-changes-hidden", ["train", "--resume", "run", "--iters", "4", "--hidden", "128", "--no-progress",
                                       "--final-ode", "0", "--final-samples", "50"], setup=run_setup,
             words=("--hidden",), note="must refuse (or say) that --hidden cannot change on resume")
    cli_case("resume-changes-lr", ["train", "--resume", "run", "--iters", "4", "--lr", "0.5", "--no-progress",
                                   "--final-ode", "0", "--final-samples", "50"], setup=run_setup, words=("--lr",))
    cli_case("resume-fewer-iters", ["train", "--resume", "run", "--iters", "1", "--no-progress"], setup=run_setup,
             words=("--iters",))

    # -- sample
    def sample_case(id, extra, words, setup=run_setup, expect="error", check=None):
        cli_case(f"sample{id}", ["sample", "run", *extra], words=words, setup=setup, expect=expect, check=check)

    for v in ["0", "-5", "abc", "100000000000"]:
        sample_case(f"-n={v}", ["-n", v, "--png", "none", "--out", "s.npy"], ("-n",))
    for v in ["inf", "nan", "-1", "abc", "1e300"]:
        sample_case(f"--lam={v}", ["-n", "10", "--lam", v, "--png", "none", "--out", "s.npy"], ("--lam",))
    for v in ["0", "-1", "100000000"]:
        sample_case(f"-N={v}", ["-n", "10", "-N", v, "--png", "none", "--out", "s.npy"], ("-N", "--num-steps"))
    sample_case("--seed=-1", ["-n", "10", "--seed", "-1", "--png", "none", "--out", "s.npy"], ("--seed",))

    def user_file(name):
        def setup(tmp):
            with_run(tmp)
            (tmp / name).write_text("user data\n")
        return setup

    sample_case("-out-existing", ["-n", "10", "--png", "none", "--out", "keep.npy"], ("--out", "keep.npy"),
                setup=user_file("keep.npy"))
    sample_case("-png-existing", ["-n", "10", "--png", "keep.png", "--out", "s.npy"], ("--png", "keep.png"),
                setup=user_file("keep.png"))

    def out_dir(tmp):
        with_run(tmp)
        (tmp / "outdir").mkdir()

    cli_case("sample-out-dir", ["sample", "run", "-n", "10", "--png", "none", "--out", "outdir"], setup=out_dir,
             expect="ok", check=lambda tmp, _: "wrote outdir.npy beside the folder"
             if (tmp / "outdir.npy").exists() else (None if any((tmp / "outdir").iterdir()) else "nothing in outdir"))
    sample_case("-out-nonnpy", ["-n", "10", "--png", "none", "--out", "s.txt"], ("--out", ".npy"))
    sample_case("-ok", ["-n", "10", "--png", "none", "--out", "s.npy"], (), expect="ok", check=samples_finite("s.npy"))
    sample_case("-ok-lam0", ["-n", "10", "--lam", "0", "--png", "none", "--out", "s.npy"], (), expect="ok",
                check=samples_finite("s.npy"))
    cli_case("sample-missing-ckpt", ["sample", "nope", "-n", "10"], words=("nope",))

    # -- options that must not be ignored (silent wrong results)
    def stdout_field(key, want):
        def check(tmp, out):
            try:
                got = json.loads(out[out.index("{"):]).get(key)
            except (ValueError, AttributeError):
                return f"no JSON summary on stdout: {out[-200:]!r}"
            return None if got == want else f"{key} reported as {got!r}, asked for {want!r}"
        return check

    sample_case("-N5-used", ["-n", "10", "-N", "5", "--png", "none", "--out", "s.npy"], (), expect="ok",
                check=stdout_field("num_steps", 5))

    def rerun_compare(extra, *, same):
        def check(tmp, _):
            a = np.load(tmp / "s.npy")
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main(["sample", str(tmp / "run"), "-n", "10", "--png", "none", "--out", str(tmp / "s2.npy"),
                               *extra])
            if rc != 0:
                return f"second sample failed rc={rc}"
            b = np.load(tmp / "s2.npy")
            if same and not np.array_equal(a, b):
                return "same options, different samples (not deterministic)"
            if not same and np.array_equal(a, b):
                return f"{extra} had no effect on the samples"
            return None
        return check

    sample_case("-seed-determinism", ["-n", "10", "--seed", "1", "--png", "none", "--out", "s.npy"], (), expect="ok",
                check=rerun_compare(["--seed", "1"], same=True))
    sample_case("-seed-used", ["-n", "10", "--seed", "1", "--png", "none", "--out", "s.npy"], (), expect="ok",
                check=rerun_compare(["--seed", "2"], same=False))
    sample_case("-no-ema-used", ["-n", "10", "--png", "none", "--out", "s.npy"], (), expect="ok",
                check=rerun_compare(["--no-ema"], same=False))
    sample_case("-lam-used", ["-n", "10", "--lam", "0", "--png", "none", "--out", "s.npy"], (), expect="ok",
                check=rerun_compare(["--lam", "1"], same=False))

    # -- eval
    def eval_case(id, extra, words, setup=run_setup, expect="error", check=None):
        cli_case(f"eval{id}", ["eval", "run", "--n-samples", "50", "--n-heldout", "50", "--n-nll", "20", "--n-ode", "0",
                               *extra], words=words, setup=setup, expect=expect, check=check)

    for flag in ["--n-samples", "--n-heldout", "--n-nll"]:
        for v in ["0", "-1", "100000000000"]:
            eval_case(f"{flag}={v}", [flag, v], (flag,))
    eval_case("--n-ode=-1", ["--n-ode", "-1"], ("--n-ode",))
    for v in ["nan", "inf", "-1"]:
        eval_case(f"--lam={v}", ["--lam", v], ("--lam",))
    eval_case("--seed=-1", ["--seed", "-1"], ("--seed",))
    eval_case("--data=nosuch", ["--data", "nosuch"], ("nosuch",))
    eval_case("--data=missing.npy", ["--data", "missing.npy"], ("missing.npy",))

    def eval_dim_mismatch(tmp):
        with_run(tmp)
        np.save(tmp / "d3.npy", np.random.default_rng(0).normal(size=(100, 3)))

    eval_case("--data=wrong-dim", ["--data", "d3.npy"], ("d3.npy", "dim", "--data"), setup=eval_dim_mismatch)
    eval_case("-json-existing", ["--json", "keep.json"], ("--json", "keep.json"), setup=user_file("keep.json"))
    eval_case("-ok", ["--json", "m.json"], (), expect="ok",
              check=lambda tmp, _: None if (tmp / "m.json").is_file() else "m.json not written")

    # -- the newer surface: devices, precision, networks, data sources, samplers, odd paths
    for flag, v, words in [
        ("--device", "cuda", ("--device", "cuda")),
        ("--device", "cuda:7", ("--device",)),
        ("--device", "bogus", ("--device",)),
        ("--precision", "fp8", ("--precision",)),
        ("--memory-budget", "-1", ("--memory-budget",)),
        ("--memory-budget", "nan", ("--memory-budget",)),
        ("--memory-budget", "2.5", ("--memory-budget",)),
        ("--network", "bogus", ("--network",)),
        ("--network-option", "bogus=1", ("--network-option", "bogus")),
        ("--network-option", "noequals", ("--network-option",)),
        ("--data-option", "bogus=1", ("--data-option", "bogus")),
        ("--data-option", "outliers=maybe", ("--data-option", "outliers")),
        ("--lr-schedule", "bogus", ("--lr-schedule",)),
        ("--lr-warmup", "-1", ("--lr-warmup",)),
        ("--time-dim", "3", ("--time-dim",)),
        ("--time-dim", "0", ("--time-dim",)),
        ("--log-every", "-1", ("--log-every",)),
        ("--width", "0", ("--width",)),
    ]:
        cli_case(f"train{flag}={v}", ["train", "checkerboard", *FAST_N, "--out", "r", flag, v], words=words)
    cli_case("train-precision-fp16-cpu", ["train", "checkerboard", *FAST_N, "--out", "r", "--precision", "fp16"],
             expect="ok", note="fp16 autocast runs on CPU in torch >= 2.x")
    cli_case("train-mnist-no-data-dir", ["train", "mnist", *FAST_N, "--out", "r"], words=("mnist", "--data-dir"))
    cli_case("train-mnist-missing-dir", ["train", "mnist", *FAST_N, "--out", "r", "--data-dir", "nope"],
             words=("nope", "--data-dir"))
    cli_case("train-cifar-empty-dir", ["train", "cifar10", *FAST_N, "--out", "r", "--data-dir", "."],
             words=("cifar", "--data-dir", "data_batch"))
    cli_case("train-power-missing", ["train", "power", *FAST_N, "--out", "r", "--data-dir", "."],
             words=("power", "--data-dir"))
    cli_case("train-out-too-long", ["train", "checkerboard", *FAST_N, "--out", "x" * 5000], words=("--out",))
    cli_case("train-out-newline", ["train", "checkerboard", *FAST_N, "--out", "a\nb"], words=("--out",),
             expect="ok", check=lambda tmp, _: None if (tmp / "a\nb" / "checkpoint.safetensors").exists()
             else "no run folder written")

    def symlink_devzero(tmp):
        os.symlink("/dev/zero", tmp / "z.npy")

    cli_case("data-symlink-devzero", ["train", "z.npy", *FAST_N, "--out", "r"], setup=symlink_devzero, words=("z.npy",),
             timeout=30)

    def images_npz_huge(tmp):
        hdr = {"descr": "|u1", "fortran_order": False, "shape": (10**11, 28, 28)}
        with zipfile.ZipFile(tmp / "imgs.npz", "w") as z:
            z.writestr("x.npy", _npy_with_header(hdr, b"\0" * 64))

    cli_case("data-images-npz-huge-header", ["train", "imgs.npz", *FAST_N, "--out", "r"], setup=images_npz_huge,
             words=("imgs.npz",))

    def images_npy_huge(tmp):
        (tmp / "imgs.npy").write_bytes(_npy_with_header({"descr": "|u1", "fortran_order": False,
                                                          "shape": (10**11, 1, 28, 28)}, b"\0" * 64))

    cli_case("data-images-npy-huge-header", ["train", "imgs.npy", *FAST_N, "--out", "r"], setup=images_npy_huge,
             words=("imgs.npy",))
    cli_case("data-images-npy-fifo", ["train", "imgs.npz", *FAST_N, "--out", "r"],
             setup=lambda tmp: os.mkfifo(tmp / "imgs.npz"), words=("imgs.npz",), timeout=30)

    def run_plus(fn):
        def setup(tmp):
            with_run(tmp)
            fn(tmp)
        return setup

    cli_case("eval-data-fifo", ["eval", "run", "--n-samples", "50", "--n-ode", "0", "--data", "d.npy"],
             setup=run_plus(lambda tmp: os.mkfifo(tmp / "d.npy")), words=("d.npy",), timeout=30)
    cli_case("eval-data-devzero", ["eval", "run", "--n-samples", "50", "--n-ode", "0", "--data", "/dev/zero"],
             setup=run_plus(lambda tmp: None), words=("/dev/zero",), timeout=30)
    cli_case("sample-out-is-dir-npy", ["sample", "run", "-n", "10", "--png", "none", "--out", "d.npy"],
             setup=run_plus(lambda tmp: (tmp / "d.npy").mkdir()), expect="ok",
             check=lambda tmp, _: None if any((tmp / "d.npy").iterdir()) else "--out DIR: nothing written into DIR",
             note="an existing folder given as --out receives the samples inside it")
    cli_case("sample-png-is-dir", ["sample", "run", "-n", "10", "--png", "p.png", "--out", "s.npy"],
             setup=run_plus(lambda tmp: (tmp / "p.png").mkdir()), words=("--png", "p.png"))
    cli_case("eval-json-is-dir", ["eval", "run", "--n-samples", "50", "--n-ode", "0", "--json", "j"],
             setup=run_plus(lambda tmp: (tmp / "j").mkdir()), words=("--json", "j"))
    run_with = run_plus(lambda tmp: None)
    cli_case("sample-method-bogus", ["sample", "run", "-n", "10", "--png", "none", "--out", "s.npy", "--method",
                                     "bogus"], setup=run_with, words=("--method",))
    cli_case("sample-sampler-option-bogus", ["sample", "run", "-n", "10", "--png", "none", "--out", "s.npy",
                                             "--sampler-option", "bogus=1"], setup=run_with,
             words=("--sampler-option", "bogus"))
    cli_case("sample-batch-size-0", ["sample", "run", "-n", "10", "--png", "none", "--out", "s.npy", "--batch-size",
                                     "0"], setup=run_with, words=("--batch-size",))
    cli_case("sample-device-cuda", ["sample", "run", "-n", "10", "--png", "none", "--out", "s.npy", "--device", "cuda"],
             setup=run_with, words=("--device", "cuda"))
    cli_case("eval-split-bogus", ["eval", "run", "--n-samples", "50", "--n-ode", "0", "--split", "bogus"],
             setup=run_with, words=("--split",))
    cli_case("eval-draws-0", ["eval", "run", "--n-samples", "50", "--n-ode", "0", "--draws", "0"], setup=run_with,
             words=("--draws",))
    cli_case("eval-fid-no-weights", ["eval", "run", "--n-samples", "50", "--n-ode", "0", "--fid"], setup=run_with,
             words=("--fid", "weights", "image"))
    cli_case("eval-fid-weights-missing", ["eval", "run", "--n-samples", "50", "--n-ode", "0", "--fid",
                                          "--fid-weights", "nope.pth"], setup=run_with,
             words=("--fid", "nope.pth", "image"))
    cli_case("bogus-command", ["bogus"], words=("bogus",))

    def changed_data(tmp):
        a = np.random.default_rng(0).normal(size=(200, 2))
        np.save(tmp / "pts.npy", a)
        rc = cli.main(["train", str(tmp / "pts.npy"), *FAST_N, "--out", str(tmp / "run")])
        assert rc == 0, f"setup training failed rc={rc}"
        np.save(tmp / "pts.npy", a * 2)

    cli_case("resume-data-changed", ["train", "--resume", "run", "--iters", "4", "--no-progress", "--final-ode", "0"],
             setup=changed_data, words=("pts.npy", "changed"))
    cli_case("eval-data-changed", ["eval", "run", "--n-samples", "50", "--n-ode", "0"], setup=changed_data,
             words=("pts.npy", "changed"))

    # -- tiny/extreme sizes and scales: results must be finite and not degenerate
    def finite_json(tmp, out):
        try:
            res = json.loads(out[out.index("{"):])
        except ValueError:
            return f"no JSON on stdout: {out[-200:]!r}"
        bad = []

        def walk(x, path):
            if isinstance(x, dict):
                for k, v in x.items():
                    walk(v, f"{path}.{k}")
            elif isinstance(x, list):
                for i, v in enumerate(x):
                    walk(v, f"{path}[{i}]")
            elif isinstance(x, float) and not math.isfinite(x):
                bad.append(path)
        walk(res, "")
        return f"non-finite numbers in the output: {bad[:4]}" if bad else None

    cli_case("eval-n-samples-1", ["eval", "run", "--n-samples", "1", "--n-heldout", "50", "--n-nll", "1", "--n-ode",
                                  "1"], setup=run_with, expect="either", check=finite_json,
             words=("--n-samples", "--n-nll", "--n-ode"), note="an error naming the flag, or finite metrics")
    cli_case("sample-n-1-png", ["sample", "run", "-n", "1", "--png", "p.png", "--out", "s.npy"], setup=run_with,
             expect="ok", check=samples_finite("s.npy"))
    no_b = [a for i, a in enumerate(FAST_N) if a != "-b" and FAST_N[i - 1] != "-b"]
    cli_case("train-b-1", ["train", "checkerboard", *no_b, "--out", "r", "-b", "1"], expect="ok",
             check=lambda tmp, out: None if (tmp / "r" / "checkpoint.safetensors").exists() else "no checkpoint")
    cli_case("train-holdout-0", ["train", "pts.npy", *FAST_N, "--out", "r", "--holdout", "0"],
             setup=npy("pts.npy", good), expect="ok",
             check=lambda tmp, out: None if (tmp / "r" / "checkpoint.safetensors").exists() else "no checkpoint")
    cli_case("train-two-points", ["train", "pts.npy", *FAST_N, "--out", "r"], setup=npy("pts.npy", good[:2]),
             words=("pts.npy", "points", "--holdout"))

    def scaled(scale):
        return npy("pts.npy", good * scale + 3 * scale)

    for scale in (1e-45, 1e-30, 1e30):
        cli_case(f"train-then-sample-scale-{scale:g}", ["train", "pts.npy", *FAST_N, "--out", "r"], setup=scaled(scale),
                 expect="ok", note="samples in data units must not underflow/overflow to 0/inf",
                 check=lambda tmp, out, s=scale: _sample_scale_ok(tmp, s))
    cli_case("train-out-non-utf8", ["train", "checkerboard", *FAST_N, "--out", os.fsdecode(b"r\xff")], expect="ok",
             check=lambda tmp, out: None if (tmp / os.fsdecode(b"r\xff") / "checkpoint.safetensors").exists()
             else "no run folder")
    cli_case("data-non-utf8-name", ["train", os.fsdecode(b"d\xff.npy"), *FAST_N, "--out", "r"],
             setup=lambda tmp: np.save(tmp / os.fsdecode(b"d\xff.npy"), good), expect="ok")

    # -- interrupted runs: Ctrl-C / kill -9 in the middle of training
    def interrupted_ok(kind):
        def check(tmp: Path, rc):
            from diffflow_ext.checkpoint import CheckpointError, load_checkpoint

            r = tmp / "r"
            if kind == "int" and rc not in (130, 1):
                return f"exit code {rc} after Ctrl-C (expected 130)"
            if not r.exists():
                return None  # interrupted before anything was written: untouched
            names = sorted(x.name for x in r.iterdir())
            ck = r / "checkpoint.safetensors"
            if not ck.exists():
                return f"folder left without a checkpoint: {names}"
            try:
                step = load_checkpoint(ck).step
            except CheckpointError as e:
                return f"checkpoint unreadable after interrupt: {e}"
            junk = [n for n in names if n.endswith(".tmp")]
            if junk and kind == "int":
                return f"temporary files left after Ctrl-C: {junk}"
            return None if step >= 0 else "bad step"
        return check

    long_run = ["train", "checkerboard", "--iters", "100000", "-b", "64", "--hidden", "8", "--depth", "1", "-N", "3",
                "--eval-every", "0", "--ckpt-every", "5", "--no-progress", "--out", "r"]
    for secs in (1.0, 4.0, 8.0):
        cli_case(f"interrupt-sigint-{secs:g}s", long_run, expect="ok", sig=(signal.SIGINT, secs),
                 check=interrupted_ok("int"), timeout=secs + 40)
        cli_case(f"interrupt-sigkill-{secs:g}s", long_run, expect="ok", sig=(signal.SIGKILL, secs),
                 check=interrupted_ok("kill"), timeout=secs + 40)

    # Ctrl-C, then --resume, must equal the uninterrupted run bit for bit
    exact = ["checkerboard", "--iters", "150", "-b", "64", "--hidden", "8", "--depth", "1", "-N", "3", "--eval-every",
             "0", "--no-progress", "--final-samples", "100", "--final-ode", "0"]

    def resume_equals_uninterrupted(tmp: Path, rc):
        from diffflow_ext.checkpoint import load_checkpoint

        r = tmp / "r"
        if not (r / "checkpoint.safetensors").exists():
            return None if not r.exists() else "folder without checkpoint after Ctrl-C"
        part = load_checkpoint(r).step
        err = io.StringIO()
        here = os.getcwd()
        os.chdir(tmp)  # as the user would: from the folder the run was started in
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc1 = cli.main(["train", "--resume", "r", "--iters", "150", "--no-progress"]) if part < 150 else 0
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                rc2 = cli.main(["train", *exact, "--out", "ref"])
        finally:
            os.chdir(here)
        if rc1 or rc2:
            return f"resume rc={rc1}, reference rc={rc2}: {err.getvalue().strip().splitlines()[-1][:150]}"
        a, b = load_checkpoint(r), load_checkpoint(tmp / "ref")
        diff = [k for k in b.tensors if k.startswith(("model/", "ema/", "optim/"))
                and not torch.equal(a.tensors[k], b.tensors[k])]
        return f"interrupted at step {part}, resumed: {len(diff)} tensors differ from the uninterrupted run " \
               f"(e.g. {diff[:2]})" if diff else None

    def run_in_subfolder(tmp: Path):
        (tmp / "A").mkdir()
        here = os.getcwd()
        os.chdir(tmp / "A")
        try:
            assert cli.main(["train", "checkerboard", *FAST_N, "--out", "r"]) == 0
        finally:
            os.chdir(here)

    def continued_in_place(tmp: Path, out):
        from diffflow_ext.checkpoint import load_checkpoint

        if (tmp / "r").exists():
            return "the resumed run was written to a new folder ./r, not continued in A/r"
        step = load_checkpoint(tmp / "A" / "r").step
        return None if step == 4 else f"A/r is at step {step} after resuming to --iters 4"

    cli_case("resume-from-another-folder", ["train", "--resume", "A/r", "--iters", "4", "--no-progress"],
             setup=run_in_subfolder, expect="ok", check=continued_in_place)
    CASES[-1].owned = ("A/r/",)

    for secs in (2.5, 4.0):
        cli_case(f"interrupt-sigint-{secs:g}s-resume-exact", ["train", *exact, "--out", "r"], expect="ok",
                 sig=(signal.SIGINT, secs), check=resume_equals_uninterrupted, timeout=secs + 60)

    # -- damaged / crafted checkpoints (sample, eval, resume, API)
    def trunc(n):
        return lambda p: p.write_bytes(ckpt_bytes()[:n])

    ck_case("empty", trunc(0))
    ck_case("trunc-half", lambda p: p.write_bytes(ckpt_bytes()[: len(ckpt_bytes()) // 2]))
    ck_case("trunc-1", lambda p: p.write_bytes(ckpt_bytes()[:-1]))
    ck_case("flip-payload", lambda p: p.write_bytes(ckpt_bytes()[:-5] + bytes([ckpt_bytes()[-5] ^ 1])
                                                    + ckpt_bytes()[-4:]))
    ck_case("pickle", lambda p: p.write_bytes(pickle.dumps({"a": 1})), words=("pickle",))

    def zip_pt(p):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
        p.write_bytes(buf.getvalue())

    ck_case("torch-zip", zip_pt, words=("pickle",))
    ck_case("fifo", lambda p: os.mkfifo(p), words=("bad.safetensors",))
    ck_case("dir-no-ckpt", lambda p: p.mkdir(), words=("bad.safetensors",))
    ck_case("random-bytes", lambda p: p.write_bytes(np.random.default_rng(1).bytes(5000)))
    ck_case("header-len-huge", lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}" * 10))
    ck_case("header-len-1e8", lambda p: p.write_bytes(struct.pack("<Q", 99_999_999) + b"{" + b" " * 1000))

    # tampered without recomputing the checksum: must be caught by the checksum
    def tamper_std(p):
        header, data = split_st(ckpt_bytes())
        meta = json.loads(header["__metadata__"]["meta"])
        d = meta["extra"]["data"]
        std = (d.get("transform") or d)["std"]
        std[0] = std[0] * 1.1
        header["__metadata__"]["meta"] = json.dumps(meta)
        p.write_bytes(join_st(header, data))

    def tamper_step(p):
        header, data = split_st(ckpt_bytes())
        meta = json.loads(header["__metadata__"]["meta"])
        meta["step"] = meta["step"] + 1000
        header["__metadata__"]["meta"] = json.dumps(meta)
        p.write_bytes(join_st(header, data))

    ck_case("tamper-std", tamper_std, words=("checksum", "corrupt", "modified"))
    ck_case("tamper-step", tamper_step, words=("checksum", "corrupt", "modified"))

    # crafted with a recomputed checksum: must be caught by the schema/bounds
    def set_in(keys, value):
        def edit(meta):
            d = meta
            for k in keys[:-1]:
                d = d[k]
            last = keys[-1]
            if isinstance(last, str) and last.startswith("*"):  # the key wherever it is below d
                last = last[1:]
                stack = [d]
                while stack:
                    x = stack.pop()
                    if isinstance(x, dict):
                        if last in x:
                            d = x
                            break
                        stack.extend(x.values())
                else:
                    raise KeyError(last)
            d[last] = value
        return edit

    def deep(n):
        v = 1
        for _ in range(n):
            v = [v]
        return v

    crafted = [
        ("hidden-huge", ["model_config", "hidden"], 10**12, ("hidden",)),
        ("net-hidden-huge", ["model_config", "drift", "kwargs", "hidden"], 10**12, ("hidden", "fit")),
        ("net-dim-huge", ["model_config", "score", "kwargs", "dim"], 10**9, ("dim", "fit")),
        ("net-name-bogus", ["model_config", "drift", "name"], "bogus", ("bogus", "network")),
        ("data-shape-huge", ["model_config", "data_shape"], [10**9], ("data_shape", "fit", "shape", "values")),
        ("num-steps-huge", ["model_config", "num_steps"], 10**12, ("num_steps",)),
        ("dim-huge", ["model_config", "dim"], 10**12, ("dim",)),
        ("dim-str", ["model_config", "dim"], "two", ("dim",)),
        ("hidden-neg", ["model_config", "hidden"], -3, ("hidden",)),
        ("model-config-list", ["model_config"], [1, 2], ("model_config",)),
        ("model-config-missing", ["model_config"], None, ("model_config",)),
        ("step-neg", ["step"], -5, ("step",)),
        ("step-str", ["step"], "x", ("step",)),
        ("step-float", ["step"], 1.5, ("step",)),
        ("std-zero", ["extra", "data", "*std"], [0.0, 1.0], ("std",)),
        ("std-nan", ["extra", "data", "*std"], [float("nan"), 1.0], ("std",)),
        ("std-len", ["extra", "data", "*std"], [1.0] * 1000, ("std",)),
        ("std-str", ["extra", "data", "*std"], "x", ("std",)),
        ("mean-inf", ["extra", "data", "*mean"], [float("inf"), 0.0], ("mean",)),
        ("data-shape-bad", ["extra", "data", "shape"], [10**12], ("shape",)),
        ("data-name-etc-passwd", ["extra", "data"], {"name": "/etc/passwd", "kind": "file", "seed": 0,
                                                      "holdout": 0.1, "dim": 2, "mean": [0, 0], "std": [1, 1],
                                                      "sha256": "0" * 64}, ("passwd", "data")),
        ("data-kind-bogus", ["extra", "data", "kind"], "bogus", ("kind",)),
        ("data-missing", ["extra", "data"], None, ("data",)),
        ("train-config-bad", ["extra", "train_config", "batch_size"], -1, ("batch_size",)),
        ("train-config-str", ["extra", "train_config"], "x", ("train_config",)),
        ("ema-decay-bad", ["ema", "decay"], 5.0, ("ema",)),
        ("ema-missing-num", ["ema"], {}, ("ema",)),
        ("optim-groups-str", ["optimizer", "param_groups"], "x", ("optimizer",)),
        ("optim-lr-nan", ["optimizer", "param_groups", 0, "lr"], float("nan"), ("lr", "optimizer")),
        ("sched-str", ["scheduler"], "x", ("scheduler",)),
        ("rng-python-bad", ["rng_python"], [1, 2], ("rng",)),
        ("rng-numpy-global-bad", ["rng_numpy_global"], ["MT19937", [1, 2], 0, 0, 0.0], ("rng",)),
        ("rng-numpy-bad", ["rng_numpy", "data"], {"bit_generator": "PCG64", "state": {}}, ("rng",)),
        ("deep-nesting", ["extra", "x"], deep(100_000), ("nest", "deep")),
        ("meta-not-dict", [], None, ("meta",)),
    ]
    for cid, keys, value, words in crafted:
        if keys:
            edit = set_in(keys, value)
        else:
            def edit(meta):
                meta.clear()
        if cid == "deep-nesting":
            def make(p, _v=value):  # json.dumps itself recurses; write the nesting by hand
                header, data = split_st(ckpt_bytes())
                meta = header["__metadata__"]["meta"]
                meta = meta[:-1] + ', "deep": ' + "[" * 100_000 + "1" + "]" * 100_000 + "}"
                header["__metadata__"]["meta"] = meta
                recompute_digest(header, data)
                p.write_bytes(join_st(header, data))
        else:
            def make(p, _e=edit):
                write_crafted(p, _e)
        # train --resume builds the model from the stored training config: a crafted model_config is unused there
        cmds = ("sample", "eval") if keys[:1] == ["model_config"] else ("sample", "eval", "resume")
        # the loader does not interpret meta.extra (its consumers do): no API variant for those
        ck_case(f"crafted-{cid}", make, words=words, cmds=cmds, api=keys[:1] != ["extra"])

    def secret_source(p):
        """The stored data source points at a file whose content must never appear in an error."""
        secret = p.parent / "secret.csv"
        secret.write_text("s3cr3t-token,hunter2\n1,2\n")

        def edit(meta):
            d = meta["extra"]["data"]
            if isinstance(d.get("source"), dict):
                d["source"]["name"] = str(secret)
            else:
                d["name"] = str(secret)
                d["kind"] = "file"
        write_crafted(p, edit)

    ck_case("crafted-data-source-secret-file", secret_source, words=("secret.csv", "data", "changed", "sha"), api=False)
    # sampling needs only the stored transform, not the data source: exit 0 is right there (a leak is still caught)
    for c in CASES:
        if c.id in ("ckpt-crafted-data-source-secret-file-sample", "ckpt-crafted-data-name-etc-passwd-sample",
                    "ckpt-crafted-data-shape-bad-sample", "ckpt-crafted-data-kind-bogus-sample"):
            c.expect = "ok"

    # crafted image transforms (dequantisation state) on an image run
    def img_crafted(edit):
        def setup(tmp):
            header, data = split_st((IMG_RUN / "checkpoint.safetensors").read_bytes())
            meta = json.loads(header["__metadata__"]["meta"])
            edit(meta["extra"]["data"]["transform"])
            header["__metadata__"]["meta"] = json.dumps(meta)
            recompute_digest(header, data)
            (tmp / "bad.safetensors").write_bytes(join_st(header, data))
        return setup

    for cid, edit, words in [
        ("levels-0", lambda t: t.update(levels=0), ("levels",)),
        ("levels-huge", lambda t: t.update(levels=10**12), ("levels",)),
        ("levels-float", lambda t: t.update(levels=16.5), ("levels",)),
        ("low-ge-high", lambda t: t.update(low=1.0, high=-1.0), ("low", "high")),
        ("high-nan", lambda t: t.update(high=float("nan")), ("high",)),
        ("shape-mismatch", lambda t: t.update(shape=[3, 8, 8]), ("shape",)),
        ("name-bogus", lambda t: t.update(name="bogus"), ("transform", "bogus")),
    ]:
        cli_case(f"img-crafted-{cid}-sample", ["sample", "bad.safetensors", "-n", "4", "--png", "none", "--out",
                                               "s.npy"], setup=img_crafted(edit), words=words)
        cli_case(f"img-crafted-{cid}-eval", ["eval", "bad.safetensors", "--n-samples", "8", "--n-nll", "4",
                                             "--n-ode", "0"], setup=img_crafted(edit), words=words)

    def shape_lie(p):
        def edit(h):
            k = next(k for k in h if k.startswith("model/"))
            h[k]["shape"] = [10**12, 10**12]
        write_crafted_header(p, edit)

    def offsets_lie(p):
        def edit(h):
            k = next(k for k in h if k.startswith("model/"))
            h[k]["data_offsets"] = [0, 10**15]
        write_crafted_header(p, edit)

    def dtype_lie(p):
        def edit(h):
            k = next(k for k in h if k.startswith("model/"))
            h[k]["dtype"] = "F64"
        write_crafted_header(p, edit)

    ck_case("header-shape-huge", shape_lie)
    ck_case("header-offsets-huge", offsets_lie)
    ck_case("header-dtype-lie", dtype_lie)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npy_with_header(hdr: dict, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, hdr)
    return buf.getvalue() + payload  # write_array_header_1_0 writes the magic string too


# ----------------------------------------------------------------------------- API cases


def build_api_cases() -> None:
    from diffflow_ext import DiffFlow, ops

    def mlp(**kw):
        return lambda tmp: DiffFlow.mlp(**({"dim": 2, "hidden": 8, "depth": 1, "num_steps": 3} | kw))

    for kw, words in [({"dim": 0}, "dim"), ({"dim": -1}, "dim"), ({"hidden": 0}, "hidden"), ({"depth": -1}, "depth"),
                      ({"num_steps": 0}, "num_steps"), ({"num_steps": -2}, "num_steps"),
                      ({"num_steps": 2.5}, "num_steps"),
                      ({"t_start": -1.0}, "t_start"), ({"t_start": 0.5, "t_end": 0.1}, "t_"),
                      ({"t_end": float("nan")}, "t_end"), ({"diffusion": -1.0}, "diffusion"),
                      ({"diffusion": float("nan")}, "diffusion"), ({"diffusion": 0.0}, "diffusion"),
                      ({"diffusion": [0.1, 0.2]}, "diffusion"), ({"gradient": "bogus"}, "gradient"),
                      ({"backend": "bogus"}, "backend"), ({"grid": "bogus"}, "grid"),
                      ({"time_exponent": 0.0}, "time_exponent"), ({"prior_std": -1.0}, "prior_std"),
                      ({"time_dim": 0}, "time_dim")]:
        api_case(f"api-mlp-{'-'.join(f'{k}={v}' for k, v in kw.items())}", mlp(**kw), words=(words,))

    def model():
        torch.manual_seed(0)
        return DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3)

    def loss_of(x):
        def f(tmp):
            m = model()
            loss = m.loss(x() if callable(x) else x, torch.Generator().manual_seed(0))
            loss.backward()
            grads = [p.grad for p in m.parameters()]
            if not torch.isfinite(loss) or any(g is not None and not torch.isfinite(g).all() for g in grads):
                raise _Silent("non-finite loss or gradients returned")
            return float(loss)
        return f

    for cid, x, words in [
        ("loss-wrong-dim", lambda: torch.randn(8, 3), ("x", "shape")),
        ("loss-1d", lambda: torch.randn(8), ("x", "shape")),
        ("loss-empty", lambda: torch.randn(0, 2), ("x", "batch", "B")),
        ("loss-nan", lambda: torch.tensor([[float("nan"), 0.0]] + [[0.0, 0.0]] * 7), ("x", "finite", "nan")),
        ("loss-inf", lambda: torch.tensor([[float("inf"), 0.0]] + [[0.0, 0.0]] * 7), ("x", "finite", "inf")),
        ("loss-int", lambda: torch.ones(8, 2, dtype=torch.int64), ("x", "dtype")),
        ("loss-f64", lambda: torch.randn(8, 2, dtype=torch.float64), ("x", "dtype")),
        ("loss-list", lambda: [[0.0, 1.0]], ("x", "tensor")),
    ]:
        api_case(f"api-{cid}", loss_of(x), words=words)
    api_case("api-loss-ok", loss_of(lambda: torch.randn(8, 2)), expect="ok")

    def sample(**kw):
        def f(tmp):
            s = model().sample(**({"n": 8} | kw))
            if not torch.isfinite(s).all():
                raise _Silent("non-finite samples")
            return s
        return f

    for kw, words in [({"n": 0}, "n"), ({"n": -1}, "n"), ({"n": 2.5}, "n"), ({"lam": float("nan")}, "lam"),
                      ({"lam": float("inf")}, "lam"), ({"lam": -1.0}, "lam"), ({"num_steps": 0}, "num_steps"),
                      ({"num_steps": -1}, "num_steps"), ({"method": "bogus"}, "method"),
                      ({"x_init": torch.randn(8, 3)}, "x_init"),
                      ({"x_init": torch.full((8, 2), float("nan"))}, "x_init")]:
        label = "-".join(f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else v}" for k, v in kw.items())
        api_case(f"api-sample-{label}", sample(**kw), words=(words,))
    api_case("api-sample-ok", sample(), expect="ok")

    def log_prob(x):
        def f(tmp):
            r = model().log_prob(x)
            if not torch.isfinite(r).all():
                raise _Silent("non-finite log_prob")
            return r
        return f

    api_case("api-log_prob-wrong-dim", log_prob(torch.randn(4, 3)), words=("x", "shape"))
    api_case("api-log_prob-nan", log_prob(torch.full((4, 2), float("nan"))), words=("x", "finite", "nan"))
    api_case("api-nll_bound-wrong-dim", lambda tmp: model().nll_bound(torch.randn(4, 3)), words=("x", "shape"))

    # ops
    x = torch.randn(4, 3)

    def op(fn, *a, **kw):
        def f(tmp):
            r = fn(*a, **kw)
            rs = r if isinstance(r, tuple) else (r,)
            if any(not torch.isfinite(t).all() for t in rs):
                raise _Silent("non-finite op result")
            return r
        return f

    z = torch.zeros_like
    for cid, call, words in [
        ("em-shape", op(ops.em_step, x, torch.randn(4, 2), z(x), 0.1, 0.2), ("drift",)),
        ("em-dtype", op(ops.em_step, x, x.double(), z(x), 0.1, 0.2), ("drift",)),
        ("em-dt-neg", op(ops.em_step, x, x, z(x), -0.1, 0.2), ("dt",)),
        ("em-dt-nan", op(ops.em_step, x, x, z(x), float("nan"), 0.2), ("dt",)),
        ("em-dt-inf", op(ops.em_step, x, x, z(x), float("inf"), 0.2), ("dt",)),
        ("em-g-neg", op(ops.em_step, x, x, z(x), 0.1, -0.2), ("g",)),
        ("em-g-nan", op(ops.em_step, x, x, z(x), 0.1, float("nan")), ("g",)),
        ("em-dt-tensor-len", op(ops.em_step, x, x, z(x), torch.full((3,), 0.1), 0.2), ("dt",)),
        ("em-dt-tensor-2d", op(ops.em_step, x, x, z(x), torch.full((4, 1), 0.1), 0.2), ("dt",)),
        ("em-dt-tensor-int", op(ops.em_step, x, x, z(x), torch.ones(4, dtype=torch.int64), 0.2), ("dt",)),
        ("em-dt-str", op(ops.em_step, x, x, z(x), "0.1", 0.2), ("dt",)),
        ("em-x-int", op(ops.em_step, x.long(), x.long(), z(x).long(), 0.1, 0.2), ("x",)),
        ("em-x-0d", op(ops.em_step, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0), 0.1, 0.2), ("x",)),
        ("em-x-empty", op(ops.em_step, torch.randn(0, 3), torch.randn(0, 3), torch.randn(0, 3), 0.1, 0.2), ("x",)),
        ("em-backend-bogus", op(ops.em_step, x, x, z(x), 0.1, 0.2, backend="bogus"), ("backend",)),
        ("em-backend-cuda", op(ops.em_step, x, x, z(x), 0.1, 0.2, backend="cuda"), ("backend", "cuda")),
        ("bn-g-zero", op(ops.backward_noise, x, x, x, x, 0.1, 0.0), ("g",)),
        ("bn-dt-zero", op(ops.backward_noise, x, x, x, x, 0.0, 0.2), ("dt",)),
        ("bn-shape", op(ops.backward_noise, x, torch.randn(4, 2), x, x, 0.1, 0.2), ("x_next",)),
        ("flow-shape", op(ops.flow_step, x, x, x, x, torch.randn(5, 3), 0.1, 0.1, 0.2), ("noise",)),
        ("flow-g-zero", op(ops.flow_step, x, x, x, x, x, 0.1, 0.1, 0.0), ("g",)),
        ("adj-weight-shape", op(ops.adjoint_step, x, x, x, x, torch.ones(3), x, x, 0.1, 0.1, 0.2), ("weight",)),
        ("adj-g-zero", op(ops.adjoint_step, x, x, x, x, torch.ones(4), x, x, 0.1, 0.1, 0.0), ("g",)),
    ]:
        api_case(f"api-op-{cid}", call, words=words)

    def noncontig(tmp):
        xb = torch.randn(3, 4).t()  # (4, 3) non-contiguous
        d, n = torch.randn(3, 4).t(), torch.randn(3, 4).t()
        got = ops.em_step(xb, d, n, 0.1, 0.2)
        ref = ops.reference.em_step_ref(xb, d, n, torch.full((4,), 0.1), torch.full((4,), 0.2)) \
            if hasattr(ops.reference, "em_step_ref") else xb + d * 0.1 + 0.2 * 0.1 ** 0.5 * n
        if not torch.allclose(got, ref, atol=1e-6):
            raise _Silent("non-contiguous input gives a wrong result")
        return got

    api_case("api-op-em-noncontig-ok", noncontig, expect="ok")

    # the adjoint's numerics (issue 10): dropout, batch norm, learnable g, long sums
    from torch import nn

    class Net(nn.Module):
        def __init__(self, extra: nn.Module):
            super().__init__()
            self.inp = nn.Linear(3, 16)
            self.extra = extra
            self.out = nn.Linear(16, 2)

        def forward(self, x, t):
            return self.out(self.extra(torch.tanh(self.inp(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], 1)))))

    def grads_in(mode, extra_factory):
        torch.manual_seed(0)
        m = DiffFlow(Net(extra_factory()), Net(extra_factory()), (2,), num_steps=4, gradient=mode)
        x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        m.loss(x, torch.Generator().manual_seed(2)).backward()
        return m, [p.grad.clone() for p in m.parameters()]

    def adjoint_matches_autograd(extra_factory, what):
        def f(tmp):
            _, ga = grads_in("autograd", extra_factory)
            for mode in ("adjoint", "auto"):
                _, gb = grads_in(mode, extra_factory)
                err = max(float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(ga, gb))
                if err > 1e-4:
                    raise _Silent(f"{what}: gradient={mode} differs from autograd by {err:.2%}")
            return True
        return f

    api_case("api-adjoint-dropout-ok", adjoint_matches_autograd(lambda: nn.Dropout(0.3), "dropout"), expect="ok",
             words=("dropout",))

    def batchnorm_counts(tmp):
        counts = {}
        for mode in ("autograd", "adjoint", "auto"):
            m, _ = grads_in(mode, lambda: nn.BatchNorm1d(16))
            counts[mode] = int(m.drift.extra.num_batches_tracked)
        if len(set(counts.values())) != 1:
            raise _Silent(f"batch-norm updates per loss differ by gradient mode: {counts}")
        return counts

    api_case("api-adjoint-batchnorm-ok", batchnorm_counts, expect="ok")

    class LearnableG(nn.Module):
        def __init__(self):
            super().__init__()
            self.log_g = nn.Parameter(torch.tensor(-1.0))

        def forward(self, t):
            return self.log_g.exp() * torch.ones_like(t)

    api_case("api-learnable-diffusion", lambda tmp: DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3,
                                                                 diffusion=LearnableG()), words=("diffusion",))

    def long_sum(tmp):
        D = 196_608
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(2, D, generator=gen) for _ in range(4)]
        _, h = ops.backward_noise(*xs, 0.01, 0.3)
        dt64, g64 = (torch.full((2,), v, dtype=torch.float64) for v in (0.01, 0.3))
        _, h64 = ops.reference.backward_noise_ref(*[x.double() for x in xs], dt64, g64)
        rel = float(((h.double() - h64).abs() / h64).max())
        if rel > 1e-6:
            raise _Silent(f"half squared norm at D={D}: relative error {rel:.2e} (torch float32 sum: ~2e-7)")
        return rel

    api_case("api-op-long-sum-accuracy-ok", long_sum, expect="ok")

    # more of the public API: likelihood, bounds, samplers, data registry, evaluation, networks
    from diffflow_ext import likelihood as lik
    from diffflow_ext import samplers as smp

    x4 = torch.randn(4, 2)
    for kw, words in [({"method": "bogus"}, "method"), ({"num_probes": 0}, "num_probes"), ({"probe": "bogus"}, "probe"),
                      ({"solver": "bogus"}, "solver"), ({"rtol": -1.0}, "rtol"), ({"atol": float("nan")}, "atol"),
                      ({"rtol": 0.0, "atol": 0.0}, "tol")]:
        label = "-".join(f"{k}={v}" for k, v in kw.items())
        api_case(f"api-log_prob-{label}", (lambda kw: lambda tmp: lik.log_prob(model(), x4, **kw))(kw), words=(words,))
    for kw, words in [({"num_steps": 0}, "num_steps"), ({"generator": "seed"}, "generator")]:
        label = "-".join(f"{k}={v}" for k, v in kw.items())
        api_case(f"api-nll_bound-{label}", (lambda kw: lambda tmp: model().nll_bound(x4, **kw))(kw), words=(words,))
        api_case(f"api-forward_trajectory-{label}",
                 (lambda kw: lambda tmp: model().forward_trajectory(x4, **kw))(kw), words=(words,))
    api_case("api-get_sampler-bogus", lambda tmp: smp.get_sampler("bogus"), words=("bogus",))
    api_case("api-get_sampler-bad-option", lambda tmp: smp.get_sampler("em", bogus=1), words=("bogus",))
    api_case("api-sample-heun-lam-nan", lambda tmp: model().sample(4, method="heun", lam=float("nan")), words=("lam",))
    api_case("api-sample-ode-ok", sample(method="ode"), expect="ok")

    from diffflow_ext import data as dsrc

    api_case("api-get_data_source-bogus", lambda tmp: dsrc.get_data_source("bogus"), words=("bogus",))
    api_case("api-get_data_source-bad-option", lambda tmp: dsrc.get_data_source("checkerboard", bogus=1),
             words=("bogus",))
    api_case("api-get_data_source-mnist-no-dir", lambda tmp: dsrc.get_data_source("mnist"), words=("mnist", "data_dir"))
    api_case("api-data_source_from_state-garbage", lambda tmp: dsrc.data_source_from_state({"kind": 3}),
             words=("state", "kind"))
    api_case("api-load_mnist-missing", lambda tmp: dsrc.load_mnist(tmp / "nope"), words=("nope",))

    from diffflow_ext import evaluation as ev
    from diffflow_ext.networks import build_network

    api_case("api-evaluate_checkpoint-missing", lambda tmp: ev.evaluate_checkpoint(tmp / "nope"), words=("nope",))
    api_case("api-sliced_wasserstein-shape", lambda tmp: ev.sliced_wasserstein(torch.randn(5, 2), torch.randn(5, 3)),
             words=("shape", "dim"))
    api_case("api-sliced_wasserstein-nan", lambda tmp: _finite_or_silent(ev.sliced_wasserstein(
        torch.full((5, 2), float("nan")), torch.randn(5, 2))), words=("finite", "nan", "NaN"))
    api_case("api-build_network-bogus", lambda tmp: build_network("bogus"), words=("bogus",))
    api_case("api-build_network-bad-kwarg", lambda tmp: build_network("mlp", data_shape=(2,), bogus=1),
             words=("bogus",))
    api_case("api-build_network-unet-odd-shape", lambda tmp: build_network("unet", data_shape=(1, 7, 9)),
             words=("data_shape", "image_size", "7", "9", "shape"))

    # data-file loader (API)
    from diffflow_ext.data.files import load_points

    def lp(name, make, **kw):
        def f(tmp):
            make(tmp / name)
            return load_points(tmp / name, **kw)
        return f

    api_case("api-load_points-fifo", lp("d.npy", os.mkfifo), words=("d.npy",), timeout=15)
    api_case("api-load_points-devzero", lambda tmp: load_points("/dev/zero"), words=("/dev/zero",), timeout=15)

    def fortran_equal(tmp):
        a = np.arange(12, dtype=np.float64).reshape(6, 2) * 1.5
        np.save(tmp / "f.npy", np.asfortranarray(a))
        got = load_points(tmp / "f.npy", dtype=torch.float64).numpy()
        if not np.array_equal(got, a):
            raise _Silent("fortran-order array read wrongly")
        return got

    api_case("api-load_points-fortran-ok", fortran_equal, expect="ok")

    def csv_header_typo_kept(tmp):
        (tmp / "d.csv").write_text("0.5,1.5x\n1,2\n3,4\n5,6\n")
        r = load_points(tmp / "d.csv")
        raise _Silent(f"first row with a typo dropped, returned {tuple(r.shape)}")

    api_case("api-load_points-csv-typo-row1", csv_header_typo_kept, words=("d.csv",))

    def etc_passwd_csv(tmp):  # an error about a file must not print its content
        (tmp / "secret.csv").write_text("s3cr3t-token-abc,1\n1,2\nhunter2-password,4\n")
        return load_points(tmp / "secret.csv")

    api_case("api-load_points-no-content-in-error", etc_passwd_csv, words=("secret.csv",),
             check=None, note="the error must not quote the file's content")


def _finite_or_silent(v):
    t = torch.as_tensor(v, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise _Silent(f"non-finite result {v}")
    return v


class _Silent(Exception):
    """Raised by an API case's own result check: the call returned a wrong result without error."""


# ----------------------------------------------------------------------------- runner


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            out[str(p.relative_to(root))] = ("dir",)
        for f in filenames:
            p = Path(dirpath) / f
            try:
                st = p.lstat()
                import stat as _st

                if _st.S_ISREG(st.st_mode):
                    out[str(p.relative_to(root))] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
                else:
                    out[str(p.relative_to(root))] = ("special", st.st_mode)
            except OSError:
                out[str(p.relative_to(root))] = ("unreadable",)
    return out


@dataclass
class Result:
    id: str
    outcome: str
    rc: int | None
    seconds: float
    detail: str = ""
    stderr: str = field(default="", repr=False)


def run_child(case: Case, tmp: Path) -> tuple[int | None, str, str, bool, float]:
    out_f, err_f = tmp.parent / f"{tmp.name}.out", tmp.parent / f"{tmp.name}.err"
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        rc = 97
        try:
            os.chdir(tmp)
            fo = os.open(out_f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fe = os.open(err_f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            # the interpreter's own defaults: strict stdout, backslashreplace stderr (as for a real `diffflow` process)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), encoding="utf-8", write_through=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), encoding="utf-8", errors="backslashreplace",
                                          write_through=True)
            os.setpgid(0, 0)
            if case.kind == "cli":
                try:
                    rc = cli.main(case.argv)
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    traceback.print_exc()
                    rc = 1
            else:
                try:
                    res = case.fn(tmp)
                    if case.check is not None:
                        prob = case.check(tmp, res)
                        if prob:
                            print(f"SILENT: {prob}", file=sys.stderr)
                            rc = 95
                            raise SystemExit
                    rc = 0
                except SystemExit:
                    pass
                except _Silent as e:
                    print(f"SILENT: {e}", file=sys.stderr)
                    rc = 95
                except CLEAN_API_ERRORS as e:
                    if isinstance(e, INTERNAL_ERRORS):
                        traceback.print_exc()
                        rc = 96
                    else:
                        print(f"{type(e).__name__}: {e}", file=sys.stderr)
                        rc = 90
                except RecursionError:
                    traceback.print_exc()
                    rc = 96
                except RuntimeError as e:  # clean only when the library raised it on purpose
                    last = traceback.extract_tb(e.__traceback__)[-1]
                    if "diffflow_ext" in last.filename and (last.line or "").lstrip().startswith("raise"):
                        print(f"{type(e).__name__}: {e}", file=sys.stderr)
                        rc = 90
                    else:
                        traceback.print_exc()
                        rc = 96
                except BaseException:
                    traceback.print_exc()
                    rc = 96
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)
    deadline = t0 + case.timeout
    hung = False
    sent = case.signal is None
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            break
        if not sent and time.perf_counter() > t0 + case.signal[1]:
            try:
                os.killpg(pid, case.signal[0])
            except OSError:
                pass
            sent = True
        if time.perf_counter() > deadline:
            hung = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -1
            break
        time.sleep(0.02)
    secs = time.perf_counter() - t0
    rc = None if hung else (os.waitstatus_to_exitcode(status))
    out = out_f.read_text(errors="replace") if out_f.exists() else ""
    err = err_f.read_text(errors="replace") if err_f.exists() else ""
    return rc, out, err, hung, secs


def classify(case: Case, tmp: Path, before: dict, rc, out: str, err: str, hung: bool) -> tuple[str, str]:
    if "s3cr3t" in err or "hunter2" in err or "s3cr3t" in out:
        return "unclear", "the error quotes the content of a file"
    after = snapshot(tmp)
    changed = [k for k, v in before.items() if after.get(k) != v and not k.startswith(case.owned or ("\0",))]
    if changed:
        return "lost_file", f"changed/removed: {changed[:3]}"
    if hung:
        return "hang", f"no result after {case.timeout:.0f} s"
    new = sorted(set(after) - set(before))
    words_ok = lambda msg: not case.words or any(w.lower() in msg.lower() for w in case.words)  # noqa: E731
    if case.signal is not None:
        prob = case.check(tmp, rc) if case.check else None
        if "Traceback (most recent call last)" in err and case.signal[0] != signal.SIGKILL:
            return "traceback", (err.strip().splitlines() or [""])[-1][:200]
        return ("silent", prob) if prob else ("clean", f"rc={rc}")
    if case.kind == "cli":
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if "Traceback (most recent call last)" in err:
            return "traceback", (lines[-1] if lines else "")[:200]
        if case.expect == "ok" or (case.expect == "either" and rc == 0):
            if rc != 0:
                return "silent", f"good input failed rc={rc}: {(lines[-1] if lines else '')[:200]}"
            prob = case.check(tmp, out) if case.check else None
            return ("silent", prob) if prob else ("clean", "ok")
        if rc == 0:
            return "silent", "bad input accepted (exit 0)"
        last = lines[-1] if lines else ""
        trained = any(ln.lstrip().startswith(("step ", "{\"step\"", "it ")) or " it/s" in ln for ln in lines[:-1])
        if new:
            return "half", f"failed but left {new[:4]}; {last[:160]}"
        if trained:
            return "late", last[:200]
        if not ("error" in last.lower() and last.lower().startswith(("diffflow", "usage"))):
            return "unclear", f"no error line: {last[:200]}"
        extra = [ln for ln in lines[:-1] if not ln.startswith(("usage:", " ")) and ln.strip()]
        if extra:
            return "unclear", f"{len(lines)} lines on stderr: {last[:160]}"
        if not words_ok(last):
            return "unclear", f"does not name {case.words}: {last[:200]}"
        return "clean", last[:200]
    # api
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if rc == 95:
        return "silent", last[:200]
    if rc == 96:
        return "traceback", last[:200]
    if case.expect == "ok":
        return ("clean", "ok") if rc == 0 else ("silent", f"good call failed: {last[:200]}")
    if rc == 0:
        return "silent", "bad call accepted"
    if rc != 90:
        return "traceback", f"rc={rc} {last[:200]}"
    if len(lines) > 1:
        return "unclear", f"multi-line message: {last[:160]}"
    if not words_ok(last):
        return "unclear", f"does not name {case.words}: {last[:200]}"
    if "token" in case.id or "content" in case.id:
        if "s3cr3t" in err or "hunter2" in err:
            return "unclear", "error quotes the file's content"
    return "clean", last[:200]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="run cases whose id contains this (comma: any of several)")
    ap.add_argument("--kind", choices=("cli", "api"), default=None)
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    ap.add_argument("-v", "--verbose", action="store_true", help="print stderr of non-clean cases")
    ap.add_argument("--list", action="store_true", help="list case ids and exit")
    args = ap.parse_args(argv)

    global BASE_RUN
    root = Path(tempfile.mkdtemp(prefix="diffflow_probe_"))
    here = os.getcwd()
    if args.json:
        args.json = os.path.abspath(args.json)
    os.chdir(root)  # whatever a check runs in this process stays inside the temporary folder
    try:
        build_cli_cases()
        build_api_cases()
        cases = CASES
        if args.only:
            keys = args.only.split(",")
            cases = [c for c in cases if any(k in c.id for k in keys)]
        if args.kind:
            cases = [c for c in cases if c.kind == args.kind]
        if args.list:
            for c in cases:
                print(c.id, c.argv if c.kind == "cli" else "")
            return 0

        global IMG_RUN
        if any(c.kind == "cli" or c.id.startswith("ckpt-") for c in cases):  # only they use the trained run
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                BASE_RUN = make_base_run(root)
        if any(c.id.startswith("img-") for c in cases):
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                IMG_RUN = make_img_run(root)
        results: list[Result] = []
        for i, case in enumerate(cases):
            tmp = root / f"c{i:04d}"
            tmp.mkdir()
            if case.setup:
                try:
                    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                        case.setup(tmp)
                except Exception as e:  # a case that does not apply to this version of the library
                    results.append(Result(case.id, "n/a", None, 0.0, f"setup failed: {type(e).__name__}: {e}"[:150]))
                    print(f"{'n/a':10s} {0:6.1f}s  {case.id:45s} {results[-1].detail}", flush=True)
                    continue
            before = snapshot(tmp)
            rc, out, err, hung, secs = run_child(case, tmp)
            outcome, detail = classify(case, tmp, before, rc, out, err, hung)
            results.append(Result(case.id, outcome, rc, secs, detail, err[-3000:]))
            print(f"{outcome:10s} {secs:6.1f}s  {case.id:45s} {detail[:150]}", flush=True)
            if args.verbose and outcome != "clean":
                print("    argv:", case.argv if case.kind == "cli" else "(api)")
                print("    " + err[-1500:].replace("\n", "\n    "))
            shutil.rmtree(tmp, ignore_errors=True)
        counts: dict[str, dict[str, int]] = {}
        for c, r in zip(cases, results):
            counts.setdefault(c.kind, {}).setdefault(r.outcome, 0)
            counts[c.kind][r.outcome] += 1
        print("\nsummary (cases by outcome):")
        for kind, d in counts.items():
            print(f"  {kind}: {sum(d.values())} cases: " + ", ".join(f"{k}={v}" for k, v in sorted(d.items())))
        if args.json:
            Path(args.json).write_text(json.dumps({"counts": counts, "results": [r.__dict__ for r in results]},
                                                  indent=1))
        bad = sum(v for d in counts.values() for k, v in d.items() if k != "clean")
        return 1 if bad else 0
    finally:
        os.chdir(here)
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                try:
                    os.chmod(Path(dirpath) / d, 0o700)
                except OSError:
                    pass
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
