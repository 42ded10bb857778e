"""TemplateSsim: template matching + local SSIM, with per-class score normalisation."""

from .lightning_model import TemplateSsim
from .torch_model import TemplateSsimModel

__all__ = ["TemplateSsim", "TemplateSsimModel"]
