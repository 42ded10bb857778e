"""Pure-torch teacher-student network: pretrained teacher, random-init student, cosine-distance map.

Only the eval-mode forward is traced for export; it uses no data-dependent Python control flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components import (
    GaussianBlur,
    InputNormalization,
    InputNormalizer,
    build_feature_extractor,
    topk_mean,
)

from .anomaly_map import ANOMALY_MAP_MODES, cosine_anomaly_map


class TeacherStudentModel(nn.Module):
    """Teacher and student feature pyramids plus a small classifier head used to fine-tune the teacher.

    The arguments are ``TeacherStudent``'s (documented there, with their defaults).

    Args:
        backbone: timm architecture of the teacher (pretrained, offline weights).
        layers: feature layers compared between teacher and student.
        student_backbone: architecture of the student (random init); ``None`` means the teacher's. When its
            channel counts differ from the teacher's, 1x1 convolutions project the student onto them.
        anomaly_map_mode: ``"mul"`` (product of per-layer maps) or ``"sum"``.
        map_sigma: Gaussian smoothing of the final map in pixels; 0 disables it.
        topk_fraction: image score = mean of the top ``topk_fraction`` of map pixels (0 means the max).
        input_normalization: ``backbone`` (the teacher's pretrained mean/std) or ``imagenet``; teacher and student
            see the same normalised images.
    """

    def __init__(
        self,
        *,
        backbone: str,
        layers: Sequence[str],
        student_backbone: str | None,
        anomaly_map_mode: str,
        map_sigma: float,
        topk_fraction: float,
        input_normalization: InputNormalization,
    ) -> None:
        super().__init__()
        if anomaly_map_mode not in ANOMALY_MAP_MODES:
            msg = f"anomaly_map_mode must be one of {ANOMALY_MAP_MODES}, got '{anomaly_map_mode}'"
            raise ValueError(msg)
        if not 0.0 <= topk_fraction < 1.0:
            msg = f"topk_fraction must be in [0, 1), got {topk_fraction}"
            raise ValueError(msg)
        if len(layers) == 0:
            msg = "layers must name at least one feature layer"
            raise ValueError(msg)
        self.layers = list(layers)
        self.anomaly_map_mode = anomaly_map_mode
        self.topk_fraction = topk_fraction
        self.normalize = InputNormalizer.for_backbone(backbone, input_normalization)
        # requires_grad=True so the teacher can be fine-tuned first; freeze_teacher() turns it off
        self.teacher: TimmFeatureExtractor = build_feature_extractor(backbone, layers, requires_grad=True)
        self.student: TimmFeatureExtractor = build_feature_extractor(
            student_backbone or backbone, layers, pre_trained=False, requires_grad=True
        )
        teacher_channels = list(self.teacher.out_dims)
        student_channels = list(self.student.out_dims)
        self.projections = nn.ModuleList(
            nn.Identity() if s == t else nn.Conv2d(s, t, kernel_size=1)
            for s, t in zip(student_channels, teacher_channels, strict=True)
        )
        # normal-vs-defective head on the deepest compared layer, only used while fine-tuning the teacher
        self.classifier = nn.Linear(teacher_channels[-1], 1)
        self.blur = GaussianBlur(map_sigma, truncate=4.0)

    # ------------------------------------------------------------------------------------------ features
    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Teacher features of [0, 1] images, one tensor per layer."""
        features = self.teacher(self.normalize(images))
        return [features[layer] for layer in self.layers]

    def student_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Student features of [0, 1] images, projected onto the teacher's channels."""
        features = self.student(self.normalize(images))
        return [project(features[layer]) for project, layer in zip(self.projections, self.layers, strict=True)]

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


def layer_feature_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the mean squared error between channel-L2-normalised features (STFPM's loss)."""
    losses = [
        0.5 * (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(dim=1).mean()
        for t, s in zip(teacher, student, strict=True)
    ]
    return torch.stack(losses).sum()
