"""A progress bar that says when a time-budgeted run really ends.

HistAuGAN's configs train for a wall-clock budget (``max_time``) with ``max_epochs`` set high so that the budget,
not the epoch count, ends the run. Lightning's bar then reads ``Epoch 3/999``, which promises hours. This bar
names the budget instead: ``Epoch 3 · 4:12 of 10:00 · ends in ~5:48 (max_time)``.
"""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, RichProgressBar, Timer, TQDMProgressBar


def _clock(seconds: float) -> str:
    """``754.2`` -> ``12:34``; hours when needed (``1:02:03``)."""
    text = str(timedelta(seconds=round(max(seconds, 0.0))))
    return text[2:] if text.startswith("0:") else text


def time_budget(trainer: Trainer) -> Timer | None:
    """The trainer's ``max_time`` timer, or ``None`` when the run has no time budget."""
    return next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)


def budget_description(trainer: Trainer) -> str:
    """``Epoch N`` plus, with a time budget, the time spent, the budget and when the run will end."""
    epoch = f"Epoch {trainer.current_epoch}"
    timer = time_budget(trainer)
    if timer is None or timer.time_elapsed("train") is None:
        return epoch
    elapsed = timer.time_elapsed("train")
    remaining = timer.time_remaining("train") or 0.0
    epochs_left = trainer.max_epochs - trainer.current_epoch if trainer.max_epochs and trainer.max_epochs > 0 else None
    done_epochs = max(trainer.current_epoch, 1)
    ends_by_epochs = epochs_left is not None and elapsed / done_epochs * epochs_left < remaining
    ending = f"{epochs_left} epochs left (max_epochs)" if ends_by_epochs else f"ends in ~{_clock(remaining)} (max_time)"
    return f"{epoch} · {_clock(elapsed)} of {_clock(elapsed + remaining)} · {ending}"


class TimeBudgetProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, described by the time budget when the run has ``max_time``."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if time_budget(trainer) is not None:
            self.train_progress_bar.set_description(budget_description(trainer))


class TimeBudgetRichProgressBar(RichProgressBar):
    """Lightning's rich bar (its default when rich is installed), described by the time budget."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if time_budget(trainer) is not None and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=budget_description(trainer))


def time_budget_bar(current: Callback | None) -> Callback | None:
    """The time-budget version of the trainer's current bar (``None`` when it has none or a custom one)."""
    replacements: dict[type, type[Callback]] = {
        TQDMProgressBar: TimeBudgetProgressBar,
        RichProgressBar: TimeBudgetRichProgressBar,
    }
    replacement = replacements.get(type(current))
    return replacement() if replacement is not None else None
