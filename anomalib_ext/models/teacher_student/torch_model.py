"""Pure-torch teacher-student network: pretrained teacher, random-init student, cosine-distance map.

Only the eval-mode forward is traced for export; it uses no data-dependent Python control flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn

from anomalib_ext.models.components import (
    GaussianBlur,
    ImageTiling,
    InputNormalization,
    InputNormalizer,
    build_feature_extractor,
    topk_mean,
)
from anomalib_ext.models.components.stats import check_topk_fraction

from .anomaly_map import ANOMALY_MAP_MODES, cosine_anomaly_map


class TeacherStudentModel(nn.Module):
    """Teacher and student feature pyramids (same architecture) plus a small classifier head used to fine-tune the
    teacher. The arguments are ``TeacherStudent``'s, documented there (``image_size`` as an ``(H, W)`` pair)."""

    def __init__(
        self,
        *,
        backbone: str,
        layers: Sequence[str],
        input_normalization: InputNormalization,
        anomaly_map_mode: str,
        map_sigma: float,
        topk_fraction: float,
        image_tiling: ImageTiling | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if anomaly_map_mode not in ANOMALY_MAP_MODES:
            msg = f"anomaly_map_mode must be one of {ANOMALY_MAP_MODES}, got '{anomaly_map_mode}'"
            raise ValueError(msg)
        if len(layers) == 0:
            msg = "layers must name at least one feature layer"
            raise ValueError(msg)
        self.layers = list(layers)
        # teacher and student both run on tiles of a large image (their features stitched), or on the whole image
        self.image_tiling = image_tiling or ImageTiling()
        self.image_tiling.check(image_size)
        self.anomaly_map_mode = anomaly_map_mode
        self.topk_fraction = check_topk_fraction(topk_fraction, allow_zero=True)
        # by default the mean/std the teacher's pretrained weights expect (timm's pretrained_cfg); the student sees
        # the same
        self.normalize = InputNormalizer.for_backbone(backbone, input_normalization)
        # requires_grad=True so the teacher can be fine-tuned first; freeze_teacher() turns it off
        self.teacher: TimmFeatureExtractor = build_feature_extractor(backbone, layers, requires_grad=True)
        self.student: TimmFeatureExtractor = build_feature_extractor(
            backbone, layers, pre_trained=False, requires_grad=True
        )
        # normal-vs-defective head on the deepest compared layer, only used while fine-tuning the teacher
        self.classifier = nn.Linear(list(self.teacher.out_dims)[-1], 1)
        self.blur = GaussianBlur(map_sigma, truncate=4.0)

    # ------------------------------------------------------------------------------------------ features
    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Teacher features of [0, 1] images, one tensor per layer."""
        features = self.image_tiling.run(self.teacher, self.normalize(images))
        return [features[layer] for layer in self.layers]

    def student_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Student features of [0, 1] images, one tensor per layer."""
        features = self.image_tiling.run(self.student, self.normalize(images))
        return [features[layer] for layer in self.layers]

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Defect logit per image from the teacher (used to fine-tune it)."""
        deepest = self.teacher_features(images)[-1]
        return self.classifier(deepest.mean(dim=(-2, -1))).squeeze(-1)

    def freeze_teacher(self) -> None:
        """Stop training the teacher: no gradients, eval-mode batch norm from now on."""
        self.teacher.requires_grad = False
        for parameter in [*self.teacher.parameters(), *self.classifier.parameters()]:
            parameter.requires_grad_(False)
        self.teacher.eval()

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        """Training: (teacher, student) features. Eval: ``InferenceBatch`` with map and score.

        ``images`` are RGB in [0, 1]; the backbone's input normalisation happens here so augmentations, synthetic
        defects and HistAuGAN work on plain images during training.
        """
        with torch.no_grad():
            teacher = self.teacher_features(images)
        student = self.student_features(images)
        if self.training:
            return teacher, student
        anomaly_map = cosine_anomaly_map(teacher, student, tuple(images.shape[-2:]), self.anomaly_map_mode)
        anomaly_map = self.blur(anomaly_map)
        return InferenceBatch(pred_score=topk_mean(anomaly_map, self.topk_fraction), anomaly_map=anomaly_map)

    def train(self, mode: bool = True) -> TeacherStudentModel:
        """Keep the teacher's batch-norm statistics fixed in every mode: it is fine-tuned, never re-normalised."""
        super().train(mode)
        self.teacher.eval()
        return self
