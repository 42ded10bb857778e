"""Every model in ``anomalib_ext.models.__all__`` with its cheapest settings, taken from the harness cases."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

import anomalib_ext.models as ext_models
import tests.harness.cases as cases_package
from tests.harness.case import ModelCase

MAX_EPOCHS = 2  # enough for two-stage models (teacher then student); the harness checks accuracy, not us


def _case_modules() -> list:
    return [
        importlib.import_module(f"{cases_package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(cases_package.__path__)
    ]


def cheapest_cases() -> list[ModelCase]:
    """One case per model of ``anomalib_ext.models.__all__`` (the first harness case that builds it).

    A model that has no harness case yet is built with its defaults, so a newly landed model is covered at once.
    """
    modules = _case_modules()
    cases = []
    for name in ext_models.__all__:
        model_class = getattr(ext_models, name)
        case = next(
            (m.CASE for m in modules if any(v is model_class for v in vars(m).values()) and hasattr(m, "CASE")),
            None,
        )
        if case is None:
            case = ModelCase(name=name, build=model_class)
        cases.append(replace(case, max_epochs=min(case.max_epochs, MAX_EPOCHS)))
    return cases


def write_constant_dataset(root: Path, size: int = 24, value: int = 0) -> Path:
    """MVTec layout, category ``constant``: constant, duplicated, tiny, mixed-mode training images.

    train/good holds one all-``value`` image saved as RGB (three identical copies), grayscale, palette and RGBA:
    after conversion to RGB every training image is the same constant image. Images are ``size`` px, smaller
    than any model's input. test/good is constant too; test/spot has a bright square and its mask.
    """
    base = root / "constant"
    good = base / "train" / "good"
    good.mkdir(parents=True)
    rgb = np.full((size, size, 3), value, np.uint8)
    for index in range(3):
        Image.fromarray(rgb).save(good / f"{index:03d}.png")
    Image.fromarray(rgb[..., 0]).save(good / "003_gray.png")
    Image.fromarray(rgb).convert("P").save(good / "004_palette.png")
    Image.fromarray(np.dstack([rgb, np.full((size, size), 255, np.uint8)])).save(good / "005_rgba.png")
    (base / "test" / "good").mkdir(parents=True)
    for index in range(2):
        Image.fromarray(rgb).save(base / "test" / "good" / f"{index:03d}.png")
    (base / "test" / "spot").mkdir(parents=True)
    (base / "ground_truth" / "spot").mkdir(parents=True)
    for index in range(2):
        image, mask = rgb.copy(), np.zeros((size, size), np.uint8)
        corner = 4 + 6 * index
        image[corner : corner + 6, corner : corner + 6] = 255 - value
        mask[corner : corner + 6, corner : corner + 6] = 255
        Image.fromarray(image).save(base / "test" / "spot" / f"{index:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth" / "spot" / f"{index:03d}_mask.png")
    return root


def datamodule(root: Path, category: str, seed: int = 0):
    from anomalib.data import MVTecAD

    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        val_split_mode="from_test",
        val_split_ratio=0.5,
        seed=seed,
    )


def engine(workdir: Path, case: ModelCase):
    from anomalib.engine import Engine

    return Engine(
        max_epochs=case.max_epochs,
        default_root_dir=workdir,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        **case.engine_kwargs,
    )
