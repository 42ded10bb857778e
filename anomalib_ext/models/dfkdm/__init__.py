"""Dfkdm: deep-feature kernel density model on pooled backbone features; DfkdmLake: its LAKE autoencoder variant."""

from .lightning_model import Dfkdm, DfkdmLake
from .torch_model import DensitySettings, DfkdmModel, LakeModel

__all__ = ["DensitySettings", "Dfkdm", "DfkdmLake", "DfkdmModel", "LakeModel"]
