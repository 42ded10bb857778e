"""``anomalib-ext score``: score a folder of images with a trained checkpoint into ``predictions.csv``.

    anomalib-ext score --ckpt_path results/TileOutlier/MVTecAD/bottle/latest/weights/lightning/model.ckpt \\
        --input images/ --output scores/ [--maps] [--batch-size 4] [--device auto|cpu|cuda] [--workers 1]

``anomalib predict`` writes visualisations only (no scores), draws every image (under 1 img/s) and stops at the first
unreadable file. This command runs the model the way ``Engine.predict`` does (the checkpoint's own pre-processor
resizes each image at its original size, ``predict_step`` scores it, the post-processor normalises and thresholds)
but in inference mode, in batches, without drawing unless asked. Under ``--output``:

- ``predictions.csv``: ``image_path`` (absolute), ``pred_score`` (normalised, in [0, 1]), ``pred_label`` (1 =
  anomalous: ``pred_score`` above the normalised threshold, 0.5 by default), ``raw_score`` (the model's score before
  normalisation); rows are appended and flushed batch by batch;
- ``errors.csv``: ``image_path``, ``error`` of every file that could not be read (empty, not an image, truncated,
  16-bit grayscale): it is skipped, the run goes on;
- ``score.json``: the checkpoint (path and SHA-256), the model class, the thresholds. One folder holds the scores
  of one checkpoint: a run with another checkpoint is refused (``--overwrite`` starts the folder afresh);
- with ``--maps``: ``maps/<path below --input>.png`` (normalised anomaly map, 8-bit, at the model's input size)
  and ``overlays/<...>.png`` (the model's anomalib visualizer: image, map, predicted mask).

Running the same command again resumes: images already in ``predictions.csv`` are skipped (a row cut short by a
killed run is dropped and its image scored again), unreadable files are tried again, new rows are appended.

The checkpoint's model class is found from its saved constructor arguments (Lightning checkpoints store the
arguments, not the class); ``--model`` names it when that is ambiguous (some of anomalib's own models share
arguments).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from anomalib.data import ImageBatch, ImageItem, PredictDataset
from anomalib.data.utils import read_image
from anomalib.models import AnomalibModule
from PIL import Image
from torch.utils.data import DataLoader

from anomalib_ext.data.validation import IMAGE_SUFFIXES
from anomalib_ext.data.validation.files import ImageInfo, image_problem, probe_image
from anomalib_ext.models.components import IncompatibleCheckpointError
from anomalib_ext.prediction import path_key
from anomalib_ext.weights import file_sha256

PREDICTIONS_NAME = "predictions.csv"
ERRORS_NAME = "errors.csv"
RUN_NAME = "score.json"
MAPS_DIR, OVERLAYS_DIR = "maps", "overlays"
PREDICTION_COLUMNS = ("image_path", "pred_score", "pred_label", "raw_score")
ERROR_COLUMNS = ("image_path", "error")
# the constructor arguments anomalib does not save in a checkpoint (``save_hyperparameters(ignore=...)``)
COMPONENT_ARGUMENTS = frozenset({"pre_processor", "post_processor", "evaluator", "visualizer"})
PROGRESS_EVERY_S = 10.0
USAGE_ERROR = 2


class ScoreError(Exception):
    """A problem the user can fix, said in one line (the command prints it and exits with status 2)."""


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# ----------------------------------------------------------------------------------------------------- model
def model_classes() -> list[type[AnomalibModule]]:
    """Every model anomalib knows: its own (``anomalib.models``) and ours (importing ``anomalib_ext`` registers
    them as subclasses)."""
    found: list[type[AnomalibModule]] = []
    pending = list(AnomalibModule.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls not in found:
            found.append(cls)
            pending.extend(cls.__subclasses__())
    return found


def constructor_arguments(cls: type) -> set[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {parameter.name for parameter in parameters if parameter.name != "self" and parameter.kind not in variadic}


def find_model_class(saved: dict[str, Any], ckpt_path: Path, requested: str | None) -> type[AnomalibModule]:
    """The class ``requested`` names (full class path or short name), else the one whose constructor takes exactly
    the saved arguments; a tie is broken by anomalib's results layout (``results/<Model>/<Dataset>/...``)."""
    classes = model_classes()
    if requested:
        if "." in requested:
            module_name, _, class_name = requested.rpartition(".")
            try:
                return getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError) as error:
                msg = f"--model {requested}: no such class ({one_line(error)})"
                raise ScoreError(msg) from error
        named = [cls for cls in classes if cls.__name__.lower() == requested.lower()]
        if not named:
            msg = f"--model {requested}: no such model (give a class path, e.g. anomalib_ext.models.TileOutlier)"
            raise ScoreError(msg)
        return named[0]
    saved_names = set(saved)
    fits: list[tuple[int, type[AnomalibModule]]] = []
    for cls in classes:
        accepted = constructor_arguments(cls)
        if saved_names <= accepted:
            # arguments added after the checkpoint was written have defaults: fewest unsaved ones fits best
            fits.append((len(accepted - saved_names - COMPONENT_ARGUMENTS), cls))
    best = [cls for unsaved, cls in fits if unsaved == min(unsaved for unsaved, _ in fits)] if fits else []
    if len(best) > 1:
        in_path = [cls for cls in best if cls.__name__ in ckpt_path.parts]
        best = in_path or best
    if len(best) == 1:
        return best[0]
    names = ", ".join(sorted(f"{cls.__module__.split('.')[0]}.models.{cls.__name__}" for cls in best)) or "none"
    msg = (
        f"{ckpt_path}: cannot tell the model class from the checkpoint's saved arguments (candidates: {names}); "
        "name it with --model, e.g. --model anomalib_ext.models.TileOutlier"
    )
    raise ScoreError(msg)


