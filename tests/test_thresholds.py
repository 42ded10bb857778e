"""Thresholds: the synthetic validation split is reproducible, and the image threshold stays within reach of the
normal validation scores (``RobustThresholdPostProcessor``). The fooling test (every family, validation anomalies
much easier or much harder than the test defects) lives in tests/test_model_harness.py, on its trained models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch, MVTecAD

from anomalib_ext.data.seeded_split import ensure_seeded_anomalies, setup_with_seeded_anomalies
from anomalib_ext.models.components.thresholds import NormalScoreWindow, RobustThresholdPostProcessor, clamp_threshold


def _synthetic_datamodule(root: Path, seed: int = 7) -> MVTecAD:
    return MVTecAD(
        root=root, category="synthetic", num_workers=0, val_split_mode="synthetic", val_split_ratio=0.25, seed=seed
    )


def _validation_pixels(datamodule: MVTecAD) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Labels (sorted by file name) and every validation image and mask, as arrays."""
    import cv2

    samples = datamodule.val_data.samples.sort_values("image_path")
    images = np.stack([cv2.imread(str(path)) for path in samples.image_path])
    masks = np.stack(
        [cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in samples.mask_path if isinstance(path, str) and path]
    )
    return [Path(p).name for p in samples.image_path], images, masks


def test_synthetic_validation_split_depends_on_the_datamodule_seed_only(mvtec_root: Path) -> None:
    """Two set-ups after different random histories (``anomalib train`` never applies ``seed_everything``) draw
    the same anomalies; another datamodule seed draws other ones; the global random stream is left untouched."""
    draws = []
    for history in (1, 2):
        torch.manual_seed(history)
        np.random.seed(history)  # noqa: NPY002
        before = torch.rand(1)
        torch.manual_seed(history)
        datamodule = _synthetic_datamodule(mvtec_root)
        setup_with_seeded_anomalies(datamodule)
        assert torch.equal(torch.rand(1), before), "drawing anomalies moved the global torch generator"
        draws.append(_validation_pixels(datamodule))
    (names_a, images_a, masks_a), (names_b, images_b, masks_b) = draws
    assert names_a == names_b
    assert len(masks_a) >= 2, "no synthetic anomaly was drawn"
    assert np.array_equal(images_a, images_b)
    assert np.array_equal(masks_a, masks_b)

    other = _synthetic_datamodule(mvtec_root, seed=8)
    setup_with_seeded_anomalies(other)
    assert not np.array_equal(_validation_pixels(other)[2], masks_a), "the datamodule seed is ignored"


def test_a_split_drawn_without_seeding_is_redrawn_from_the_datamodule_seed(mvtec_root: Path) -> None:
    seeded = _synthetic_datamodule(mvtec_root)
    setup_with_seeded_anomalies(seeded)
    by_hand = _synthetic_datamodule(mvtec_root)
    torch.manual_seed(123)
    by_hand.setup("fit")  # as a DDP rank other than 0 does (Lightning skips prepare_data there)
    assert ensure_seeded_anomalies(by_hand) == ["val_data"]
    assert ensure_seeded_anomalies(by_hand) == []  # drawn once
    assert np.array_equal(_validation_pixels(by_hand)[1], _validation_pixels(seeded)[1])


def test_two_unseeded_fits_of_the_same_config_give_the_same_threshold(mvtec_root: Path, tmp_path: Path) -> None:
    """The reported bug end to end: a fit-only model (deterministic fit) fitted twice after different random
    histories, validated on anomalib's synthetic split, must pick the same threshold."""
    from anomalib.engine import Engine

    from anomalib_ext.models import Dfkdm

    thresholds = []
    for history in (1, 2):
        torch.manual_seed(history)
        np.random.seed(history)  # noqa: NPY002
        model = Dfkdm(image_size=64, layers=["blocks.2"], check_data=False)
        engine = Engine(
            max_epochs=1, default_root_dir=tmp_path / str(history), accelerator="cpu", devices=1, logger=False
        )
        engine.fit(model=model, datamodule=_synthetic_datamodule(mvtec_root))
        processor = model.post_processor
        thresholds.append((float(processor.image_threshold), float(processor.f1_optimal_image_threshold)))
    assert np.isfinite(thresholds[0]).all()
    assert thresholds[0] == thresholds[1]


