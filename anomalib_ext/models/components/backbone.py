"""Pretrained timm backbones that load offline, their layer defaults and their input normalisation.

Input normalisation: a pretrained backbone expects its inputs standardised with the mean and standard deviation
it was trained with, which timm records in the model's ``pretrained_cfg`` (``tf_efficientnet_lite0``: mean =
std = 0.5, not ImageNet's). ``InputNormalizer`` applies them to raw [0, 1] images inside the torch model, so
the pre-processor only resizes, the exported graph contains the normalisation, and training-time image
changes (synthetic defects, augmentations, fastdup's raw tiles) all work on plain images.

``per_image`` photometric standardisation: each image standardised by its own per-channel mean and standard
deviation, which is what the backbone's standardisation gives an image whose statistics equal the backbone's
(``(x - m) / s`` mapped to the backbone's mean and std, then standardised by them, is ``(x - m) / s`` again). A
change of brightness or contrast (``a * x + b`` per channel: gain, offset, a colour temperature's per-channel
gains) then leaves the features unchanged; a gamma or a vignette only partly (docs/lighting.md measures it).

``flat_field``: each image first divided by its own illumination, a smooth surface through its block means
(``FLAT_FIELD_GRID`` x ``FLAT_FIELD_GRID`` blocks, upsampled bilinearly), then standardised as ``per_image``.
A light that falls off across the part (a vignette, a lamp to one side) multiplies the image by a smooth field,
which the division removes; so does everything ``per_image`` removes. What it costs: whatever varies as slowly as
the illumination is taken out too (a defect as large as a block, the part's own large-scale shading).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import timm
import torch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.weights import DEFAULT_ARCHITECTURE, ensure_pretrained

DEFAULT_BACKBONE = DEFAULT_ARCHITECTURE
# feature maps compared position by position (tiles, teacher-student): /4, /8, /16 of the input
DEFAULT_LAYERS = ("blocks.1", "blocks.2", "blocks.4")
# globally pooled image descriptors (Dfkdm): deeper, more semantic layers, /8 to /32
DEFAULT_POOLED_LAYERS = ("blocks.2", "blocks.4", "blocks.6")

InputNormalization = Literal["backbone", "imagenet", "per_image", "flat_field"]
INPUT_NORMALIZATIONS: tuple[str, ...] = ("backbone", "imagenet", "per_image", "flat_field")
# ``per_image``: the smallest per-channel standard deviation divided by, so a flat image stays finite; below one
# 8-bit grey level (1/255), so any image with texture is standardised exactly
PER_IMAGE_MIN_STD = 1e-4
# ``flat_field``: the illumination is read from a grid of block means (a fixed share of the image, whatever its size:
# 16 px blocks at 256 px): fine enough to follow a vignette (an 8 x 8 grid left much of it in), coarse enough to keep
# what is smaller than a block; an illumination below FLAT_FIELD_MIN_LEVEL (a black background) is taken as that
# level, so the noise there is not blown up
FLAT_FIELD_GRID = 16
FLAT_FIELD_MIN_LEVEL = 0.02
# the "imagenet" option: the statistics anomalib's default pre-processor uses
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_feature_extractor(
    backbone: str = DEFAULT_BACKBONE,
    layers: Sequence[str] = DEFAULT_LAYERS,
    pre_trained: bool = True,
    requires_grad: bool = False,
) -> TimmFeatureExtractor:
    """anomalib's ``TimmFeatureExtractor``, with our offline weights provisioned first.

    Raises ``anomalib_ext.weights.WeightsError`` naming the architectures we can provide when ``pre_trained``
    asks for one we cannot load offline.
    """
    ensure_pretrained(backbone, pre_trained)
    extractor = TimmFeatureExtractor(
        backbone=backbone, layers=list(layers), pre_trained=pre_trained, requires_grad=requires_grad
    )
    return extractor if requires_grad else extractor.eval()


def backbone_mean_std(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std of ``backbone``'s pretrained weights, from timm's ``pretrained_cfg`` (offline)."""
    config = timm.models.get_pretrained_cfg(backbone)
    if config is not None:
        return tuple(config.mean), tuple(config.std)
    model_config = timm.create_model(backbone, pretrained=False).pretrained_cfg  # no download either
    return tuple(model_config.get("mean", IMAGENET_MEAN)), tuple(model_config.get("std", IMAGENET_STD))


def normalization_stats(backbone: str, mode: InputNormalization) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for ``mode``: ``backbone`` = the backbone's own statistics, ``imagenet`` = ImageNet's,
    ``per_image`` = the backbone's (kept for the record: ``InputNormalizer`` then uses each image's own)."""
    if mode not in INPUT_NORMALIZATIONS:
        msg = f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got {mode!r}"
        raise ValueError(msg)
    return (IMAGENET_MEAN, IMAGENET_STD) if mode == "imagenet" else backbone_mean_std(backbone)


class InputNormalizer(nn.Module):
    """``(images - mean) / std`` per channel for raw [0, 1] images, with the statistics as buffers (exportable).

    With ``per_image`` the mean and std are each image's own, per channel; with ``flat_field`` the image is first
    divided by its own smooth illumination (module docstring). Pure tensor ops, no data-dependent branch: the
    exported graph computes them. Build it with ``InputNormalizer.for_backbone(backbone, mode)``.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], per_image: bool = False, flat_field: bool = False
    ) -> None:
        super().__init__()
        self.per_image = per_image or flat_field
        self.flat_field = flat_field
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def for_backbone(cls, backbone: str, mode: InputNormalization = "backbone") -> InputNormalizer:
        return cls(*normalization_stats(backbone, mode), per_image=mode == "per_image", flat_field=mode == "flat_field")

    @staticmethod
    def illumination(images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) smooth illumination of each image: its block means, upsampled bilinearly."""
        blocks = F.adaptive_avg_pool2d(images, FLAT_FIELD_GRID)
        return F.interpolate(blocks, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.flat_field:  # a constructor setting, the same for every input
            images = images / self.illumination(images).clamp_min(FLAT_FIELD_MIN_LEVEL)
        if self.per_image:
            mean = images.mean(dim=(2, 3), keepdim=True)
            std = (images - mean).square().mean(dim=(2, 3), keepdim=True).sqrt().clamp_min(PER_IMAGE_MIN_STD)
            return (images - mean) / std
        return (images - self.mean) / self.std

    def extra_repr(self) -> str:
        if self.flat_field:
            return "flat_field=True (each image divided by its smooth illumination, then its own mean and std)"
        if self.per_image:
            return "per_image=True (each image's own per-channel mean and std)"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
