"""benchmarks/quality_2d.py's budgeted trainer: the fixed-drift baselines' learning rate is annealed over the CPU
budget (cosine to 0), so no baseline spends most of its budget frozen at a vanishing learning rate."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
q = pytest.importorskip("quality_2d")


class _Data:
    def batch(self, n, rng):
        return torch.zeros(n, 2)


def _steps(monkeypatch, schedule, budget=20.0, tick=1.0):
    """Adam on loss = p (gradient 1): each update moves p by lr / (1 + eps), so the moves read back the lr used."""
    clock = iter(np.arange(0.0, 1e4, tick))
    monkeypatch.setattr(q, "_cpu", lambda: float(next(clock)))
    p = torch.nn.Parameter(torch.zeros(()))
    trace = []

    def loss_fn(x, gen):
        trace.append(float(p.detach()))
        return p * 1.0

    its = q.train_for(loss_fn, [p], _Data(), budget, batch=4, lr=0.1, seed=0, schedule=schedule, clip=0.0)
    trace.append(float(p.detach()))
    return its, -np.diff(trace)


def test_cosine_schedule_anneals_over_the_budget(monkeypatch):
    its, moves = _steps(monkeypatch, "cosine")
    # the fake clock advances 1 per reading: the start reads 0, then step k reads spent = k (k = 1..19; 20 ends it)
    assert its == 19
    expect = 0.1 * 0.5 * (1 + np.cos(np.pi * np.arange(1, 20) / 20.0))
    np.testing.assert_allclose(moves, expect, rtol=1e-5, atol=1e-7)
    assert moves[-1] < 0.1 * (1 - math.cos(math.pi / 20))  # the last step runs at ~0.6% of the initial rate


def test_constant_schedule_keeps_the_rate(monkeypatch):
    its, moves = _steps(monkeypatch, "constant")
    assert its == 19
    np.testing.assert_allclose(moves, 0.1, rtol=1e-5)


def test_unknown_schedule_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="'cosine' or 'constant'"):
        _steps(monkeypatch, "step")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_bad_fixed_time_exponent_is_a_one_line_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        q.main(["--fixed-time-exponent", value, "--sets", "sharp_8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--fixed-time-exponent: expected a number in (0, 1]" in err[-1], err


def test_fixed_drift_model_takes_the_grid_exponent():
    model = q.fixed_drift_model(time_exponent=0.1)
    assert model.time_exponent == pytest.approx(0.1) and q.FIXED_TIME_EXPONENT == 0.1
    t = model.timestamps.to(torch.float64)  # uniform in t^0.1: the steps shrink toward the data
    torch.testing.assert_close(t**0.1, torch.linspace(1e-3**0.1, 1.0, 31, dtype=torch.float64), rtol=0, atol=1e-6)
    dt = torch.diff(t)
    assert dt[0] < 1e-3 < 0.1 < dt[-1]  # N = 30: 4e-4 next to the data, 0.15 at t = 1
