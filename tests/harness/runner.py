"""Train, predict, export and reload one harness case; shared by the harness tests."""

from __future__ import annotations

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
    scores: np.ndarray
    labels: np.ndarray  # ground truth: 1 = defective
    workdir: Path


def make_datamodule(case: ModelCase, data_root: Path):
    """The case's synthetic data as an anomalib datamodule (validation from train: never the test images)."""
    if case.dataset == "dice":
        from anomalib_ext.data import Dice  # lands with the TemplateSsim issue

        return Dice(root=data_root, train_batch_size=8, eval_batch_size=8, num_workers=0, seed=0)
    return MVTecAD(
        root=data_root,
        category="synthetic",
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        val_split_mode="from_test",
        val_split_ratio=0.5,
        seed=0,
    )


def train_case(case: ModelCase, data_root: Path, workdir: Path) -> TrainedCase:
    torch.manual_seed(0)
    model = case.build()
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
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    paths, scores, labels = [], [], []
    for batch in predictions:
        paths += [str(p) for p in batch.image_path]
        scores += batch.pred_score.flatten().tolist()
        labels += batch.gt_label.flatten().int().tolist()
    return TrainedCase(case, model, engine, checkpoint, paths, np.array(scores), np.array(labels), workdir)


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
    size = trained.case.image_size
    path = trained.engine.export(
        model=trained.model,
        export_type=ExportType.OPENVINO,
        export_root=trained.workdir / "export",
        input_size=(size, size),
        **trained.case.export_kwargs,
    )
    return Path(path)
