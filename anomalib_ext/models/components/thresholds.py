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

A model trained from one good image has no validation normals: ``threshold_from_normal_variations`` sets its
threshold from held-out variations of that image instead (Tukey's fence, ``tukey_fence``).

The threshold is the post-processor's ``_image_threshold`` buffer, as in anomalib: normalisation (score 0.5 at the
threshold), ``pred_label``, checkpoints and the exported OpenVINO graph all use it. The F1-optimal value and the
window stay available (``f1_optimal_image_threshold``, ``normal_score_window``) for reports comparing both rules;
they are not persistent, so checkpoints keep anomalib's state-dict keys.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

NORMAL_QUANTILE = 0.9
MARGIN = 0.5
# Tukey's outlier fence: q75 + TUKEY_K * (q75 - q25), the textbook rule (Tukey 1977), not a figure tuned here
TUKEY_K = 1.5


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

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lower, upper, median, iqr)`` of the normal scores: the window, and where the normal scores sit and
        how widely, which recalibration's ``anchored`` rule needs to carry the threshold to a new condition."""
        normal = dim_zero_cat(self.normal_scores) if len(self.normal_scores) else torch.empty(0)  # DDP sync: a tensor
        if normal.numel() == 0:
            nan = torch.tensor(float("nan"), device=normal.device)
            return nan, nan, nan, nan
        top, median = normal.max(), normal.median()
        lower = torch.quantile(normal, self.normal_quantile)
        upper = top + self.margin * (top - median)
        return lower, upper, median, interquartile_range(normal)


def interquartile_range(scores: torch.Tensor) -> torch.Tensor:
    q25, q75 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return q75 - q25


