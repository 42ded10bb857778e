"""Pieces shared by several anomalib-ext models. They know no model."""

from .autoencoder import AutoencoderOutput, ConvAutoencoder, ReconstructionLoss, kl_divergence
from .backbone import DEFAULT_BACKBONE, DEFAULT_LAYERS, build_feature_extractor, feature_channels, imagenet_normalize
from .export import EXPORT_OPSET, ExportDefaultsMixin
from .interrupt import SIGTERM_EXIT_STATUS, InterruptStatusMixin, SigtermExitStatus
from .ssim import SSIMMap, gaussian_window, ssim_loss, ssim_map, topk_mean

__all__ = [
    "AutoencoderOutput",
    "ConvAutoencoder",
    "ReconstructionLoss",
    "kl_divergence",
    "DEFAULT_BACKBONE",
    "DEFAULT_LAYERS",
    "EXPORT_OPSET",
    "ExportDefaultsMixin",
    "InterruptStatusMixin",
    "SIGTERM_EXIT_STATUS",
    "SigtermExitStatus",
    "SSIMMap",
    "build_feature_extractor",
    "feature_channels",
    "gaussian_window",
    "imagenet_normalize",
    "ssim_loss",
    "ssim_map",
    "topk_mean",
]
