"""The losses of TeacherStudent's two training stages (as anomalib's ``stfpm/loss.py``).

Stage 1 (optional) fine-tunes the teacher as a normal-vs-defective classifier: ``TeacherClassifierLoss``.
Stage 2 trains the student to reproduce the teacher's features: ``FeatureMatchingLoss``, STFPM's loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class TeacherClassifierLoss(nn.Module):
    """Weighted BCE of the teacher's defect head: normal and augmented normal images are label 0, synthetic defects
    label 1. The per-sample weights (the origin's 5 / 2 / 10) make a missed defect cost more than a false alarm,
    and a varied normal less than a plain one, whose look is certain to be normal.

    Args:
        normal_weight, augmented_weight, defect_weight: weight of each sample of the kind.
    """

    def __init__(self, normal_weight: float = 5.0, augmented_weight: float = 2.0, defect_weight: float = 10.0) -> None:
        super().__init__()
        self.normal_weight = normal_weight
        self.augmented_weight = augmented_weight
        self.defect_weight = defect_weight

    def forward(self, normal: torch.Tensor, augmented: torch.Tensor, defective: torch.Tensor) -> torch.Tensor:
        """Weighted mean BCE of the defect logits of the three kinds of images, one (B,) tensor each."""
        logits = torch.cat([normal, augmented, defective])
        labels = torch.cat([normal.new_zeros(len(normal) + len(augmented)), defective.new_ones(len(defective))])
        weights = torch.cat(
            [
                normal.new_full((len(normal),), self.normal_weight),
                augmented.new_full((len(augmented),), self.augmented_weight),
                defective.new_full((len(defective),), self.defect_weight),
            ]
        )
        per_sample = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return (per_sample * weights).sum() / weights.sum().clamp_min(1e-8)


class FeatureMatchingLoss(nn.Module):
    """STFPM's loss: sum over layers of the mean squared distance between channel-L2-normalised teacher and student
    features (per position ``0.5 * ||t/|t| - s/|s|||^2 = 1 - cosine``, the quantity the anomaly map reports)."""

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        losses = [
            0.5 * (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(dim=1).mean()
            for t, s in zip(teacher, student, strict=True)
        ]
        return torch.stack(losses).sum()
