"""Fused, the recommended default: tile outliers and a global density on one backbone pass, standardised and fused."""

from .lightning_model import Fused
from .torch_model import FusedModel

__all__ = ["Fused", "FusedModel"]
