"""Reconstruction family: convolutional autoencoder / VAE scored by reconstruction error."""

from .lightning_model import Reconstruction
from .torch_model import ReconstructionModel

__all__ = ["Reconstruction", "ReconstructionModel"]
