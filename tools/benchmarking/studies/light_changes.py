"""``--study light_changes``: does a model fitted under one light hold when the test light changes?

A second lighting shift beside the dice sessions (``--study lighting``), under control: every model is fitted on the
dataset as it is (MVTec or folder layout), its thresholds picked on the usual validation split under the unchanged
light, and the same fitted model is then tested on its test set under each change of ``CHANGES`` (deterministic:
the same change for every image and seed, so the spread is the models' and the splits'):

- ``gamma0.7`` / ``gamma1.4``: ``x ** gamma`` (0.7 brightens the mid-tones, 1.4 darkens them);
- ``gain0.8`` / ``gain1.2``: ``x * gain`` (exposure or lamp power), clipped to [0, 1];
- ``warm`` / ``cold``: per-channel (R, G, B) gains ``WARM`` / ``COLD`` (a colour temperature the white balance
  did not follow), clipped;
- ``vignette``: ``x * (1 - VIGNETTE * r ** 2)``, ``r`` the distance from the centre, 1 at the corners;
- ``unchanged``: the reference.

Every changed image is rounded to 8 bits, as a camera would deliver it. The change reaches the test set through the
test dataset's ``augmentations`` (anomalib applies them to the raw [0, 1] image, before the model's pre-processor).

Remedies, as arms. Model arms (one cell each): ``none``, ``per_image`` (``input_normalization: per_image``, each
image standardised by its own per-channel mean and std before the backbone, for models with that option) and
``flat_field`` (``input_normalization: flat_field``: first divided by its own smooth illumination; not run unless
``--arms`` names it). Within
every cell, each change is also scored after **recalibration** (``anomalib_ext.commands.recalibrate.recalibrate``:
thresholds and normalisation from normal images, no gradient step) on ``RECALIBRATION_NORMALS`` normals of the
changed condition: validation normals (held out from training, never a test image), drawn with the cell's seed,
put through the same change and written as PNG (a validation split with fewer normals gives all of them; one with
fewer than recalibration's minimum leaves the recalibrated figures out); the model's post-processor is restored
afterwards. A model with a memory bank (TileOutlier, Fused's tile half) is also recalibrated with ``extend_bank``
(the normals join its bank, ``anomalib-ext recalibrate --extend-bank``) and tested once more, the bank restored
afterwards. Reported arms: ``none``, ``per_image``, ``flat_field``, ``recalibration`` (the ``none`` model
recalibrated), ``per_image+recalibration``, ``flat_field+recalibration``, and each ``...+recalibration+bank``.

Report: per dataset, model, arm and change, image AUROC (raw scores) and image F1 (mean over seeds) and the F1
drop from the same arm's unchanged-light F1; then, per model, the worst drop of each arm over the changes.
"""

from __future__ import annotations

import copy
import inspect
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarking.builders import import_class
from benchmarking.measures import raw_test_scores, scored
from benchmarking.studies.arms import chosen_arms

KINDS = ("mvtec", "folder")  # layouts with a plain validation split of normals
MODEL_ARMS = ("none", "per_image", "flat_field")
DEFAULT_MODEL_ARMS = MODEL_ARMS[:2]
# the input normalisations the model arms set (``input_normalization``); ``none`` keeps the model's own
NORMALIZATION_ARMS = ("per_image", "flat_field")
REPORT_ARMS = (
    "none",
    "per_image",
    "flat_field",
    "recalibration",
    "per_image+recalibration",
    "flat_field+recalibration",
)
# the recalibrated arms whose normals also joined the model's memory bank (``extend_bank``): their scores moved too
BANK_ARMS = ("recalibration+bank", "per_image+recalibration+bank", "flat_field+recalibration+bank")
# the recalibrated arms under a named rule (``anomalib_ext.models.components.thresholds.RECALIBRATION_RULES``);
# the plain ``recalibration`` arms use the default rule, ``anchored``
RULE_ARMS = ("recalibration:upper", "per_image+recalibration:upper")
WARM = (1.10, 1.00, 0.85)  # R, G, B gains of a warmer light (about 3500 K under a 5000 K white balance)
COLD = (0.85, 1.00, 1.10)
VIGNETTE = 0.4  # the corners lose 40 % of their light
CHANGES: dict[str, tuple[str, Any]] = {
    "unchanged": ("none", None),
    "gamma0.7": ("gamma", 0.7),
    "gamma1.4": ("gamma", 1.4),
    "gain0.8": ("gain", 0.8),
    "gain1.2": ("gain", 1.2),
    "warm": ("channel_gains", WARM),
    "cold": ("channel_gains", COLD),
    "vignette": ("vignette", VIGNETTE),
}
SPATIAL_CHANGES = ("vignette",)  # changes that differ across the image (the others act on every pixel alike)
RECALIBRATION_NORMALS = 10
MAX_F1_DROP = 0.05  # the goal: the remedy keeps F1 within this of the unchanged-light F1


