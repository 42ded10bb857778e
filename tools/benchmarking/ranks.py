"""Per-process figures of a ``--devices N`` fit (DDP): what the launching cell process cannot measure itself."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from benchmarking.measures import peak_rss_mb


class RankPeakMemory(Callback):
    """Each fitting process (every DDP rank, or the cell itself on one device) records its own peak RSS.

    A module-level class: ``ddp_spawn`` pickles callbacks into the spawned processes.
    """

    def __init__(self, cell_dir: Path) -> None:
        self.cell_dir = Path(cell_dir)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        path = self.cell_dir / f"fit_rss_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"rank": trainer.global_rank, "peak_rss_mb": peak_rss_mb()}))

    @staticmethod
    def collect(cell_dir: Path) -> list[float]:
        """Peak RSS (MB) of every rank of the fit, in rank order (the files are removed once read)."""
        paths = sorted(Path(cell_dir).glob("fit_rss_rank*.json"))
        records = sorted((json.loads(path.read_text()) for path in paths), key=lambda record: record["rank"])
        for path in paths:
            path.unlink()
        return [round(record["peak_rss_mb"], 1) for record in records]
