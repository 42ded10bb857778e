"""CutPaste synthetic defects (Li et al., "CutPaste: Self-Supervised Learning for Anomaly Detection and
Localization", CVPR 2021) on raw [0, 1] images.

Each image gets, with equal chance, one of the paper's two variants: a rectangle (2-25 % of the area, aspect
ratio 0.3-3.3) or a thin "scar" (2-16 x 10-25 px, rotated by up to 45 degrees), cut from a random place,
colour-jittered and pasted at another random place of the same image. Patches are placed anywhere (no
foreground mask), so the augmentation needs no knowledge of the dataset.
"""

from __future__ import annotations

import math
import random

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF  # noqa: N812


class CutPaste:
    """Paste one jittered patch of each (B, C, H, W) image in [0, 1] elsewhere in it; returns a new batch.

    Args:
        color_jitter: strength of the brightness / contrast / saturation / hue jitter of the patch (0 = none).
        area_ratio: range of the rectangle's area as a fraction of the image.
        aspect_ratio: the rectangle's width / height lies in ``[aspect_ratio, 1 / aspect_ratio]``.
        scar_width, scar_height, scar_rotation: ranges of the scar's size (pixels) and rotation (degrees).
    """

    def __init__(
        self,
        color_jitter: float = 0.5,
        area_ratio: tuple[float, float] = (0.02, 0.25),
        aspect_ratio: float = 0.3,
        scar_width: tuple[int, int] = (2, 16),
        scar_height: tuple[int, int] = (10, 25),
        scar_rotation: tuple[float, float] = (-45.0, 45.0),
    ) -> None:
        jitter = min(color_jitter, 0.5)  # hue jitter must stay within 0.5
        self.jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter, jitter) if color_jitter > 0 else None
        self.area_ratio = area_ratio
        self.aspect_ratio = aspect_ratio
        self.scar_width = scar_width
        self.scar_height = scar_height
        self.scar_rotation = scar_rotation

    def _patch_size(self, height: int, width: int, scar: bool) -> tuple[int, int]:
        if scar:
            return random.randint(*self.scar_height), random.randint(*self.scar_width)  # noqa: S311
        area = random.uniform(*self.area_ratio) * height * width  # noqa: S311
        aspect = random.uniform(self.aspect_ratio, 1.0 / self.aspect_ratio)  # noqa: S311
        return round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))

    def paste_one(self, image: torch.Tensor) -> torch.Tensor:
        """CutPaste of one (C, H, W) image; the image itself when the patch would not fit."""
        _, height, width = image.shape
        scar = random.random() < 0.5  # noqa: S311
        cut_h, cut_w = self._patch_size(height, width, scar)
        if not (0 < cut_h < height and 0 < cut_w < width):
            return image
        top, left = random.randint(0, height - cut_h), random.randint(0, width - cut_w)  # noqa: S311
        patch = image[:, top : top + cut_h, left : left + cut_w]
        if self.jitter is not None:
            patch = self.jitter(patch).clamp(0, 1)
        mask = torch.ones_like(patch[:1])
        if scar:
            angle = random.uniform(*self.scar_rotation)  # noqa: S311
            patch = TF.rotate(patch, angle, interpolation=v2.InterpolationMode.BILINEAR, expand=True)
            mask = TF.rotate(mask, angle, interpolation=v2.InterpolationMode.BILINEAR, expand=True)
        patch_h, patch_w = patch.shape[-2:]
        if patch_h >= height or patch_w >= width:
            return image
        top, left = random.randint(0, height - patch_h), random.randint(0, width - patch_w)  # noqa: S311
        result = image.clone()
        region = result[:, top : top + patch_h, left : left + patch_w]
        result[:, top : top + patch_h, left : left + patch_w] = region * (1 - mask) + patch * mask
        return result

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.paste_one(image) for image in images])
