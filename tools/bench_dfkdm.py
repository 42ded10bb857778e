"""Benchmark Dfkdm (both feature sources) against anomalib's Dfkde and Dfm on one MVTec AD category.

Every model runs in the same process on the same split:

- training: ``train/good`` minus a held-out 20 % (seeded);
- validation: that held-out 20 %, half of it turned into anomalies by anomalib's Perlin-noise generator
  (``val_split_mode="synthetic"``). anomalib's PostProcessor picks the F1-optimal threshold there, so the test
  F1 uses a threshold that never saw a test image;
- test: the category's ``test`` folder (real defects).

Also measures torch and OpenVINO (FP32 inference hint) throughput of the Dfkdm models at their image sizes.
Results go to ``results/dfkdm/<category>.json`` and a markdown table on stdout.

    .venv/bin/python tools/bench_dfkdm.py --root ../shared/data/mvtec_ad --category bottle
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models import AnomalibModule, Dfkde, Dfm

from anomalib_ext.models import Dfkdm
from anomalib_ext.weights import ensure_pretrained

BACKBONE = "tf_efficientnet_lite0"
BACKBONE_LAYERS = ["blocks.2", "blocks.4", "blocks.6"]


def model_factories(lake_epochs: int) -> dict[str, tuple[Callable[[], AnomalibModule], int]]:
    """name -> (builder, max_epochs). Same backbone and layers for every backbone-based model."""
    return {
        "Dfkdm backbone (KDE, LOO bandwidth)": (
            lambda: Dfkdm(feature_source="backbone", layers=BACKBONE_LAYERS, image_size=256),
            1,
        ),
        "Dfkdm backbone (single Gaussian)": (
            lambda: Dfkdm(feature_source="backbone", layers=BACKBONE_LAYERS, image_size=256, density="gaussian"),
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
                learning_rate=2e-3,
            ),
            lake_epochs,
        ),
        # anomalib 2.7's Dfkde concatenates layer outputs along the batch axis: only one layer works
        "anomalib Dfkde": (lambda: Dfkde(backbone=BACKBONE, layers=["blocks.6"]), 1),
        "anomalib Dfm": (lambda: Dfm(backbone=BACKBONE, layer="blocks.6"), 1),
    }


def datamodule(root: Path, category: str, seed: int) -> MVTecAD:
    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=16,
        eval_batch_size=16,
        num_workers=0,
        val_split_mode="synthetic",
        val_split_ratio=0.2,
        seed=seed,
    )


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_pretrained(BACKBONE)
    results: dict[str, Any] = {"category": args.category, "seed": args.seed, "models": {}}
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
        data = datamodule(args.root, args.category, args.seed)
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
        if isinstance(model, Dfkdm) and not args.skip_throughput:
            size = 256 if model.feature_source == "backbone" else 128
            entry.update(throughput(model, size, args.workdir / f"export_{name.replace(' ', '_')}", args.repeats))
            entry["image_size"] = size
        results["models"][name] = entry
        logging.getLogger(__name__).warning("%s: %s", name, entry)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| model | image AUROC | image F1 (val threshold) | pixel AUROC | fit s | torch img/s | OpenVINO img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():

        def cell(key: str, digits: int = 3, entry: dict[str, Any] = entry) -> str:
            return f"{entry[key]:.{digits}f}" if key in entry else "-"

        lines.append(
            f"| {name} | {cell('image_AUROC')} | {cell('image_F1Score')} | {cell('pixel_AUROC')} | "
            f"{cell('fit_seconds', 0)} | {cell('torch_images_per_s', 1)} | {cell('openvino_images_per_s', 1)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lake-epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes for throughput")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--throughput-only", action="store_true", help="speed only, density fitted on noise")
    parser.add_argument("--fit-points", type=int, default=167, help="stored points for --throughput-only")
    parser.add_argument("--only", nargs="*", help="run only models whose name contains one of these words")
    parser.add_argument("--workdir", type=Path, default=Path("results/dfkdm/work"))
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default results/dfkdm/<category>.json)")
    args = parser.parse_args()
    if not (args.root / args.category / "train" / "good").is_dir():
        parser.error(f"--root/--category: {args.root / args.category / 'train' / 'good'} is not a directory")
    warnings.filterwarnings("ignore")
    results = throughput_only(args) if args.throughput_only else run(args)
    output = args.output or Path("results/dfkdm") / f"{args.category}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
