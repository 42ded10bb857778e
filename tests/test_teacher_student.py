"""TeacherStudent beyond the shared harness: map maths, losses, argument errors, configs, both stages,
single-template mode."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.data.synthetic import make_mvtec_dataset
from anomalib_ext.models import TeacherStudent
from anomalib_ext.models.teacher_student import Augmentation, SingleTemplate, TeacherFinetuning
from anomalib_ext.models.teacher_student.anomaly_map import cosine_anomaly_map
from anomalib_ext.models.teacher_student.loss import FeatureMatchingLoss, TeacherClassifierLoss

IMAGE_SIZE = 64
CONFIG_DIR = Path(__file__).parents[1] / "anomalib_ext" / "configs" / "teacher_student"
CONFIG = CONFIG_DIR / "mvtec.yaml"


def test_cosine_map_is_zero_where_features_agree_and_combines_by_mode() -> None:
    teacher = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    assert cosine_anomaly_map(teacher, teacher, (8, 8), "mul").abs().max() < 1e-5
    assert cosine_anomaly_map(teacher, teacher, (8, 8), "sum").abs().max() < 1e-5
    # student disagrees on layer 0 only (opposite direction: distance 2): product stays 0, sum reaches 2
    student = [-teacher[0], teacher[1]]
    assert cosine_anomaly_map(teacher, student, (8, 8), "mul").abs().max() < 1e-5
    summed = cosine_anomaly_map(teacher, student, (8, 8), "sum")
    assert summed.shape == (2, 1, 8, 8)
    assert torch.allclose(summed, torch.full_like(summed, 2.0), atol=1e-4)


def test_feature_matching_loss_is_the_summed_mean_cosine_distance() -> None:
    """Per layer 0.5 * ||t/|t| - s/|s|||^2 = 1 - cosine: the loss is the sum over layers of the mean of the map's
    per-layer distance, whatever the features' scale."""
    loss = FeatureMatchingLoss()
    teacher = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    student = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    expected = sum((1 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in zip(teacher, student, strict=True))
    assert torch.allclose(loss(teacher, student), expected, atol=1e-5)
    assert loss(teacher, [3.0 * t for t in teacher]).abs() < 1e-6  # same directions: nothing left to learn


def test_teacher_classifier_loss_weighs_each_kind_of_image() -> None:
    """Undecided logits cost log 2 per sample whatever the weights; confident mistakes on one kind cost in proportion
    to that kind's share of the total weight."""
    loss = TeacherClassifierLoss(normal_weight=5.0, augmented_weight=2.0, defect_weight=10.0)
    zeros = torch.zeros(4)
    assert torch.isclose(loss(zeros, zeros, zeros), torch.tensor(math.log(2.0)), atol=1e-6)
    right, wrong = torch.full((4,), -20.0), torch.full((4,), 20.0)  # confident "normal" / "defective"
    assert loss(right, right, -right) < 1e-6
    missed_defects = loss(right, right, right)  # every defect called normal: BCE 20 on a 10 / 17 share of weight
    assert torch.isclose(missed_defects, torch.tensor(20.0 * 10 / 17), rtol=1e-4)
    false_alarms = loss(wrong, right, -right)  # every plain normal called defective: a 5 / 17 share
    assert torch.isclose(false_alarms, torch.tensor(20.0 * 5 / 17), rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"anomaly_map_mode": "max"}, ValueError, "anomaly_map_mode"),
        ({"topk_fraction": 1.0}, ValueError, "topk_fraction"),
        ({"topk_fraction": -0.1}, ValueError, "topk_fraction"),
        ({"teacher_finetuning": {"epochs": 0}}, ValueError, "teacher_finetuning.epochs"),
        ({"teacher_finetuning": {"defect_weight": -1.0}}, ValueError, "teacher_finetuning.defect_weight"),
        ({"teacher_finetuning": {"epoch": 1}}, ValueError, "epoch"),
        ({"single_template": {"path": "/no/such/good.png"}}, FileNotFoundError, "/no/such/good.png"),
        ({"single_template": {"path": "x.png", "samples_per_epoch": 0}}, ValueError, "samples_per_epoch"),
        ({"augmentation": {"histaugan_checkpoint": "/no/such/generator.pt"}}, FileNotFoundError, "/no/such/gen"),
        ({"augmentation": {"student_fraction": 1.5}}, ValueError, "augmentation.student_fraction"),
        ({"augmentation": {"colour_jitter": 0.1}}, ValueError, "colour_jitter"),
        ({"augmentation": {"uneven_light": 1.0}}, ValueError, "augmentation.uneven_light"),
        ({"image_size": (64, 64, 3)}, ValueError, "image_size"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, error: type[Exception], names: str) -> None:
    with pytest.raises(error, match=names):
        TeacherStudent(**kwargs)


