"""g rising geometrically in t (``{"start": g0, "end": g1}``, the 2-D default): values, equivalence with per-point
g, serialisation through the model config and checkpoints, the ``--g START:END`` flag, and the preset's LR-schedule
conflict check."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffflow_ext import DiffFlow
from diffflow_ext.cli import main
from diffflow_ext.schedules import Diffusion, polynomial_grid
from diffflow_ext.training.config import ConfigError, TrainConfig, parse_diffusion, resolve_config

SPEC = {"start": 0.2, "end": 1.0}


def test_geometric_values_at_the_ends_and_in_between():
    grid = polynomial_grid(30, 1e-3, 0.05, 0.9)
    d = Diffusion(SPEC)
    g = d.at_grid(grid.expand(3, -1), grid)
    assert g.shape == (3, 31)
    torch.testing.assert_close(g[:, 0], torch.full((3,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(g[:, -1], torch.full((3,), 1.0, dtype=torch.float64))
    t = torch.tensor([1e-3 + 0.5 * (0.05 - 1e-3)], dtype=torch.float64)
    torch.testing.assert_close(d.at_time(t, grid), torch.tensor([math.sqrt(0.2)], dtype=torch.float64))
    assert bool((g[0, 1:] > g[0, :-1]).all())  # rising
    assert d.config() == SPEC
    torch.testing.assert_close(d.at_grid(grid.expand(2, -1)), d.at_grid(grid.expand(2, -1), grid))


@pytest.mark.parametrize("bad", [{"start": 0.2}, {"start": 0.0, "end": 1.0}, {"start": 0.2, "end": math.inf},
                                 {"start": 0.2, "end": 1.0, "x": 1}])
def test_bad_geometric_specs_are_refused(bad):
    with pytest.raises(ValueError, match="diffusion"):
        Diffusion(bad)


def test_same_loss_and_bound_as_the_per_point_values():
    """At the points of the fixed grid the geometric g is the per-point g with the same values: the loss, its
    gradients and the -ELBO (whose constant holds D log(g_N/g_0)) are identical."""
    torch.manual_seed(0)
    a = DiffFlow.mlp(2, hidden=16, depth=2, num_steps=12, diffusion=SPEC, gradient="autograd")
    b = DiffFlow.mlp(2, hidden=16, depth=2, num_steps=12, gradient="autograd",
                     diffusion=Diffusion(SPEC).at_grid(a.timestamps[None], a.timestamps)[0].tolist())
    b.load_state_dict(a.state_dict())
    for m in (a, b):  # non-zero networks
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    la, lb = (m.loss(x, torch.Generator().manual_seed(2)) for m in (a, b))
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    na, nb = (m.nll_bound(x, torch.Generator().manual_seed(3)).nats for m in (a, b))
    torch.testing.assert_close(na, nb)
    c = DiffFlow.from_config(a.config())
    assert c.config()["diffusion"] == SPEC


def test_flag_parses_and_a_run_round_trips_through_its_checkpoint(tmp_path, capsys):
    assert parse_diffusion("0.5") == 0.5 and parse_diffusion("0.2:1") == SPEC
    for bad in ("0:1", "a", "1:2:3", "-1"):
        with pytest.raises(ValueError, match="diffusion: expected"):
            parse_diffusion(bad)
    assert main(["train", "checkerboard", "--g", "0:1", "--out", str(tmp_path / "x")]) == 2
    assert "--g" in capsys.readouterr().err and not (tmp_path / "x").exists()
    out = tmp_path / "run"
    assert main(["train", "checkerboard", "--g", "0.3:2", "--out", str(out), "--iters", "3", "--batch-size", "64",
                 "--hidden", "8", "--depth", "1", "-N", "3", "--final-samples", "100", "--final-ode", "0",
                 "--eval-every", "0", "--no-progress"]) == 0
    from diffflow_ext.checkpoint import load_checkpoint

    ck = load_checkpoint(out)
    assert ck.extra["train_config"]["diffusion"] == {"start": 0.3, "end": 2.0}
    assert main(["sample", str(out), "-n", "20", "--out", str(tmp_path / "s.npy"), "--png", "none"]) == 0
    assert np.isfinite(np.load(tmp_path / "s.npy")).all()
    capsys.readouterr()
    assert main(["eval", str(out), "--n-samples", "100", "--n-ode", "0", "--n-nll", "20"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["nelbo_nats"])


def test_point_preset_and_its_schedule_conflicts():
    cfg = resolve_config("points", {})
    assert cfg.diffusion == SPEC and cfg.lr_schedule == "cosine" and cfg.eval_lam == 1.0
    with pytest.raises(ConfigError, match="lr_decay applies to lr_schedule step, not cosine"):
        resolve_config("points", {"lr_decay": 0.9})
    assert resolve_config("points", {"lr_decay": 0.9, "lr_schedule": "step"}).lr_decay == 0.9
    with pytest.raises(ConfigError, match="diffusion: expected"):
        TrainConfig(diffusion={"start": 0.2})