def change_light(image, change: str):  # noqa: ANN001, ANN201 (torch tensor (C, H, W) or (B, C, H, W) in [0, 1])
    """``image`` under the lighting change ``change`` (a key of ``CHANGES``), clipped and rounded to 8 bits."""
    import torch

    kind, value = CHANGES[change]
    if kind == "none":
        return image
    if kind == "gamma":
        changed = image.clamp(0, 1) ** value
    elif kind == "gain":
        changed = image * value
    elif kind == "channel_gains":
        gains = torch.tensor(value, dtype=image.dtype, device=image.device)
        if image.shape[-3] == 1:  # a one-channel image: its luminance (Rec. 601) under the new light
            gains = (gains * torch.tensor((0.299, 0.587, 0.114), dtype=image.dtype)).sum().view(1)
        changed = image * gains.view(-1, 1, 1)
    else:  # vignette
        height, width = image.shape[-2:]
        ys = torch.linspace(-1, 1, height, dtype=image.dtype, device=image.device).view(-1, 1)
        xs = torch.linspace(-1, 1, width, dtype=image.dtype, device=image.device).view(1, -1)
        changed = image * (1 - value * (ys**2 + xs**2) / 2)
    return torch.round(changed.clamp(0, 1) * 255) / 255


class ChangedLight:
    """A test dataset's augmentations with the lighting change first (the image only; masks pass through)."""

    def __init__(self, change: str, then) -> None:  # noqa: ANN001 (the dataset's own augmentations or None)
        self.change, self.then = change, then

    def __call__(self, image, mask=None):  # noqa: ANN001, ANN204
        from torchvision import tv_tensors

        changed = change_light(image, self.change)
        if isinstance(image, tv_tensors.Image):
            changed = tv_tensors.wrap(changed, like=image)
        if self.then is None:
            return changed if mask is None else (changed, mask)
        return self.then(changed) if mask is None else self.then(changed, mask)


