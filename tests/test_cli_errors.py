"""Issue 10 at the CLI surface: every bad input ends in ONE line on stderr naming the flag the user typed, a
non-zero exit, and nothing written or replaced; conflicts are errors; user files are never replaced.

All cases run the CLI in-process (``diffflow_ext.cli.main``); the usage errors are found while parsing, so
they cost milliseconds. The few that need a trained run share one tiny run (module fixture)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffflow_ext.cli import main

TINY = ["--iters", "2", "-b", "32", "--hidden", "8", "--depth", "1", "-N", "3", "--final-samples", "100",
        "--final-ode", "0", "--eval-every", "0", "--no-progress"]


def _run(argv, capsys):
    """(exit status, stderr lines) of ``diffflow *argv``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def _tree(d: Path) -> dict[str, str]:
    """Every file under ``d`` with its content hash (to show that nothing was written or replaced)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _one_line_error(rc, lines, *, flag: str, code: int | None = None):
    assert rc != 0, lines
    if code is not None:
        assert rc == code, (rc, lines)
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert flag in lines[0], (flag, lines[0])
    assert lines[0].startswith("diffflow")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_errors") / "run"
    assert main(["train", "checkerboard", "--out", str(out), *TINY]) == 0
    return out


# ----------------------------------------------------------------------------- train: bad values

BAD_TRAIN = [
    (["-b", "0"], "-b", "batch_size"),
    (["--batch-size", "abc"], "--batch-size", "batch_size"),
    (["-N", "100000000"], "-N", "num_steps"),
    (["--num-steps", "0"], "--num-steps", "num_steps"),
    (["--eval-seed", "-1"], "--eval-seed", "eval_seed"),
    (["--shards", "0"], "--shards", None),
    (["--lr", "inf"], "--lr", None),
    (["--lr", "nan"], "--lr", None),
    (["--lr", "-1"], "--lr", None),
    (["--g", "0"], "--g", "diffusion"),
    (["--ema", "1"], "--ema", None),
    (["--holdout", "1.5"], "--holdout", None),
    (["--grid", "wobbly"], "--grid", None),
    (["--gradient", "magic"], "--gradient", None),
    (["--backend", "mine"], "--backend", None),
    (["--dtype", "float16"], "--dtype", None),
    (["--progressive", "30:10"], "--progressive", None),
    (["--progressive", "5:100000000"], "--progressive", None),
    (["--iters", "0"], "--iters", None),
    (["--iters", "1.5"], "--iters", None),
    (["--final-ode", "-3"], "--final-ode", "final_ode"),
    (["--eval-lam", "inf"], "--eval-lam", "eval_lam"),
    (["--device", "gpu"], "--device", None),
    (["--precision", "fp8"], "--precision", None),
    (["--memory-budget", "lots"], "--memory-budget", "memory_budget"),
    (["--threads", "-2"], "--threads", None),
    (["-b", "8", "-b", "16"], "-b", None),
    (["-b", "63", "--shards", "2"], "-b", "batch_size"),
    (["--t-start", "0.1", "--t-end", "0.05"], "--t-start", "t_start"),
    (["-N", "20", "--progressive", "5:30"], "--progressive", None),
    (["--no-such-option", "1"], "--no-such-option", None),
    (["--progressive", ""], "--progressive", None),  # only 'none' turns it off
    (["--out", ""], "--out", None),
    (["--data-option", "pad_to"], "--data-option", None),
    (["--network", "resnet"], "--network", None),
    (["--hidden", "128", "--network", "unet"], "--hidden", None),  # the MLP's size with another network
    (["--holdout", "0.2"], "--holdout", None),  # checkerboard is generated: a holdout would be ignored
    (["--data-dir", "."], "--data-dir", None),  # checkerboard reads no files
    (["--time-dim", "3"], "--time-dim", "time_dim"),  # the embedding needs an even width
    (["--out", "x" * 300], "--out", None),  # a name too long for the file system
    (["--lr-schedule", "cosine", "--lr-decay", "0.5"], "--lr-decay", None),
]


@pytest.mark.parametrize("args,flag,field", BAD_TRAIN, ids=[" ".join(a) for a, _, _ in BAD_TRAIN])
def test_train_bad_option_is_one_line_naming_the_flag(tmp_path, capsys, args, flag, field):
    os.chdir(tmp_path)  # the default output folder (runs/...) would land here
    out = [] if "--out" in args else ["--out", tmp_path / "out"]
    rc, lines = _run(["train", *out, *args], capsys)
    _one_line_error(rc, lines, flag=flag, code=2)
    assert "given twice" not in lines[0] or args.count(flag) == 2
    if field is not None:
        assert field not in lines[0]  # the flag the user typed, not the config field's name
    assert list(tmp_path.iterdir()) == []  # nothing written (no out folder, no runs/)


def test_both_flags_of_a_conflict_are_named(tmp_path, capsys):
    rc, lines = _run(["train", "--out", tmp_path / "o", "-N", "20", "--progressive", "5:30"], capsys)
    _one_line_error(rc, lines, flag="-N", code=2)
    assert "--progressive" in lines[0]
    rc, lines = _run(["train", "--out", tmp_path / "o", "--lr-decay", "0.5", "--lr-decay-every", "0"], capsys)
    _one_line_error(rc, lines, flag="--lr-decay", code=2)
    # -N with --progressive none is consistent (a fixed N), not a conflict
    from diffflow_ext.training.config import resolve_config

    assert resolve_config("points", {"num_steps": 20, "progressive": "none"}).max_steps() == 20


def test_error_names_long_flag_when_typed_long(tmp_path, capsys):
    rc, lines = _run(["train", "--out", tmp_path / "o", "--batch-size", "0"], capsys)
    _one_line_error(rc, lines, flag="--batch-size", code=2)
    assert "-b:" not in lines[0] and "-b " not in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("args,flag", [(["--backend", "cuda"], "--backend"), (["--device", "cuda"], "--device"),
                                       (["--device", "cuda:3"], "--device")])
def test_gpu_options_without_gpu(tmp_path, capsys, args, flag):
    rc, lines = _run(["train", "--out", tmp_path / "o", *args, *TINY], capsys)
    _one_line_error(rc, lines, flag=flag, code=1)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    rc, lines = _run(["train", "--out", blocker / "run", *TINY], capsys)
    _one_line_error(rc, lines, flag="--out")
    assert blocker.read_text() == "mine"
    if os.geteuid() != 0:  # root may write into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            rc, lines = _run(["train", "--out", ro / "run", *TINY], capsys)
            _one_line_error(rc, lines, flag="--out")
            assert list(ro.iterdir()) == []
        finally:
            ro.chmod(0o700)


def test_train_never_overwrites_its_data_file(tmp_path, capsys):
    data = tmp_path / "mydata"
    data.mkdir()
    pts = np.random.default_rng(0).normal(size=(200, 2))
    np.save(data / "samples.npy", pts)
    before = _tree(data)
    rc, lines = _run(["train", data / "samples.npy", "--out", data, *TINY], capsys)
    _one_line_error(rc, lines, flag="--out")
    rc, lines = _run(["train", data / "samples.npy", "--out", data, "--overwrite", *TINY], capsys)
    _one_line_error(rc, lines, flag="--out")
    assert _tree(data) == before


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_contradicting_options(run_dir, capsys):
    before = _tree(run_dir)
    ck = run_dir / "checkpoint.safetensors"
    rc, lines = _run(["train", "--resume", ck, "--iters", "4", "--hidden", "128", "--lr", "0.5"], capsys)
    _one_line_error(rc, lines, flag="--hidden", code=2)
    assert "--lr" in lines[0] and "--iters" in lines[0]  # says what may change
    rc, lines = _run(["train", "moons", "--resume", ck, "--iters", "4"], capsys)
    _one_line_error(rc, lines, flag="DATA", code=2)
    rc, lines = _run(["train", "--resume", ck, "--iters", "2"], capsys)  # already at step 2
    _one_line_error(rc, lines, flag="--iters", code=2)
    assert _tree(run_dir) == before


def test_resume_continues_in_the_checkpoint_folder(tmp_path, monkeypatch):
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    monkeypatch.chdir(tmp_path / "A")
    assert main(["train", "--out", "r", *TINY]) == 0  # a relative --out is stored
    monkeypatch.chdir(tmp_path / "B")
    assert main(["train", "--resume", "../A/r", "--iters", "3", "--no-progress", "--final-ode", "0"]) == 0
    from diffflow_ext.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "A" / "r").step == 3 and list((tmp_path / "B").iterdir()) == []


# ----------------------------------------------------------------------------- sample / eval outputs


def test_sample_refuses_existing_files_unless_overwrite(run_dir, tmp_path, capsys):
    mine = tmp_path / "mine.npy"
    np.save(mine, np.arange(3))
    pic = tmp_path / "pic.png"
    pic.write_bytes(b"not a picture")
    before = _tree(tmp_path)
    rc, lines = _run(["sample", run_dir, "-n", "10", "--out", mine, "--png", "none"], capsys)
    _one_line_error(rc, lines, flag="--out", code=1)
    rc, lines = _run(["sample", run_dir, "-n", "10", "--out", tmp_path / "new.npy", "--png", pic], capsys)
    _one_line_error(rc, lines, flag="--png", code=1)
    # the default picture next to --out is a user's file too
    (tmp_path / "new.png").write_bytes(b"user")
    rc, lines = _run(["sample", run_dir, "-n", "10", "--out", tmp_path / "new.npy"], capsys)
    _one_line_error(rc, lines, flag="--out", code=1)
    (tmp_path / "new.png").unlink()
    assert _tree(tmp_path) == before
    assert main(["sample", str(run_dir), "-n", "10", "--out", str(mine), "--png", "none", "--overwrite"]) == 0
    assert np.load(mine).shape == (10, 2)


def test_sample_refuses_a_dangling_symlink(run_dir, tmp_path, capsys):
    """A symlink whose target does not exist (yet) is the user's file too: never replaced."""
    link = tmp_path / "link.npy"
    link.symlink_to(tmp_path / "missing-target.npy")
    rc, lines = _run(["sample", run_dir, "-n", "10", "--out", link, "--png", "none"], capsys)
    _one_line_error(rc, lines, flag="--out", code=1)
    assert link.is_symlink() and not (tmp_path / "missing-target.npy").exists()


