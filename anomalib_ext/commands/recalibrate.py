"""``anomalib-ext recalibrate``: a trained checkpoint's threshold and normalisation reset for a new condition.

    anomalib-ext recalibrate --ckpt_path results/Dfkdm/.../model.ckpt --normals new_light/good/ \\
        [--output model-recalibrated.ckpt] [--rule anchored|upper] [--margin 0.5] [--extend-bank] \\
        [--batch-size 4] [--device auto|cpu|cuda]

When the light (camera, exposure) changes, a model's scores move: its ranking of images may hold while the whole
scale shifts, and a threshold set under the old light flags every normal image or none. With a few normal images of
the new condition (at least ``MIN_RECALIBRATION_NORMALS``, 10 or more recommended), this command scores them as
``anomalib-ext score`` does (the checkpoint's own pre-processor, ``predict_step``; unreadable files are listed and
skipped) and writes a checkpoint whose post-processor holds thresholds recomputed from those scores alone
(``recalibrate_thresholds`` in ``anomalib_ext/models/components/thresholds.py``):

- image threshold, ``--rule anchored`` (default): the fitted threshold carried to the new normals, as far from their
  median (in units of their interquartile range) as it was from the validation normals', kept inside their
  normal-score window (docs/thresholds.md); ``--rule upper``: the top of that window, ``max + margin * (max -
  median)`` of the new normals' raw scores (``margin`` defaults to the post-processor's own, 0.5);
- normalisation: ``image_min`` = their lowest score, ``image_max`` carried over by the affine map that takes the old
  (min, threshold) to the new one, so normalised scores keep their spread;
- pixel threshold (models with a map and a pixel threshold): the ``upper`` rule on each normal image's highest map
  value; ``pixel_min`` the lowest map value, ``pixel_max`` carried over likewise.

No gradient step and no weight changes: only the post-processor's buffers (thresholds, normalisation, the normal-score
statistics) differ from the input checkpoint (in its ``state_dict`` and in the post-processor's callback state, which
``Engine.predict(ckpt_path=...)`` restores), plus an ``anomalib_ext_recalibration`` entry recording the images, the
rule, the margin and the old and new values. The result loads with
``anomalib-ext score``, ``Engine.predict`` and exports to OpenVINO as before (the thresholds live in the graph).

It cannot fix a condition that changes the ranking (defects that now score among the normals): see
docs/thresholds.md, "Recalibration under a new condition". For a model with a memory bank (TileOutlier, Fused's
tile half), ``--extend-bank`` can: the new normals' tiles join the bank first (still no gradient step), each normal
is then scored leave-one-out (against the bank extended by the others) for the thresholds, and the written
checkpoint holds the extended bank too (a vignette on bottle: TileOutlier's image AUROC 0.42-0.55 without it, 1.000
with it; docs/lighting.md).

Python: ``recalibrate(model, images)`` sets a loaded model's post-processor in place;
``recalibrate_checkpoint(ckpt_path, normals, output)`` does what the command does.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from anomalib.models import AnomalibModule
from torch.utils.data import DataLoader

from anomalib_ext.commands.score import (
    ScoreError,
    UnreadableImage,
    add_runtime_arguments,
    check_runtime_arguments,
    collate,
    load_model,
    pick_device,
    predicted_batches,
    run_reporting_errors,
    scoring_dataset,
    set_threads,
)
from anomalib_ext.models.components.thresholds import (
    MIN_RECALIBRATION_NORMALS,
    NORMAL_QUANTILE,
    POST_PROCESSOR_BUFFERS,
    RECALIBRATION_RULES,
    labelling_threshold,
    recalibrate_thresholds,
)

RECORD_KEY = "anomalib_ext_recalibration"  # the checkpoint entry that says how it was recalibrated
POST_PROCESSOR_PREFIX = "post_processor."  # AnomalibModule.post_processor's keys in the checkpoint's state_dict
# a normal image this far above the others' quartiles (Tukey's "far out" fence) is worth a look: it alone sets the
# threshold, and a defect or a wrong image among the normals would lift it above real defects
FAR_OUT_K = 3.0
# the old threshold flagging at most this share of the new normals is inside the window's lower bound
# (``NORMAL_QUANTILE``): the condition may not have moved it out of place, which the summary says
OLD_THRESHOLD_STILL_FITS = 1.0 - NORMAL_QUANTILE


@dataclass
class NormalScores:
    """What the model makes of the new normal images: raw scores (and map extremes), before any post-processing."""

    paths: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    map_maxima: list[float] = field(default_factory=list)
    map_minimum: float = math.inf
    unreadable: list[UnreadableImage] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # pre-processed, kept only for a bank to extend

    def use_outputs(self, scores: torch.Tensor, maps: torch.Tensor | None) -> None:
        """Scores and map extremes from other outputs for the same images (the leave-one-out ones)."""
        self.scores = scores.detach().flatten().float().cpu().tolist()
        if maps is not None:
            flat = maps.detach().float().flatten(start_dim=1)
            self.map_maxima = flat.amax(dim=1).cpu().tolist()
            self.map_minimum = float(flat.min())


@dataclass
class Recalibration:
    """The outcome of one recalibration: the images, the margin and the post-processor's values before and after."""

    normals: NormalScores
    margin: float
    before: dict[str, float]
    after: dict[str, float]
    rule: str = RECALIBRATION_RULES[0]  # the rule applied (a fallback says why)
    bank_images: int = 0  # new-condition images added to the model's memory bank (``extend_bank``)

    def flagged(self, which: str) -> int:
        """How many of the new normals the ``before`` or ``after`` image threshold flags (raw score above it)."""
        values = getattr(self, which)
        threshold = values["_image_threshold"]
        if math.isnan(threshold) and not math.isnan(values["_pixel_threshold"]):
            threshold = values["_pixel_threshold"]  # anomalib's threshold matching
        return sum(score > threshold for score in self.normals.scores)

    def suspicious_normal(self) -> tuple[str, float, float] | None:
        """``(path, score, fence)`` of the highest normal when it lies above Tukey's far-out fence of the others."""
        scores = torch.tensor(self.normals.scores)
        top = int(scores.argmax())
        others = torch.cat([scores[:top], scores[top + 1 :]])
        q25, q75 = torch.quantile(others, torch.tensor([0.25, 0.75])).tolist()
        fence = q75 + FAR_OUT_K * (q75 - q25)
        return (self.normals.paths[top], float(scores[top]), fence) if float(scores[top]) > fence else None

    def record(self, source: str) -> dict[str, Any]:
        """What the written checkpoint keeps under ``RECORD_KEY``."""
        return {
            "normals": source,
            "images": len(self.normals.scores),
            "skipped": [[item.image_path, item.reason] for item in self.normals.unreadable],
            "margin": self.margin,
            "rule": self.rule,
            "bank_images": self.bank_images,
            "before": self.before,
            "after": self.after,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def summary(self) -> list[str]:
        count = len(self.normals.scores)
        lines = [
            f"image threshold {self.before['_image_threshold']:.6g} -> {self.after['_image_threshold']:.6g} "
            f"(raw score, rule {self.rule}; of the {count} new normals the old one flagged "
            f"{self.flagged('before')}, the new one flags {self.flagged('after')})",
            f"image normalisation min/max {self.before['image_min']:.6g}/{self.before['image_max']:.6g} -> "
            f"{self.after['image_min']:.6g}/{self.after['image_max']:.6g}",
        ]
        if self.flagged("before") <= OLD_THRESHOLD_STILL_FITS * count and self.rule.startswith("upper"):
            lines.append(
                f"note: the old threshold flagged only {self.flagged('before')} of {count} new normals (at most "
                f"{OLD_THRESHOLD_STILL_FITS:.0%}, the window's lower bound): it may still fit this condition, and "
                "the new one, placed above every new normal, trades defects scoring among them for fewer false "
                "alarms; compare both on a few labelled images of the new condition"
            )
        if self.bank_images:
            lines.append(
                f"memory bank: the {self.bank_images} new normals added; the thresholds come from their "
                "leave-one-out scores (each against the bank extended by the others)"
            )
        pixel = ("_pixel_threshold", "pixel_min", "pixel_max")
        if any(self.before[name] != self.after[name] for name in pixel if not math.isnan(self.before[name])):
            lines.append(
                "pixel threshold/min/max "
                + "/".join(f"{self.before[name]:.6g}" for name in pixel)
                + " -> "
                + "/".join(f"{self.after[name]:.6g}" for name in pixel)
            )
        else:
            lines.append("pixel threshold: unchanged (the model has no anomaly map or no pixel threshold of its own)")
        return lines


def score_normals(
    model: AnomalibModule,
    images: Path | str | Sequence[Path | str],
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    workers: int = 0,
    keep_images: bool = False,
) -> NormalScores:
    """Raw scores (and map extremes) of ``images`` (a folder, searched recursively, an image, or a list of image
    paths), pre-processed by the model's own pre-processor as ``anomalib-ext score`` does; unreadable files are
    collected, not raised; ``keep_images`` keeps the pre-processed images too. Raises ``ScoreError`` when there is
    no image at all."""
    if isinstance(images, str | Path):
        dataset = scoring_dataset(Path(images).absolute())
    else:
        paths = [Path(image).absolute() for image in images]
        if not paths:
            msg = "no normal images given"
            raise ScoreError(msg)
        dataset = scoring_dataset(paths[0])
        dataset.image_filenames = paths
    dataset.transform = model.pre_processor.transform if model.pre_processor else None
    device = torch.device(device)
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, shuffle=False)
    found = NormalScores()
    for _, outputs, unreadable in predicted_batches(model, loader, device):
        found.unreadable.extend(unreadable)
        if outputs is None:
            continue
        found.paths.extend(str(path) for path in outputs.image_path)
        if keep_images:
            found.images.append(outputs.image.detach().cpu())
        if outputs.pred_score is not None:
            found.scores.extend(outputs.pred_score.detach().flatten().float().cpu().tolist())
        if outputs.anomaly_map is not None:
            maps = outputs.anomaly_map.detach().float().flatten(start_dim=1)
            found.map_maxima.extend(maps.amax(dim=1).cpu().tolist())
            found.map_minimum = min(found.map_minimum, float(maps.min()))
        if outputs.pred_score is None and outputs.anomaly_map is not None:  # the post-processor's own fallback
            found.scores.extend(outputs.anomaly_map.detach().float().flatten(start_dim=1).amax(dim=1).cpu().tolist())
    return found


