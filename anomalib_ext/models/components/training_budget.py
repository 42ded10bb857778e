"""Optimiser steps of a gradient-trained family: epochs are a poor budget when the training set is small.

A config's ``max_epochs`` was chosen on a full training set: bottle's 168 normals in batches of 16 give 11 steps an
epoch. A plant with 10 good images keeps 8 for training after the validation split: one batch, one optimiser step
an epoch, so the same config trains its network for a handful of steps and its maps are mostly untrained noise.
``ensure_min_steps`` (called from a model's ``on_train_start``, when Lightning knows the number of batches) says
so in one line and, when the model asks for it, raises the run's epochs until it takes at least ``min_steps``
optimiser steps. It never lowers a budget, and a run that sets ``max_steps`` keeps its own.
"""

from __future__ import annotations

import logging
import math

from lightning.pytorch import Trainer

logger = logging.getLogger(__name__)

# what a gradient family trains at least when the caller has no figure of its own, measured on bottle at 10 normals
# (8 to train, one step an epoch): TeacherStudent's image AUROC 0.42-0.68 after 4 steps, 0.99 after 50 (0.995 on
# all 168 normals); Reconstruction's pixel AUROC 0.50-0.58 after 4 steps, 0.79 after 50 (0.77 on all 168)
DEFAULT_MIN_STEPS = 50


def steps_per_epoch(trainer: Trainer) -> int:
    """Optimiser steps of one training epoch (batches divided by gradient accumulation, at least 1)."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches <= 0:
        return 0
    return max(1, math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches)))


def ensure_min_steps(trainer: Trainer, family: str, min_steps: int) -> int | None:
    """Make the run take at least ``min_steps`` optimiser steps when its epochs give fewer; one warning line.

    The fit loop's ``max_epochs`` goes up (rounded up to a multiple of ``check_val_every_n_epoch`` when the planned
    run ended on a validation, so it still does). Returns the new ``max_epochs``, or ``None`` when nothing changed.
    ``min_steps <= 0`` turns it off.
    """
    epochs = trainer.max_epochs
    per_epoch = steps_per_epoch(trainer)
    if min_steps <= 0 or per_epoch == 0 or epochs is None or epochs < 0 or trainer.max_steps not in (-1, None):
        return None
    planned = epochs * per_epoch
    if planned >= min_steps:
        return None
    images = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
    count = f"{len(images)} training images" if images is not None and hasattr(images, "__len__") else "the data"
    new_epochs = math.ceil(min_steps / per_epoch)
    every = max(1, int(trainer.check_val_every_n_epoch or 1))
    if every > 1 and epochs % every == 0:
        new_epochs = math.ceil(new_epochs / every) * every
    trainer.fit_loop.max_epochs = new_epochs
    logger.warning(
        "%s: %s give %d optimiser step(s) an epoch, %d in %d epochs, fewer than the %d it trains at least: "
        "training %d epochs (%d steps) instead",
        family,
        count,
        per_epoch,
        planned,
        epochs,
        min_steps,
        new_epochs,
        new_epochs * per_epoch,
    )
    return new_epochs
