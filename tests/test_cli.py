"""The ``diffflow`` command end to end on a tiny budget: train -> checkpoint, pictures, metrics.json;
sample and eval on that checkpoint; a user's .npy file trains; clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import diffflow_ext
from diffflow_ext.cli import main

# where the imported package lives (source tree or site-packages), for subprocesses
ROOT = Path(diffflow_ext.__file__).resolve().parents[1]
TINY = ["--iters", "4", "--batch-size", "64", "--hidden", "8", "--depth", "1", "-N", "3", "--final-samples", "400",
        "--final-ode", "50", "--eval-every", "2", "--eval-samples", "200", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    _ok(["train", "checkerboard", "--out", str(out), *TINY])
    return out


def _ok(argv):
    """Run the CLI in-process; on failure show what it printed to stderr."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc == 0, f"diffflow {' '.join(argv)} -> {rc}\n{err.getvalue()[-3000:]}"


def test_train_writes_outputs(run_dir):
    for name in ("checkpoint.safetensors", "metrics.json", "samples.png", "trajectories.png", "samples.npy",
                 "log.jsonl"):
        assert (run_dir / name).is_file(), name
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("nelbo_nats", "nelbo_bits_per_dim", "ode_nll_nats", "ode_bits_per_dim", "sliced_wasserstein",
                "w2_emd", "fraction_in_support"):
        assert np.isfinite(m[key]), key
    assert m["step"] == 4 and 0 <= m["fraction_in_support"] <= 1 and m["fraction_in_support_heldout"] == 1.0
    assert m["training"]["steps_run"] == 4 and m["training"]["iters_per_second"] > 0
    assert np.load(run_dir / "samples.npy").shape == (400, 2)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in log)
    assert (run_dir / "samples.png").stat().st_size > 5000
    from diffflow_ext.checkpoint import load_checkpoint

    tc = load_checkpoint(run_dir).extra["train_config"]
    assert tc["num_steps"] == 3 and tc["progressive"] is None  # -N turns the default progressive schedule off


def test_progressive_default_and_override():
    from diffflow_ext.cli import build_parser
    from diffflow_ext.train import TrainConfig

    assert TrainConfig().progressive == "10:30:800"
    assert TrainConfig(progressive="none").progressive is None
    with pytest.raises(ValueError, match="START:END"):
        TrainConfig(progressive="30:10")
    args = build_parser().parse_args(["train", "--progressive", "5:20:300"])
    assert args.progressive == "5:20:300" and not hasattr(args, "num_steps")  # only what the user typed
    from diffflow_ext.training.config import resolve_config

    assert resolve_config("points", {"num_steps": 7}).progressive is None  # -N alone: a fixed N
    assert resolve_config("points", {}).progressive == TrainConfig().progressive


def test_eval_recomputes_metrics_json(run_dir, capsys):
    capsys.readouterr()
    _ok(["eval", str(run_dir)])
    res = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "metrics.json").read_text())
    saved.pop("training")
    assert res == saved


