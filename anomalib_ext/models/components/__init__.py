"""Pieces shared by several anomalib-ext models, grouped by topic like anomalib's own components. They know no model.

- ``base``: ``ExtModelMixin``, the Lightning base of every model (resize pre-processor, data check, opset-18 export,
  SIGTERM status, versioned checkpoints)
- ``backbone``: offline timm feature extractors, layer defaults, ``InputNormalizer``
- ``filters``: ``GaussianBlur`` and ``SSIMMap``
- ``stats``: image scores from maps, robust statistics, k-medoids, ``MapStandardizer``; ``kde``: feature densities
- ``sampling``: reservoir and coreset samplers; ``alignment``: NCC pose search; ``tiling``: tile grids;
  ``image_tiling``: a network run on tiles of a large image (anomalib's ``Tiler``), outputs stitched back
- ``autoencoder``, ``cutpaste``; ``class_from_path`` is re-exported from ``anomalib_ext.data.class_folders``
- ``thresholds``: ``RobustThresholdPostProcessor``, the image threshold every model uses (docs/thresholds.md)
- ``distributed``: merging fit data across DDP ranks (no-ops on one process); makes ``ddp_spawn`` pickle the CLI
"""

from anomalib_ext.data.class_folders import NORMAL_DIR, class_from_path

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
    CHECKPOINT_VERSION_KEY,
    EXPORT_OPSET,
    SIGTERM_EXIT_STATUS,
    ExtModelMixin,
    FitOnlyHooks,
    ImageSize,
    IncompatibleCheckpointError,
    SigtermExitStatus,
    as_pair,
    image_metrics_evaluator,
)
from .cutpaste import CutPaste
from .distributed import (
    DdpAnchor,
    gather_objects,
    gather_reservoir,
    gather_rows,
    is_distributed,
    sum_across_ranks,
    with_image_paths,
)
from .filters import GaussianBlur, SSIMMap, gaussian_kernel_1d
from .image_tiling import ImageTiling, TiledNetwork
from .stats import (
    CROSS_FIT_FOLDS,
    MapMoments,
    MapStandardizer,
    fold_indices,
    k_medoids,
    robust_center_scale,
    topk_mean,
    weighted_theil_sen_slope,
)
from .thresholds import NormalScoreWindow, RobustThresholdPostProcessor

__all__ = [
    "CROSS_FIT_FOLDS",
    "ImageTiling",
    "TiledNetwork",
    "CHECKPOINT_VERSION_KEY",
    "AutoencoderOutput",
    "ConvAutoencoder",
    "CutPaste",
    "DEFAULT_BACKBONE",
    "DEFAULT_LAYERS",
    "DEFAULT_POOLED_LAYERS",
    "DdpAnchor",
    "EXPORT_OPSET",
    "ExtModelMixin",
    "FitOnlyHooks",
    "GaussianBlur",
    "INPUT_NORMALIZATIONS",
    "IncompatibleCheckpointError",
    "ImageSize",
    "InputNormalization",
    "InputNormalizer",
    "MapMoments",
    "NormalScoreWindow",
    "MapStandardizer",
    "NORMAL_DIR",
    "ReconstructionLoss",
    "RobustThresholdPostProcessor",
    "SIGTERM_EXIT_STATUS",
    "SSIMMap",
    "SigtermExitStatus",
    "as_pair",
    "backbone_mean_std",
    "build_feature_extractor",
    "class_from_path",
    "fold_indices",
    "gather_objects",
    "gather_reservoir",
    "gather_rows",
    "gaussian_kernel_1d",
    "image_metrics_evaluator",
    "is_distributed",
    "k_medoids",
    "kl_divergence",
    "robust_center_scale",
    "sum_across_ranks",
    "topk_mean",
    "weighted_theil_sen_slope",
    "with_image_paths",
]