def tukey_fence(scores: torch.Tensor) -> torch.Tensor:
    """``q75 + 1.5 * (q75 - q25)`` of ``scores``: above it a score is an outlier among them, whatever up to a quarter
    of them look like."""
    q25, q75 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return q75 + TUKEY_K * (q75 - q25)


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
        # where the validation normals' scores sit and how widely: persistent, so that a checkpoint can be
        # recalibrated to a new condition by carrying its threshold along (``recalibrate_thresholds``, "anchored")
        self.register_buffer("normal_score_median", nan.clone())
        self.register_buffer("normal_score_iqr", nan.clone())
        self.f1_optimal_image_threshold: torch.Tensor
        self.normal_score_lower: torch.Tensor
        self.normal_score_upper: torch.Tensor
        self.normal_score_median: torch.Tensor
        self.normal_score_iqr: torch.Tensor

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """Checkpoints written before 0.9.0 have no normal-score statistics: they load with NaNs (recalibration
        then falls back to the ``upper`` rule and says so)."""
        for name in NORMAL_STATISTICS:
            state_dict.setdefault(prefix + name, torch.tensor(float("nan")))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        return (*super()._checkpoint_config_keys, "normal_quantile", "margin")

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None, norm_min: torch.Tensor, norm_max: torch.Tensor, threshold: torch.Tensor
    ) -> torch.Tensor | None:
        """anomalib's normalisation (0.5 at the threshold, slope ``1 / (max - min)`` there) without its clamp.

        anomalib maps ``(score - threshold) / (max - min) + 0.5`` and clamps it to [0, 1], with min and max from the
        validation split. With few normals that split holds a handful of images, many test scores fall outside
        their range and tie at 0 or 1, and the AUROC that ``anomalib train`` prints (computed on these scores) drops:
        in the few-normals study 37 of 100 cells printed an image AUROC more than 0.01 below the raw scores' (bottle
        at 10 normals: 0.925 instead of 0.998; magnetic tile: 0.504 instead of 0.713). Here a softsign,
        ``0.5 + 0.5 t / (1 + |t|)`` with ``t = 2 (score - threshold) / (max - min)``, keeps the same value and slope
        at the threshold and stays in (0, 1), but is strictly increasing: labels are unchanged, the printed AUROC is
        the raw scores' AUROC, and maps keep their order too. Values away from the threshold are squashed more
        gently than clamped (a score at the validation maximum reads about 0.8 instead of 1).
        """
        if preds is None:
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        safe_range = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
        scaled = 2 * (preds - threshold) / safe_range
        normalized = 0.5 + 0.5 * scaled / (1 + scaled.abs())
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(has_range, normalized, preds)

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
        lower, upper, median, iqr = self._normal_window_metric.compute()
        self._normal_window_metric.reset()
        f1_optimal = self._image_threshold.clone()
        self.f1_optimal_image_threshold.copy_(f1_optimal)
        self.normal_score_lower.copy_(lower)
        self.normal_score_upper.copy_(upper)
        self.normal_score_median.copy_(median)
        self.normal_score_iqr.copy_(iqr)
        if not torch.isnan(f1_optimal):
            self._image_threshold.copy_(clamp_threshold(f1_optimal, lower.to(f1_optimal), upper.to(f1_optimal)))

    def threshold_from_normal_variations(
        self, scores: torch.Tensor, anomaly_maps: torch.Tensor | None = None, normalise: bool = False
    ) -> None:
        """Image threshold = Tukey's outlier fence over normal images a model made itself (no validation needed).

        For a model trained from one good image (TeacherStudent's single-template mode): ``scores`` (and maps) of
        held-out variations of that image. ``threshold = q75 + 1.5 * (q75 - q25)``: a score is anomalous when it is
        an outlier among them by the textbook rule. Not the window of validation normals: a minority of the
        variations (the augmentation's extreme draws, e.g. a zoom-out and shift whose reflection-padded border no
        real image has) score like defects, and the window's bounds, its 90 % quantile and maximum, sit among them;
        the quartiles ignore up to a quarter of such draws. The inner fence (1.5), not the far-out one (3): a
        threshold too high is what leaves F1 below flagging everything (``docs/thresholds.md``, "One good image").
        The min/max normalisation comes from the same images with ``normalise`` (no validation ran this epoch) or
        where no validation ever set it (NaN), so scores are still 0.5 at the threshold. The F1-optimal value and
        the normal-score window of a validation, if any, are left as they are: reports compare them.
        """
        scores = scores.detach().flatten().float().to(self._image_threshold.device)
        scores = scores[torch.isfinite(scores)]
        if scores.numel() == 0:
            msg = "threshold_from_normal_variations: no finite score"
            raise ValueError(msg)
        self._image_threshold.copy_(tukey_fence(scores))
        self.normal_score_median.copy_(scores.median())
        self.normal_score_iqr.copy_(interquartile_range(scores))
        if normalise or bool(torch.isnan(self.image_min) | torch.isnan(self.image_max)):
            self.image_min.copy_(scores.min())
            self.image_max.copy_(scores.max())
        if anomaly_maps is not None and (normalise or bool(torch.isnan(self.pixel_min) | torch.isnan(self.pixel_max))):
            maps = anomaly_maps.detach().float().to(self.pixel_min.device)
            self.pixel_min.copy_(maps.min())
            self.pixel_max.copy_(maps.max())


# ------------------------------------------------------------------------------ recalibration under a new condition
# Fewer normal images of a new condition than this give no threshold: it rests on their maximum and median, and a
# new normal image scores above the maximum of N others with probability 1 / (N + 1), over 1 in 6 below 5 images.
MIN_RECALIBRATION_NORMALS = 5
POST_PROCESSOR_BUFFERS = ("_image_threshold", "_pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")
NORMAL_STATISTICS = ("normal_score_median", "normal_score_iqr")  # of the validation (or recalibration) normals
# how the image threshold moves to a new condition (``recalibrate_thresholds``); the first is the default
RECALIBRATION_RULES = ("anchored", "upper")


def labelling_threshold(post_processor: PostProcessor) -> float:
    """The raw-score threshold ``post_processor`` labels images with: its image threshold, or the pixel one when
    the image one is unset (anomalib's threshold matching)."""
    threshold = float(post_processor.image_threshold)
    return float(post_processor.pixel_threshold) if math.isnan(threshold) else threshold


