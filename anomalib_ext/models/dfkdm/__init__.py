"""Dfkdm: deep-feature kernel density model (backbone features or LAKE autoencoder features)."""

from .lightning_model import Dfkdm
from .torch_model import DfkdmModel

__all__ = ["Dfkdm", "DfkdmModel"]
