"""Train, predict, export and reload one harness case; shared by the harness tests."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models import AnomalibModule

from tests.harness.case import ModelCase


@dataclass
class TrainedCase:
    case: ModelCase
    model: AnomalibModule
    engine: Engine
    checkpoint: Path
    image_paths: list[str]
    scores: np.ndarray  # raw image scores (before normalisation and its clamping to [0, 1], which ties them)
    labels: np.ndarray  # ground truth: 1 = defective
    workdir: Path
    predicted: np.ndarray  # pred_label from the threshold picked on validation (never on test)
    mask_paths: list[str]  # ground-truth mask of each test image ("" for normal images)
    openvino_xml: Path | None = None  # the OpenVINO export, once a test has made it (export_openvino)


# share of train/good held out for validation; anomalib turns half of it into synthetic (Perlin) anomalies.
# tests/test_model_harness.py generates 40 training images, so 32 remain for training as before.
VAL_SPLIT_RATIO = 0.2


def make_datamodule(case: ModelCase, data_root: Path):
    """The case's synthetic data as an anomalib datamodule. Validation never holds a test image: held-out
    training normals, half of them turned into synthetic anomalies (anomalib's ``synthetic`` split, which our
    models draw from the datamodule's seed), as the shipped configs do; Dice uses its own validation."""
    if case.dataset == "dice":
        from anomalib_ext.data import Dice  # lands with the TemplateSsim issue

        return Dice(root=data_root, train_batch_size=8, eval_batch_size=8, num_workers=0, seed=0)
    return MVTecAD(
        root=data_root,
        category="synthetic",
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        val_split_mode="synthetic",
        val_split_ratio=VAL_SPLIT_RATIO,
        seed=0,
    )


def train_case(case: ModelCase, data_root: Path, workdir: Path) -> TrainedCase:
    torch.manual_seed(0)
    model = case.build()
    if hasattr(model, "min_steps"):  # the case's max_epochs is its budget; the 50-step floor: tests/test_few_normals.py
        model.min_steps = 0
    datamodule = make_datamodule(case, data_root)
    engine = Engine(
        max_epochs=case.max_epochs,
        default_root_dir=workdir,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        **case.engine_kwargs,
    )
    engine.fit(model=model, datamodule=datamodule)
    checkpoint = workdir / "harness.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    raw_scores: list[float] = []
    hook = model.model.register_forward_hook(
        lambda _module, _inputs, output: raw_scores.extend(output.pred_score.flatten().tolist())
    )
    try:
        predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    finally:
        hook.remove()
    samples = datamodule.test_data.samples  # batches drop mask_path when a batch mixes good and defect images
    mask_of = {
        str(image): str(mask) if isinstance(mask, str) else ""
        for image, mask in zip(samples.image_path, samples.mask_path, strict=True)
    }
    paths, labels, predicted = [], [], []
    for batch in predictions:
        paths += [str(p) for p in batch.image_path]
        labels += batch.gt_label.flatten().int().tolist()
        predicted += batch.pred_label.flatten().int().tolist()
    return TrainedCase(
        case,
        model,
        engine,
        checkpoint,
        paths,
        np.array(raw_scores),
        np.array(labels),
        workdir,
        np.array(predicted),
        [mask_of.get(path, "") for path in paths],
    )


def flag_everything_f1(labels: np.ndarray) -> float:
    """F1 of predicting every image defective: 2p / (1 + p) for a defective share p. A useful threshold beats it."""
    share = float(np.mean(labels))
    return 2 * share / (1 + share)


def raw_outputs(model: AnomalibModule, images: torch.Tensor):  # noqa: ANN201
    """The torch model's scores and maps before the post-processor (no normalisation, no clamping)."""
    model = model.eval().cpu()
    with torch.no_grad():
        return model.model(model.pre_processor(images) if model.pre_processor else images)


def export_raw_openvino(
    model: AnomalibModule,
    engine: Engine,
    case: ModelCase,
    export_root: Path,
    int8_datamodule=None,  # noqa: ANN001
) -> Path:
    """Export to OpenVINO with the post-processor's normalisation off, so the graph's scores and maps are the raw
    ones: normalised scores are clamped to [0, 1], which ties every image beyond the normalisation range and
    hides whether the export kept their order. ``int8_datamodule`` calibrates an ``INT8_PTQ`` export."""
    from anomalib.deploy import CompressionType

    compression = {}
    if int8_datamodule is not None:
        compression = {"compression_type": CompressionType.INT8_PTQ, "datamodule": int8_datamodule}
    processor = model.post_processor
    processor.enable_normalization = False
    try:
        size = case.image_size
        return Path(
            engine.export(
                model=model,
                export_type=ExportType.OPENVINO,
                export_root=export_root,
                input_size=(size, size),
                **case.export_kwargs,
                **compression,
            )
        )
    finally:
        processor.enable_normalization = True


def load_images(paths: list[str] | list[Path], size: int) -> torch.Tensor:
    """Images as anomalib reads them: RGB float in [0, 1], each resized to the model input, (N, 3, H, W)."""
    from anomalib.data.utils import read_image

    images = []
    for path in paths:
        image = read_image(path, as_tensor=True)[None]
        if tuple(image.shape[-2:]) != (size, size):  # real images differ in size (bottle 900 px, dice 128 px)
            image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
        images.append(image)
    # antialiased resizing overshoots to 1.0000001 on bright pixels, and anomalib's OpenVINOInferencer divides
    # any float image whose maximum exceeds 1.0 by 255: clamp, or the exported model sees a black image
    return torch.cat(images).clamp(0, 1)


def export_openvino(trained: TrainedCase) -> Path:
    """The case's OpenVINO export at its image size, made once: the parity and edge tests share it (the export is
    most of their time)."""
    if trained.openvino_xml is None:
        size = trained.case.image_size
        path = trained.engine.export(
            model=trained.model,
            export_type=ExportType.OPENVINO,
            export_root=trained.workdir / "export",
            input_size=(size, size),
            **trained.case.export_kwargs,
        )
        trained.openvino_xml = Path(path)
    return trained.openvino_xml


def fit_small_tile_outlier(root: Path, n_test_good: int) -> Path:
    """A TileOutlier fitted on 16 synthetic 64 px normal images under ``root``, copied to ``root/model.ckpt`` (a path
    that does not name its class); ``root/synthetic/test`` holds ``n_test_good`` normal and 2 images per defect."""
    from anomalib.engine import Engine

    from anomalib_ext.data.synthetic import make_mvtec_dataset
    from anomalib_ext.models import TileOutlier

    make_mvtec_dataset(root, image_size=64, n_train=16, n_test_good=n_test_good, n_test_per_defect=2, seed=5)
    model = TileOutlier(image_size=64, tiling={"tile_size": 16, "stride": 8}, layers=["blocks.1", "blocks.2"])
    datamodule = MVTecAD(root=root, category="synthetic", num_workers=0, train_batch_size=16, eval_batch_size=16)
    engine = Engine(default_root_dir=root / "run", accelerator="cpu", logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    written = sorted((root / "run").rglob("*.ckpt"))
    assert written, "training wrote no checkpoint"
    target = root / "model.ckpt"
    shutil.copy(written[-1], target)
    return target