def test_eval_other_data_and_json(run_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    _ok(["eval", str(run_dir / "checkpoint.safetensors"), "--data", "four_rings", "--n-samples", "300",
         "--n-ode", "0", "--n-nll", "100", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["data"] == "four_rings" and "ode_nll_nats" not in res and 0 <= res["fraction_in_support"] <= 1


def test_sample_command(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npy"
    _ok(["sample", str(run_dir), "-n", "123", "--lam", "0.5", "--seed", "7", "--out", str(out)])
    x = np.load(out)
    assert x.shape == (123, 2) and np.isfinite(x).all()
    assert out.with_suffix(".png").is_file()
    info = json.loads(capsys.readouterr().out)
    assert info["n"] == 123 and "fraction_in_support" in info
    # deterministic in the seed
    out2 = tmp_path / "s2.npy"
    _ok(["sample", str(run_dir), "-n", "123", "--lam", "0.5", "--seed", "7", "--out", str(out2),
         "--png", "none"])
    np.testing.assert_array_equal(np.load(out2), x)
    assert not out2.with_suffix(".png").exists()


def test_user_npy_trains(tmp_path, capsys):
    pts = np.random.default_rng(0).normal(size=(300, 3)) * [1.0, 2.0, 0.5] + [0.0, 5.0, -1.0]
    f = tmp_path / "mine.npy"
    np.save(f, pts)
    out = tmp_path / "r"
    _ok(["train", str(f), "--out", str(out), *TINY])
    m = json.loads((out / "metrics.json").read_text())
    assert m["dim"] == 3 and "fraction_in_support" not in m and np.isfinite(m["nelbo_nats"])
    assert m["n_heldout"] == 30  # 10% held out
    assert np.load(out / "samples.npy").shape == (400, 3)
    capsys.readouterr()
    _ok(["sample", str(out), "-n", "10", "--out", str(tmp_path / "x.npy")])
    assert np.load(tmp_path / "x.npy").shape == (10, 3)


def test_user_csv_trains(tmp_path):
    pts = np.random.default_rng(1).uniform(-1, 1, size=(200, 2))
    f = tmp_path / "pts.csv"
    np.savetxt(f, pts, delimiter=",", header="x,y", comments="")
    _ok(["train", str(f), "--out", str(tmp_path / "r"), *[a if a != "50" else "0" for a in TINY]])


def test_errors_are_clear(tmp_path, run_dir, capsys):
    assert main(["train", "checkers", "--out", str(tmp_path / "a"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "unknown data source 'checkers'" in err and "checkerboard" in err and "Traceback" not in err
    assert main(["train", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "n"), *TINY]) == 1
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()  # nothing created for a failed start
    # an existing run is not overwritten silently
    assert main(["train", "--out", str(run_dir), *TINY]) == 1
    assert "--resume" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04garbage")
    assert main(["eval", str(bad)]) == 1
    assert "pickle" in capsys.readouterr().err
    assert main(["train", "--batch-size", "63", "--shards", "2", "--out", str(tmp_path / "b")]) == 2
    assert "divisible" in capsys.readouterr().err


def test_resume_via_cli(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["--batch-size", "32", "--hidden", "8", "--depth", "1", "-N", "3", "--eval-every", "0", "--no-progress",
            "--final-ode", "0", "--final-samples", "100"]
    _ok(["train", "--out", str(out), "--iters", "2", *args])
    _ok(["train", "--resume", str(out / "checkpoint.safetensors"), "--iters", "4", "--no-progress",
         "--final-ode", "0", "--final-samples", "100"])
    assert json.loads((out / "metrics.json").read_text())["step"] == 4


def test_console_entry_point_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "diffflow_ext.train", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "--shards" in r.stdout and "--progressive" in r.stdout and "--resume" in r.stdout


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "sample" in out and "eval" in out
    assert main([]) == 2


def test_presets_layering(monkeypatch):
    """dataclass defaults < PRESETS[kind] < SOURCE_PRESETS[name] < what the user typed."""
    from diffflow_ext.training import config

    monkeypatch.setitem(config.PRESETS, "image", {"batch_size": 100, "lr": 1e-3})
    monkeypatch.setitem(config.SOURCE_PRESETS, "digits", {"batch_size": 50})
    cfg = config.resolve_config("image", {"lr": 2e-3}, "digits")
    assert (cfg.batch_size, cfg.lr, cfg.ema) == (50, 2e-3, config.TrainConfig().ema)
    assert config.resolve_config("image", {}, "mnist").batch_size == 100
    assert config.resolve_config("points", {}).batch_size == config.TrainConfig().batch_size


def test_source_preset_reaches_the_model():
    """The digits preset's prior std (a model argument) reaches the DiffFlow the trainer builds; other sources keep
    the unit prior."""
    from diffflow_ext.training import config
    from diffflow_ext.training.loop import build_model

    cfg = config.resolve_config("image", {}, "digits")
    assert (cfg.prior_std, cfg.num_steps, cfg.network) == (0.5, 10, "unet-digits")
    import torch

    model = build_model(cfg, (1, 8, 8), torch.device("cpu"))
    assert model.prior_std == 0.5 and model.num_steps == 10
    assert config.resolve_config("points", {}).prior_std == 1.0


def test_choosing_another_network_drops_the_presets_network_arguments(tmp_path, capsys):
    """The digits preset sizes its MLP (hidden 512); `diffflow train digits --network unet-digits` must not fail on
    a --hidden the user never typed. The preset's other options (prior, N, lr...) still apply."""
    from diffflow_ext.training import config

    cfg = config.resolve_config("image", {"network": "unet-digits"}, "digits")
    assert cfg.network == "unet-digits" and cfg.hidden == config.TrainConfig().hidden and cfg.network_options == {}
    assert (cfg.prior, cfg.num_steps) == (config.SOURCE_PRESETS["digits"]["prior"], 10)
    # what the user types is kept, and still checked against the network
    with pytest.raises(config.ConfigError, match="hidden"):
        config.resolve_config("image", {"network": "unet-digits", "hidden": 128}, "digits")
    _ok(["train", "digits", "--network", "unet-digits", "--network-option", "base_channels=8", "--iters", "1",
         "--batch-size", "8", "--eval-every", "0", "--final-samples", "8", "--final-ode", "0", "--no-progress",
         "--out", str(tmp_path / "u")])
    assert json.loads((tmp_path / "u" / "metrics.json").read_text())["training"]["step"] == 1
