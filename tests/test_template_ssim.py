"""TemplateSsim: pose recovery, where the map peaks, class-less templates, clear errors, Engine on dice."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomalib_ext.data import make_dice_dataset
from anomalib_ext.models import TemplateSsim
from anomalib_ext.models.components.alignment import to_image_frame
from anomalib_ext.models.template_ssim import TemplateSsimModel

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
    model = TemplateSsimModel(angles=ANGLES, max_shift=8).eval()
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
    with torch.no_grad():
        _, template_index = model.raw_maps(model._as_template_channels(images))
    assert template_index.tolist() == truth


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
    model = TemplateSsimModel(angles=[-4.0, 0.0, 4.0], max_shift=6).eval()
    order = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(0))
    model.fit([pooled[order[:24]]], [pooled[order[24:]]], num_templates=3)
    assert model.templates.shape == (3, 1, 64, 64)
    test = _class_images(root, "test")
    with torch.no_grad():
        assigned = [set(model.raw_maps(model._as_template_channels(test[n]))[1].tolist()) for n in sorted(test)]
    assert all(len(a) == 1 for a in assigned)  # each kind always matches the same template
    assert len(set.union(*assigned)) == 3  # and the three kinds match three different templates


def test_wrong_size_or_channels_give_a_clear_error() -> None:
    colour = torch.rand(6, 3, 64, 64)
    model = TemplateSsimModel(angles=[0.0], max_shift=4).eval()
    with pytest.raises(RuntimeError, match="fit"):
        model(colour[:1])
    model.fit([colour[:4]], [colour[4:]])
    assert model.templates.shape[1] == 3  # colour images keep colour templates
    with pytest.raises(ValueError, match=r"templates are \(C, H, W\) = \(3, 64, 64\)"):
        model(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match="channel count"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="topk_fraction"):
        TemplateSsimModel(angles=[0.0], topk_fraction=0.0)
    with pytest.raises(ValueError, match="num_templates"):
        TemplateSsim(num_templates=0)


def test_engine_on_dice_layout(dice_data: Path, tmp_path: Path) -> None:
    """The Dice datamodule feeds classes to the model; anomalies outscore normals; classes survive a reload."""
    from anomalib.engine import Engine
    from sklearn.metrics import roc_auc_score

    from anomalib_ext.data import Dice

    datamodule = Dice(root=dice_data, train_batch_size=16, eval_batch_size=16, num_workers=0, seed=0)
    model = TemplateSsim(image_size=(96, 96), max_shift=8, angles=tuple(ANGLES))
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
    model = TemplateSsimModel(angles=ANGLES, max_shift=8).eval()
    source = model.fit([classes[n][:6] for n in picked], [classes[n][6:] for n in picked], num_templates=2)
    assert source == [0, 0, 1, 1, 2, 2]
    assert model.templates.shape[0] == 6 and model.class_center.shape == (6,)
    test = _class_images(dice_data, "test")
    with torch.no_grad():
        for index, name in enumerate(picked):
            _, template_index = model.raw_maps(model._as_template_channels(test[name]))
            assert all(source[t] == index for t in template_index.tolist())


def test_pixel_statistics_keep_the_mark_at_the_peak(dice_data: Path) -> None:
    """Per-pixel standardisation (fitted on held-out normals) still puts a planted mark at the map's peak."""
    classes = _class_images(dice_data)
    names = sorted(classes)[:4]
    model = TemplateSsimModel(angles=ANGLES, max_shift=8, pixel_statistics=True).eval()
    model.fit([classes[n][:4] for n in names], [classes[n][4:] for n in names])
    assert model.pixel_std.shape == (4, 1, 96, 96) and bool((model.pixel_std > 0).all())
    normal = _class_images(dice_data, "test")[names[2]][0]
    marked = normal.clone()
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    marked[:, ((yy - 60) ** 2 + (xx - 40) ** 2) <= 16] = 0.1
    with torch.no_grad():
        output = model(torch.stack([normal, marked]))
    peak = int(output.anomaly_map[1, 0].flatten().argmax())
    assert abs(peak // 96 - 60) <= 4 and abs(peak % 96 - 40) <= 4
    assert output.pred_score[1] > output.pred_score[0] + 3.0


def test_lighting_changes_are_discounted_but_a_thin_line_is_not(dice_data: Path) -> None:
    """Photometric matching + illumination removal + residual channel: a global gain/offset and a smooth
    highlight barely move the score, a thin light line inside a dark area does (the dice failure modes)."""
    classes = _class_images(dice_data)
    names = sorted(classes)[:4]
    model = TemplateSsimModel(
        angles=ANGLES, max_shift=8, pixel_statistics=True, photometric=True, residual=True, illumination_sigma=4.0
    ).eval()
    model.fit([classes[n][:4] for n in names], [classes[n][4:] for n in names])
    assert model.pixel_mean.shape == (4, 2, 96, 96) and bool((model.pixel_std > 0).all())
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
    torch.testing.assert_close(
        model.match_photometry(darker[None, :1], normal[None, :1]), normal[None, :1], atol=0.05, rtol=0
    )