def normal_upper_bound(scores: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """``max + margin * (max - median)`` of normal ``scores``: the upper end of ``NormalScoreWindow``."""
    top, median = scores.max(), scores.median()
    return top + margin * (top - median)


def anchored_threshold(
    old_threshold: torch.Tensor,
    old_median: torch.Tensor,
    old_iqr: torch.Tensor,
    scores: torch.Tensor,
    margin: float = MARGIN,
    normal_quantile: float = NORMAL_QUANTILE,
) -> torch.Tensor | None:
    """The old threshold carried to the new normal ``scores``, or None when the old statistics are missing.

    The fitted threshold sits somewhere in its validation normals' window, where the validation (synthetic
    anomalies included) put it. Measured in those normals' units, ``(threshold - median) / iqr``, it is placed at the
    same distance from the new normals' median (a change of gain and offset moves it exactly with the scores), then
    kept inside the window of the new normals, ``[quantile(normal_quantile), max + margin * (max - median)]``, as at
    fit time. The ``upper`` rule always takes that window's top, above every new normal: on a part whose defects
    overlap the normals (bottle's autoencoder at AUROC 0.98, magnetic tile) it misses defects the fitted threshold
    caught, even when the light did not change.
    """
    if not bool(torch.isfinite(old_median) & torch.isfinite(old_iqr) & torch.isfinite(old_threshold)):
        return None
    median, iqr = scores.median(), interquartile_range(scores)
    scale = iqr / old_iqr if float(old_iqr) > 0 and float(iqr) > 0 else torch.ones_like(iqr)
    moved = median + (old_threshold - old_median) * scale
    lower, upper = torch.quantile(scores, normal_quantile), normal_upper_bound(scores, margin)
    return clamp_threshold(moved, lower, upper)


def _carry_range(
    old_min: torch.Tensor,
    old_threshold: torch.Tensor,
    old_max: torch.Tensor,
    new_min: torch.Tensor,
    new_threshold: torch.Tensor,
) -> torch.Tensor:
    """The new normalisation maximum: the affine map taking the old minimum and threshold to the new ones, applied
    to the old maximum (a change of gain and offset leaves every normalised score where it was). Without a usable
    old range, as far above the threshold as the minimum is below it."""
    old_span = old_threshold - old_min
    if bool(torch.isfinite(old_span) & torch.isfinite(old_max)) and float(old_span) > 0:
        return new_threshold + (new_threshold - new_min) / old_span * (old_max - old_threshold)
    return new_threshold + (new_threshold - new_min)


def recalibrate_thresholds(
    post_processor: PostProcessor,
    normal_scores: torch.Tensor,
    map_maxima: torch.Tensor | None = None,
    map_minimum: torch.Tensor | float | None = None,
    margin: float | None = None,
    rule: str = RECALIBRATION_RULES[0],
) -> dict[str, Any]:
    """Set a post-processor's thresholds and normalisation from normal images of a new condition alone.

    For a trained model whose scores moved with the light (or camera, exposure): ``normal_scores`` are its raw image
    scores of at least ``MIN_RECALIBRATION_NORMALS`` normal images of the new condition; ``map_maxima`` and
    ``map_minimum`` the highest value of each one's raw anomaly map and the lowest value of all of them (models with
    a map). No anomaly of the new condition is known. The image threshold, by ``rule``:

    - ``anchored`` (default): the fitted threshold carried to the new normals (``anchored_threshold``): as far from
      their median, in units of their interquartile range, as it was from the validation normals', kept inside their
      window. Unchanged light gives about the fitted threshold back. Needs the validation statistics a checkpoint
      holds since 0.9.0; without them it falls back to ``upper``, and the returned ``rule`` says so.
    - ``upper``: the top of the new normals' window, ``max + margin * (max - median)`` (``margin``: the
      post-processor's own, else 0.5): no new normal is flagged, and a defect that scores above every normal is; one
      that scores among them is missed.

    Then: ``image_min`` the normals' lowest score, ``image_max`` carried over by the affine map taking the old (min,
    threshold) to the new (``_carry_range``), so normalised scores keep their scale; the normal-score statistics
    become the new normals' (a later recalibration starts from this condition).
    Pixel (only with the map arguments, and where the model had a pixel threshold): the ``upper`` rule on each normal
    image's highest map value (no validation statistics of maps are kept), so no pixel of a normal image is in
    ``pred_mask``; ``pixel_min``/``pixel_max`` as above. A pixel threshold left NaN (anomalib's threshold matching:
    the image threshold) stays NaN and follows it.

    Returns ``{"before": {...}, "after": {...}, "rule": applied}`` (buffers as floats, NaN where unset). Raises
    ``ValueError`` for fewer finite scores than ``MIN_RECALIBRATION_NORMALS``, disabled thresholding or an unknown
    rule.
    """
    if not isinstance(post_processor, PostProcessor):
        msg = f"the model's post-processor ({type(post_processor).__name__}) is not anomalib's PostProcessor"
        raise ValueError(msg)  # noqa: TRY004  (the caller reports one kind of error)
    if not post_processor.enable_thresholding:
        msg = "the model's post-processor has thresholding disabled: there is no threshold to recalibrate"
        raise ValueError(msg)
    if rule not in RECALIBRATION_RULES:
        msg = f"unknown recalibration rule {rule!r}: one of {', '.join(RECALIBRATION_RULES)}"
        raise ValueError(msg)
    device = post_processor._image_threshold.device  # noqa: SLF001
    scores = normal_scores.detach().flatten().float().to(device)
    scores = scores[torch.isfinite(scores)]
    if scores.numel() < MIN_RECALIBRATION_NORMALS:
        msg = (
            f"{scores.numel()} normal image score(s); recalibration needs at least {MIN_RECALIBRATION_NORMALS} "
            "(the threshold rests on their maximum and median)"
        )
        raise ValueError(msg)
    if margin is None:
        margin = float(getattr(post_processor, "margin", MARGIN))
    if margin < 0:
        msg = f"margin must be >= 0, got {margin}"
        raise ValueError(msg)
    buffers = {name: getattr(post_processor, name) for name in POST_PROCESSOR_BUFFERS}
    before = {name: float(value) for name, value in buffers.items()}
    old_image_threshold = post_processor.image_threshold.clone()
    old_pixel_threshold = post_processor.pixel_threshold.clone()
    statistics = {name: getattr(post_processor, name, None) for name in NORMAL_STATISTICS}

    image_threshold, applied = None, "upper"
    if rule == "anchored" and None not in statistics.values():
        image_threshold = anchored_threshold(
            old_image_threshold,
            statistics["normal_score_median"],
            statistics["normal_score_iqr"],
            scores,
            margin,
            float(getattr(post_processor, "normal_quantile", NORMAL_QUANTILE)),
        )
        applied = "anchored" if image_threshold is not None else "upper (no validation statistics to carry it)"
    elif rule == "anchored":
        applied = f"upper ({type(post_processor).__name__} keeps no validation statistics)"
    if image_threshold is None:
        image_threshold = normal_upper_bound(scores, margin)
    image_min = scores.min()
    image_max = _carry_range(
        buffers["image_min"], old_image_threshold, buffers["image_max"], image_min, image_threshold
    )
    buffers["_image_threshold"].copy_(image_threshold)
    buffers["image_min"].copy_(image_min)
    buffers["image_max"].copy_(image_max)
    if None not in statistics.values():
        statistics["normal_score_median"].copy_(scores.median())
        statistics["normal_score_iqr"].copy_(interquartile_range(scores))

    if map_maxima is not None and map_minimum is not None and not bool(torch.isnan(old_pixel_threshold)):
        maxima = map_maxima.detach().flatten().float().to(device)
        maxima = maxima[torch.isfinite(maxima)]
        if maxima.numel() >= MIN_RECALIBRATION_NORMALS:
            own_pixel_threshold = not bool(torch.isnan(buffers["_pixel_threshold"]))
            pixel_threshold = normal_upper_bound(maxima, margin) if own_pixel_threshold else image_threshold
            pixel_min = torch.as_tensor(map_minimum, device=device).float()
            pixel_max = _carry_range(
                buffers["pixel_min"], old_pixel_threshold, buffers["pixel_max"], pixel_min, pixel_threshold
            )
            if own_pixel_threshold:
                buffers["_pixel_threshold"].copy_(pixel_threshold)
            buffers["pixel_min"].copy_(pixel_min)
            buffers["pixel_max"].copy_(pixel_max)
    after = {name: float(value) for name, value in buffers.items()}
    return {"before": before, "after": after, "rule": applied}
