"""Large images, small defects: synthetic parts with a dark fleck of 4-6 px, and what a test of tiling needs.

Shrinking the image by half, what a 256 px config does to a 512 px camera image, drowns the fleck; a family with
``image_tiling`` keeps the full resolution. Used by tests/test_large_images.py (the fit-only families and the
export) and tests/test_large_images_trained.py (the families trained with gradients, in their own file so that
pytest-xdist runs them beside the others).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SIZE = 256  # the "camera" resolution of the synthetic parts
SHRUNK = SIZE // 2
# the gradient families (tests/test_large_images_trained.py, test_large_images_autoencoder.py): shrunk as their 128 px
# configs shrink a 512 px image, and scored by the top 0.001 of the map (65 pixels at 256 px, a small defect's size)
GRADIENT_SHRUNK = SIZE // 4
SMALL_DEFECT_TOPK = 0.001
# their optimiser steps take 2 parts each (8 steps an epoch): what they need to learn is steps, not images per step,
# and a step on 2 parts (8 tiles) costs a quarter of one on 8 (the autoencoder at 8 parts a step: 120 s for 100
# steps, 2 threads; at 2 a step 45 s for 104, the fleck-to-normal score margin the same)
GRADIENT_BATCH = 2
TILES = {"tile_size": SIZE // 2, "stride": SIZE // 2}


def make_flecked_parts(root: Path) -> Path:
    """16 normal training parts, 6 normal and 5 flecked test parts at ``SIZE`` px (category ``part``)."""
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    make_mvtec_dataset(
        root, category="part", image_size=SIZE, n_train=16, n_test_good=6, n_test_per_defect=5, defects=("speck",)
    )
    return root


def test_images(root: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The test images at full size and whether each is flecked."""
    from anomalib.data.utils import read_image

    paths = sorted((root / "part" / "test").glob("*/*.png"))
    images = torch.stack([read_image(path, as_tensor=True) for path in paths])
    return images, np.array([path.parent.name != "good" for path in paths])


test_images.__test__ = False  # a helper, not a test


def fit(model, root: Path, workdir: Path, epochs: int = 1, seed: int = 0, batch_size: int = 8):  # noqa: ANN001, ANN201
    """``model`` trained on the flecked parts' normals (seeded), in eval mode, with its engine."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(seed)
    # seed_everything also exports PL_GLOBAL_SEED, which every later fit in this worker (and the CLI runs it starts)
    # would inherit: keep the seed to this fit
    os.environ.pop("PL_GLOBAL_SEED", None)
    datamodule = MVTecAD(root=root, category="part", train_batch_size=batch_size, eval_batch_size=8, num_workers=0)
    engine = Engine(  # validated once, at the end: the tests read raw scores, which thresholds do not touch
        max_epochs=epochs,
        check_val_every_n_epoch=epochs,
        default_root_dir=workdir,
        logger=False,
        enable_progress_bar=False,
        devices=1,
    )
    engine.fit(model=model, datamodule=datamodule)
    return model.eval(), engine


def raw_scores(model, images: torch.Tensor) -> np.ndarray:  # noqa: ANN001
    """The torch model's unnormalised image scores: the normalised ones are clamped and could hide a tie."""
    with torch.no_grad():
        return model.model(model.pre_processor.transform(images)).pred_score.flatten().numpy()


def assert_only_tiling_finds_every_fleck(
    family: str,
    shrunk_scores: np.ndarray,
    tiled_scores: np.ndarray,
    flecked: np.ndarray,
    shrunk_size: int = SHRUNK,
) -> None:
    """The shrunk model scores some flecked part at or below a normal one; the tiled one every fleck above all."""
    assert (shrunk_scores[flecked] <= shrunk_scores[~flecked].max()).any(), (
        f"{family} at {shrunk_size} px already finds every fleck: {shrunk_scores[flecked]} vs normals "
        f"{shrunk_scores[~flecked]}; the test no longer shows what tiling adds"
    )
    assert tiled_scores[flecked].min() > tiled_scores[~flecked].max(), (
        f"{family} tiled at {SIZE} px: flecks {tiled_scores[flecked]} vs normals {tiled_scores[~flecked]}"
    )


def assert_shrunk_misses_and_tiled_finds(
    family: str, build, epochs: int, root: Path, workdir: Path, shrunk: int, batch_size: int = GRADIENT_BATCH
) -> None:  # noqa: ANN001
    """Fit ``build`` (a model for an ``image_size`` and optional ``image_tiling``) shrunk to ``shrunk`` px and tiled at
    full size, ``epochs`` of ``batch_size`` images each, and check that only the tiled one ranks every flecked part
    above every normal one."""
    images, flecked = test_images(root)
    shrunk_model, _ = fit(build(image_size=shrunk), root, workdir / "shrunk", epochs, batch_size=batch_size)
    tiled = build(image_size=SIZE, image_tiling=TILES)
    tiled_model, _ = fit(tiled, root, workdir / "tiled", epochs, batch_size=batch_size)
    assert_only_tiling_finds_every_fleck(
        family, raw_scores(shrunk_model, images), raw_scores(tiled_model, images), flecked, shrunk_size=shrunk
    )
