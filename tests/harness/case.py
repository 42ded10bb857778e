"""What a model family declares to join the shared model harness (tests/test_model_harness.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anomalib.models import AnomalibModule


@dataclass
class ModelCase:
    """One entry of the harness: how to build a small, fast version of a model.

    ``build`` returns a fresh, untrained model sized for tiny synthetic data (64-128 px, a few dozen images,
    few epochs). ``dataset`` picks the synthetic data: ``"mvtec"`` (object with scratches, spots, missing
    parts, colour changes) or ``"dice"`` (dice layout). The harness trains it through ``Engine`` (thresholds
    picked on a validation split that holds no test image), tests it, checks planted defects outscore normal
    images, that the predicted labels beat flagging everything (also when the validation anomalies are made much
    easier or much harder than the test defects) and that the map peaks on the planted region, exports to
    OpenVINO and compares with torch, and reloads the checkpoint.
    """

    name: str
    build: Callable[[], AnomalibModule]
    dataset: str = "mvtec"
    image_size: int = 128
    max_epochs: int = 1
    # fraction of defect images that must score above every normal test image
    min_separated_fraction: float = 0.8
    min_image_auroc: float = 0.95
    # fraction of defect images whose anomaly map peaks on the planted region (models with a map)
    min_peak_in_defect_fraction: float = 0.75
    # the fooling test (thresholds from misleading validation anomalies beat flagging everything) needs a model
    # that ranks most defects above the normal images; ``False`` for a case trained too briefly for that
    threshold_fooling_test: bool = True
    # robustness: on constant training images, a bright square must outscore a copy of the training image;
    # ``False`` (with the measured scores in the case's module) for a model that needs texture to learn from
    ranks_spot_on_constant_images: bool = True
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    exportable: bool = True
    # extra arguments for Engine.export (our models need none; anomalib's built-ins need opset 18 here)
    export_kwargs: dict[str, Any] = field(default_factory=dict)
