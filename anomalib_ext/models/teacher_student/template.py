"""Single-good-template training data: one image and ``samples_per_epoch`` random variations of it.

A line that starts inspecting a new part often has exactly one verified good part. TeacherStudent swaps
this dataset in for the datamodule's training set (see ``TeacherStudent.setup``), so validation and test
still come from the datamodule and ``anomalib train --config`` works unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.data import ImageBatch, ImageItem
from anomalib.data.utils import read_image
from torch.utils.data import Dataset

from .augment import NormalVariation


def load_template(path: str | Path) -> torch.Tensor:
    """The template as a (3, H, W) float tensor in [0, 1], with a clear error when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        msg = f"single_template '{path}' does not exist"
        raise FileNotFoundError(msg)
    try:
        image = read_image(path, as_tensor=True)
    except Exception as error:
        msg = f"single_template '{path}' is not a readable image: {error}"
        raise ValueError(msg) from error
    return image.float().clamp(0, 1)


class SingleTemplateDataset(Dataset):
    """``samples_per_epoch`` items; the first is the template itself, the rest are its variations."""

    def __init__(self, template: str | Path, samples_per_epoch: int, variation: NormalVariation) -> None:
        if samples_per_epoch < 1:
            msg = f"samples_per_epoch must be >= 1, got {samples_per_epoch}"
            raise ValueError(msg)
        self.template_path = str(template)
        self.template = load_template(template)
        self.samples_per_epoch = samples_per_epoch
        self.variation = variation

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> ImageItem:
        image = self.template if index == 0 else self.variation(self.template.unsqueeze(0))[0]
        return ImageItem(image=image, gt_label=torch.tensor(0), image_path=self.template_path)

    @property
    def collate_fn(self):  # noqa: ANN201  (same hook name as anomalib's datasets)
        """anomalib's batch collation, so the datamodule's DataLoader can use this dataset as is."""
        return ImageBatch.collate