def test_uneven_light_scales_each_normal_by_its_own_smooth_falloff() -> None:
    """Each augmented normal is multiplied by a surface of gains in [1 - strength, 1], smooth (neighbouring pixels
    differ by far less than the range) and different per image; 0 leaves the light as it is."""
    from anomalib_ext.models.teacher_student.augment import NormalVariation

    torch.manual_seed(0)
    images = torch.full((4, 3, 64, 64), 0.8)
    still = {"degrees": 0.0, "translate": 0.0, "color_jitter": 0.0}
    varied = NormalVariation(Augmentation(**still, uneven_light=0.5))(images)
    gains = varied / images
    assert gains.min() >= 0.5 - 1e-6 and gains.max() <= 1.0 + 1e-6
    assert gains.amax(dim=(1, 2, 3)).sub(gains.amin(dim=(1, 2, 3))).min() > 0.05  # every image's light varies
    assert (gains[..., 1:] - gains[..., :-1]).abs().max() < 0.05  # a falloff, not noise
    assert not torch.allclose(gains[0], gains[1])
    assert torch.allclose(NormalVariation(Augmentation(**still))(images), images, atol=1e-5)  # the zoom resamples


def test_unreadable_template_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "good.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="good.png"):
        TeacherStudent(image_size=64, single_template=SingleTemplate(path=str(broken)))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ts_mvtec")
    make_mvtec_dataset(root, image_size=IMAGE_SIZE, n_train=8, n_test_good=6, n_test_per_defect=2, seed=3)
    return root


def test_single_template_trains_both_stages_and_localises_planted_defects(synthetic_root: Path, tmp_path: Path) -> None:
    """One good image -> teacher fine-tuned, then frozen; student trained; defects found where they are."""
    torch.manual_seed(0)
    template = synthetic_root / "synthetic" / "train" / "good" / "000.png"
    model = TeacherStudent(
        image_size=IMAGE_SIZE,
        teacher_finetuning=TeacherFinetuning(epochs=1),
        single_template=SingleTemplate(path=str(template), samples_per_epoch=48),
        map_sigma=1.0,
    )
    teacher_before = [p.detach().clone() for p in model.model.teacher.parameters()]
    datamodule = MVTecAD(
        root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0, seed=0
    )
    engine = Engine(
        max_epochs=5, default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False
    )
    train_data = datamodule.train_data if hasattr(datamodule, "train_data") else None
    engine.fit(model=model, datamodule=datamodule)

    # the model trained on the template's variations; the user's datamodule was left as it was
    assert train_data is None or datamodule.train_data is train_data
    assert type(datamodule.train_data).__module__.startswith("anomalib.")
    # stage 1 changed the teacher, stage 2 froze it
    changed = [not torch.equal(a, b) for a, b in zip(teacher_before, model.model.teacher.parameters(), strict=True)]
    assert any(changed), "teacher fine-tuning did not change the teacher"
    assert not any(p.requires_grad for p in model.model.teacher.parameters())

    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    scores = torch.cat([batch.pred_score.flatten() for batch in predictions]).numpy()
    labels = torch.cat([batch.gt_label.flatten() for batch in predictions]).numpy().astype(bool)
    maps = torch.cat([batch.anomaly_map.reshape(len(batch.pred_score), -1) for batch in predictions])
    masks = torch.cat([batch.gt_mask.reshape(len(batch.pred_score), -1) for batch in predictions]).bool()

    from sklearn.metrics import roc_auc_score

    image_auroc = roc_auc_score(labels, scores)
    assert image_auroc >= 0.85, f"image AUROC {image_auroc:.3f} from one template"
    pixel_auroc = roc_auc_score(masks[labels].flatten().numpy(), maps[labels].flatten().numpy())
    assert pixel_auroc >= 0.85, f"pixel AUROC {pixel_auroc:.3f} on defective images"
    # localisation: on most defective images the hottest pixel lies on (or next to) the planted defect
    hits = []
    for flat_map, flat_mask in zip(maps[labels], masks[labels], strict=True):
        mask = flat_mask.view(1, 1, IMAGE_SIZE, IMAGE_SIZE).float()
        near = torch.nn.functional.max_pool2d(mask, kernel_size=7, stride=1, padding=3).flatten() > 0
        hits.append(bool(near[flat_map.argmax()]))
    assert np.mean(hits) >= 0.6, f"hottest pixel on the defect in only {np.mean(hits):.0%} of defective images"


