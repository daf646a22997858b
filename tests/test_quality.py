"""Quality of plain ``diffflow train`` (defaults): checkerboard samples fall inside the squares.

Slow (a few CPU minutes): the default budget is what this test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diffflow_ext

PKG_PARENT = Path(diffflow_ext.__file__).resolve().parents[1]


def _diffflow_cmd() -> list[str]:
    exe = shutil.which("diffflow")
    return [exe] if exe else [sys.executable, "-m", "diffflow_ext.cli"]


@pytest.mark.slow
def test_default_train_puts_90_percent_in_support_and_eval_matches(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(PKG_PARENT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([*_diffflow_cmd(), "train", "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / "runs" / "checkerboard"
    metrics = json.loads((run / "metrics.json").read_text())
    training = metrics.pop("training")
    print(f"default training: {training['train_seconds']:.0f}s, {training['iters_per_second']} it/s, "
          f"in support {metrics['fraction_in_support']:.4f}, SWD {metrics['sliced_wasserstein']:.4f}")
    assert metrics["fraction_in_support"] >= 0.90
    assert metrics["fraction_in_support_heldout"] == 1.0
    for name in ("checkpoint.safetensors", "samples.png", "trajectories.png"):
        assert (run / name).is_file()
    r = subprocess.run([*_diffflow_cmd(), "eval", str(run)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout) == metrics
