"""Prediction over huge folders on any number of devices: every image's result written exactly once, resumable.

``PredictionWriter`` is a Lightning callback for ``anomalib predict`` / ``Engine.predict``. Each rank appends one
JSON line per image (``image_path``, ``pred_score``, ``pred_label``) to its own ``part-rank<N>.jsonl`` as batches
finish, so memory does not grow with the folder and nothing is lost when a run stops. At the end rank 0 merges the
parts into ``predictions.jsonl``, keeping each image path once: Lightning's distributed samplers may repeat images
to even out the ranks, and a resumed run may recompute an image whose line was half-written.

Resuming: run the same command again. The writer reads the paths already in ``predictions.jsonl`` and in any part
left by an interrupted run, never writes them again, and removes them from anomalib's ``PredictDataset``
(``--data FOLDER`` / ``data_path=``) before the sampler splits it, so they are not recomputed either.

    anomalib predict --ckpt_path model.ckpt --model anomalib_ext.models.TileOutlier --data /images \\
        --trainer.devices 8 --trainer.strategy ddp --return_predictions false \\
        --trainer.callbacks+=anomalib_ext.prediction.PredictionWriter \\
        --trainer.callbacks.output_dir predictions/

``python -m anomalib_ext.prediction merge DIR`` merges the parts of a run that died before its end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

MERGED_NAME = "predictions.jsonl"
PART_PATTERN = "part-rank*.jsonl"


def path_key(path: str) -> int:
    """8-byte digest of an image path: the set of done images costs ~100 bytes per image, not the path strings
    (shared with ``anomalib-ext score``'s resume)."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")


def _records(file: Path) -> Iterator[dict[str, Any]]:
    """The complete JSON lines of ``file`` (a line cut short by a killed run is skipped)."""
    if not file.is_file():
        return
    with file.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "image_path" in record:
                yield record


def written_paths(output_dir: str | Path) -> set[str]:
    """Image paths with a result in ``output_dir`` already (merged file and parts of an interrupted run)."""
    folder = Path(output_dir)
    files = [folder / MERGED_NAME, *sorted(folder.glob(PART_PATTERN))]
    return {record["image_path"] for file in files for record in _records(file)}


def merge_predictions(output_dir: str | Path) -> Path:
    """Append the parts' records whose image is not in ``predictions.jsonl`` yet, then delete the parts.

    Safe to run again after a crash at any point: records already merged are recognised by their path.
    """
    folder = Path(output_dir)
    merged = folder / MERGED_NAME
    seen = {path_key(record["image_path"]) for record in _records(merged)}
    parts = sorted(folder.glob(PART_PATTERN))
    _end_with_newline(merged)
    with merged.open("a", encoding="utf-8") as out:
        for part in parts:
            for record in _records(part):
                key = path_key(record["image_path"])
                if key not in seen:
                    seen.add(key)
                    out.write(json.dumps(record) + "\n")
    for part in parts:
        part.unlink()
    return merged


def _end_with_newline(file: Path) -> None:
    """A killed run can leave a half line: start appending on a fresh line."""
    if file.is_file() and file.stat().st_size > 0:
        with file.open("rb+") as handle:
            handle.seek(-1, 2)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


def _as_list(value: Any, count: int) -> list[Any]:  # noqa: ANN401
    """A batch field as one Python value per image."""
    if value is None:
        return [None] * count
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().flatten().tolist()
    if isinstance(value, str | Path):
        return [value]
    return list(value)


class PredictionWriter(BasePredictionWriter):
    """Write ``image_path``, ``pred_score``, ``pred_label`` of every predicted image once (module docstring).

    Args:
        output_dir: folder of ``predictions.jsonl`` (and of the per-rank parts while running).
        resume: skip images that already have a result in ``output_dir`` (``False``: start the folder afresh).
    """

    def __init__(self, output_dir: str | Path, resume: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.resume = resume
        self._done: set[str] = set()
        self._pending: list[Any] = []

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles callbacks: each rank reads the folder itself in ``setup``
        return {**self.__dict__, "_done": set(), "_pending": []}

    def _part(self, trainer: Trainer) -> Path:
        return self.output_dir / f"part-rank{trainer.global_rank:05d}.jsonl"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        del pl_module
        if stage != "predict":
            return
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                for old in [self.output_dir / MERGED_NAME, *self.output_dir.glob(PART_PATTERN)]:
                    old.unlink(missing_ok=True)
        trainer.strategy.barrier("prediction_writer_setup")
        self._done = written_paths(self.output_dir)
        self._pending = []
        if self._done:
            self._drop_done_images(trainer)

    def _drop_done_images(self, trainer: Trainer) -> None:
        """Remove already predicted images from anomalib's ``PredictDataset`` before the sampler splits it."""
        source = getattr(getattr(trainer.predict_loop, "_data_source", None), "instance", None)
        loaders = source if isinstance(source, list | tuple) else [source]
        for loader in loaders:
            dataset = getattr(loader, "dataset", None)
            filenames = getattr(dataset, "image_filenames", None)
            if isinstance(filenames, list):
                dataset.image_filenames = [name for name in filenames if str(name) not in self._done]

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,  # noqa: ANN401
        batch_indices: Sequence[int] | None,
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the batch: the post-processor (a later callback) still normalises and thresholds it in place."""
        del pl_module, batch_indices, batch, batch_idx, dataloader_idx
        self._flush(trainer)
        self._pending.append(prediction)

    def on_predict_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        del args, kwargs
        self._flush(trainer)

    def _flush(self, trainer: Trainer) -> None:
        if not self._pending:
            return
        part = self._part(trainer)
        _end_with_newline(part)
        with part.open("a", encoding="utf-8") as out:
            for prediction in self._pending:
                paths = _as_list(getattr(prediction, "image_path", None), 0)
                scores = _as_list(getattr(prediction, "pred_score", None), len(paths))
                labels = _as_list(getattr(prediction, "pred_label", None), len(paths))
                for path, score, label in zip(paths, scores, labels, strict=True):
                    if str(path) in self._done:  # written by an earlier run (repeats within a run: the merge)
                        continue
                    flag = None if label is None else bool(label)
                    out.write(json.dumps({"image_path": str(path), "pred_score": score, "pred_label": flag}) + "\n")
        self._pending = []

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        self._flush(trainer)
        trainer.strategy.barrier("prediction_writer_merge")  # every rank's part is complete
        if trainer.is_global_zero:
            merge_predictions(self.output_dir)
        trainer.strategy.barrier("prediction_writer_merged")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anomalib_ext.prediction", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    merge = sub.add_parser("merge", help="merge the per-rank parts of an interrupted run into predictions.jsonl")
    merge.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.output_dir.is_dir():
        parser.error(f"{args.output_dir} is not a folder")
    merged = merge_predictions(args.output_dir)
    print(f"{merged}: {sum(1 for _ in _records(merged))} images")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
