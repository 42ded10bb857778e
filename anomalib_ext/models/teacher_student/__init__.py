"""TeacherStudent: fine-tuned pretrained teacher, distilled student, 1 - cosine map; single-template mode."""

from .lightning_model import TeacherStudent
from .torch_model import TeacherStudentModel

__all__ = ["TeacherStudent", "TeacherStudentModel"]
