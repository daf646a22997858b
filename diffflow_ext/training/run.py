"""The run folder: where a run's files go, what it may replace, and its logs (``log.jsonl``, TensorBoard).

Rules (issue 10): nothing the run did not create is ever replaced; a new run goes into a folder that
does not exist yet or is empty (``--overwrite`` replaces a previous *run*, never other files); a run
that fails before its first checkpoint removes what it created, so the folder is left complete or
untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT_NAME", "BEST_NAME", "OUTPUT_NAMES", "RunFolder", "choose_out_dir"]

CHECKPOINT_NAME = "checkpoint.safetensors"
#: the checkpoint of the best periodic evaluation (``--keep-best``)
BEST_NAME = "best.safetensors"
#: where ``--overwrite`` keeps the replaced run until the new run's first checkpoint
PREVIOUS_RUN = ".previous-run"
#: every file a training run writes into its folder
OUTPUT_NAMES = (CHECKPOINT_NAME, BEST_NAME, "log.jsonl", "metrics.json", "samples.npy", "samples.png",
                "trajectories.png")


def _default_name(data: str) -> str:
    p = Path(str(data))
    return p.stem if p.suffix else p.name or "run"


def choose_out_dir(out: str | None, *, data: str, resume: str | None, overwrite: bool,
                   inputs: tuple[str, ...] = ()) -> tuple[Path, bool]:
    """``(folder, is_continuation)`` for a run; raises ``FileExistsError``/``ValueError`` with the reason.

    ``inputs``: files the run reads (data files); the run refuses to write over any of them.
    """
    resume_dir = None
    if resume:
        rp = Path(resume)
        resume_dir = (rp if rp.is_dir() else rp.parent).resolve()
    if out:
        folder = Path(out)
        _check_inputs(folder, inputs)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"--out {out}: exists and is not a folder")
        continuing = resume_dir is not None and folder.resolve() == resume_dir
        if folder.is_dir() and not continuing:
            entries = [e.name for e in folder.iterdir()]
            if (folder / CHECKPOINT_NAME).exists() and not overwrite:
                raise FileExistsError(
                    f"--out {out} already holds a training run; use --resume {folder / CHECKPOINT_NAME} to "
                    "continue it, --overwrite to replace it, or another --out")
            if PREVIOUS_RUN in entries and not (folder / CHECKPOINT_NAME).exists():
                raise FileExistsError(
                    f"--out {out}: an --overwrite of this folder was killed before its first checkpoint; the run it "
                    f"replaced is intact in {folder / PREVIOUS_RUN} (move its files back into {out} to keep it, or "
                    "delete that folder and this one's other files to start afresh)")
            if entries and not (folder / CHECKPOINT_NAME).exists():
                raise FileExistsError(
                    f"--out {out}: folder is not empty and holds no training run ({', '.join(sorted(entries)[:3])}"
                    f"{', ...' if len(entries) > 3 else ''}); choose a new or empty --out")
    elif resume_dir is not None:
        folder, continuing = resume_dir, True
    else:
        base = Path("runs") / _default_name(data)
        folder, k = base, 2
        while folder.exists():
            folder, k = base.with_name(f"{base.name}-{k}"), k + 1
        continuing = False
    _check_inputs(folder, inputs)
    return folder, continuing


def _check_inputs(folder: Path, inputs: tuple[str, ...]) -> None:
    targets = {(folder / n).resolve() for n in OUTPUT_NAMES}
    for f in inputs:
        if f and Path(f).resolve() in targets:
            raise FileExistsError(f"--out {folder}: the run would write over its own input file {f}; "
                                  "choose another --out")


class RunFolder:
    """A run's output folder; remembers what it created so a failed start can be undone."""

    def __init__(self, path: Path, *, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.created_dir = False
        self.created: list[Path] = []
        self._missing: list[Path] = []
        self._backup: Path | None = None
        self._tb = None

    def open(self, *, replace_run: bool = False) -> None:
        """Create the folder (and parents) and check it is writable; one-line errors.

        ``replace_run``: the folder holds a previous run that ``--overwrite`` replaces; its outputs are moved
        aside (``.previous-run/``) and deleted by :meth:`commit` once the new run has written its first
        checkpoint, or put back by :meth:`discard` if the new run fails before that.
        """
        if not self.is_main:
            return
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            for d in missing:  # missing[0] is the deepest: remove what this call created
                try:
                    d.rmdir()
                except FileNotFoundError:
                    continue
                except OSError:
                    break
            raise ValueError(f"--out {self.path}: cannot write there ({e.strerror or e})") from None
        self.created_dir = bool(missing)
        self._missing = missing
        if replace_run:
            backup = self.path / PREVIOUS_RUN
            shutil.rmtree(backup, ignore_errors=True)
            backup.mkdir()
            for n in (*OUTPUT_NAMES, "tensorboard"):
                if (self.path / n).exists():
                    os.replace(self.path / n, backup / n)
            self._backup = backup

    def file(self, name: str) -> Path:
        p = self.path / name
        if self.is_main and not p.exists() and p not in self.created:
            self.created.append(p)
        return p

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.file("log.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # TensorBoard -------------------------------------------------------------
    def enable_tensorboard(self) -> bool:
        """Start a TensorBoard writer in ``tensorboard/`` next to ``log.jsonl`` (the caller checked that the
        ``tensorboard`` package is installed)."""
        if not self.is_main:
            return False
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path / "tensorboard"))
        except Exception as e:  # noqa: BLE001 -- any failure of the optional package: one line naming the flag
            raise ValueError(f"--tensorboard: cannot start the TensorBoard writer ({type(e).__name__}: {e})") from None
        self.created.append(self.path / "tensorboard")
        return True

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def commit(self) -> None:
        """The run has written its first checkpoint: a replaced previous run is now deleted."""
        backup = self._backup
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
            self._backup = None

    def discard(self) -> None:
        """Undo a run that failed before its first checkpoint: remove what it created (and put back a
        previous run that ``--overwrite`` was replacing)."""
        self.close()
        if not self.is_main:
            return
        backup = self._backup
        for p in reversed(self.created):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if backup is not None:
            for p in backup.iterdir():
                os.replace(p, self.path / p.name)
            backup.rmdir()
            self._backup = None
        if self.created_dir:
            for d in self._missing:
                try:
                    d.rmdir()
                except OSError:
                    break
