"""The single good template of ``TeacherStudent``'s single-template mode, read as a [0, 1] image."""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.data.utils import read_image


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
