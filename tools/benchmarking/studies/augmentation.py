"""``--study augmentation``: fit each model on augmented views of the training normals (Dfkdm's study).

Every model becomes one model per augmentation, ``<label>+<augmentation>``: the training split is repeated
``--augmented-views`` times and each view goes through the augmentation (anomalib's ``train_augmentations``);
``none`` is the plain model. Validation and test are untouched, so the thresholds and test metrics say whether
the augmentation helps. The nuisances are what a plant sees: part pose and lighting.
"""

from __future__ import annotations

from typing import Any

AUGMENTATIONS = ("none", "pose", "lighting", "pose+lighting", "any_rotation")


def make_augmentation(name: str):  # noqa: ANN201
    """A torchvision v2 transform on [0, 1] float images (``None`` for ``none``)."""
    from torchvision.transforms import v2

    pose = v2.RandomAffine(degrees=10.0, translate=(0.04, 0.04))
    lighting = v2.ColorJitter(brightness=0.1, contrast=0.1)
    return {
        "none": None,
        "pose": pose,
        "lighting": lighting,
        "pose+lighting": v2.Compose([pose, lighting]),
        "any_rotation": v2.RandomRotation(degrees=180.0),
    }[name]


def expand(
    datasets: list[dict[str, Any]], models: list[dict[str, Any]], settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    views = settings.get("augmented_views", 8)
    expanded = [
        {
            **model,
            "label": f"{model['label']}+{name}",
            "train_augmentation": None if name == "none" else name,
            "train_views": 1 if name == "none" else views,
        }
        for model in models
        for name in AUGMENTATIONS
    ]
    return datasets, expanded


def apply_before_setup(datamodule, model_spec: dict[str, Any]) -> None:  # noqa: ANN001
    name = model_spec.get("train_augmentation")
    if name:
        datamodule.train_augmentations = make_augmentation(name)


def apply_after_setup(datamodule, model_spec: dict[str, Any]) -> None:  # noqa: ANN001
    """Repeat the training split ``train_views`` times: each repetition is a new random view."""
    import pandas as pd

    views = model_spec.get("train_views", 1)
    if views > 1:
        samples = datamodule.train_data.samples
        datamodule.train_data.samples = pd.concat([samples] * views, ignore_index=True)


def report(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Study: density fitted on augmented training views", ""]
    lines += [
        "| dataset | model + augmentation | seed | fit images (views) | image AUROC | image F1 | F1 over val draws |"
    ]
    lines += ["|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        if row.get("status") != "ok":
            continue
        draws = row.get("image_f1_draws") or []
        spread = f"{sum(draws) / len(draws):.3f} [{min(draws):.3f}, {max(draws):.3f}]" if draws else "–"
        f1 = row.get("image_f1")
        lines.append(
            f"| {row['dataset']} | {row['model']} | {row.get('seed', '')} | {row.get('n_train')} | "
            f"{row['image_auroc']:.3f} | {'–' if f1 is None else f'{f1:.3f}'} | {spread} |"
        )
    return [*lines, ""]