def test_sample_out_dir_writes_inside(run_dir, tmp_path, capsys):
    d = tmp_path / "folder"
    d.mkdir()
    assert main(["sample", str(run_dir), "-n", "10", "--seed", "3", "--out", str(d)]) == 0
    assert (d / "samples_seed3.npy").is_file() and (d / "samples_seed3.png").is_file()
    assert not (tmp_path / "folder.npy").exists()
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == str(d / "samples_seed3.npy")
    rc, lines = _run(["sample", run_dir, "-n", "10", "--out", tmp_path / "x.txt"], capsys)
    _one_line_error(rc, lines, flag="--out", code=2)
    assert main(["sample", str(run_dir), "-n", "10", "--out", str(tmp_path / "new" / "sub" / "s.npy")]) == 0
    assert sorted(p.name for p in (tmp_path / "new" / "sub").iterdir()) == ["s.npy", "s.png"]  # no temporaries


def test_failed_sample_leaves_no_folders_or_temporaries(run_dir, tmp_path, capsys, monkeypatch):
    import diffflow_ext.cli as cli

    def broken_picture(*a, **k):
        raise RuntimeError("picture failed")

    monkeypatch.setattr(cli, "_sample_picture", broken_picture)
    rc, lines = _run(["sample", run_dir, "-n", "10", "--out", tmp_path / "a" / "b" / "s.npy"], capsys)
    _one_line_error(rc, lines, flag="picture failed", code=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,flag", [(["--lam", "inf"], "--lam"), (["--lam", "-1"], "--lam"),
                                       (["-n", "0"], "-n"), (["-N", "100000000"], "-N"), (["--seed", "-5"], "--seed")])
