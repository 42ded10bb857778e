"""Anomaly map from teacher/student feature pairs: per layer 1 - cosine similarity, combined over layers."""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812

ANOMALY_MAP_MODES = ("mul", "sum")


def cosine_anomaly_map(
    teacher: list[torch.Tensor], student: list[torch.Tensor], image_size: tuple[int, int], mode: str = "mul"
) -> torch.Tensor:
    """(B, 1, H, W) map. ``mul`` keeps only what every layer disagrees on (sharp, few false alarms);
    ``sum`` keeps what any layer disagrees on (catches defects only one scale sees)."""
    combined: torch.Tensor | None = None
    for teacher_layer, student_layer in zip(teacher, student, strict=True):
        distance = 1.0 - F.cosine_similarity(teacher_layer, student_layer, dim=1, eps=1e-6).unsqueeze(1)
        distance = F.interpolate(distance, size=image_size, mode="bilinear", align_corners=False)
        if combined is None:
            combined = distance
        elif mode == "mul":
            combined = combined * distance
        else:
            combined = combined + distance
    assert combined is not None  # the model checks layers is non-empty
    return combined