def test_config_budget_is_machine_independent_and_matches_the_defaults() -> None:
    """The shipped config ends after a number of epochs (never a wall-clock budget, whose result would depend on
    the machine's speed) and, like the class, does not fine-tune the teacher (measured worse on bottle)."""
    config = yaml.safe_load(CONFIG.read_text())
    trainer = config["trainer"]
    assert trainer["max_epochs"] > 0
    assert "max_time" not in trainer
    init_args = config["model"]["init_args"]
    defaults = inspect.signature(TeacherStudent).parameters
    assert init_args["teacher_finetuning"] is None, "teacher fine-tuning is off"
    assert defaults["teacher_finetuning"].default is None


@pytest.mark.parametrize("name", ["mvtec", "single_template"])
def test_configs_build_through_jsonargparse_like_the_cli(name: str, synthetic_root: Path) -> None:
    """``anomalib train --config`` parses the model section with jsonargparse: the nested keys become the settings
    objects, keys left out keep their defaults, and dotted overrides reach inside them."""
    from anomalib.models import AnomalibModule
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AnomalibModule, "model")
    template = synthetic_root / "synthetic" / "train" / "good" / "000.png"
    section = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())["model"]
    overrides = ["--model.init_args.augmentation.color_jitter", "0.0", "--model.init_args.image_size", "64"]
    if name == "single_template":
        overrides += ["--model.init_args.single_template.path", str(template)]
    config = parser.parse_args(["--model", yaml.safe_dump(section), *overrides])
    model = parser.instantiate_classes(config).model
    assert isinstance(model, TeacherStudent)
    assert model.augmentation == Augmentation(color_jitter=0.0)  # the configs' other values are the defaults
    if name == "mvtec":
        assert model.teacher_finetuning is None
        assert model.single_template is None
        assert model.student_learning_rate == 0.1
    else:
        assert model.teacher_finetuning == TeacherFinetuning(epochs=1)
        assert model.single_template == SingleTemplate(path=str(template), samples_per_epoch=64)


def test_default_training_is_reproducible_and_keeps_the_imagenet_teacher(synthetic_root: Path, tmp_path: Path) -> None:
    """Same seed, same model: two default runs give identical scores, and the default teacher is never changed
    (teacher fine-tuning is off by default), so the student copies ImageNet features."""

    def fit_and_score(run: str) -> tuple[torch.Tensor, bool, bool]:
        seed_everything(0)
        model = TeacherStudent(image_size=IMAGE_SIZE, map_sigma=1.0, evaluator=False, visualizer=False)
        teacher_before = [p.detach().clone() for p in model.model.teacher.parameters()]
        student_before = [p.detach().clone() for p in model.model.student.parameters()]
        datamodule = MVTecAD(
            root=synthetic_root, category="synthetic", train_batch_size=4, eval_batch_size=8, num_workers=0, seed=0
        )
        engine = Engine(
            max_epochs=1,
            default_root_dir=tmp_path / run,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
        )
        engine.fit(model=model, datamodule=datamodule)
        teacher_kept = all(
            torch.equal(a, b) for a, b in zip(teacher_before, model.model.teacher.parameters(), strict=True)
        )
        student_trained = any(
            not torch.equal(a, b) for a, b in zip(student_before, model.model.student.parameters(), strict=True)
        )
        model.model.eval()
        with torch.no_grad():
            scores = model.model(next(iter(datamodule.test_dataloader())).image).pred_score
        return scores, teacher_kept, student_trained

    first, teacher_kept, student_trained = fit_and_score("first")
    second, _, _ = fit_and_score("second")
    assert teacher_kept, "the default run changed the ImageNet teacher"
    assert student_trained, "the student did not train"
    assert torch.equal(first, second), f"same seed, different scores: {first} vs {second}"