def load_model(ckpt_path: Path, requested: str | None) -> tuple[AnomalibModule, str]:
    """The checkpoint's model in eval mode on the CPU, and its class path (``run`` checked that the file exists)."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001  (any unreadable file is the same one-line answer)
        msg = f"{ckpt_path}: not a checkpoint torch can read ({one_line(error)})"
        raise ScoreError(msg) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        msg = f"{ckpt_path}: not a Lightning checkpoint (no state_dict); give the model.ckpt written by training"
        raise ScoreError(msg)
    saved = dict(checkpoint.get("hyper_parameters") or {})
    del checkpoint
    cls = find_model_class(saved, ckpt_path, requested)
    # the backbone's weights come from the checkpoint: building it without reading pretrained weights first is
    # faster and works where anomalib's own models would download them
    overrides = {"pre_trained": False} if "pre_trained" in saved else {}
    try:
        model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", **overrides)
    except IncompatibleCheckpointError as error:
        raise ScoreError(str(error)) from error
    except Exception as error:  # noqa: BLE001
        msg = f"{ckpt_path}: cannot be loaded as {cls.__name__}: {one_line(error)}"
        raise ScoreError(msg) from error
    return model.eval(), f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class UnreadableImage:
    """Stands in a batch for a file that could not be read or pre-processed; it becomes a row of errors.csv."""

    image_path: str
    reason: str


def read_or_reason(path: str) -> tuple[torch.Tensor | None, str]:
    """anomalib's ``read_image``, or why the file cannot be scored (the reasons of the data checks)."""
    try:
        with Image.open(path) as header:  # reads the header only
            info = ImageInfo(Path(path), header.width, header.height, header.mode)
        problem = image_problem(info, min_size=None, allow_16bit_gray=False)  # anomalib would clip it at 255
        return (None, problem) if problem else (read_image(path, as_tensor=True), "")
    except Exception as error:  # noqa: BLE001  (whatever the decoder raises, the run goes on)
        _, problem = probe_image(Path(path))
        return None, problem or f"unreadable image ({one_line(error)})"


class ScoringDataset(PredictDataset):
    """anomalib's ``PredictDataset`` whose items are an ``UnreadableImage`` where anomalib's would raise."""

    def __getitem__(self, index: int) -> ImageItem | UnreadableImage:
        path = str(self.image_filenames[index])
        image, problem = read_or_reason(path)
        if image is None:
            return UnreadableImage(path, problem)
        if self.transform:
            try:
                image = self.transform(image)
            except Exception as error:  # noqa: BLE001
                return UnreadableImage(path, f"the model's pre-processor fails on it ({one_line(error)})")
        return ImageItem(image=image, image_path=path)


def scoring_dataset(source: Path) -> ScoringDataset:
    """The images under ``source`` (recursive, anomalib's extensions), or a one-line error."""
    try:
        return ScoringDataset(source)
    except FileNotFoundError as error:
        msg = f"{source}: no such file or folder"
        raise ScoreError(msg) from error
    except ValueError as error:
        what = "folder holds no images" if source.is_dir() else "is not an image file"
        msg = f"{source}: {what} (looked for {' '.join(IMAGE_SUFFIXES)})"
        raise ScoreError(msg) from error