def _validate(processor: RobustThresholdPostProcessor, normal: list[float], anomalous: list[float]) -> None:
    scores = torch.tensor(normal + anomalous)
    labels = torch.tensor([0] * len(normal) + [1] * len(anomalous))
    batch = ImageBatch(image=torch.zeros(len(scores), 3, 8, 8), gt_label=labels, pred_score=scores)
    processor.on_validation_batch_end(None, None, batch)  # type: ignore[arg-type]
    processor.on_validation_epoch_end(None, None)  # type: ignore[arg-type]


NORMAL = [float(v) for v in np.linspace(0.0, 1.0, 11)]  # median 0.5, q90 0.9, max 1.0 -> window [0.9, 1.25]


@pytest.mark.parametrize(
    ("anomalous", "expected", "why"),
    [
        ([50.0, 60.0, 70.0], 1.25, "easy synthetic anomalies: capped just above the normal scores"),
        ([0.1, 0.3, 0.5], 0.9, "hard synthetic anomalies: never below the normals' 90 % quantile"),
        ([1.1, 1.2, 1.3], 1.1, "anomalies right above the normals: the F1-optimal threshold is kept"),
    ],
)
def test_threshold_is_the_f1_optimum_clamped_into_the_normal_window(anomalous, expected, why) -> None:
    processor = RobustThresholdPostProcessor()
    _validate(processor, NORMAL, anomalous)
    assert float(processor.image_threshold) == pytest.approx(expected), why
    assert processor.normal_score_window == pytest.approx((0.9, 1.25))
    # labels and normalisation follow the new threshold: 0.5 at the threshold, as anomalib users expect
    raw = torch.tensor([expected - 0.01, expected + 0.01])
    output = processor(InferenceBatch(pred_score=raw))
    assert output.pred_label.tolist() == [False, True]


def test_without_normal_validation_images_the_f1_threshold_stays() -> None:
    processor = RobustThresholdPostProcessor()
    _validate(processor, [], [3.0, 4.0])
    assert float(processor.image_threshold) == pytest.approx(3.0)
    window = NormalScoreWindow()
    assert all(np.isnan(v) for v in (float(b) for b in window.compute()))
    nan = torch.tensor(float("nan"))
    assert float(clamp_threshold(torch.tensor(2.0), nan, nan)) == 2.0


def test_normalised_scores_keep_their_order_outside_the_validation_range() -> None:
    """anomalib clamps normalised scores to [0, 1] around the validation min/max: with a tiny validation split many
    test scores tie at 0 or 1 and the printed AUROC drops (issue 23). Ours stay strictly ordered, in (0, 1), with
    0.5 at the threshold (labels unchanged)."""
    from anomalib_ext.models.components import RobustThresholdPostProcessor

    norm_min, norm_max, threshold = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(1.5)
    scores = torch.tensor([-50.0, 0.0, 0.9, 1.4, 1.5, 1.6, 2.1, 3.0, 40.0, 4000.0])
    normalised = RobustThresholdPostProcessor._normalize(scores, norm_min, norm_max, threshold)
    assert torch.all(normalised[1:] > normalised[:-1])  # anomalib's clamp ties the first two and the last four
    assert torch.all((normalised > 0) & (normalised < 1))
    assert float(normalised[4]) == 0.5
    assert torch.equal(normalised >= 0.5, scores >= threshold)
    # same slope as anomalib's linear map at the threshold
    step = 1e-3
    slope = (RobustThresholdPostProcessor._normalize(threshold + step, norm_min, norm_max, threshold) - 0.5) / step
    assert abs(float(slope) - 1.0 / float(norm_max - norm_min)) < 1e-2
