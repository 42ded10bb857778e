"""Image thresholds that synthetic validation anomalies cannot push out of the normal images' reach.

anomalib's ``PostProcessor`` picks the image threshold that maximises F1 on the validation set. When that set's
anomalies are synthetic (Perlin noise on held-out normals), they may look nothing like a part's real defects:

- much easier than the real defects: the F1-optimal threshold sits just below the synthetic anomalies, far above
  every normal image, and real defects in between are missed (a Dfkdm config flagged almost nothing: F1 0.129 at
  image AUROC 0.685, below the 0.35 that flagging every image would give);
- much harder: the F1-optimal threshold drops into the normal scores (or to "flag everything").

The held-out validation normals are real images, so they say reliably where normal scores end.
``RobustThresholdPostProcessor`` keeps the F1-optimal threshold but clamps it into a window read from those normal
scores only:

    lower = quantile(normal, normal_quantile)                 (flag at most ~10 % of normal images)
    upper = max(normal) + margin * (max(normal) - median(normal))   (never far above every normal image)
    threshold = min(max(f1_optimal, lower), upper)

With synthetic anomalies that score unlike anything seen, the threshold is thus calibrated on the normal scores
alone (``upper`` or ``lower``); when they resemble real defects, the F1-optimal threshold usually lies in the
window and is kept. See ``docs/thresholds.md`` for the reasoning and the limits.

The threshold is the post-processor's ``_image_threshold`` buffer, as in anomalib: normalisation (score 0.5 at the
threshold), ``pred_label``, checkpoints and the exported OpenVINO graph all use it. The F1-optimal value and the
window stay available (``f1_optimal_image_threshold``, ``normal_score_window``) for reports comparing both rules;
they are not persistent, so checkpoints keep anomalib's state-dict keys.
"""

from __future__ import annotations

from typing import Any

import torch
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

NORMAL_QUANTILE = 0.9
MARGIN = 0.5


class NormalScoreWindow(Metric):
    """The ``(lower, upper)`` threshold window from the normal validation images' scores (NaNs if there are none).

    A torchmetrics ``Metric`` so that the scores of every DDP rank are gathered before the window is computed.
    """

    full_state_update = False

    def __init__(self, normal_quantile: float = NORMAL_QUANTILE, margin: float = MARGIN) -> None:
        super().__init__()
        if not 0.0 <= normal_quantile <= 1.0:
            msg = f"normal_quantile must be in [0, 1], got {normal_quantile}"
            raise ValueError(msg)
        if margin < 0:
            msg = f"margin must be >= 0, got {margin}"
            raise ValueError(msg)
        self.normal_quantile = normal_quantile
        self.margin = margin
        self.add_state("normal_scores", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        scores = scores.detach().flatten().float()
        normal = labels.detach().flatten().to(scores.device) == 0
        self.normal_scores.append(scores[normal & torch.isfinite(scores)])

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        normal = dim_zero_cat(self.normal_scores) if len(self.normal_scores) else torch.empty(0)  # DDP sync: a tensor
        if normal.numel() == 0:
            nan = torch.tensor(float("nan"), device=normal.device)
            return nan, nan
        top, median = normal.max(), normal.median()
        lower = torch.quantile(normal, self.normal_quantile)
        upper = top + self.margin * (top - median)
        return lower, upper


def clamp_threshold(f1_optimal: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``min(max(f1_optimal, lower), upper)``; a NaN bound (no normal validation image) leaves that side free."""
    threshold = torch.where(torch.isnan(lower) | (f1_optimal >= lower), f1_optimal, lower)
    return torch.where(torch.isnan(upper) | (threshold <= upper), threshold, upper)


class RobustThresholdPostProcessor(PostProcessor):
    """anomalib's ``PostProcessor`` whose image threshold is the F1-optimal one clamped into the normal-score window.

    Args:
        normal_quantile: the threshold is never below this quantile of the normal validation scores.
        margin: nor above ``max + margin * (max - median)`` of them (in units of the normal scores' upper spread).
        **kwargs: anomalib's ``PostProcessor`` arguments (normalisation, sensitivities, ...).
    """

    def __init__(self, normal_quantile: float = NORMAL_QUANTILE, margin: float = MARGIN, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(**kwargs)
        self._normal_window_metric = NormalScoreWindow(normal_quantile, margin)
        nan = torch.tensor(float("nan"))
        self.register_buffer("f1_optimal_image_threshold", nan.clone(), persistent=False)
        self.register_buffer("normal_score_lower", nan.clone(), persistent=False)
        self.register_buffer("normal_score_upper", nan.clone(), persistent=False)
        self.f1_optimal_image_threshold: torch.Tensor
        self.normal_score_lower: torch.Tensor
        self.normal_score_upper: torch.Tensor

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        return (*super()._checkpoint_config_keys, "normal_quantile", "margin")

    # held once, by the window metric that uses them (a checkpoint's config sets them through these)
    @property
    def normal_quantile(self) -> float:
        return self._normal_window_metric.normal_quantile

    @normal_quantile.setter
    def normal_quantile(self, value: float) -> None:
        self._normal_window_metric.normal_quantile = value

    @property
    def margin(self) -> float:
        return self._normal_window_metric.margin

    @margin.setter
    def margin(self, value: float) -> None:
        self._normal_window_metric.margin = value

    @property
    def normal_score_window(self) -> tuple[float, float]:
        """``(lower, upper)`` of the last validation (NaNs before any, or without normal validation images)."""
        return float(self.normal_score_lower), float(self.normal_score_upper)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401
        *args: Any,  # noqa: ANN401
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
        scores, labels = getattr(outputs, "pred_score", None), getattr(outputs, "gt_label", None)
        if self.enable_thresholding and scores is not None and labels is not None:
            self._normal_window_metric.update(scores, labels)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """anomalib's thresholds and min/max, then the image threshold clamped into the normal-score window."""
        window_updated = self._normal_window_metric.update_called
        super().on_validation_epoch_end(trainer, pl_module)
        if not (self.enable_thresholding and window_updated):
            return
        lower, upper = self._normal_window_metric.compute()
        self._normal_window_metric.reset()
        f1_optimal = self._image_threshold.clone()
        self.f1_optimal_image_threshold.copy_(f1_optimal)
        self.normal_score_lower.copy_(lower)
        self.normal_score_upper.copy_(upper)
        if not torch.isnan(f1_optimal):
            self._image_threshold.copy_(clamp_threshold(f1_optimal, lower.to(f1_optimal), upper.to(f1_optimal)))
