"""TeacherStudent: fine-tuned pretrained teacher, distilled student, 1 - cosine map; single-template mode."""

from .augment import Augmentation
from .lightning_model import TeacherFinetuning, TeacherStudent
from .template import SingleTemplate
from .torch_model import TeacherStudentModel

__all__ = ["Augmentation", "SingleTemplate", "TeacherFinetuning", "TeacherStudent", "TeacherStudentModel"]
