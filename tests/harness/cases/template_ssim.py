"""TemplateSsim in class-less mode (k-medoids templates) on the synthetic MVTec object."""

from anomalib_ext.models import TemplateSsim
from tests.harness.case import ModelCase


def _build() -> TemplateSsim:
    return TemplateSsim(
        image_size=(128, 128),
        num_templates=2,
        pose_search={"max_shift": 8, "angles": (-4.0, -2.0, 0.0, 2.0, 4.0)},
        lighting={"gain_trend": True},
    )


CASE = ModelCase(name="template_ssim", build=_build)