def too_few_message(found: NormalScores, source: str) -> str:
    skipped = ""
    if found.unreadable:
        listed = "; ".join(f"{Path(item.image_path).name} ({item.reason})" for item in found.unreadable[:5])
        more = f"; {len(found.unreadable) - 5} more" if len(found.unreadable) > 5 else ""
        skipped = f", {len(found.unreadable)} unreadable skipped: {listed}{more}"
    return (
        f"{source}: {len(found.scores)} readable normal image(s){skipped}; recalibration needs at least "
        f"{MIN_RECALIBRATION_NORMALS} (the threshold rests on their maximum and median: a new normal image scores "
        "above the maximum of N with probability 1/(N+1)), 10 or more recommended"
    )


def recalibrate(
    model: AnomalibModule,
    images: Path | str | Sequence[Path | str],
    margin: float | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    workers: int = 0,
    rule: str = RECALIBRATION_RULES[0],
    extend_bank: bool = False,
) -> Recalibration:
    """Set ``model``'s post-processor thresholds and normalisation, in place, from normal ``images`` of a new
    condition (no gradient step; weights untouched unless ``extend_bank``), by ``rule``
    (``recalibrate_thresholds``). With ``extend_bank`` the images first join the model's memory bank (the
    ``extend_bank`` of TileOutlier and Fused) and the thresholds come from their leave-one-out scores. Raises
    ``ScoreError`` (one line) for no images, fewer than ``MIN_RECALIBRATION_NORMALS`` readable ones, a model without a
    thresholding post-processor, or ``extend_bank`` for a model without a bank."""
    post_processor = getattr(model, "post_processor", None)
    if post_processor is None:
        msg = f"{type(model).__name__} has no post-processor: there is no threshold to recalibrate"
        raise ScoreError(msg)
    add_to_bank = getattr(model, "extend_bank", None)
    if extend_bank and not callable(add_to_bank):
        msg = f"{type(model).__name__} has no memory bank to extend: --extend-bank is for TileOutlier and Fused"
        raise ScoreError(msg)
    source = str(images) if isinstance(images, str | Path) else f"{len(images)} images"
    found = score_normals(model, images, batch_size=batch_size, device=device, workers=workers, keep_images=extend_bank)
    if len(found.scores) < MIN_RECALIBRATION_NORMALS:
        raise ScoreError(too_few_message(found, source))
    if extend_bank:
        held_out = add_to_bank(torch.cat(found.images).clone().to(device))  # clone: out of inference mode
        found.use_outputs(held_out.pred_score, held_out.anomaly_map if found.map_maxima else None)
        found.images = []
    used_margin = float(getattr(post_processor, "margin", 0.5)) if margin is None else margin
    try:
        values = recalibrate_thresholds(
            post_processor,
            torch.tensor(found.scores),
            map_maxima=torch.tensor(found.map_maxima) if found.map_maxima else None,
            map_minimum=found.map_minimum if found.map_maxima else None,
            margin=used_margin,
            rule=rule,
        )
    except ValueError as error:
        raise ScoreError(f"{type(model).__name__}: {error}") from error
    bank_images = len(found.scores) if extend_bank else 0
    return Recalibration(found, used_margin, values["before"], values["after"], values["rule"], bank_images)


