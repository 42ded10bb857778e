"""TemplateSsim: pose recovery, where the map peaks, class-less templates, clear errors, Engine on dice."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomalib_ext.data import make_dice_dataset
from anomalib_ext.models import TemplateSsim
from anomalib_ext.models.components.alignment import to_image_frame
from anomalib_ext.models.components.stats import check_topk_fraction
from anomalib_ext.models.template_ssim import (
    AnomalyMapSettings,
    LightingSettings,
    PoseSearchSettings,
    TemplateSsimModel,
)
from anomalib_ext.models.template_ssim.torch_model import match_photometry

# the torch model's options beyond TemplateSsim's defaults that these tests switch off unless they test them
PLAIN = {"photometric": False, "residual": False, "pixel_statistics": False}
GROUPS = {"pose_search": PoseSearchSettings, "anomaly_map": AnomalyMapSettings, "lighting": LightingSettings}


def _torch_model(**options) -> TemplateSsimModel:
    """``TemplateSsimModel`` with ``TemplateSsim``'s defaults (declared there only), plain unless asked.

    ``options``: ``TemplateSsim`` arguments or keys of its settings groups (``angles``, ``residual``, ...).
    """
    options = {**PLAIN, **options}
    groups = {
        name: {key: options.pop(key) for key in [field.name for field in fields(kind)] if key in options}
        for name, kind in GROUPS.items()
    }
    return TemplateSsim(**groups, **options, visualizer=False).model


def _matched_template(model: TemplateSsimModel, images: torch.Tensor) -> list[int]:
    """Index of the template the pose search picks for each image."""
    with torch.no_grad():
        return model.search(model._as_template_channels(images)).reference_index.tolist()


ANGLES = [-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0]


def _read(path: Path) -> torch.Tensor:
    return torch.from_numpy(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)).float().div(255)[None].repeat(3, 1, 1)


def _class_images(root: Path, split: str = "train") -> dict[str, torch.Tensor]:
    folders = sorted(p for p in (root / split / "good").iterdir() if p.is_dir())
    return {f.name: torch.stack([_read(p) for p in sorted(f.glob("*.png"))]) for f in folders}


@pytest.fixture(scope="module")
def dice_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ts_dice")
    return make_dice_dataset(
        root,
        image_size=96,
        n_train_per_class=8,
        n_val_anomalous=3,
        n_test_good_per_class=2,
        n_test_per_defect=2,
        seed=3,
    )


@pytest.fixture(scope="module")
def fitted(dice_data: Path) -> tuple[TemplateSsimModel, list[str]]:
    """One template per dice class (11 classes; 07-10 are the same logo turned by quarter turns)."""
    classes = _class_images(dice_data)
    model = _torch_model(angles=ANGLES, max_shift=8).eval()
    names = sorted(classes)
    model.fit([classes[n][:5] for n in names], [classes[n][5:] for n in names])
    return model, names


def test_template_and_pose_are_recovered(fitted) -> None:
    model, names = fitted
    angles = torch.tensor([4.0, -6.0, 2.0, 0.0, -2.0, 6.0, -4.0, 4.0, -2.0, 2.0, 6.0])
    shifts = torch.tensor(
        [
            [3.0, -5.0],
            [-7.0, 2.0],
            [0.0, 6.0],
            [5.0, 5.0],
            [-2.0, -8.0],
            [8.0, 0.0],
            [1.0, 1.0],
            [-4.0, 3.0],
            [6.0, -6.0],
            [-8.0, -1.0],
            [2.0, 7.0],
        ]
    )
    generator = torch.Generator().manual_seed(0)
    images = to_image_frame(model.templates, angles, shifts)
    images = (images + 0.02 * torch.randn(images.shape, generator=generator)).clamp(0, 1).repeat(1, 3, 1, 1)
    with torch.no_grad():
        pose = model.search(model._as_template_channels(images))
    assert pose.reference_index.tolist() == list(range(len(names)))  # 07..10 not confused by rotation
    torch.testing.assert_close(pose.angle, angles)
    torch.testing.assert_close(pose.shift, shifts)


def test_normal_dice_match_their_own_class(fitted, dice_data: Path) -> None:
    model, names = fitted
    test = _class_images(dice_data, "test")
    images = torch.cat([test[n] for n in names])
    truth = [names.index(n) for n in names for _ in range(len(test[n]))]
    assert _matched_template(model, images) == truth


def test_planted_mark_is_where_the_map_peaks(fitted, dice_data: Path) -> None:
    model, names = fitted
    normal = _class_images(dice_data, "test")[names[5]][0].clone()
    marked = normal.clone()
    centre_y, centre_x = 30, 62
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    marked[:, ((yy - centre_y) ** 2 + (xx - centre_x) ** 2) <= 16] = 0.1
    with torch.no_grad():
        output = model(torch.stack([normal, marked]))
    peak = int(output.anomaly_map[1, 0].flatten().argmax())
    assert abs(peak // 96 - centre_y) <= 4 and abs(peak % 96 - centre_x) <= 4
    assert output.pred_score[1] > output.pred_score[0] + 3.0  # in units of the class's normal spread


def test_class_less_mode_finds_one_template_per_kind(tmp_path: Path) -> None:
    root = make_dice_dataset(
        tmp_path,
        image_size=64,
        classes=3,
        n_train_per_class=10,
        n_val_anomalous=1,
        n_test_good_per_class=3,
        n_test_per_defect=1,
        seed=5,
    )
    train = _class_images(root)
    pooled = torch.cat([train[n] for n in sorted(train)])  # labels thrown away
    model = _torch_model(angles=[-4.0, 0.0, 4.0], max_shift=6).eval()
    order = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(0))
    model.fit([pooled[order[:24]]], [pooled[order[24:]]], num_templates=3)
    assert model.templates.shape == (3, 1, 64, 64)
    test = _class_images(root, "test")
    assigned = [set(_matched_template(model, test[n])) for n in sorted(test)]
    assert all(len(a) == 1 for a in assigned)  # each kind always matches the same template
    assert len(set.union(*assigned)) == 3  # and the three kinds match three different templates


def test_wrong_size_or_channels_give_a_clear_error() -> None:
    colour = torch.rand(6, 3, 64, 64)
    model = _torch_model(angles=[0.0], max_shift=4).eval()
    with pytest.raises(RuntimeError, match="fit"):
        model(colour[:1])
    model.fit([colour[:4]], [colour[4:]])
    assert model.templates.shape[1] == 3  # colour images keep colour templates
    with pytest.raises(ValueError, match=r"templates are \(C, H, W\) = \(3, 64, 64\)"):
        model(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match="channel count"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"topk_fraction must be in \(0, 1\], got 0.0"):
        _torch_model(angles=[0.0], topk_fraction=0.0)
    with pytest.raises(ValueError, match="num_templates"):
        TemplateSsim(num_templates=0)
    with pytest.raises(ValueError, match=r"unknown keys \['max_shfit'\]"):
        TemplateSsim(pose_search={"max_shfit": 4})


def test_topk_fraction_check_names_its_interval() -> None:
    """The shared check: (0, 1] for a mean of the top pixels, [0, 1) where 0 means the maximum."""
    assert check_topk_fraction(1.0) == 1.0
    assert check_topk_fraction(0.0, allow_zero=True) == 0.0
    cases = ((0.0, False, "(0, 1]"), (1.2, False, "(0, 1]"), (1.0, True, "[0, 1)"), (-0.1, True, "[0, 1)"))
    for value, allow_zero, interval in cases:
        with pytest.raises(ValueError, match=re.escape(f"topk_fraction must be in {interval}, got {value}")):
            check_topk_fraction(value, allow_zero=allow_zero)


def test_engine_on_dice_layout(dice_data: Path, tmp_path: Path) -> None:
    """The Dice datamodule feeds classes to the model; anomalies outscore normals; classes survive a reload."""
    from anomalib.engine import Engine
    from sklearn.metrics import roc_auc_score

    from anomalib_ext.data import Dice

    datamodule = Dice(root=dice_data, train_batch_size=16, eval_batch_size=16, num_workers=0, seed=0)
    model = TemplateSsim(image_size=(96, 96), pose_search={"max_shift": 8, "angles": ANGLES})
    engine = Engine(
        max_epochs=1,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model=model, datamodule=datamodule)
    assert model.class_names == [f"{c:02d}" for c in range(11)]
    assert model.model.templates.shape == (11, 1, 96, 96)
    batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    scores = torch.cat([b.pred_score.flatten() for b in batches]).numpy()
    labels = torch.cat([b.gt_label.flatten() for b in batches]).int().numpy()
    assert roc_auc_score(labels, scores) >= 0.95
    assert (scores[labels == 1] > scores[labels == 0].max()).mean() >= 0.8
    checkpoint = tmp_path / "ts.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    reloaded = TemplateSsim.load_from_checkpoint(checkpoint, map_location="cpu")
    assert reloaded.class_names == model.class_names
    np.testing.assert_array_equal(reloaded.model.template_class.numpy(), model.model.template_class.numpy())


def test_several_templates_per_class_keep_their_class(fitted, dice_data: Path) -> None:
    """k-medoids inside each class (e.g. lighting regimes): every template has its own statistics."""
    _, names = fitted
    classes = _class_images(dice_data)
    picked = names[:3]
    model = _torch_model(angles=ANGLES, max_shift=8).eval()
    source = model.fit([classes[n][:6] for n in picked], [classes[n][6:] for n in picked], num_templates=2)
    assert source == [0, 0, 1, 1, 2, 2]
    assert model.templates.shape[0] == 6 and model.class_center.shape == (6,)
    test = _class_images(dice_data, "test")
    for index, name in enumerate(picked):
        assert all(source[t] == index for t in _matched_template(model, test[name]))


def _assert_planted_mark_peaks_and_stands_out(model: TemplateSsimModel, normal: torch.Tensor) -> None:
    """A dark disc planted on a normal 96 px image: the map peaks on it and its score is 3 normal spreads higher."""
    marked = normal.clone()
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    marked[:, ((yy - 60) ** 2 + (xx - 40) ** 2) <= 16] = 0.1
    with torch.no_grad():
        output = model(torch.stack([normal, marked]))
    peak = int(output.anomaly_map[1, 0].flatten().argmax())
    assert abs(peak // 96 - 60) <= 4 and abs(peak % 96 - 40) <= 4
    assert output.pred_score[1] > output.pred_score[0] + 3.0


def test_pixel_statistics_keep_the_mark_at_the_peak(dice_data: Path) -> None:
    """Per-pixel standardisation (fitted on held-out normals) still puts a planted mark at the map's peak."""
    classes = _class_images(dice_data)
    names = sorted(classes)[:4]
    model = _torch_model(angles=ANGLES, max_shift=8, pixel_statistics=True).eval()
    model.fit([classes[n][:4] for n in names], [classes[n][4:] for n in names])
    assert model.pixel_stats.scale.shape == (4, 1, 96, 96) and bool((model.pixel_stats.scale > 0).all())
    _assert_planted_mark_peaks_and_stands_out(model, _class_images(dice_data, "test")[names[2]][0])


