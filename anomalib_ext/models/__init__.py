"""anomalib-ext's model families. Importing this registers each one with anomalib (``list_models``)."""

from .dfkdm import Dfkdm, DfkdmLake
from .fused import Fused
from .reconstruction import Reconstruction
from .teacher_student import TeacherStudent
from .template_ssim import TemplateSsim
from .tile_outlier import TileOutlier

__all__ = ["Dfkdm", "DfkdmLake", "Fused", "Reconstruction", "TeacherStudent", "TemplateSsim", "TileOutlier"]
