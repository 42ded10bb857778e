"""HistAuGAN: a multi-domain disentangled image-to-image GAN that re-renders normal images in new styles.

Train with ``python -m anomalib_ext.augment.histaugan fit --config configs/histaugan/bottle.yaml``; use the
exported generator through ``HistAuGANAugment`` as ``train_augmentations`` of any anomalib datamodule.
"""

from .checkpoint import CHECKPOINT_FORMAT, HistAuGANCheckpointError, load_generator, save_generator
from .data import HistAuGANDataModule
from .module import HistAuGAN
from .networks import HistAuGANGenerator
from .transform import HistAuGANAugment

__all__ = [
    "CHECKPOINT_FORMAT",
    "HistAuGAN",
    "HistAuGANAugment",
    "HistAuGANCheckpointError",
    "HistAuGANDataModule",
    "HistAuGANGenerator",
    "load_generator",
    "save_generator",
]