def test_classes_too_small_to_split_are_cross_fitted(dice_data: Path) -> None:
    """With no normals held out (few images), every image builds the template and every image calibrates it, each
    scored against a template built without it; a planted mark still peaks there and scores far above a normal."""
    classes = _class_images(dice_data)
    names = sorted(classes)[:3]
    train = [classes[name] for name in names]  # 8 images each
    model = _torch_model(angles=ANGLES, max_shift=8, pixel_statistics=True).eval()
    model.fit(train, [images[:0] for images in train], cross_fit_folds=4)
    grey = [images.mean(dim=1, keepdim=True) for images in train]  # the dice images are grey: grey templates
    for entry, images in enumerate(grey):
        torch.testing.assert_close(model.templates[entry], model.build_template(images))
    folds = model._cross_fitted_folds(grey, [images[:0] for images in grey], 4)
    assert len(folds) == 3 * 4
    for entry, images in enumerate(grey):
        entry_folds = folds[4 * entry : 4 * entry + 4]
        held = torch.cat([fold_images for _, fold_images in entry_folds])
        assert sorted(map(tuple, held.flatten(1).tolist())) == sorted(map(tuple, images.flatten(1).tolist()))
        for templates, fold_images in entry_folds:  # the fold's own template left its images out
            assert not torch.equal(templates[entry], model.templates[entry])
            torch.testing.assert_close(templates[entry], model.build_template(images[~_rows_in(images, fold_images)]))
    assert bool((model.pixel_stats.scale > 0).all())
    _assert_planted_mark_peaks_and_stands_out(model, _class_images(dice_data, "test")[names[1]][0])


