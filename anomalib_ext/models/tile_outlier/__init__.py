"""TileOutlier: tiles scored by nearest-neighbour distance to a capped bank of normal tiles."""

from .lightning_model import MemoryBankSettings, SearchSettings, TileOutlier, TilingSettings
from .torch_model import TileOutlierModel

__all__ = ["MemoryBankSettings", "SearchSettings", "TileOutlier", "TileOutlierModel", "TilingSettings"]
