"""Benchmark Dfkdm (both feature sources) against anomalib's Dfkde and Dfm on one MVTec AD category.

Every model runs in the same process on the same split:

- training: ``train/good`` minus a held-out 20 % (seeded);
- validation: that held-out 20 %, half of it turned into anomalies by anomalib's Perlin-noise generator
  (``val_split_mode="synthetic"``). anomalib's PostProcessor picks the F1-optimal threshold there, so the test
  F1 uses a threshold that never saw a test image;
- test: the category's ``test`` folder (real defects).

anomalib draws the synthetic anomalies (which images, Perlin masks, blend factors) from the global numpy and
torch generators. The datamodule is therefore set up right after seeding them with ``--seed``: every model, and
every run, gets the same validation images. ``--val-draws N`` repeats validation (threshold) and test with N
synthetic draws (seeds ``seed .. seed + N - 1``, same normal split, same fitted model) and reports the F1 of
each: with about 20 synthetic anomalies the threshold, hence the F1, varies from draw to draw.

Also measures torch and OpenVINO (FP32 inference hint) throughput of the Dfkdm models at their image sizes.
Results go to ``results/dfkdm/<category>.json`` and a markdown table on stdout.

    .venv/bin/python tools/bench_dfkdm.py --root ../shared/data/mvtec_ad --category bottle

``--val-split same_as_test`` is anomalib's own default for MVTecAD (the test set doubles as validation, so
the F1 threshold is picked on the test images). It is not a fair F1, it is the protocol anomalib users quote
(and the one behind the reference figures in the issue); run it only to compare against such figures.

``--select`` is the model-selection step: it never reads a test image. It pools backbone features once, fits
each candidate density (layers x pooling x density settings) on the training split and reports the image
AUROC on the synthetic validation set, averaged over ``--val-draws`` draws.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import synthetic
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models import AnomalibModule, Dfkde, Dfm
from lightning.pytorch import seed_everything
from lightning.pytorch.trainer.states import TrainerFn

from anomalib_ext.models import Dfkdm
from anomalib_ext.models.components import build_feature_extractor
from anomalib_ext.models.components.kde import FeatureDensity
from anomalib_ext.weights import ensure_pretrained

BACKBONE = "tf_efficientnet_lite0"
BACKBONE_LAYERS = ["blocks.2", "blocks.4", "blocks.6"]


def model_factories(lake_epochs: int) -> dict[str, tuple[Callable[[], AnomalibModule], int]]:
    """name -> (builder, max_epochs). Same backbone and layers for every backbone-based model."""
    return {
        # the defaults of configs/dfkdm/backbone.yaml: probabilistic PCA (Gaussian + residual), 97 % variance
        "Dfkdm backbone (PPCA: Gaussian + residual)": (
            lambda: Dfkdm(feature_source="backbone", layers=BACKBONE_LAYERS, image_size=256),
            1,
        ),
        "Dfkdm backbone (KDE + residual)": (
            lambda: Dfkdm(feature_source="backbone", layers=BACKBONE_LAYERS, image_size=256, density="kde"),
            1,
        ),
        # the previous default: KDE on 16 components, nothing outside them
        "Dfkdm backbone (KDE, 16 components, no residual)": (
            lambda: Dfkdm(
                feature_source="backbone",
                layers=BACKBONE_LAYERS,
                image_size=256,
                density="kde",
                n_components=16,
                residual=False,
            ),
            1,
        ),
        "Dfkdm LAKE autoencoder (KDE)": (
            lambda: Dfkdm(
                feature_source="autoencoder",
                image_size=128,
                latent_dim=32,
                base_channels=32,
                num_downsamples=4,
                n_components=0,
                density="kde",
                learning_rate=2e-3,
            ),
            lake_epochs,
        ),
        # anomalib 2.7's Dfkde concatenates layer outputs along the batch axis: only one layer works
        "anomalib Dfkde": (lambda: Dfkde(backbone=BACKBONE, layers=["blocks.6"]), 1),
        "anomalib Dfm": (lambda: Dfm(backbone=BACKBONE, layer="blocks.6"), 1),
    }


@contextmanager
def perlin_blend(blend: tuple[float, float] | None) -> Iterator[None]:
    """Make anomalib's synthetic validation split blend its Perlin anomalies with ``blend`` (None: unchanged).

    anomalib's ``make_synthetic_dataset`` hard-codes ``blend_factor=(0.01, 0.2)``: an anomaly region moves 1-20 %
    of the way towards a noise texture, and the weakest ones are invisible, i.e. normal images labelled anomalous.
    ``(0.2, 1.0)`` is the default of anomalib's own ``PerlinAnomalyGenerator`` (the DRAEM-style range).
    """
    if blend is None:
        yield
        return
    original = synthetic.PerlinAnomalyGenerator

    class Generator(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["blend_factor"] = blend
            super().__init__(*args, **kwargs)

    synthetic.PerlinAnomalyGenerator = Generator
    try:
        yield
    finally:
        synthetic.PerlinAnomalyGenerator = original


def datamodule(
    root: Path,
    category: str,
    seed: int,
    draw: int = 0,
    blend: tuple[float, float] | None = None,
    val_split: str = "synthetic",
) -> MVTecAD:
    """The split of ``seed``; synthetic anomalies of draw ``draw`` (global generators seeded with seed + draw).

    Set up here, once, so that Engine.fit / validate / test reuse exactly these images.
    """
    data = MVTecAD(
        root=root,
        category=category,
        train_batch_size=16,
        eval_batch_size=16,
        num_workers=0,
        val_split_mode=val_split,
        val_split_ratio=0.2,
        seed=seed,
    )
    seed_everything(seed + draw, verbose=False)
    data.prepare_data()
    with perlin_blend(blend):
        data.setup(TrainerFn.FITTING)
    return data


def throughput(model: AnomalibModule, image_size: int, workdir: Path, repeats: int) -> dict[str, float]:
    """Images per second, batch 1, of the full AnomalibModule in torch and of its OpenVINO export (FP32)."""
    import openvino as ov

    model = model.eval().cpu()
    image = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad():
        model(image)
        start = time.perf_counter()
        for _ in range(repeats):
            model(image)
        torch_rate = repeats / (time.perf_counter() - start)
    engine = Engine(accelerator="cpu", devices=1, logger=False)
    xml = engine.export(
        model=model,
        export_type=ExportType.OPENVINO,
        export_root=workdir,
        input_size=(image_size, image_size),
    )
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    array = image.numpy()
    compiled(array)
    start = time.perf_counter()
    for _ in range(repeats):
        compiled(array)
    openvino_rate = repeats / (time.perf_counter() - start)
    return {"torch_images_per_s": torch_rate, "openvino_images_per_s": openvino_rate}


def throughput_only(args: argparse.Namespace) -> dict[str, Any]:
    """Speed without training: the density is fitted on random features of the size bottle gives.

    Inference cost depends only on shapes (network, number of stored points, dimensions), not on the values,
    so this measures the same computation as a trained model, in a fraction of the time.
    """
    ensure_pretrained(BACKBONE)
    results: dict[str, Any] = {"category": "shapes-only", "fit_points": args.fit_points, "models": {}}
    for name, (build, _) in model_factories(args.lake_epochs).items():
        if not name.startswith("Dfkdm"):
            continue
        torch.manual_seed(args.seed)
        model = build().eval()
        assert isinstance(model, Dfkdm)
        size = 256 if model.feature_source == "backbone" else 128
        with torch.no_grad():
            features = model.model.extract_features(torch.rand(2, 3, size, size))
        model.model.density.fit(torch.randn(args.fit_points, features.shape[1]))
        model._is_fitted = torch.tensor([True])  # noqa: SLF001  (fitted by hand above)
        entry = throughput(model, size, args.workdir / f"speed_{name.replace(' ', '_')}", args.repeats)
        entry["image_size"] = size
        results["models"][name] = entry
        logging.getLogger(__name__).warning("%s: %s", name, entry)
    return results


SELECT_LAYERS = {
    "blocks.6": ["blocks.6"],
    "blocks.4+6": ["blocks.4", "blocks.6"],
    "blocks.2+4+6": ["blocks.2", "blocks.4", "blocks.6"],
    "blocks.1+2+4+6": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"],
}
SELECT_DENSITIES: dict[str, dict[str, Any]] = {
    "KDE (LOO), 16 comp., no residual": {"density": "kde", "n_components": 16, "residual": False},
    "KDE (LOO), 97 % var., no residual": {"density": "kde", "n_components": 0.97, "residual": False},
    "Gaussian, 97 % var., no residual": {"density": "gaussian", "n_components": 0.97, "residual": False},
    "KDE (LOO) + residual, 97 % var.": {"density": "kde", "n_components": 0.97, "residual": True},
    "PPCA (Gaussian + residual), 16 comp.": {"density": "gaussian", "n_components": 16, "residual": True},
    "PPCA (Gaussian + residual), 97 % var.": {"density": "gaussian", "n_components": 0.97, "residual": True},
}


def select(args: argparse.Namespace) -> dict[str, Any]:
    """Validation-only comparison of layers, pooling and densities; no test image is read."""
    from torchmetrics.functional.classification import binary_auroc

    ensure_pretrained(BACKBONE)
    all_layers = sorted({layer for layers in SELECT_LAYERS.values() for layer in layers})
    extractor = build_feature_extractor(BACKBONE, all_layers).eval()
    transform = Dfkdm.default_pre_processor("backbone", (256, 256)).transform

    def pooled(loader: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        features: dict[str, list[torch.Tensor]] = {}
        labels = []
        with torch.no_grad():
            for batch in loader:
                outputs = extractor(transform(batch.image))
                for layer, output in outputs.items():
                    features.setdefault(f"{layer}/avg", []).append(output.mean(dim=(2, 3)))
                    features.setdefault(f"{layer}/max", []).append(output.amax(dim=(2, 3)))
                labels.append(batch.gt_label.int())
        return {key: torch.cat(value) for key, value in features.items()}, torch.cat(labels)

    train: dict[str, torch.Tensor] | None = None
    validation = []
    for draw in range(args.val_draws):
        data = datamodule(args.root, args.category, args.seed, draw, args.val_blend)
        if train is None:
            train = pooled(data.train_dataloader())[0]
        validation.append(pooled(data.val_dataloader()))
    assert train is not None
    results: dict[str, Any] = {
        "category": args.category,
        "seed": args.seed,
        "val_draws": args.val_draws,
        "val_blend": args.val_blend,
        "rows": [],
    }
    for (layer_name, layers), pooling, (density_name, settings) in product(
        SELECT_LAYERS.items(), ("avg", "max"), SELECT_DENSITIES.items()
    ):
        keys = [f"{layer}/{pooling}" for layer in layers]
        density = FeatureDensity(bandwidth="loo", max_training_points=2000, **settings)
        density.fit(torch.cat([train[key] for key in keys], dim=1))
        aurocs = []
        for features, labels in validation:
            scores = density(torch.cat([features[key] for key in keys], dim=1)).double()
            # torchmetrics reads scores outside [0, 1] as logits and squashes them: min-max them first
            scores = (scores - scores.min()) / (scores.max() - scores.min()).clamp_min(1e-300)
            aurocs.append(float(binary_auroc(scores, labels)))
        row = {
            "layers": layer_name,
            "pooling": pooling,
            "density": density_name,
            "components": density.pca.output_dim,
            "val_AUROC_mean": float(np.mean(aurocs)),
            "val_AUROC_min": float(np.min(aurocs)),
        }
        results["rows"].append(row)
        logging.getLogger(__name__).warning("%s", row)
    return results


def training_augmentations() -> dict[str, Any]:
    """Nuisance variations a plant sees, fixed before any run: part pose and lighting (kornia, on [0, 1])."""
    import kornia.augmentation as augment

    pose = augment.RandomAffine(degrees=10.0, translate=(0.04, 0.04), p=1.0)
    lighting = augment.ColorJiggle(brightness=0.1, contrast=0.1, p=1.0)
    return {
        "none": None,
        "pose (+-10 deg, +-4 %)": augment.AugmentationSequential(pose),
        "lighting (+-10 % brightness, contrast)": augment.AugmentationSequential(lighting),
        "pose + lighting": augment.AugmentationSequential(pose, lighting),
        "any rotation": augment.AugmentationSequential(augment.RandomRotation(degrees=180.0, p=1.0)),
    }


def augmentation_study(args: argparse.Namespace) -> dict[str, Any]:
    """Does fitting the default density on augmented views of the normals move the good test images?

    Each training image gives itself plus ``--augmented-views - 1`` augmented views; the density is the default
    PPCA. The threshold is the F1-optimal one on each synthetic validation draw, as in ``run``. The test images
    are scored to report the outcome; the adopted setting is only changed if validation agrees.
    """
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    ensure_pretrained(BACKBONE)
    torch.manual_seed(args.seed)
    model = Dfkdm(feature_source="backbone", layers=BACKBONE_LAYERS, image_size=256).eval()
    transform = model.pre_processor.transform

    def features(loader: Any, augmentation: Any = None, views: int = 1) -> tuple[torch.Tensor, np.ndarray]:
        collected, labels = [], []
        with torch.no_grad():
            for batch in loader:
                for view in range(views):
                    images = batch.image if view == 0 else augmentation(batch.image).clamp(0, 1)
                    collected.append(model.model.backbone_features(transform(images)))
                    labels.append(batch.gt_label.int())
        return torch.cat(collected), torch.cat(labels).numpy()

    def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        return float(thresholds[np.argmax(f1[:-1])])

    split = datamodule(args.root, args.category, args.seed)
    test_features, test_labels = features(split.test_dataloader())
    validation = [
        features(datamodule(args.root, args.category, args.seed, draw).val_dataloader())
        for draw in range(args.val_draws)
    ]
    results: dict[str, Any] = {"category": args.category, "seed": args.seed, "val_draws": args.val_draws, "aug": []}
    for name, augmentation in training_augmentations().items():
        torch.manual_seed(args.seed)
        views = 1 if augmentation is None else args.augmented_views
        train_features, _ = features(split.train_dataloader(), augmentation, views)
        density = FeatureDensity(density="gaussian", n_components=0.97, residual=True, max_training_points=2000)
        density.fit(train_features)
        test_scores = density(test_features).numpy()
        row: dict[str, Any] = {"augmentation": name, "fit_points": len(train_features), "val_AUROC": [], "F1": []}
        row["test_AUROC"] = float(roc_auc_score(test_labels, test_scores))
        row["false_positives"], row["false_negatives"] = [], []
        for val_features, val_labels in validation:
            val_scores = density(val_features).numpy()
            row["val_AUROC"].append(float(roc_auc_score(val_labels, val_scores)))
            flagged = test_scores >= f1_threshold(val_scores, val_labels)
            true_positives = int((flagged & (test_labels == 1)).sum())
            false_positives = int((flagged & (test_labels == 0)).sum())
            false_negatives = int((~flagged & (test_labels == 1)).sum())
            row["F1"].append(2 * true_positives / (2 * true_positives + false_positives + false_negatives))
            row["false_positives"].append(false_positives)
            row["false_negatives"].append(false_negatives)
        results["aug"].append(row)
        logging.getLogger(__name__).warning("%s", row)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_pretrained(BACKBONE)
    results: dict[str, Any] = {
        "category": args.category,
        "seed": args.seed,
        "val_draws": args.val_draws,
        "val_blend": args.val_blend,
        "val_split": args.val_split,
        "models": {},
    }
    selected = model_factories(args.lake_epochs)
    if args.only:
        selected = {name: value for name, value in selected.items() if any(key in name for key in args.only)}
    for name, (build, epochs) in selected.items():
        torch.manual_seed(args.seed)
        model = build()
        engine = Engine(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            default_root_dir=args.workdir / name.replace(" ", "_"),
        )
        data = datamodule(args.root, args.category, args.seed, blend=args.val_blend, val_split=args.val_split)
        start = time.perf_counter()
        engine.fit(model=model, datamodule=data)
        fit_seconds = time.perf_counter() - start
        metrics = engine.test(model=model, datamodule=data, verbose=False)[0]
        entry = {
            "image_AUROC": float(metrics["image_AUROC"]),
            "image_F1Score": float(metrics["image_F1Score"]),
            "fit_seconds": fit_seconds,
            "epochs": epochs,
        }
        if "pixel_AUROC" in metrics:
            entry["pixel_AUROC"] = float(metrics["pixel_AUROC"])
        if args.val_draws > 1:
            # same fitted model and test set; only the synthetic validation anomalies, hence the threshold, change
            f1_scores = [entry["image_F1Score"]]
            for draw in range(1, args.val_draws):
                other = datamodule(args.root, args.category, args.seed, draw, args.val_blend)
                engine.validate(model=model, datamodule=other, verbose=False)
                f1_scores.append(float(engine.test(model=model, datamodule=other, verbose=False)[0]["image_F1Score"]))
            entry["image_F1Score_draws"] = f1_scores
            entry["image_F1Score_mean"] = float(np.mean(f1_scores))
        if isinstance(model, Dfkdm) and not args.skip_throughput:
            size = 256 if model.feature_source == "backbone" else 128
            entry.update(throughput(model, size, args.workdir / f"export_{name.replace(' ', '_')}", args.repeats))
            entry["image_size"] = size
        results["models"][name] = entry
        logging.getLogger(__name__).warning("%s: %s", name, entry)
    return results


def markdown(results: dict[str, Any]) -> str:
    if "aug" in results:  # --augmentation-study
        lines = [
            f"| training views | fit points | val AUROC mean ({results['val_draws']} draws) | test AUROC "
            "| test F1 mean [min, max] | good test images flagged per draw | defects missed per draw |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in results["aug"]:
            lines.append(
                f"| {row['augmentation']} | {row['fit_points']} | {np.mean(row['val_AUROC']):.3f} | "
                f"{row['test_AUROC']:.3f} | {np.mean(row['F1']):.3f} [{min(row['F1']):.3f}, {max(row['F1']):.3f}] | "
                f"{row['false_positives']} | {row['false_negatives']} |"
            )
        return "\n".join(lines)
    if "rows" in results:  # --select
        lines = [
            f"| layers | pooling | density | kept comp. | val AUROC mean ({results['val_draws']} draws) | min |",
            "|---|---|---|---|---|---|",
        ]
        for row in sorted(results["rows"], key=lambda row: -row["val_AUROC_mean"]):
            lines.append(
                f"| {row['layers']} | {row['pooling']} | {row['density']} | {row['components']} | "
                f"{row['val_AUROC_mean']:.3f} | {row['val_AUROC_min']:.3f} |"
            )
        return "\n".join(lines)
    lines = [
        "| model | image AUROC | image F1 (val threshold) | F1 mean [min, max] over draws | pixel AUROC | fit s "
        "| torch img/s | OpenVINO img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():

        def cell(key: str, digits: int = 3, entry: dict[str, Any] = entry) -> str:
            return f"{entry[key]:.{digits}f}" if key in entry else "-"

        draws = entry.get("image_F1Score_draws")
        spread = f"{np.mean(draws):.3f} [{min(draws):.3f}, {max(draws):.3f}] ({len(draws)})" if draws else "-"
        lines.append(
            f"| {name} | {cell('image_AUROC')} | {cell('image_F1Score')} | {spread} | {cell('pixel_AUROC')} | "
            f"{cell('fit_seconds', 0)} | {cell('torch_images_per_s', 1)} | {cell('openvino_images_per_s', 1)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lake-epochs", type=int, default=40)
    parser.add_argument(
        "--val-draws", type=int, default=1, help="synthetic validation draws to report the F1 over (threshold)"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes for throughput")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--throughput-only", action="store_true", help="speed only, density fitted on noise")
    parser.add_argument(
        "--val-blend",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="blend range of the synthetic validation anomalies (anomalib's split: 0.01 0.2)",
    )
    parser.add_argument(
        "--val-split",
        choices=["synthetic", "same_as_test"],
        default="synthetic",
        help="threshold split: synthetic anomalies on held-out normals, or anomalib's default: the test set",
    )
    parser.add_argument(
        "--augmentation-study", action="store_true", help="fit the default density on augmented training views"
    )
    parser.add_argument("--augmented-views", type=int, default=8, help="views per training image in the study")
    parser.add_argument("--select", action="store_true", help="validation-only comparison of settings (no test)")
    parser.add_argument("--fit-points", type=int, default=167, help="stored points for --throughput-only")
    parser.add_argument("--only", nargs="*", help="run only models whose name contains one of these words")
    parser.add_argument("--workdir", type=Path, default=Path("results/dfkdm/work"))
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default results/dfkdm/<category>.json)")
    args = parser.parse_args()
    if not (args.root / args.category / "train" / "good").is_dir():
        parser.error(f"--root/--category: {args.root / args.category / 'train' / 'good'} is not a directory")
    args.val_blend = tuple(args.val_blend) if args.val_blend else None  # the generator wants a tuple
    if args.val_split == "same_as_test" and (args.val_draws > 1 or args.select):
        parser.error("--val-split same_as_test has no synthetic draws: use it without --val-draws and --select")
    warnings.filterwarnings("ignore")
    mode = run
    if args.select:
        mode = select
    elif args.augmentation_study:
        mode = augmentation_study
    elif args.throughput_only:
        mode = throughput_only
    results = mode(args)
    output = args.output or Path("results/dfkdm") / f"{args.category}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