def test_sample_bad_values(run_dir, tmp_path, capsys, args, flag):
    rc, lines = _run(["sample", run_dir, "--out", tmp_path / "s.npy", *args], capsys)
    _one_line_error(rc, lines, flag=flag, code=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,flag", [
    (["--method", "heun", "--lam", "0.5"], "--lam"),  # heun follows the ODE: a lambda would be ignored
    (["--method", "ode", "--sampler-option", "rtol=2"], "--sampler-option"),
    (["--method", "em", "--sampler-option", "speed=9"], "--sampler-option"),
    (["--sampler-option", "lam=0.3"], "--sampler-option"),
    (["--sampler-option", "novalue"], "--sampler-option"),
    (["--method", "rk45"], "--method"),
    (["--device", "tpu"], "--device"),
])
def test_sampler_options_are_checked(run_dir, tmp_path, capsys, args, flag):
    for cmd in (["sample", run_dir, "--out", tmp_path / "s.npy"], ["eval", run_dir, "--json", tmp_path / "m.json"]):
        rc, lines = _run([*cmd, *args], capsys)
        _one_line_error(rc, lines, flag=flag, code=2)
    assert list(tmp_path.iterdir()) == []


def test_sample_with_another_sampler(run_dir, tmp_path, capsys):
    assert main(["sample", str(run_dir), "-n", "20", "--method", "heun", "--out", str(tmp_path / "h.npy"),
                 "--png", "none"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "heun" and info["lam"] is None
    x = np.load(tmp_path / "h.npy")
    assert x.shape == (20, 2) and np.isfinite(x).all()
    # sampler options reach the sampler: a loose and a tight ODE tolerance give different samples
    outs = []
    for tol in ("1e-2", "1e-8"):
        out = tmp_path / f"ode{tol}.npy"
        assert main(["sample", str(run_dir), "-n", "20", "--method", "ode", "--sampler-option", f"rtol={tol}",
                     "--sampler-option", f"atol={tol}", "--out", str(out), "--png", "none"]) == 0
        outs.append(np.load(out))
    assert np.abs(outs[0] - outs[1]).max() > 1e-6
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--method", "heun", "--n-samples", "50", "--n-ode", "0", "--n-nll", "20"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["lam"] is None and res["n_samples"] == 50


@pytest.mark.parametrize("args,flag", [(["--draws", "5"], "--draws"), (["--fid", "on"], "--fid"),
                                       (["--split", "val"], "--split")])
def test_eval_options_that_vectors_would_ignore(run_dir, capsys, args, flag):
    rc, lines = _run(["eval", run_dir, *args], capsys)
    _one_line_error(rc, lines, flag=flag, code=2)


@pytest.mark.parametrize("args,flag", [(["--ode-rtol", "1e-3"], "--ode-rtol"),
                                       (["--ode-trace", "exact"], "--ode-trace"), (["--ode-atol", "0"], "--ode-atol"),
                                       (["--ode-trace", "magic"], "--ode-trace")])
def test_eval_ode_options_that_would_be_ignored_or_are_invalid(run_dir, capsys, args, flag):
    rc, lines = _run(["eval", run_dir, "--n-ode", "0", *args], capsys)  # the run's --final-ode is 0 as well
    _one_line_error(rc, lines, flag=flag, code=2)


def test_eval_ode_tolerances_reach_the_solver(run_dir, capsys):
    """--ode-rtol/--ode-atol/--ode-trace change the ODE likelihood's computation and are stated in the output; a
    loose tolerance stays near the default's value (a tiny model: the trajectories are smooth)."""
    res = {}
    for extra in ([], ["--ode-rtol", "1e-2", "--ode-atol", "1e-2"], ["--ode-trace", "hutchinson"]):
        capsys.readouterr()
        assert main(["eval", str(run_dir), "--n-ode", "40", "--n-nll", "10", "--n-samples", "10", *extra]) == 0
        res[" ".join(extra)] = json.loads(capsys.readouterr().out)
    base, loose, hutch = res.values()
    assert "ode_options" not in base
    assert loose["ode_options"] == {"rtol": 1e-2, "atol": 1e-2} and hutch["ode_options"] == {"method": "hutchinson"}
    assert loose["ode_nll_nats"] != base["ode_nll_nats"] != hutch["ode_nll_nats"]
    assert abs(loose["ode_nll_nats"] - base["ode_nll_nats"]) < 0.05
    assert abs(hutch["ode_nll_nats"] - base["ode_nll_nats"]) < 5 * hutch["ode_nll_nats_se"] + 0.05


def test_eval_json_refuses_existing_file(run_dir, tmp_path, capsys):
    j = tmp_path / "m.json"
    j.write_text("keep me")
    rc, lines = _run(["eval", run_dir, "--json", j, "--n-samples", "50", "--n-ode", "0", "--n-nll", "20"], capsys)
    _one_line_error(rc, lines, flag="--json", code=1)
    assert j.read_text() == "keep me"
    assert main(["eval", str(run_dir), "--json", str(j), "--n-samples", "50", "--n-ode", "0", "--n-nll", "20",
                 "--overwrite"]) == 0
    assert json.loads(j.read_text())["step"] == 2


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    for cmd in ("sample", "eval"):
        rc, lines = _run([cmd, tmp_path / "nope"], capsys)
        _one_line_error(rc, lines, flag=str(tmp_path / "nope"), code=1)
    rc, lines = _run(["train", "--resume", tmp_path / "nope"], capsys)
    _one_line_error(rc, lines, flag=str(tmp_path / "nope"), code=1)


def _crafted(run_dir: Path, tmp_path: Path, train_config) -> Path:
    """A valid checkpoint (checksum and all) of the run whose stored training options are ``train_config``."""
    from diffflow_ext.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(run_dir)
    path = tmp_path / "crafted" / "checkpoint.safetensors"
    save_checkpoint(path, model=ck.build_model(), step=ck.step, extra={**ck.extra, "train_config": train_config})
    return path


@pytest.mark.parametrize("bad", ["x", {"batch_size": -1}, {"progressive": 5, "lr": "fast"}])
def test_crafted_stored_options_are_one_line(run_dir, tmp_path, capsys, bad):
    from diffflow_ext.checkpoint import load_checkpoint

    tc = bad if isinstance(bad, str) else {**load_checkpoint(run_dir).extra["train_config"], **bad}
    ck = _crafted(run_dir, tmp_path, tc)
    for argv in (["sample", ck, "-n", "5", "--out", tmp_path / "s.npy"], ["eval", ck, "--n-samples", "10"],
                 ["train", "--resume", ck, "--iters", "9"]):
        rc, lines = _run(argv, capsys)
        _one_line_error(rc, lines, flag=str(ck), code=1)
        if not isinstance(bad, str):
            assert next(iter(bad)) in lines[0] and "-b" not in lines[0]  # the stored option, not a flag
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("data", [None, {"kind": "bogus"}, {"source": {"name": "checkerboard"}, "transform": "x"}])
def test_sample_refuses_a_stored_data_state_without_a_valid_transform(run_dir, tmp_path, capsys, data):
    from diffflow_ext.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(run_dir)
    path = tmp_path / "c" / "checkpoint.safetensors"
    save_checkpoint(path, model=ck.build_model(), step=ck.step, extra={**ck.extra, "data": data})
    for argv in (["sample", path, "-n", "5", "--out", tmp_path / "s.npy"], ["eval", path, "--n-samples", "10"],
                 ["train", "--resume", path, "--iters", "9", "--no-progress"]):
        rc, lines = _run(argv, capsys)
        _one_line_error(rc, lines, flag=str(path), code=1)
    assert not (tmp_path / "s.npy").exists()  # never samples left in model space


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_data_is_refused_without_blocking(run_dir, tmp_path, capsys):
    fifo = tmp_path / "d.npy"
    os.mkfifo(fifo)
    rc, lines = _run(["train", fifo, "--out", tmp_path / "r", *TINY], capsys)  # would block if opened
    _one_line_error(rc, lines, flag="FIFO", code=1)
    rc, lines = _run(["eval", run_dir, "--data", fifo], capsys)
    _one_line_error(rc, lines, flag="--data", code=1)
    assert not (tmp_path / "r").exists()


def test_sample_without_the_training_data_uses_the_stored_transform(tmp_path, capsys):
    pts = np.random.default_rng(0).normal(size=(300, 2)) * [1.0, 3.0] + [10.0, -5.0]
    f = tmp_path / "pts.npy"
    np.save(f, pts)
    assert main(["train", str(f), "--out", str(tmp_path / "r"), *TINY]) == 0
    f.unlink()  # the data moved away: samples are still in data units
    rc, lines = _run(["sample", tmp_path / "r", "-n", "400", "--out", tmp_path / "s.npy"], capsys)
    assert rc == 0 and len(lines) == 1 and "not available" in lines[0]
    x = np.load(tmp_path / "s.npy")
    assert abs(x[:, 0].mean() - 10.0) < 1.5 and abs(x[:, 1].mean() + 5.0) < 3.0  # not model space (mean ~0)


# ----------------------------------------------------------------------------- the top-level handler


def test_unexpected_exception_is_one_line_and_debug_shows_it(monkeypatch, capsys):
    import diffflow_ext.cli as cli

    def boom(args):
        raise RuntimeError("something broke\ninside")

    monkeypatch.setattr(cli, "_cmd_eval", boom)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    rc, lines = _run(["eval", "x"], capsys)
    _one_line_error(rc, lines, flag="something broke inside", code=1)
    assert cli.DEBUG_ENV in lines[0]
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="something broke"):
        main(["eval", "x"])