def collate(items: list[Any]) -> tuple[ImageBatch | None, list[UnreadableImage]]:
    """anomalib's ``ImageBatch.collate`` of the readable items, and the unreadable ones apart."""
    readable = [item for item in items if not isinstance(item, UnreadableImage)]
    unreadable = [item for item in items if isinstance(item, UnreadableImage)]
    return (ImageBatch.collate(readable) if readable else None), unreadable


# ---------------------------------------------------------------------------------------------------- output
def drop_partial_last_line(file: Path) -> None:
    """Cut a row a killed run left half-written (no newline yet): its image is scored again."""
    if not file.is_file():
        return
    with file.open("rb+") as handle:
        end = handle.seek(0, 2)
        position = end
        while position > 0:
            start = max(0, position - (1 << 16))
            handle.seek(start)
            block = handle.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                if keep != end:
                    handle.truncate(keep)
                return
            position = start
        handle.truncate(0)


def scored_keys(predictions: Path) -> set[int]:
    """``path_key`` of every image with a row in ``predictions`` (after dropping a half-written last row)."""
    drop_partial_last_line(predictions)
    if not predictions.is_file():
        return set()
    with predictions.open(newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header is None:
            return set()
        if tuple(header) != PREDICTION_COLUMNS:
            msg = f"{predictions}: not written by anomalib-ext score (columns {','.join(header)}); pass --overwrite"
            raise ScoreError(msg)
        return {path_key(row[0]) for row in rows if len(row) == len(PREDICTION_COLUMNS)}


class CsvLog:
    """A CSV file appended row by row and flushed after each batch, so a killed run loses at most one batch."""

    def __init__(self, path: Path, columns: Sequence[str], append: bool) -> None:
        fresh = not append or not path.is_file() or path.stat().st_size == 0
        self.handle = path.open("w" if fresh else "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.handle)
        if fresh:
            self.writer.writerow(columns)
            self.handle.flush()

    def write(self, rows: Iterable[Sequence[Any]]) -> None:
        self.writer.writerows(rows)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def prepare_output(output: Path, run: dict[str, Any], overwrite: bool) -> None:
    """Create ``output``, or check that it holds scores of the same checkpoint; ``overwrite`` empties our files."""
    if output.exists() and not output.is_dir():
        msg = f"{output}: --output is a file; give a folder"
        raise ScoreError(msg)
    run_file = output / RUN_NAME
    if overwrite:
        for name in (PREDICTIONS_NAME, ERRORS_NAME, RUN_NAME):
            (output / name).unlink(missing_ok=True)
        for name in (MAPS_DIR, OVERLAYS_DIR):
            shutil.rmtree(output / name, ignore_errors=True)
    elif run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            msg = f"{run_file}: unreadable ({one_line(error)}); pass --overwrite to start the folder afresh"
            raise ScoreError(msg) from error
        if previous.get("checkpoint_sha256") != run["checkpoint_sha256"]:
            msg = (
                f"{output} holds scores of another checkpoint ({previous.get('checkpoint', '?')}); "
                "choose another --output or pass --overwrite to replace them"
            )
            raise ScoreError(msg)
    elif (output / PREDICTIONS_NAME).is_file():
        msg = f"{output / PREDICTIONS_NAME}: not written by anomalib-ext score; choose another --output or --overwrite"
        raise ScoreError(msg)
    output.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(run, indent=2) + "\n")


def relative_name(path: str, source: Path) -> Path:
    """Where an image's map goes: its path below ``--input`` (its name for a single file), as a PNG."""
    image = Path(path)
    relative = image.relative_to(source) if source.is_dir() else Path(image.name)
    return relative.with_suffix(".png")


def write_maps(batch: ImageBatch, output: Path, source: Path, visualizer: Any) -> None:  # noqa: ANN401
    """The normalised anomaly map as an 8-bit PNG and the model's visualisation, for every image of ``batch``."""
    from anomalib.visualization import ImageVisualizer  # only with --maps

    def cpu(value: Any) -> Any:  # noqa: ANN401
        return value.detach().cpu() if value is not None else None

    for index, path in enumerate(batch.image_path):
        name = relative_name(path, source)
        anomaly_map = cpu(batch.anomaly_map[index]) if batch.anomaly_map is not None else None
        if anomaly_map is not None:
            target = output / MAPS_DIR / name
            target.parent.mkdir(parents=True, exist_ok=True)
            pixels = (anomaly_map.squeeze().clamp(0, 1) * 255).round().byte().numpy()
            Image.fromarray(pixels).save(target)
        if isinstance(visualizer, ImageVisualizer):
            fields = ("pred_score", "pred_label", "pred_mask")
            values = {field: cpu(getattr(batch, field)[index]) for field in fields if getattr(batch, field) is not None}
            item = ImageItem(image=cpu(batch.image[index]), image_path=path, anomaly_map=anomaly_map, **values)
            picture = visualizer.visualize(item)
            if picture is not None:
                target = output / OVERLAYS_DIR / name
                target.parent.mkdir(parents=True, exist_ok=True)
                picture.save(target)


# ------------------------------------------------------------------------------------------------------- run
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda: no CUDA device is available to torch (use --device cpu)"
        raise ScoreError(msg)
    return torch.device(name)


def set_threads(threads: int, workers: int) -> None:
    """One core per image-reading worker and the rest for the model: torch's default (every core) beside busy
    workers, or on a machine shared with other jobs, makes its threads wait on each other (measured: 2 threads
    ran 4-25x slower than 1 on a loaded 2-core machine)."""
    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores - workers))


