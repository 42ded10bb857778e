"""Pretrained timm backbones that load offline, shared by every model that embeds images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.components import TimmFeatureExtractor

from anomalib_ext.weights import DEFAULT_ARCHITECTURE, ensure_pretrained

DEFAULT_BACKBONE = DEFAULT_ARCHITECTURE
DEFAULT_LAYERS = ("blocks.1", "blocks.2", "blocks.4")


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


def feature_channels(extractor: TimmFeatureExtractor) -> list[int]:
    """Channels of each selected layer, in the order the extractor returns them."""
    return list(extractor.out_dims)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation for models that receive raw [0, 1] images."""
    mean = images.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = images.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std
