"""TileOutlier: tiles scored by nearest-neighbour distance to a capped bank of normal tiles."""

from .lightning_model import TileOutlier
from .torch_model import TileOutlierModel

__all__ = ["TileOutlier", "TileOutlierModel"]
