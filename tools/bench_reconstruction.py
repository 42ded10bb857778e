"""Benchmark the Reconstruction family (AE / VAE) on an MVTec AD category: accuracy, training time, throughput.

Trains through anomalib's Engine with the same settings as ``configs/reconstruction/{ae,vae}.yaml``, then

- tests on the whole test split: image AUROC and pixel AUROC (threshold-free, so no validation split is
  needed for them; no F1 is reported because its threshold would have to come from the test images),
- measures torch and OpenVINO throughput at the model's image size (batch 1, after warm-up),
- checks that OpenVINO scores and maps match torch,
- draws a figure of inputs, reconstructions and anomaly maps.

Writes ``<out>/<variant>_<category>.json`` (and the figure with ``--figure``).

Example::

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_reconstruction.py --variant ae --epochs 20 --batch_size 8 \\
        --threads 1 --data_path ../shared/data/mvtec_ad/bottle --figure results/reconstruction/bottle_ae.png
    # evaluate a checkpoint (e.g. an epoch of a longer run) instead of training:
    .venv/bin/python tools/bench_reconstruction.py --checkpoint results/reconstruction/ae_bottle_snapshot.ckpt \\
        --threads 1 --data_path ../shared/data/mvtec_ad/bottle
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import UsageError, default_downsamples, resolve_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=("ae", "vae"), default="ae")
    parser.add_argument("--data_path", required=True, help="MVTec AD category folder (with train/good)")
    parser.add_argument("--category", default=None, help="category, when --data_path is the dataset root")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--latent_dim", type=int, default=128)
    parser.add_argument("--base_channels", type=int, default=32)
    parser.add_argument("--beta", type=float, default=1e-4)
    parser.add_argument("--anomaly_map_mode", choices=("ssim", "l2"), default="ssim")
    parser.add_argument("--no_normalize_map", action="store_true", help="raw reconstruction error map")
    parser.add_argument("--smoothing_sigma", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--speed_images", type=int, default=30, help="images timed for throughput")
    parser.add_argument("--no_openvino", action="store_true", help="skip export, parity and OpenVINO speed")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of inputs, reconstructions and maps")
    parser.add_argument("--out", type=Path, default=Path("results/reconstruction"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="evaluate this trained checkpoint (e.g. one epoch of a longer run) instead of training",
    )
    return parser.parse_args(argv)


def _build_model(args: argparse.Namespace, model_class):
    return model_class(
        variant=args.variant,
        image_size=args.size,
        latent_dim=args.latent_dim,
        base_channels=args.base_channels,
        num_downsamples=default_downsamples(args.size),
        beta=args.beta,
        learning_rate=args.learning_rate,
        anomaly_map_mode=args.anomaly_map_mode,
        normalize_map=not args.no_normalize_map,
        smoothing_sigma=args.smoothing_sigma,
    )


def images_per_second(function, images, repeats: int) -> float:
    """Batch-1 throughput after two warm-up calls."""
    for image in images[:2]:
        function(image)
    started = time.perf_counter()
    count = 0
    for index in range(repeats):
        function(images[index % len(images)])
        count += 1
    return count / (time.perf_counter() - started)


def draw_figure(model, images, masks, path: Path, title: str) -> None:
    """Rows: input with the ground-truth outline, reconstruction, anomaly map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    model = model.eval().cpu()
    with torch.no_grad():
        processed = model.pre_processor(images) if model.pre_processor else images
        reconstruction = model.model.autoencoder(processed).reconstruction
        maps = model.model(processed).anomaly_map[:, 0]
    columns = len(images)
    figure, axes = plt.subplots(3, columns, figsize=(1.6 * columns, 5.0), dpi=72)
    low, high = float(maps.min()), float(maps.max())
    for column in range(columns):
        axes[0, column].imshow(processed[column].permute(1, 2, 0).clamp(0, 1).numpy())
        if masks[column] is not None and masks[column].any():
            axes[0, column].contour(masks[column], levels=[0.5], colors="red", linewidths=0.8)
        axes[1, column].imshow(reconstruction[column].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[2, column].imshow(maps[column].numpy(), cmap="jet", vmin=low, vmax=high)
        for row in range(3):
            axes[row, column].axis("off")
    for row, label in enumerate(("input", "reconstruction", "anomaly map")):
        axes[row, 0].set_title(label, fontsize=8, loc="left")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=72)
    plt.close(figure)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from anomalib.data import MVTecAD
    from anomalib.data.utils import read_image
    from anomalib.deploy import ExportType, OpenVINOInferencer
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_ext.models import Reconstruction

    if args.threads:
        torch.set_num_threads(args.threads)
    root, category = resolve_dataset(args.data_path, args.category)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.variant}_{category}"
    workdir = args.out / f"{name}_run"
    seed_everything(args.seed, workers=True)
    if args.checkpoint is not None:
        model = Reconstruction.load_from_checkpoint(args.checkpoint, map_location="cpu")
        hparams = model.hparams
        args.variant, args.size = hparams["variant"], int(model.image_size[0])
        args.latent_dim, args.base_channels = hparams["latent_dim"], hparams["base_channels"]
        args.learning_rate, args.beta = hparams["learning_rate"], hparams["beta"]
        args.anomaly_map_mode, args.no_normalize_map = hparams["anomaly_map_mode"], not hparams["normalize_map"]
        name = f"{args.variant}_{category}"
        workdir = args.out / f"{name}_eval"
    else:
        model = _build_model(args, Reconstruction)
    # validation = test: only threshold-free AUROCs are reported, so nothing is tuned on it
    datamodule = MVTecAD(
        root=root,
        category=category,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
        val_split_mode="same_as_test",
        seed=args.seed,
    )
    engine = Engine(
        max_epochs=args.epochs,
        default_root_dir=workdir,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
    )
    train_seconds = None
    epochs: int | None = args.epochs
    global_step = None
    if args.checkpoint is None:
        started = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        train_seconds = round(time.perf_counter() - started, 1)
        engine.trainer.save_checkpoint(workdir / "model.ckpt")
        global_step = engine.trainer.global_step
    else:
        # optimiser steps tell how far the run had got; divide by steps per epoch for the epoch count
        epochs = None
        global_step = int(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["global_step"])
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    result: dict[str, Any] = {
        "variant": args.variant,
        "category": category,
        "size": args.size,
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "epochs": epochs,
        "global_step": global_step,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "latent_dim": args.latent_dim,
        "base_channels": args.base_channels,
        "anomaly_map_mode": args.anomaly_map_mode,
        "normalize_map": not args.no_normalize_map,
        "train_images": len(datamodule.train_data),
        "test_images": len(datamodule.test_data),
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "image_AUROC": round(float(metrics["image_AUROC"]), 4),
        "pixel_AUROC": round(float(metrics["pixel_AUROC"]), 4),
        "parameters": sum(p.numel() for p in model.model.parameters()),
    }
    test_paths = [str(path) for path in datamodule.test_data.samples.image_path]
    images = [read_image(path, as_tensor=True)[None] for path in test_paths[:: max(1, len(test_paths) // 12)]]
    images = [torch.nn.functional.interpolate(image, size=(args.size, args.size), mode="nearest") for image in images]
    model = model.eval().cpu()
    with torch.no_grad():
        result["torch_images_per_second"] = round(images_per_second(model, images, args.speed_images), 1)
    if not args.no_openvino:
        xml = engine.export(
            model=model,
            export_type=ExportType.OPENVINO,
            export_root=workdir / "export",
            input_size=(args.size, args.size),
        )
        inferencer = OpenVINOInferencer(path=xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
        score_gap, map_gap = 0.0, 0.0
        with torch.no_grad():
            for image in images:
                reference = model(image)
                prediction = inferencer.predict(image[0].numpy())
                score_gap = max(score_gap, abs(float(np.ravel(prediction.pred_score)[0]) - float(reference.pred_score)))
                ov_map = np.asarray(prediction.anomaly_map).squeeze()
                map_gap = max(map_gap, float(np.abs(ov_map - reference.anomaly_map.squeeze().numpy()).max()))
        result["openvino_max_score_difference"] = score_gap
        result["openvino_max_map_difference"] = map_gap
        arrays = [image[0].numpy() for image in images]
        result["openvino_images_per_second"] = round(
            images_per_second(inferencer.predict, arrays, args.speed_images), 1
        )
    if args.figure is not None:
        picks = _figure_picks(test_paths)
        tensors = torch.stack([read_image(path, as_tensor=True) for path in picks])
        masks = [_mask_for(path, args.size) for path in picks]
        title = f"Reconstruction {args.variant.upper()} on {category} ({args.size} px)"
        draw_figure(model, tensors, masks, args.figure, title)
        result["figure"] = str(args.figure)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


def _figure_picks(test_paths: list[str]) -> list[str]:
    """One good image and the first images of up to five defect types."""
    picks: dict[str, str] = {}
    for path in sorted(test_paths):
        defect = Path(path).parent.name
        picks.setdefault(defect, path)
    good = [picks.pop("good")] if "good" in picks else []
    return good + list(picks.values())[:5]


def _mask_for(image_path: str, size: int):
    """Ground-truth mask resized to the model's size (None for good images)."""
    import cv2

    path = Path(image_path)
    mask_path = path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
    if not mask_path.is_file():
        return None
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST) > 127


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except UsageError as error:
        print(f"bench_reconstruction.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