def _rows_in(images: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Which of ``images`` are in ``subset`` (by content)."""
    return (images.flatten(1)[:, None] == subset.flatten(1)[None]).all(dim=-1).any(dim=1)


def test_lighting_changes_are_discounted_but_a_thin_line_is_not(dice_data: Path) -> None:
    """Photometric matching + illumination removal + residual channel: a global gain/offset and a smooth
    highlight barely move the score, a thin light line inside a dark area does (the dice failure modes)."""
    classes = _class_images(dice_data)
    names = sorted(classes)[:4]
    model = _torch_model(
        angles=ANGLES, max_shift=8, pixel_statistics=True, photometric=True, residual=True, illumination_sigma=4.0
    ).eval()
    model.fit([classes[n][:4] for n in names], [classes[n][4:] for n in names])
    assert model.pixel_stats.mean.shape == (4, 2, 96, 96) and bool((model.pixel_stats.scale > 0).all())
    normal = _class_images(dice_data, "test")[names[1]][0]
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    darker = (normal * 0.85 - 0.03).clamp(0, 1)  # another lighting session
    highlight = (normal + 0.12 * torch.exp(-((yy - 30) ** 2 + (xx - 30) ** 2) / (2 * 12.0**2))).clamp(0, 1)
    dark_spots = normal[0] < 0.5
    line = normal.clone()
    on_line = (yy - xx).abs() < 1.0
    line[:, on_line & dark_spots] = 0.9
    assert int((on_line & dark_spots).sum()) >= 6
    with torch.no_grad():
        scores = model(torch.stack([normal, darker, highlight, line])).pred_score
    assert abs(float(scores[1] - scores[0])) < 1.5
    assert abs(float(scores[2] - scores[0])) < 1.5
    assert scores[3] > scores[0] + 3.0
    matched, _ = match_photometry(darker[None, :1], normal[None, :1])
    torch.testing.assert_close(matched, normal[None, :1], atol=0.05, rtol=0)


def _session(images: torch.Tensor, gain: float, seed: int) -> torch.Tensor:
    """Another lighting session: scaled grey levels plus the same sensor noise (so darker = noisier once matched)."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * 0.03
    return (images * gain + noise).clamp(0, 1)


def test_gain_trend_takes_the_lighting_out_of_normal_scores(tmp_path: Path) -> None:
    """Normals of a darker session score like those of the bright one once the per-class score follows the
    photometric gain, and a planted mark on a dark image still scores above every normal of either session."""
    root = make_dice_dataset(tmp_path, image_size=96, n_train_per_class=16, n_test_good_per_class=1, seed=3)
    classes = _class_images(root)
    names = sorted(classes)[:4]
    templates = [_session(classes[n][:6], 1.0, 0) for n in names]
    calibration = [
        torch.cat([_session(classes[n][6:12], gain, seed) for gain in (1.0, 0.7) for seed in (1, 2)]) for n in names
    ]
    bright = torch.cat([_session(classes[n][12:], 1.0, 7) for n in names])
    dark = torch.cat([_session(classes[n][12:], 0.7, 8) for n in names])
    marked = dark[:1].clone()
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    marked[:, :, ((yy - 60) ** 2 + (xx - 40) ** 2) <= 16] = 0.05
    gaps = {}
    for trend in (False, True):
        model = _torch_model(angles=ANGLES, max_shift=8, photometric=True, residual=True, gain_trend=trend).eval()
        model.fit(templates, calibration)
        with torch.no_grad():
            scores = model(torch.cat([bright, dark, marked])).pred_score
        gaps[trend] = float(scores[len(bright) : -1].median() - scores[: len(bright)].median())
        assert scores[-1] > scores[:-1].max() + 1.0
    assert gaps[False] > 0.8  # darker = noisier once matched: the effect is there without the trend ...
    assert abs(gaps[True]) < gaps[False] / 2  # ... and mostly gone with it
    assert model.gain_slope.shape == (4,) and bool((model.gain_slope < 0).all())


def test_gain_trend_does_not_extrapolate_beyond_the_normals() -> None:
    """A gain far outside the held-out normals' range gets the centre at the edge of that range."""
    model = _torch_model(angles=[0.0], photometric=True, gain_trend=True)
    model.class_center = torch.tensor([1.0])
    model.gain_reference, model.gain_slope = torch.tensor([0.95]), torch.tensor([-20.0])
    model.gain_low, model.gain_high = torch.tensor([0.85]), torch.tensor([1.05])
    centers = model.normal_center(torch.tensor([0, 0, 0]), torch.tensor([0.3, 0.9, 1.5]))
    torch.testing.assert_close(centers, torch.tensor([1.0 + 20 * 0.1, 1.0 + 20 * 0.05, 1.0 - 20 * 0.1]))


def test_fit_does_not_depend_on_the_order_of_the_training_images(dice_data: Path) -> None:
    """The per-class sample is keyed on image content, so a shuffled loader gives the same templates and
    statistics (a shuffled order used to change which images built the template and the F1 with it)."""
    from anomalib.data import ImageBatch

    paths = sorted((dice_data / "train" / "good").glob("*/*.png"))
    images = torch.stack([_read(path) for path in paths])

    def fitted(order: torch.Tensor) -> TemplateSsim:
        model = TemplateSsim(
            image_size=96, pose_search={"angles": ANGLES, "max_shift": 8}, max_images_per_class=5, visualizer=False
        )
        for chunk in order.split(16):
            model.training_step(ImageBatch(image=images[chunk], image_path=[str(paths[i]) for i in chunk]))
        model.fit()
        return model

    first = fitted(torch.arange(len(paths)))
    second = fitted(torch.randperm(len(paths), generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(first.model.templates, second.model.templates)
    torch.testing.assert_close(first.model.class_center, second.model.class_center)
    torch.testing.assert_close(first.model.gain_slope, second.model.gain_slope)
