"""Statistics shared by the models: image scores from maps, robust centre and scale, a robust slope, k-medoids,
and a per-pixel standardiser of anomaly maps learnt from normal images' maps.

(Densities for feature vectors live in ``kde.py``.)
"""

from __future__ import annotations

from typing import Literal

import torch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

MAD_TO_STD = 1.4826  # a normal distribution's standard deviation over its median absolute deviation
# folds when a model cross-fits normal statistics on its own training images (fewer when there are fewer images)
CROSS_FIT_FOLDS = 5


def fold_indices(count: int, folds: int) -> list[torch.Tensor]:
    """Interleaved folds of ``range(count)`` (item ``i`` in fold ``i % folds``): deterministic, so every DDP rank,
    holding the same merged data, cross-fits the same way."""
    return [torch.arange(fold, count, folds) for fold in range(folds)]


def check_topk_fraction(value: float, *, allow_zero: bool = False) -> float:
    """``value`` if it is a valid share of a map's pixels for ``topk_mean``, else a ``ValueError`` naming the interval.

    ``allow_zero=True`` accepts ``[0, 1)`` (0 = the maximum); otherwise ``(0, 1]``. One check for every model's
    ``topk_fraction``.
    """
    valid = 0.0 <= value < 1.0 if allow_zero else 0.0 < value <= 1.0
    if not valid:
        interval = "[0, 1)" if allow_zero else "(0, 1]"
        msg = f"topk_fraction must be in {interval}, got {value!r}"
        raise ValueError(msg)
    return value