def expand(
    datasets: list[dict[str, Any]], models: list[dict[str, Any]], settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One cell per model arm (``--arms``: ``none``, ``per_image``, ``flat_field``; default the first two); the
    changes run inside each cell."""
    unsupported = [dataset["label"] for dataset in datasets if dataset["kind"] not in KINDS]
    if unsupported:
        msg = f"--study light_changes needs MVTec or folder layouts (a validation split of normals); not {unsupported}"
        raise ValueError(msg)
    arms = chosen_arms(settings, MODEL_ARMS, DEFAULT_MODEL_ARMS, "light_changes")
    return datasets, [
        {**model, "label": f"{model['label']}@{arm}", "light_arm": arm} for model in models for arm in arms
    ]


def model_for_cell(model_spec: dict[str, Any]) -> dict[str, Any]:
    """The ``per_image`` and ``flat_field`` arms set the model's ``input_normalization``; a model without that
    option is an error."""
    arm = model_spec.get("light_arm")
    if arm not in NORMALIZATION_ARMS:
        return model_spec
    parameters = inspect.signature(import_class(model_spec["class_path"]).__init__).parameters
    if "input_normalization" not in parameters:
        msg = f"{model_spec['class_path']} has no input_normalization option: no {arm} arm for it"
        raise ValueError(msg)
    return {**model_spec, "init_args": {**(model_spec.get("init_args") or {}), "input_normalization": arm}}


def recalibration_normals(datamodule, change: str, seed: int, folder: Path) -> list[Path]:  # noqa: ANN001
    """``RECALIBRATION_NORMALS`` validation normals (seeded draw; all of them when there are fewer), under
    ``change``, written as PNG to ``folder``."""
    import numpy as np
    from anomalib.data.utils import LabelName, read_image
    from PIL import Image

    samples = datamodule.val_data.samples
    normals = samples[samples.label_index == LabelName.NORMAL]
    drawn = normals.sample(n=min(RECALIBRATION_NORMALS, len(normals)), random_state=seed).image_path
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, source in enumerate(drawn):
        image = change_light(read_image(source, as_tensor=True), change)
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = folder / f"{index:02d}_{Path(source).stem}.png"
        Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(path)
        paths.append(path)
    return paths


def measure(model, datamodule, seed: int, cell_dir: Path) -> dict[str, Any]:  # noqa: ANN001
    """Image AUROC and F1 of the fitted ``model`` under every change, as fitted and after recalibration.

    One test pass per change: recalibration moves the thresholds only, so its F1 comes from the same raw scores (a
    second pass for a model whose bank the normals extend).
    Returns ``{"light_changes": {change: {"plain": {...}, "recalibrated": {...}}}}`` for the cell's result.
    """
    import shutil

    from anomalib_ext.commands.recalibrate import image_thresholds_by_rule, memory_banks, recalibrate
    from anomalib_ext.models.components.thresholds import MIN_RECALIBRATION_NORMALS, labelling_threshold

    test_data = datamodule.test_data
    original = test_data.augmentations
    fitted = copy.deepcopy(model.post_processor.state_dict())
    fitted_threshold = labelling_threshold(model.post_processor)
    results: dict[str, Any] = {}
    scratch = cell_dir / "recalibration"
    try:
        for change in CHANGES:
            test_data.augmentations = ChangedLight(change, original)
            scores, labels = raw_test_scores(model, datamodule)
            results[change] = {"plain": scored(scores, labels, fitted_threshold)}
            normals = recalibration_normals(datamodule, change, seed, scratch / change)
            if len(normals) >= MIN_RECALIBRATION_NORMALS:
                recalibration = recalibrate(model, normals)  # the default rule
                results[change]["recalibrated"] = {
                    **scored(scores, labels, labelling_threshold(model.post_processor)),
                    "normals": len(normals),
                    "normals_flagged_before": recalibration.flagged("before"),
                    "rule": recalibration.rule,
                }
                model.post_processor.load_state_dict(fitted)
                results[change]["recalibrated_by_rule"] = {  # every rule, from the same normal and test scores
                    rule: scored(scores, labels, threshold)
                    for rule, threshold in image_thresholds_by_rule(model.post_processor, recalibration.normals).items()
                }
                if callable(getattr(model, "extend_bank", None)):  # the normals join the bank: the scores move
                    banks = memory_banks(model)
                    recalibrate(model, normals, extend_bank=True)
                    bank_scores, _ = raw_test_scores(model, datamodule)
                    results[change]["bank"] = scored(bank_scores, labels, labelling_threshold(model.post_processor))
                    model.load_state_dict(banks, strict=False)  # the fitted banks back (they resize on loading)
                    model.post_processor.load_state_dict(fitted)
            print(  # noqa: T201 (the cell's log)
                f"light_changes {change}: AUROC {results[change]['plain']['image_auroc']:.3f}, F1 "
                f"{results[change]['plain']['image_f1']:.3f} -> recalibrated "
                f"{results[change].get('recalibrated', {}).get('image_f1', 'not run (too few normals)')}",
                flush=True,
            )
    finally:
        test_data.augmentations = original
        model.post_processor.load_state_dict(fitted)
        shutil.rmtree(scratch, ignore_errors=True)
    return {"light_changes": results}


# ------------------------------------------------------------------------------------------------ report
def _arm_values(rows: list[dict[str, Any]], arm: str, change: str, key: str) -> list[float]:
    """``key`` under ``change`` for report arm ``arm``: a model arm, recalibrated when it has ``recalibration``
    (by the default rule, or by the rule after a colon)."""
    arm, _, rule = arm.partition(":")
    bank = arm.endswith("+bank")
    arm = arm.removesuffix("+bank")
    model_arm = "none" if arm == "recalibration" else arm.removesuffix("+recalibration")
    values = []
    for row in rows:
        if row["model"].rpartition("@")[2] != model_arm:
            continue
        figures = (row.get("light_changes") or {}).get(change, {})
        if rule:
            figures = figures.get("recalibrated_by_rule", {}).get(rule, {})
        else:
            figures = figures.get("bank" if bank else "recalibrated" if arm.endswith("recalibration") else "plain", {})
        value = figures.get(key)
        if value is not None and not math.isnan(value):
            values.append(value)
    return values


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _pivot(
    groups: dict[tuple[str, str], list[dict[str, Any]]], key: str, title: str, arms: tuple[str, ...] = REPORT_ARMS
) -> list[str]:
    """One row per dataset, model and arm, one column per change: the seed mean of ``key`` (and, for F1, the
    worst drop from the same arm's unchanged-light value)."""
    with_drop = key == "image_f1"
    drop_columns = " | worst ΔF1 | worst ΔF1 without vignette |"
    header = "| dataset | model | arm | seeds | " + " | ".join(CHANGES) + (drop_columns if with_drop else " |")
    lines = [title, "", header, "|---|---|---|---:|" + "---:|" * (len(CHANGES) + 2 * with_drop)]
    for (dataset, model), group in sorted(groups.items()):
        for arm in arms:
            means = {change: _mean(_arm_values(group, arm, change, key)) for change in CHANGES}
            if all(value is None for value in means.values()):
                continue
            seeds = len(_arm_values(group, arm, "unchanged", key))
            cells = " | ".join("–" if value is None else f"{value:.3f}" for value in means.values())
            row = f"| {dataset} | {model} | {arm} | {seeds} | {cells} |"
            reference = means["unchanged"]
            if with_drop:
                drops = [
                    (value - reference, change)
                    for change, value in means.items()
                    if change != "unchanged" and value is not None and reference is not None
                ]
                for kept in (drops, [drop for drop in drops if drop[1] not in SPATIAL_CHANGES]):
                    worst = min(kept, default=None)
                    row += (
                        " – |"
                        if worst is None
                        else f" {worst[0]:+.3f} ({worst[1]}){' holds' if worst[0] >= -MAX_F1_DROP else ''} |"
                    )
            lines.append(row)
    return [*lines, ""]


def report(rows: list[dict[str, Any]]) -> list[str]:
    ok = [row for row in rows if row.get("status") == "ok" and row.get("light_changes")]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in ok:
        groups.setdefault((row["dataset"], row["model"].rpartition("@")[0]), []).append(row)
    lines = ["## Study: controlled lighting changes at test time", ""]
    lines += [
        "Fitted and thresholded under the unchanged light; the same model tested under each change "
        "(`tools/benchmarking/studies/light_changes.py` documents them). Means over seeds. Arms: *none* as fitted; "
        "*per_image* / *flat_field* that `input_normalization`; *recalibration*: the *none* model's thresholds "
        "recomputed on "
        f"{RECALIBRATION_NORMALS} validation normals under the same change (`anomalib_ext.commands.recalibrate`, "
        "its default rule `anchored`; *:upper* with `--rule upper`; *+bank*: the normals also added to the model's "
        "memory bank, `--extend-bank`, and the test set scored again); "
        f"worst ΔF1: the largest F1 drop from the same arm's unchanged-light F1, 'holds' within {MAX_F1_DROP}.",
        "",
    ]
    flag_all = {}
    for row in ok:
        total, anomalous = row.get("n_test") or 0, row.get("n_test_anomalous") or 0
        if total and anomalous:
            flag_all[row["dataset"]] = 2 * (anomalous / total) / (1 + anomalous / total)
    if flag_all:
        lines += [
            "F1 of flagging every test image (what a threshold below every score gives): "
            + ", ".join(f"{dataset} {value:.3f}" for dataset, value in sorted(flag_all.items()))
            + ".",
            "",
        ]
    lines += _pivot(groups, "image_f1", "Image F1 (validation threshold):", REPORT_ARMS + BANK_ARMS + RULE_ARMS)
    # recalibration moves thresholds only: its AUROC is its model arm's; a bank that took the normals scores anew
    title = "Image AUROC (raw scores; the same with recalibration; *+bank*: after the bank took the normals):"
    lines += _pivot(groups, "image_auroc", title, MODEL_ARMS + BANK_ARMS)
    return lines
