"""Pieces shared by several anomalib-ext models, grouped by topic like anomalib's own components. They know no model.

- ``base``: ``ExtModelMixin``, the Lightning base of every model (resize pre-processor, opset-18 export, SIGTERM status)
- ``backbone``: offline timm feature extractors, layer defaults, ``InputNormalizer``
- ``filters``: ``GaussianBlur`` and ``SSIMMap``
- ``stats``: image scores from maps, robust statistics, k-medoids, ``MapStandardizer``; ``kde``: feature densities
- ``sampling``: reservoir and coreset samplers; ``alignment``: NCC pose search; ``tiling``: tile grids
- ``autoencoder``, ``cutpaste``, ``class_folders``
"""

from .autoencoder import AutoencoderOutput, ConvAutoencoder, ReconstructionLoss, kl_divergence
from .backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_LAYERS,
    DEFAULT_POOLED_LAYERS,
    INPUT_NORMALIZATIONS,
    InputNormalization,
    InputNormalizer,
    backbone_mean_std,
    build_feature_extractor,
)
from .base import (
    EXPORT_OPSET,
    SIGTERM_EXIT_STATUS,
    ExtModelMixin,
    ImageSize,
    SigtermExitStatus,
    as_pair,
    image_metrics_evaluator,
)
from .class_folders import NORMAL_DIR, class_from_path
from .cutpaste import CutPaste
from .filters import GaussianBlur, SSIMMap, gaussian_kernel_1d
from .stats import (
    MapMoments,
    MapStandardizer,
    k_medoids,
    robust_center_scale,
    topk_mean,
    weighted_theil_sen_slope,
)

__all__ = [
    "AutoencoderOutput",
    "ConvAutoencoder",
    "CutPaste",
    "DEFAULT_BACKBONE",
    "DEFAULT_LAYERS",
    "DEFAULT_POOLED_LAYERS",
    "EXPORT_OPSET",
    "ExtModelMixin",
    "GaussianBlur",
    "INPUT_NORMALIZATIONS",
    "ImageSize",
    "InputNormalization",
    "InputNormalizer",
    "MapMoments",
    "MapStandardizer",
    "NORMAL_DIR",
    "ReconstructionLoss",
    "SIGTERM_EXIT_STATUS",
    "SSIMMap",
    "SigtermExitStatus",
    "as_pair",
    "backbone_mean_std",
    "build_feature_extractor",
    "class_from_path",
    "gaussian_kernel_1d",
    "image_metrics_evaluator",
    "k_medoids",
    "kl_divergence",
    "robust_center_scale",
    "topk_mean",
    "weighted_theil_sen_slope",
]