def topk_mean(anomaly_map: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Mean of the highest ``fraction`` of each map's pixels: an image score robust to a single hot pixel.

    ``fraction == 0`` is the maximum.
    """
    flat = anomaly_map.flatten(1)
    if fraction <= 0:
        return flat.amax(dim=1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean(dim=1)


def robust_center_scale(
    scores: torch.Tensor, min_scale: float = 1e-3, std_fraction: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Median and a spread that survives outliers: ``max(1.4826 MAD, std_fraction * std, min_scale)``.

    ``std_fraction > 0`` keeps the spread from collapsing when most scores are equal (MAD 0) but a few are not.
    """
    center = scores.median()
    scale = (scores - center).abs().median() * MAD_TO_STD
    if std_fraction > 0 and len(scores) > 1:
        scale = torch.maximum(scale, scores.std() * std_fraction)
    return center, scale.clamp_min(min_scale)


def weighted_theil_sen_slope(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Straight-line slope that a few outliers do not bend: the median of all pairwise slopes, each weighted by
    how far apart its two x lie (Sievers-Scholz weighting of Theil-Sen).

    The weights matter when x comes in clusters (two lighting sessions): pairs from the same cluster have
    nearly equal x, so their slopes are noise, and unweighted they would pull the median towards 0.
    """
    first, second = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    run = x[second] - x[first]
    weight = run.abs()
    if float(weight.sum()) < 1e-6:  # every x equal: no trend to see
        return torch.zeros((), device=x.device)
    slopes = (y[second] - y[first]) / torch.where(weight > 0, run, torch.ones_like(run))
    order = slopes.argsort()
    cumulative = weight[order].cumsum(0)
    return slopes[order][torch.searchsorted(cumulative, cumulative[-1] / 2)]


def k_medoids(distance: torch.Tensor, count: int, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic k-medoids on an (n, n) distance matrix (farthest-point start, alternate assign/update).

    Returns the medoid indices (k,) and each point's cluster (n,).
    """
    total = distance.shape[0]
    count = min(count, total)
    medoids = [int(distance.sum(dim=1).argmin())]
    while len(medoids) < count:
        nearest = distance[:, medoids].min(dim=1).values
        nearest[medoids] = -1.0  # distinct medoids even when points are duplicates (all distances 0)
        medoids.append(int(nearest.argmax()))
    medoid_tensor = torch.tensor(medoids)
    for _ in range(iterations):
        assignment = distance[:, medoid_tensor].argmin(dim=1)
        updated = medoid_tensor.clone()
        for cluster in range(count):
            members = (assignment == cluster).nonzero().flatten()
            if len(members) > 0:
                within = distance[members][:, members].sum(dim=1)
                updated[cluster] = members[within.argmin()]
        if torch.equal(updated, medoid_tensor):
            break
        medoid_tensor = updated
    return medoid_tensor, distance[:, medoid_tensor].argmin(dim=1)


class MapMoments:
    """Running per-group sums of maps and of their squares (float64), for ``MapStandardizer.fit``.

    ``add(maps, group)`` takes (N, M, H, W) maps and, optionally, each map's group (N,) in ``[0, groups)``.
    """

    def __init__(self, groups: int = 1) -> None:
        self.groups = groups
        self.sums: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.counts = torch.zeros(groups, dtype=torch.float64)

    @torch.no_grad()
    def add(self, maps: torch.Tensor, group: torch.Tensor | None = None) -> None:
        maps = maps.detach().double()
        if group is None:
            group = torch.zeros(len(maps), dtype=torch.long, device=maps.device)
        if self.sums is None or self.squares is None:
            self.sums = maps.new_zeros((self.groups, *maps.shape[1:]))
            self.squares = torch.zeros_like(self.sums)
            self.counts = self.counts.to(maps.device)
        self.sums.index_add_(0, group, maps)
        self.squares.index_add_(0, group, maps * maps)
        self.counts.index_add_(0, group, torch.ones_like(group, dtype=torch.float64))

    @property
    def total(self) -> int:
        return int(self.counts.sum())


FloorRule = Literal["mean", "median"]


class MapStandardizer(DynamicBufferMixin, nn.Module):
    """Per-pixel standardisation ``(map - mean) / scale`` by the maps of normal images.

    Buffers ``mean`` and ``scale`` are (G, M, H, W): G groups (e.g. one per template), M map channels. The spread
    is floored by its own ``floor`` ("mean" or "median") over each group's and channel's pixels plus
    ``min_scale``, so pixels where normal maps never vary (flat background) do not turn noise into huge scores.

    Args:
        floor: statistic of the spread over the pixels added to every pixel's spread.
        min_scale: constant added to the spread.
        prior_count: groups with few maps lean on the maps pooled over all groups, with weight
            ``count / (count + prior_count)`` on their own (0 = no pooling).
        shape: initial (G, M, H, W) of identity statistics (zeros / ones); ``None`` = empty until fitted.
    """

    def __init__(
        self,
        floor: FloorRule = "mean",
        min_scale: float = 1e-6,
        prior_count: float = 0.0,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.floor = floor
        self.min_scale = min_scale
        self.prior_count = prior_count
        self.mean: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("mean", torch.zeros(shape) if shape else torch.empty(0))
        self.register_buffer("scale", torch.ones(shape) if shape else torch.empty(0))

    @property
    def is_fitted(self) -> bool:
        return self.mean.numel() > 0

    def reset(self) -> None:
        """Back to empty statistics (no standardisation)."""
        self.mean, self.scale = torch.empty(0, device=self.mean.device), torch.empty(0, device=self.scale.device)

    @torch.no_grad()
    def fit(self, moments: MapMoments) -> None:
        """Statistics from accumulated normal maps."""
        if moments.sums is None or moments.squares is None or moments.total == 0:
            msg = "MapStandardizer.fit: no maps were accumulated"
            raise RuntimeError(msg)
        counts = moments.counts.view(-1, *[1] * (moments.sums.dim() - 1))
        own_mean = moments.sums / counts.clamp_min(1)
        own_square = moments.squares / counts.clamp_min(1)
        if self.prior_count > 0:
            pooled_mean = moments.sums.sum(0, keepdim=True) / counts.sum()
            pooled_square = moments.squares.sum(0, keepdim=True) / counts.sum()
            weight = counts / (counts + self.prior_count)
            own_mean = weight * own_mean + (1 - weight) * pooled_mean
            own_square = weight * own_square + (1 - weight) * pooled_square
        std = (own_square - own_mean * own_mean).clamp_min(0).sqrt()
        flat = std.flatten(2)
        floor = flat.mean(dim=2) if self.floor == "mean" else flat.median(dim=2).values
        dtype = self.mean.dtype if self.mean.is_floating_point() else torch.float32
        self.mean = own_mean.to(dtype)
        self.scale = (std + floor[..., None, None] + self.min_scale).to(dtype)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Standardise (N, M, H, W) maps with group 0's statistics (identity while empty)."""
        if not self.is_fitted:
            return maps
        return (maps - self.mean[:1]) / self.scale[:1]
