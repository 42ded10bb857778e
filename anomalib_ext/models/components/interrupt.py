"""A terminated run must not look finished.

Lightning turns SIGTERM (a scheduler's stop, ``kill``, a container shutdown) into ``SIGTERMException``, a
``SystemExit`` without a code: ``anomalib train`` then exits with status 0, exactly like a completed run, and
scripts that chain fit -> export carry on with a half-trained model. The callback gives that exit the shell's
conventional status for SIGTERM (128 + 15) and says where the last checkpoint is.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGTERM_EXIT_STATUS = 143


class SigtermExitStatus(Callback):
    """On ``SIGTERMException``: name the last checkpoint and make the process exit with status 143."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = SIGTERM_EXIT_STATUS
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        where = f"last checkpoint: {last}" if last else "no checkpoint was written yet"
        stage = trainer.state.fn.value if trainer.state.fn else "run"
        print(f"interrupted by SIGTERM during {stage}; {where}", file=sys.stderr)  # noqa: T201


class InterruptStatusMixin:
    """Put before ``AnomalibModule`` in the bases: adds ``SigtermExitStatus`` to the model's callbacks."""

    def configure_callbacks(self) -> Any:
        callbacks = list(super().configure_callbacks())  # type: ignore[misc]
        return [*callbacks, SigtermExitStatus()]
