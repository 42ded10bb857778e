"""Single-template mode of ``TeacherStudent``: its settings and the one good image, read as a [0, 1] tensor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from anomalib.data.utils import read_image

from anomalib_ext.models.components.settings import Settings


@dataclass(frozen=True)
class SingleTemplate(Settings):
    """Train from one good image and its variations instead of the datamodule's training images.

    Args:
        path: the good image.
        samples_per_epoch: training samples per epoch: the template itself, then its ``Augmentation`` variations.
        batch_size: samples per optimiser step. The model makes these images itself, so it also batches them: the
            datamodule's training batch size no longer changes how many steps an epoch takes (``tools/benchmark.py``'s
            default batches of 16 used to halve the training).
    """

    path: str
    samples_per_epoch: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("samples_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                msg = f"single_template.{name} must be >= 1, got {getattr(self, name)}"
                raise ValueError(msg)


def load_template(path: str | Path) -> torch.Tensor:
    """The template as a (3, H, W) float tensor in [0, 1], with a clear error when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        msg = f"single_template.path '{path}' does not exist"
        raise FileNotFoundError(msg)
    try:
        image = read_image(path, as_tensor=True)
    except Exception as error:
        msg = f"single_template.path '{path}' is not a readable image: {error}"
        raise ValueError(msg) from error
    return image.float().clamp(0, 1)
