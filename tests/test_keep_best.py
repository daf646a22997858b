"""Early stopping (``keep_best`` / ``patience``): the weights of the best periodic validation evaluation are kept
in ``best.safetensors`` and are what the run reports; a run with ``patience`` stops after that many evaluations
without a lower validation -ELBO; the state survives ``--resume``.

The selection logic runs against a scripted evaluation (known values, so the best step is known); one run uses
the real evaluation. Tiny budgets (an MLP, N=4); about 10 s in all on a quiet machine.
"""

from __future__ import annotations

import json

import pytest
import torch

import diffflow_ext.evaluation as evaluation
from diffflow_ext.checkpoint import load_checkpoint
from diffflow_ext.training import TrainConfig, train
from diffflow_ext.training.config import ConfigError

BASE = dict(data="digits", hidden=32, depth=1, num_steps=4, progressive=None, batch_size=32, lr=5e-3, ema=0.9,
            eval_every=2, eval_samples=16, final_ode=0, final_samples=16, seed=0)


def _quiet(**kw):
    return dict(progress=False, log=lambda s: None, **kw)


@pytest.fixture
def scripted(monkeypatch):
    """Periodic evaluations return the next value of ``values`` (by step) and record the split they watched."""
    real = evaluation.evaluate_model
    seen: list[tuple[str, float]] = []

    def install(values: dict[int, float]):
        calls = iter(sorted(values))

        def fake(model, source, *, split="test", **kw):
            step = next(calls)
            seen.append((split, step))
            return {"split": split, "nelbo_nats": values[step]}

        monkeypatch.setattr(evaluation, "evaluate_model", fake)
        return seen

    yield install
    monkeypatch.setattr(evaluation, "evaluate_model", real)


def _ema_weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).build_model(use_ema=True).state_dict()


def test_the_best_evaluation_is_kept_and_reported_and_patience_stops(tmp_path, scripted):
    seen = scripted({2: 5.0, 4: 3.0, 6: 4.0, 8: 6.0, 10: 7.0})
    s = train(TrainConfig(**BASE, iters=12, keep_best=True, patience=2, out=str(tmp_path / "r")), **_quiet())
    assert [sp for sp, _ in seen] == ["val"] * 4 and [st for _, st in seen] == [2, 4, 6, 8]
    assert s["stopped_early_at"] == 8 and s["step"] == 8  # 2 evaluations (6, 8) without a value below 3.0
    assert s["best"]["step"] == 4 and s["best"]["nelbo_nats"] == 3.0
    assert load_checkpoint(tmp_path / "r" / "checkpoint.safetensors").step == 8
    best = tmp_path / "r" / "best.safetensors"
    assert load_checkpoint(best).step == 4
    # the kept weights are the run's EMA weights at step 4, bitwise: a plain 4-step run ends with the same ones
    plain = train(TrainConfig(**{**BASE, "eval_every": 0}, iters=4, out=str(tmp_path / "p")), final_eval=False,
                  **_quiet())
    a, b = _ema_weights(best), _ema_weights(plain["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the final evaluation (on the test split) and the pictures are of the best weights
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["step"] == 4 and m["split"] == "test" and m["training"]["best"]["step"] == 4
    records = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["best"]["step"] for r in records if "best" in r] == [2, 4, 4, 4]


def test_without_patience_the_run_trains_all_iterations_and_compares_the_last_step(tmp_path, scripted):
    seen = scripted({2: 5.0, 4: 6.0, 6: 1.0, 8: 2.0, 9: 0.5})
    s = train(TrainConfig(**BASE, iters=9, keep_best=True, out=str(tmp_path / "r")), final_eval=False,
              **_quiet())
    # the last step (not a multiple of eval_every) is compared too: a run still improving keeps its last weights
    assert [st for _, st in seen] == [2, 4, 6, 8, 9] and {sp for sp, _ in seen} == {"val"}
    assert s["step"] == 9 and s["stopped_early_at"] is None and s["best"]["step"] == 9
    assert load_checkpoint(tmp_path / "r" / "best.safetensors").step == 9


def test_best_state_survives_resume(tmp_path, scripted):
    scripted({2: 5.0, 4: 3.0, 6: 4.0, 8: 4.5, 10: 2.0, 12: 2.5})
    kw = dict(BASE, keep_best=True, patience=3)
    train(TrainConfig(**kw, iters=6, out=str(tmp_path / "r")), final_eval=False, **_quiet())
    assert load_checkpoint(tmp_path / "r" / "checkpoint.safetensors").extra["best"]["since"] == 1
    s = train(TrainConfig(**kw, iters=12, out=str(tmp_path / "r")), resume=str(tmp_path / "r"), final_eval=False,
              **_quiet())
    # after the resume the count goes on from 1 (step 8: 2), and step 10 improves before patience 3 is reached
    assert s["stopped_early_at"] is None and s["best"]["step"] == 10 and s["step"] == 12
    assert load_checkpoint(tmp_path / "r" / "best.safetensors").step == 10


def test_a_real_run_keeps_its_lowest_validation_evaluation(tmp_path):
    s = train(TrainConfig(**BASE, iters=8, keep_best=True, out=str(tmp_path / "r")), final_eval=False, **_quiet())
    records = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval"]["nelbo_nats"] for r in records if "eval" in r}
    assert sorted(evals) == [2, 4, 6, 8] and all(r["eval"]["split"] == "val" for r in records if "eval" in r)
    assert s["best"]["step"] == min(evals, key=evals.get) and s["best"]["nelbo_nats"] == min(evals.values())


def test_keep_best_needs_a_validation_split_and_writes_nothing(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=r"^--keep-best: checkerboard has no validation split \(it draws fresh"):
        train(TrainConfig(**{**BASE, "data": "checkerboard"}, iters=4, keep_best=True, out=str(out)), **_quiet())
    assert not out.exists()


@pytest.mark.parametrize("kw, match", [
    (dict(keep_best=True, eval_every=0), "keep_best compares the periodic evaluations: it needs eval_every > 0"),
    (dict(patience=3), "patience 3 stops at the best evaluation: it needs keep_best"),
])
def test_inconsistent_options_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_a_presets_early_stopping_gives_way_to_eval_every_0():
    """The digits preset stops early; `--eval-every 0` (no evaluations to compare) turns that off instead of failing
    on a --keep-best the user never typed; typing both is still an error."""
    from diffflow_ext.training.config import SOURCE_PRESETS, resolve_config

    assert SOURCE_PRESETS["digits"].get("keep_best") is True
    cfg = resolve_config("image", {"eval_every": 0}, "digits")
    assert cfg.keep_best is False and cfg.patience == 0 and cfg.eval_every == 0
    assert resolve_config("image", {}, "digits").keep_best is True
    with pytest.raises(ConfigError, match="keep_best compares the periodic evaluations"):
        resolve_config("image", {"eval_every": 0, "keep_best": True}, "digits")


def test_patience_on_the_command_line_uses_the_presets_early_stopping(tmp_path):
    """`diffflow train digits --patience K`: the digits preset keeps the best evaluation, so --patience alone is
    valid there (the options are checked before the data is read, with the source's preset)."""
    from diffflow_ext.cli import main

    out = tmp_path / "r"
    assert main(["train", "digits", "--patience", "3", "--network", "mlp", "--hidden", "8", "--depth", "1",
                 "--iters", "2", "--eval-every", "1", "--eval-samples", "8", "--final-samples", "8", "--out", str(out),
                 "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["training"]["best"]["step"] in (1, 2) and (out / "best.safetensors").is_file()
