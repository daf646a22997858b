"""Hostile command lines (issue 10): each must exit non-zero with ONE stderr line that names what to change,
before anything is written or trained, and must leave every existing file as it was.

A fast subset of ``scripts/probe_cli.py`` (which runs a few hundred such cases, incl. ones that train).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from diffflow_ext import cli

FAST = ["--iters", "2", "-b", "64", "--hidden", "8", "--depth", "1", "-N", "3", "--final-samples", "50",
        "--final-ode", "0", "--eval-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    assert cli.main(["train", "checkerboard", *FAST, "--out", str(out)]) == 0
    return out


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = Path(dirpath) / f
            out[os.path.relpath(p, root)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
    return out


def _rows(n=200, d=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def _npy(name, a, **kw):
    return lambda tmp: np.save(tmp / name, a, **kw)


def _text(name, s):
    return lambda tmp: (tmp / name).write_text(s)


def _huge_header(tmp):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**11, 2)})
    (tmp / "huge.npy").write_bytes(buf.getvalue() + b"\0" * 16)


def _with_outlier(v):
    a = _rows()
    a[77, 1] = v
    return a


def _csv(a):
    return "\n".join(",".join(repr(float(v)) for v in r) for r in a) + "\n"


def _tamper(run: Path, key: str):
    """Edit the stored data std / step by one digit without recomputing the checksum."""
    def setup(tmp):
        shutil.copytree(run, tmp / "run")
        p = tmp / "run" / "checkpoint.safetensors"
        b = p.read_bytes()
        n = struct.unpack("<Q", b[:8])[0]
        header = json.loads(b[8:8 + n])
        meta = json.loads(header["__metadata__"]["meta"])
        if key == "step":
            meta["step"] += 1
        else:
            meta["model_config"]["t_end"] = meta["model_config"]["t_end"] * 1.1
        header["__metadata__"]["meta"] = json.dumps(meta)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        p.write_bytes(struct.pack("<Q", len(h)) + h + b[8 + n:])
    return setup


def _copy_run(run: Path, *files: str):
    def setup(tmp):
        shutil.copytree(run, tmp / "run")
        for f in files:
            (tmp / f).write_text("the user's own file\n")
    return setup


# (id, argv, setup(tmp, run), words: the error must contain one of them)
CASES = [
    # options
    ("batch-zero", ["train", *FAST, "-b", "0"], None, ("-b",)),
    ("batch-text", ["train", *FAST, "-b", "abc"], None, ("-b",)),
    ("N-huge", ["train", *FAST, "-N", "100000000"], None, ("-N",)),
    ("lr-nan", ["train", *FAST, "--lr", "nan"], None, ("--lr",)),
    ("lr-inf", ["train", *FAST, "--lr", "inf"], None, ("--lr",)),
    ("g-negative", ["train", *FAST, "--g", "-1"], None, ("--g",)),
    ("ema-one", ["train", *FAST, "--ema", "1"], None, ("--ema",)),
    ("holdout-one", ["train", *FAST, "--holdout", "1"], None, ("--holdout",)),
    ("shards-zero", ["train", *FAST, "--shards", "0"], None, ("--shards",)),
    ("eval-seed-negative", ["train", *FAST, "--eval-seed", "-1"], None, ("--eval-seed",)),
    ("backend-bogus", ["train", *FAST, "--backend", "bogus"], None, ("--backend",)),
    ("backend-cuda-no-gpu", ["train", *FAST, "--backend", "cuda"], None, ("--backend", "cuda")),
    ("progressive-reversed", ["train", "--iters", "2", "--progressive", "30:5"], None, ("--progressive",)),
    ("N-and-progressive", ["train", "--iters", "2", "-N", "20", "--progressive", "5:30"], None,
     ("-N", "--progressive")),
    ("unknown-dataset", ["train", "nosuchdata", *FAST], None, ("nosuchdata",)),
    # data files
    ("npy-1d", ["train", "d.npy", *FAST], _npy("d.npy", _rows()[:, 0]), ("d.npy",)),
    ("npy-object", ["train", "d.npy", *FAST], _npy("d.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True),
     ("d.npy",)),
    ("npy-nan", ["train", "d.npy", *FAST], _npy("d.npy", _with_outlier(np.nan)), ("d.npy",)),
    ("npy-outlier", ["train", "d.npy", *FAST], _npy("d.npy", _with_outlier(1e30)), ("d.npy",)),
    ("npy-huge-header", ["train", "huge.npy", *FAST], _huge_header, ("huge.npy",)),
    ("csv-typo-first-row", ["train", "d.csv", *FAST], _text("d.csv", "0.5,1.2x\n" + _csv(_rows())), ("d.csv",)),
    ("csv-outlier", ["train", "d.csv", *FAST], _text("d.csv", _csv(_with_outlier(1e30))), ("d.csv",)),
    ("csv-binary", ["train", "d.csv", *FAST], lambda tmp: (tmp / "d.csv").write_bytes(bytes(range(256)) * 4),
     ("d.csv",)),
    ("data-fifo", ["train", "d.csv", *FAST], lambda tmp: os.mkfifo(tmp / "d.csv"), ("d.csv",)),
    ("data-missing", ["train", "missing.npy", *FAST], None, ("missing.npy",)),
    # never replace a user's file
    ("data-inside-out", ["train", "mydata/samples.npy", *FAST, "--out", "mydata"],
     lambda tmp: ((tmp / "mydata").mkdir(), np.save(tmp / "mydata" / "samples.npy", _rows())), ("--out", "mydata")),
    ("out-is-file", ["train", *FAST, "--out", "r"], _text("r", "mine\n"), ("--out",)),
    ("sample-out-exists", ["sample", "run", "-n", "10", "--png", "none", "--out", "keep.npy"], "run+keep.npy",
     ("keep.npy", "--out")),
    ("sample-png-exists", ["sample", "run", "-n", "10", "--png", "keep.png", "--out", "s.npy"], "run+keep.png",
     ("keep.png", "--png")),
    ("eval-json-exists", ["eval", "run", "--n-samples", "20", "--n-ode", "0", "--json", "keep.json"],
     "run+keep.json", ("keep.json", "--json")),
    # sampling options
    ("sample-lam-inf", ["sample", "run", "-n", "10", "--lam", "inf", "--png", "none", "--out", "s.npy"], "run",
     ("--lam",)),
    ("sample-n-zero", ["sample", "run", "-n", "0", "--png", "none", "--out", "s.npy"], "run", ("-n",)),
    ("sample-N-huge", ["sample", "run", "-n", "10", "-N", "100000000", "--png", "none", "--out", "s.npy"], "run",
     ("-N",)),
    # checkpoints
    ("ckpt-tampered-step", ["sample", "run", "-n", "10", "--png", "none", "--out", "s.npy"], "tamper:step",
     ("checksum",)),
    ("ckpt-tampered-config", ["sample", "run", "-n", "10", "--png", "none", "--out", "s.npy"], "tamper:config",
     ("checksum",)),
    ("ckpt-fifo", ["sample", "c.safetensors", "-n", "10"], lambda tmp: os.mkfifo(tmp / "c.safetensors"),
     ("c.safetensors",)),
    ("ckpt-devzero", ["sample", "/dev/zero", "-n", "10"], None, ("/dev/zero",)),
    ("ckpt-pickle", ["eval", "c.pt"], _text("c.pt", "\x80\x04junk"), ("pickle",)),
    ("resume-missing", ["train", "--resume", "nope.safetensors", "--iters", "4"], None, ("nope.safetensors",)),
]


@pytest.mark.parametrize("argv, setup, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_command_line_fails_cleanly_before_writing(tmp_path, monkeypatch, capsys, base_run, argv, setup, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIFFFLOW_DEBUG", raising=False)
    if isinstance(setup, str):
        if setup.startswith("tamper:"):
            _tamper(base_run, setup.split(":")[1])(tmp_path)
        else:
            _copy_run(base_run, *setup.split("+")[1:])(tmp_path)
    elif setup is not None:
        setup(tmp_path)
    before = _tree(tmp_path)
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc not in (0, None), f"accepted: {argv}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("diffflow") and "error" in lines[0], err
    assert any(w in lines[0] for w in words), lines[0]
    assert _tree(tmp_path) == before, "the failed command changed the folder"


def test_probe_script_runs_and_its_api_op_cases_are_clean(tmp_path):
    """Keeps scripts/probe_cli.py working: a fast slice of it (the step ops' argument checks) must run and
    classify every case as clean; the JSON report names each case."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "probe_cli.py"
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(script), "--only", "api-op-", "--json", str(out)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert len(res["results"]) >= 20 and {x["outcome"] for x in res["results"]} == {"clean"}