def image_thresholds_by_rule(post_processor: torch.nn.Module, normals: NormalScores) -> dict[str, float]:
    """The raw-score image threshold each of ``RECALIBRATION_RULES`` would give a fitted model's post-processor
    from the same normal scores; the post-processor is left as it is (for studies comparing the rules on one set of
    test scores)."""
    thresholds = {}
    for rule in RECALIBRATION_RULES:
        processor = copy.deepcopy(post_processor)
        recalibrate_thresholds(processor, torch.tensor(normals.scores), rule=rule)
        thresholds[rule] = labelling_threshold(processor)
    return thresholds


# ------------------------------------------------------------------------------------------------ checkpoint
def memory_banks(model: AnomalibModule) -> dict[str, torch.Tensor]:
    """The ``state_dict`` entries that ``extend_bank`` grows (the models' ``memory_bank`` buffers), by name."""
    return {name: value for name, value in model.state_dict().items() if name.endswith("memory_bank")}


def recalibrated_checkpoint(
    ckpt_path: Path, model: AnomalibModule, recalibration: Recalibration, source: str
) -> dict[str, Any]:
    """The checkpoint at ``ckpt_path`` with the post-processor's buffers replaced by ``model``'s, in its
    ``state_dict`` and in the callback state Lightning restores when a trainer is given ``ckpt_path``."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    buffers = {name: value.detach().cpu().clone() for name, value in model.post_processor.state_dict().items()}
    missing = [name for name in POST_PROCESSOR_BUFFERS if POST_PROCESSOR_PREFIX + name not in state]
    if missing:
        msg = f"{ckpt_path}: no post-processor thresholds in its state_dict ({POST_PROCESSOR_PREFIX}{missing[0]})"
        raise ScoreError(msg)
    for name, value in buffers.items():
        state[POST_PROCESSOR_PREFIX + name] = value
    if recalibration.bank_images:  # the extended bank (a buffer of any size: it loads as such)
        state.update({name: value.detach().cpu().clone() for name, value in memory_banks(model).items()})
    for key, callback_state in (checkpoint.get("callbacks") or {}).items():
        if isinstance(callback_state, Mapping) and "_image_threshold" in callback_state:
            checkpoint["callbacks"][key] = type(callback_state)(
                (name, buffers.get(name, value)) for name, value in callback_state.items()
            )
    checkpoint[RECORD_KEY] = recalibration.record(source)
    return checkpoint


def save_atomically(checkpoint: dict[str, Any], output: Path) -> None:
    """``torch.save`` to a temporary file beside ``output``, then renamed: a killed run leaves no half checkpoint."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def default_output(ckpt_path: Path) -> Path:
    return ckpt_path.with_name(f"{ckpt_path.stem}-recalibrated.ckpt")


