"""Reconstruction family: convolutional autoencoder / VAE scored by reconstruction error."""

from .lightning_model import Reconstruction
from .loss import LossWeights
from .torch_model import ReconstructionModel

__all__ = ["LossWeights", "Reconstruction", "ReconstructionModel"]
