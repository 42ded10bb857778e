"""TemplateSsim: template matching + local SSIM, with per-class score normalisation."""

from .lightning_model import AnomalyMapSettings, LightingSettings, PoseSearchSettings, TemplateSsim
from .torch_model import TemplateSsimModel

__all__ = ["AnomalyMapSettings", "LightingSettings", "PoseSearchSettings", "TemplateSsim", "TemplateSsimModel"]