def thresholds(model: AnomalibModule) -> dict[str, float | None]:
    """The image thresholds behind ``pred_label``: raw (on ``raw_score``) and normalised (on ``pred_score``)."""
    processor = model.post_processor

    def number(name: str) -> float | None:
        value = getattr(processor, name, None)
        try:
            return None if value is None else float(value)
        except (TypeError, ValueError):
            return None

    return {
        "image_threshold": number("image_threshold"),
        "normalized_image_threshold": number("normalized_image_threshold"),
    }


def predicted_batches(
    model: AnomalibModule, loader: Iterable[tuple[ImageBatch | None, list[UnreadableImage]]], device: torch.device
) -> Iterator[tuple[int, ImageBatch | None, list[UnreadableImage]]]:
    """Every batch's index and ``predict_step`` outputs: raw scores and maps, before any post-processing (shared
    with ``anomalib-ext recalibrate``, which sets the thresholds from raw scores)."""
    with torch.inference_mode():
        for index, (batch, unreadable) in enumerate(loader):
            if batch is None:
                yield index, None, unreadable
                continue
            batch.update(image=batch.image.to(device))
            yield index, model.predict_step(batch, index), unreadable


def score_batches(
    model: AnomalibModule, loader: Iterable[tuple[ImageBatch | None, list[UnreadableImage]]], device: torch.device
) -> Iterator[tuple[ImageBatch | None, list[float] | None, list[UnreadableImage]]]:
    """Every batch as ``Engine.predict`` leaves it (``predict_step``, then the post-processor's predict hook), with
    the raw scores taken before the post-processor normalises them in place."""
    with torch.inference_mode():
        for index, outputs, unreadable in predicted_batches(model, loader, device):
            if outputs is None:
                yield None, None, unreadable
                continue
            raw = outputs.pred_score.detach().flatten().cpu().tolist() if outputs.pred_score is not None else None
            if model.post_processor is not None:
                model.post_processor.on_predict_batch_end(None, model, outputs, outputs, index)
            yield outputs, raw, unreadable


def prediction_rows(batch: ImageBatch, raw: list[float] | None) -> list[list[str]]:
    paths = list(batch.image_path)
    scores = batch.pred_score.flatten().cpu().tolist() if batch.pred_score is not None else [None] * len(paths)
    labels = batch.pred_label.flatten().cpu().tolist() if batch.pred_label is not None else [None] * len(paths)
    raws = raw if raw is not None else [None] * len(paths)
    return [
        [
            path,
            "" if score is None else f"{score:.6f}",
            "" if label is None else str(int(label)),
            "" if raw_score is None else f"{raw_score:.8g}",
        ]
        for path, score, label, raw_score in zip(paths, scores, labels, raws, strict=True)
    ]


