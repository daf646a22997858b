"""Entry point of ``diffflow train`` for ``python -m diffflow_ext.train`` and ``torchrun -m diffflow_ext.train``.

The trainer lives in :mod:`diffflow_ext.training`; the names below are re-exported for compatibility.
Run ``diffflow train --help`` (or ``torchrun --nproc_per_node=K -m diffflow_ext.train ...``).
"""

from __future__ import annotations

import sys

from .training.config import TrainConfig, parse_progressive
from .training.loop import NonFiniteError, train

__all__ = ["TrainConfig", "NonFiniteError", "train", "main", "parse_progressive"]


def main(argv: list[str] | None = None) -> int:
    """``python -m diffflow_ext.train ...`` == ``diffflow train ...`` (works under torchrun)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