def check_output(ckpt_path: Path, output: Path, overwrite: bool) -> None:
    if output.resolve() == ckpt_path.resolve():
        msg = f"{output}: --output is the trained checkpoint itself; give another path (the original is kept)"
        raise ScoreError(msg)
    if output.is_dir():
        msg = f"{output}: --output is a folder; give the path of the .ckpt file to write"
        raise ScoreError(msg)
    if output.exists() and not overwrite:
        msg = f"{output}: exists; pass --overwrite to replace it, or give another --output"
        raise ScoreError(msg)


def recalibrate_checkpoint(
    ckpt_path: Path | str,
    normals: Path | str | Sequence[Path | str],
    output: Path | str | None = None,
    margin: float | None = None,
    model_class: str | None = None,
    overwrite: bool = False,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    workers: int = 0,
    rule: str = RECALIBRATION_RULES[0],
    extend_bank: bool = False,
) -> tuple[Path, Recalibration]:
    """Load ``ckpt_path``, recalibrate it on ``normals`` and write the result (default ``<stem>-recalibrated.ckpt``
    beside it); the path written and the recalibration."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        msg = f"{ckpt_path}: checkpoint not found" + (" (it is a folder)" if ckpt_path.is_dir() else "")
        raise ScoreError(msg)
    target = Path(output) if output is not None else default_output(ckpt_path)
    check_output(ckpt_path, target, overwrite)
    if isinstance(normals, str | Path):
        scoring_dataset(Path(normals).absolute())  # an empty or missing folder answers before the model loads
    model, _ = load_model(ckpt_path, model_class)
    recalibration = recalibrate(
        model,
        normals,
        margin,
        batch_size=batch_size,
        device=device,
        workers=workers,
        rule=rule,
        extend_bank=extend_bank,
    )
    source = str(Path(normals).absolute()) if isinstance(normals, str | Path) else f"{len(normals)} images"
    save_atomically(recalibrated_checkpoint(ckpt_path, model, recalibration, source), target)
    return target, recalibration


# ------------------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog="anomalib-ext recalibrate",
        description="Write a copy of a trained checkpoint whose image (and pixel) threshold and normalisation come "
        "from normal images of a new condition (new light, camera, exposure): no retraining, no gradient step.",
    )
    command.add_argument("--ckpt_path", "--ckpt-path", type=Path, required=True, help="model.ckpt written by training")
    command.add_argument(
        "--normals",
        type=Path,
        required=True,
        help=f"folder (any depth) of normal images of the new condition: at least {MIN_RECALIBRATION_NORMALS}, "
        "10 or more recommended",
    )
    command.add_argument("--output", type=Path, help="checkpoint to write (default: <ckpt stem>-recalibrated.ckpt)")
    command.add_argument(
        "--rule",
        choices=RECALIBRATION_RULES,
        default=RECALIBRATION_RULES[0],
        help="anchored: the fitted threshold carried to the new normals (as far from their median, in units of "
        "their spread, as from the validation normals'), kept inside their window; upper: the window's top, above "
        f"every new normal (default: {RECALIBRATION_RULES[0]}; docs/thresholds.md)",
    )
    command.add_argument(
        "--margin",
        type=float,
        help="the window's top = max + margin * (max - median) of the normals' scores (default: the model's own, 0.5)",
    )
    command.add_argument(
        "--extend-bank",
        action="store_true",
        help="TileOutlier, Fused: add the normals to the memory bank first (no gradient step), for a condition that "
        "moves the ranking (a lamp to one side); the thresholds then come from their leave-one-out scores",
    )
    add_runtime_arguments(command, workers=0)
    command.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return command


def run(args: argparse.Namespace) -> list[str]:
    device = pick_device(args.device)
    set_threads(args.threads, args.workers if device.type == "cpu" else 0)
    start = time.perf_counter()
    target, recalibration = recalibrate_checkpoint(
        args.ckpt_path,
        args.normals,
        args.output,
        margin=args.margin,
        model_class=args.model,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        device=device,
        workers=args.workers,
        rule=args.rule,
        extend_bank=args.extend_bank,
    )
    normals = recalibration.normals
    for item in normals.unreadable:
        print(f"anomalib-ext recalibrate: skipped {item.image_path}: {item.reason}", file=sys.stderr)  # noqa: T201
    suspicious = recalibration.suspicious_normal()
    if suspicious:
        path, score, fence = suspicious
        print(  # noqa: T201
            f"anomalib-ext recalibrate: warning: {path} scores {score:.6g}, far above the other normals (Tukey's "
            f"far-out fence {fence:.6g}); it alone sets the threshold: check that it is a normal image",
            file=sys.stderr,
        )
    skipped = f", {len(normals.unreadable)} unreadable skipped" if normals.unreadable else ""
    return [
        f"recalibrated on {len(normals.scores)} normal images of {args.normals}{skipped} "
        f"(rule {recalibration.rule}, margin {recalibration.margin:g}) in {time.perf_counter() - start:.1f} s",
        *(f"  {line}" for line in recalibration.summary()),
        f"wrote {target}",
    ]


def main(argv: list[str]) -> int:
    command = parser()
    args = command.parse_args(argv)
    check_runtime_arguments(command, args)
    if args.margin is not None and not (args.margin >= 0 and math.isfinite(args.margin)):
        command.error("--margin must be a number >= 0")
    return run_reporting_errors(command.prog, lambda: "\n".join(run(args)))