def run(args: argparse.Namespace) -> str:
    """Score every image not scored yet; return the summary line."""
    if not args.ckpt_path.is_file():  # first: the most common mistake answers before any folder is listed
        msg = f"{args.ckpt_path}: checkpoint not found" + (" (it is a folder)" if args.ckpt_path.is_dir() else "")
        raise ScoreError(msg)
    if not args.input.exists():
        raise ScoreError(f"{args.input}: no such file or folder")
    device = pick_device(args.device)
    source = args.input.absolute()
    output = args.output.absolute()
    dataset = scoring_dataset(source)  # before loading the model: an empty folder answers at once
    model, class_path = load_model(args.ckpt_path, args.model)
    # the model's own pre-processor, image by image at its original size, as Engine.predict does with batches of 1
    dataset.transform = model.pre_processor.transform if model.pre_processor else None
    run_info = {
        "checkpoint": str(args.ckpt_path.absolute()),
        # what ties an output folder to one model (a moved file is the same model)
        "checkpoint_sha256": file_sha256(args.ckpt_path),
        "model": class_path,
        **thresholds(model),
        "columns": list(PREDICTION_COLUMNS),
    }
    prepare_output(output, run_info, args.overwrite)
    done = scored_keys(output / PREDICTIONS_NAME)
    # maps written under an --output inside --input are not images to score
    dataset.image_filenames = [path for path in dataset.image_filenames if output not in path.parents]
    total = len(dataset.image_filenames)
    dataset.image_filenames = [path for path in dataset.image_filenames if path_key(str(path)) not in done]
    model.to(device)
    set_threads(args.threads, args.workers if device.type == "cpu" else 0)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate, shuffle=False
    )
    predictions = CsvLog(output / PREDICTIONS_NAME, PREDICTION_COLUMNS, append=True)
    errors = CsvLog(output / ERRORS_NAME, ERROR_COLUMNS, append=False)  # unreadable files are tried again each run
    scored = skipped = 0
    start = last_report = time.perf_counter()
    try:
        for batch, raw, unreadable in score_batches(model, loader, device):
            if unreadable:
                errors.write([item.image_path, item.reason] for item in unreadable)
                skipped += len(unreadable)
            if batch is not None:
                predictions.write(prediction_rows(batch, raw))
                scored += len(batch)
                if args.maps:
                    write_maps(batch, output, source, model.visualizer)
            now = time.perf_counter()
            if not args.quiet and now - last_report >= PROGRESS_EVERY_S:
                rate = scored / (now - start)
                print(f"{scored + skipped}/{len(dataset)} images, {rate:.1f} img/s", file=sys.stderr, flush=True)
                last_report = now
    finally:
        predictions.close()
        errors.close()
    elapsed = time.perf_counter() - start
    summary = f"scored {scored} images in {elapsed:.1f} s ({scored / max(elapsed, 1e-9):.1f} img/s)"
    if total - len(dataset):
        summary += f", {total - len(dataset)} already scored"
    if skipped:
        summary += f", {skipped} unreadable skipped (listed in {output / ERRORS_NAME})"
    return summary + f" -> {output / PREDICTIONS_NAME}"


def add_runtime_arguments(command: argparse.ArgumentParser, workers: int) -> None:
    """The options of every command that runs a trained model over images (``score``, ``recalibrate``)."""
    command.add_argument("--batch-size", "--batch_size", type=int, default=4, help="images per forward pass")
    command.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when present")
    command.add_argument(
        "--workers", type=int, default=workers, help="processes that read and resize images beside the model (0: none)"
    )
    command.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for the model (0: the cores left beside --workers, or OMP_NUM_THREADS when set)",
    )
    command.add_argument("--model", help="model class when it cannot be told from the checkpoint (e.g. Padim)")


def check_runtime_arguments(command: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.workers < 0 or args.threads < 0:
        command.error("--batch-size must be >= 1, --workers and --threads >= 0")


def run_reporting_errors(prog: str, run_command: Callable[[], str]) -> int:
    """Run a command, print what it returns; a ``ScoreError`` is one line on stderr and exit status 2."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's and anomalib's import-time deprecations
            output = run_command()
    except ScoreError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)  # noqa: T201
        return USAGE_ERROR
    print(output)  # noqa: T201
    return 0


def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog="anomalib-ext score",
        description="Score every image of a folder (recursive) or one image with a trained checkpoint into "
        "OUTPUT/predictions.csv (image_path, pred_score, pred_label, raw_score); unreadable files go to "
        "OUTPUT/errors.csv; running it again resumes.",
    )
    command.add_argument("--ckpt_path", "--ckpt-path", type=Path, required=True, help="model.ckpt written by training")
    command.add_argument("--input", type=Path, required=True, help="an image, or a folder of images (any depth)")
    command.add_argument("--output", type=Path, required=True, help="folder for predictions.csv, errors.csv, maps")
    command.add_argument("--maps", action="store_true", help="also write anomaly maps and overlays (slow)")
    add_runtime_arguments(command, workers=1)
    command.add_argument("--overwrite", action="store_true", help="replace the scores already in --output")
    command.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return command


def main(argv: list[str]) -> int:
    command = parser()
    args = command.parse_args(argv)
    check_runtime_arguments(command, args)
    return run_reporting_errors(command.prog, lambda: run(args))
