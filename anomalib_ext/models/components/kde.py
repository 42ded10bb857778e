"""Density models of normal feature vectors, fitted once and evaluated in plain torch.

anomalib's ``GaussianKDE`` loops over the batch in Python, returns a density that underflows to zero far
from the data (so every far anomaly gets the same score) and only knows Scott's rule. Here:

- ``FeatureScaler`` and ``PrincipalComponents`` keep what they learn as buffers, so they travel with the
  checkpoint and the exported graph;
- ``GaussianKde`` evaluates the log density with ``logsumexp`` (no underflow), with the bandwidth chosen by
  Scott's rule, Silverman's rule or maximum leave-one-out likelihood, and agrees with
  ``scipy.stats.gaussian_kde`` for the same bandwidth factor;
- ``GaussianDensity`` is the single-Gaussian alternative (Mahalanobis distance plus normaliser);
- ``FeatureDensity`` chains them, fits on a capped random sample (fit cost stays bounded) and turns the
  log density into an anomaly score (negative log density), optionally calibrated to [0, 1]; with
  ``residual=True`` it also scores the residual outside the kept PCA components (probabilistic PCA); with no
  more points than dimensions it shrinks the covariance (Ledoit-Wolf), which is otherwise singular.

Fitting may use any Python; ``forward`` uses only tensor operations with shapes fixed at fit time.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from anomalib.models.components.base import DynamicBufferMixin

from .stats import robust_center_scale

ScalingMethod = Literal["none", "scale", "standardize", "norm"]
BandwidthRule = Literal["scott", "silverman", "loo"]
DensityKind = Literal["kde", "gaussian"]

SCALING_METHODS: tuple[str, ...] = ("none", "scale", "standardize", "norm")
BANDWIDTH_RULES: tuple[str, ...] = ("scott", "silverman", "loo")
DENSITY_KINDS: tuple[str, ...] = ("kde", "gaussian")

_EPS = 1e-6  # floor for norms and standard deviations: constant inputs must not divide by zero
MAX_SCORE = 1e30  # finite cap on the negative log density
_RIDGE = 1e-9  # ridge on covariances (relative, plus the same absolute): constant features stay invertible
# fewer fit points than this many per feature dimension: the covariance is shrunk (Ledoit-Wolf), because the
# sample covariance of n <= d points is singular and its small eigenvalues are far too small
SHRINK_BELOW_POINTS_PER_DIM = 1.0


def _check_points(points: torch.Tensor, name: str, min_points: int = 1) -> None:
    if points.ndim != 2:
        msg = f"{name}: expected a 2-D tensor (points, dimensions), got shape {tuple(points.shape)}"
        raise ValueError(msg)
    if points.shape[0] < min_points:
        msg = f"{name}: needs at least {min_points} points to fit, got {points.shape[0]}"
        raise ValueError(msg)
    if not torch.isfinite(points).all():
        msg = f"{name}: the points contain NaN or infinite values"
        raise ValueError(msg)


def covariance(points: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance of (n, d) points (as numpy/scipy compute it), 0 for a single point."""
    centred = points - points.mean(dim=0, keepdim=True)
    return centred.T @ centred / max(points.shape[0] - 1, 1)


def ledoit_wolf_shrinkage(points: torch.Tensor) -> float:
    """Ledoit-Wolf's shrinkage intensity in [0, 1] for the covariance of (n, d) points, towards ``mu * I``.

    The same estimate as ``sklearn.covariance.ledoit_wolf_shrinkage``: close to 0 when the points pin the
    covariance down (many more points than dimensions), close to 1 when they do not. With fewer points than
    dimensions the sample covariance is singular and its smallest non-zero eigenvalues are far too small, so a
    Mahalanobis distance built on it is dominated by the directions the few points happened to miss.
    """
    centred = points.double() - points.double().mean(dim=0, keepdim=True)
    num_points, dim = centred.shape
    if num_points < 2:
        return 1.0
    squared = centred.pow(2)
    trace = squared.sum() / num_points  # trace of the (biased) sample covariance
    mu = trace / dim
    gram = centred @ centred.T  # sum((X^T X)^2) == sum((X X^T)^2): n x n is the cheaper side when n < d
    delta_sum = gram.pow(2).sum() / num_points**2
    beta_sum = squared.sum(dim=1).pow(2).sum()
    beta = (beta_sum / num_points - delta_sum) / (dim * num_points)
    delta = (delta_sum - 2.0 * mu * trace + dim * mu**2) / dim
    beta = torch.minimum(beta, delta)
    return 0.0 if float(delta) <= 0.0 else float((beta / delta).clamp(0.0, 1.0))


def shrunk_covariance(
    points: torch.Tensor, shrinkage: float = 0.0, target_variance: float | None = None
) -> torch.Tensor:
    """``(1 - shrinkage) * cov + shrinkage * target_variance * I`` (the target defaults to the mean variance)."""
    cov = covariance(points)
    if shrinkage <= 0.0:
        return cov
    if target_variance is None:
        target_variance = float(torch.diagonal(cov).mean())
    identity = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return (1.0 - shrinkage) * cov + shrinkage * target_variance * identity


def _regularised_cholesky(cov: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of ``cov`` plus a small ridge, so zero-variance directions stay finite."""
    dim = cov.shape[0]
    scale = torch.diagonal(cov).mean().clamp_min(0.0)
    ridge = _RIDGE * (scale + 1.0)
    identity = torch.eye(dim, dtype=cov.dtype, device=cov.device)
    for attempt in range(6):  # grow the ridge if rounding made the matrix indefinite
        factor, info = torch.linalg.cholesky_ex(cov + ridge * (10**attempt) * identity)
        if int(info) == 0:
            return factor
    msg = "covariance is not positive definite even with a ridge; the features are degenerate"
    raise ValueError(msg)


def scott_factor(num_points: int, dim: int) -> float:
    """Scott's rule bandwidth factor, as in scipy: n ** (-1 / (d + 4))."""
    return float(num_points ** (-1.0 / (dim + 4)))


def silverman_factor(num_points: int, dim: int) -> float:
    """Silverman's rule bandwidth factor, as in scipy: (n (d + 2) / 4) ** (-1 / (d + 4))."""
    return float((num_points * (dim + 2) / 4.0) ** (-1.0 / (dim + 4)))


def leave_one_out_log_likelihood(whitened: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Mean leave-one-out log likelihood of whitened points for each bandwidth factor.

    ``whitened`` has identity covariance, so the kernel covariance is ``factor**2 * I`` there; the constant
    ``-log|C|`` of the whitening is the same for every factor and left out.
    """
    num_points, dim = whitened.shape
    if num_points < 2:
        msg = "leave-one-out bandwidth needs at least 2 points"
        raise ValueError(msg)
    squared = torch.cdist(whitened, whitened).pow(2)
    squared.fill_diagonal_(float("inf"))
    scores = []
    for factor in factors.tolist():
        log_kernel = torch.logsumexp(-0.5 * squared / factor**2, dim=1)
        log_density = log_kernel - math.log(num_points - 1) - dim * math.log(factor) - 0.5 * dim * math.log(2 * math.pi)
        scores.append(log_density.mean())
    return torch.stack(scores)


def select_loo_factor(whitened: torch.Tensor, num_candidates: int = 48) -> float:
    """Bandwidth factor maximising the leave-one-out likelihood: log grid, then a finer grid around the best."""
    num_points, dim = whitened.shape
    scott = scott_factor(num_points, dim)
    coarse = scott * torch.logspace(-2.0, 1.0, num_candidates, dtype=torch.float64)
    best = coarse[int(torch.argmax(leave_one_out_log_likelihood(whitened, coarse)))]
    step = 10 ** (3.0 / (num_candidates - 1))
    fine = best * torch.logspace(-math.log10(step), math.log10(step), 17, dtype=torch.float64)
    return float(fine[int(torch.argmax(leave_one_out_log_likelihood(whitened, fine)))])


class FeatureScaler(DynamicBufferMixin):
    """Per-feature scaling learnt from normal features.

    ``none`` leaves features alone; ``scale`` divides by the largest L2 norm seen (anomalib's Dfkde);
    ``standardize`` subtracts the mean and divides by the standard deviation (floored, so constant features give
    0, not NaN); ``norm`` projects every vector to unit length.
    """

    def __init__(self, method: ScalingMethod = "standardize") -> None:
        super().__init__()
        if method not in SCALING_METHODS:
            msg = f"feature_scaling={method!r} is not one of {SCALING_METHODS}"
            raise ValueError(msg)
        self.method = method
        self.register_buffer("offset", torch.zeros(1))
        self.register_buffer("divisor", torch.ones(1))
        self.offset: torch.Tensor
        self.divisor: torch.Tensor

    def fit(self, features: torch.Tensor) -> None:
        _check_points(features, "FeatureScaler.fit")
        dim = features.shape[1]
        offset = torch.zeros(dim, dtype=features.dtype, device=features.device)
        divisor = torch.ones(dim, dtype=features.dtype, device=features.device)
        if self.method == "scale":
            divisor = divisor * features.norm(dim=1).max().clamp_min(_EPS)
        elif self.method == "standardize":
            offset = features.mean(dim=0)
            divisor = features.std(dim=0, unbiased=False).clamp_min(_EPS)
        self.offset = offset
        self.divisor = divisor

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.method == "norm":
            return features / features.norm(dim=1, keepdim=True).clamp_min(_EPS)
        return (features - self.offset) / self.divisor


class PrincipalComponents(DynamicBufferMixin):
    """PCA projection onto the leading ``n_components`` directions (clamped to what the data supports).

    ``n_components`` is a count (``>= 1``), a fraction of the variance to keep (``0 < n_components < 1``, as in
    scikit-learn and anomalib's Dfm), or ``<= 0`` to keep every dimension (the projection is then only a
    centring). The last ``passthrough`` features skip the projection and are appended centred: a few strong,
    hand-made features (LAKE's reconstruction errors) must not be drowned by the variance of a long latent code.

    With ``residual=True`` the fit also keeps what the projection throws away: the mean variance of the
    discarded directions, ``residual_variance`` (probabilistic PCA's sigma^2), so that
    ``residual_log_density`` can score the part of a feature vector that lies outside the kept subspace. At
    least one direction with non-zero variance is then left out, so sigma^2 is estimated from data.
    """

    def __init__(self, n_components: int | float = 16, passthrough: int = 0, residual: bool = False) -> None:
        super().__init__()
        if passthrough < 0:
            msg = f"passthrough={passthrough} must be >= 0"
            raise ValueError(msg)
        self.n_components = n_components
        if not self._keeps_fraction and n_components != int(n_components):
            msg = f"n_components={n_components} must be an integer or a fraction in (0, 1)"
            raise ValueError(msg)
        self.passthrough = passthrough
        self.residual = residual
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("components", torch.ones(1, 1))
        self.register_buffer("residual_variance", torch.ones(()))
        self.register_buffer("residual_dim", torch.zeros(()))
        self.mean: torch.Tensor
        self.components: torch.Tensor
        self.residual_variance: torch.Tensor
        self.residual_dim: torch.Tensor
        self.target_variance = 1.0  # mean variance of the projected block at the last fit (shrinkage target)

    @property
    def _keeps_fraction(self) -> bool:
        """``n_components`` is a fraction of the variance to keep, not a count."""
        return isinstance(self.n_components, float) and 0 < self.n_components < 1

    def _num_kept(self, variances: torch.Tensor, projected_dim: int, num_points: int) -> int:
        """How many leading components to keep, given the explained variances in decreasing order."""
        if self._keeps_fraction:
            fraction = torch.cumsum(variances, 0) / variances.sum().clamp_min(torch.finfo(variances.dtype).tiny)
            keep = int((fraction < self.n_components).sum()) + 1
        else:
            keep = int(self.n_components)
        keep = min(keep, projected_dim, max(num_points - 1, 1))
        if self.residual:
            # keep at least one direction with variance outside the subspace: sigma^2 must come from data
            rank = int((variances > variances[0] * 1e-10).sum()) if variances.numel() else 0
            keep = min(keep, max(rank - 1, 1), projected_dim - 1)
        return max(keep, 1)

    def fit(self, features: torch.Tensor, shrinkage: float = 0.0) -> None:
        """Fit on (n, d) features. ``shrinkage`` (Ledoit-Wolf's intensity) pulls the residual variance sigma^2
        towards the mean variance ``target_variance``, as the shrunk covariance's discarded eigenvalues are."""
        _check_points(features, "PrincipalComponents.fit")
        num_points, dim = features.shape
        if self.passthrough >= dim:
            msg = f"passthrough={self.passthrough} leaves no feature to project (features have {dim})"
            raise ValueError(msg)
        projected_dim = dim - self.passthrough
        mean = features.mean(dim=0)
        residual_variance = torch.ones((), dtype=features.dtype, device=features.device)
        residual_dim = 0
        centred_all = (features[:, :projected_dim] - mean[:projected_dim]).double()
        # mean variance of the projected block: the shrinkage target (trace / d is invariant under rotation)
        self.target_variance = float(centred_all.pow(2).sum() / max(num_points - 1, 1) / projected_dim)
        if self.n_components <= 0:
            components = torch.eye(projected_dim, dtype=features.dtype, device=features.device)
        else:
            _, singular_values, v_h = torch.linalg.svd(centred_all, full_matrices=False)
            variances = singular_values.pow(2) / max(num_points - 1, 1)  # eigenvalues of the covariance
            keep = self._num_kept(variances, projected_dim, num_points)
            # a singular vector's sign is arbitrary, and the same data in another row order (DDP's gathered
            # features) can flip it: each component points to where its largest loading is positive (scikit-learn's
            # svd_flip), so equal data gives equal buffers; every density here is symmetric in each component
            largest = v_h[:keep].abs().argmax(dim=1, keepdim=True)
            signs = torch.sign(v_h[:keep].gather(1, largest))
            components = (v_h[:keep] * signs).T.to(features.dtype)
            residual_dim = projected_dim - keep
            if residual_dim > 0:
                # PPCA's maximum-likelihood sigma^2: the discarded variance spread over every discarded direction
                # (directions beyond the data's rank have zero variance and count too); floored, so constant
                # features stay finite
                total = variances.sum()
                discarded = (total - variances[:keep].sum()).clamp_min(0.0) / residual_dim
                discarded = (1.0 - shrinkage) * discarded + shrinkage * self.target_variance
                floor = _RIDGE * (total / projected_dim + 1.0)
                residual_variance = discarded.clamp_min(floor).to(features.dtype)
        # one block-diagonal matrix: projection for the first block, identity for the passthrough block
        full = torch.zeros(dim, components.shape[1] + self.passthrough, dtype=features.dtype, device=features.device)
        full[:projected_dim, : components.shape[1]] = components
        full[projected_dim:, components.shape[1] :] = torch.eye(self.passthrough, dtype=features.dtype)
        self.mean = mean
        self.components = full
        self.residual_variance = residual_variance
        self.residual_dim = torch.tensor(float(residual_dim), dtype=features.dtype, device=features.device)

    @property
    def output_dim(self) -> int:
        return int(self.components.shape[1])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) @ self.components

    def residual_log_density(self, features: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        """Log density of the part of each row outside the kept subspace: isotropic Gaussian, variance sigma^2.

        ``-0.5 * |x - reconstruction|^2 / sigma^2 - 0.5 * (d - k) * log(2 pi sigma^2)``, shape (N,). Added to a
        density of the projected features it gives a density of the full feature vector (probabilistic PCA's
        log likelihood when that density is a Gaussian). The passthrough block is reconstructed exactly.
        ``projected`` is ``self(features)`` when the caller already has it (saves the projection).
        """
        centred = features - self.mean
        if projected is None:
            projected = centred @ self.components
        reconstruction = projected @ self.components.T
        squared = (centred - reconstruction).pow(2).sum(dim=1)
        return -0.5 * squared / self.residual_variance - 0.5 * self.residual_dim * torch.log(
            2 * math.pi * self.residual_variance
        )


class GaussianKde(DynamicBufferMixin):
    """Gaussian kernel density estimate with kernel covariance ``factor**2 * cov(points)`` (scipy's convention).

    Points are stored whitened (``points @ whitening`` has identity covariance), so evaluation is a squared
    distance, a ``logsumexp`` and a constant: exportable, and finite however far a point lies from the data.
    """

    def __init__(self, bandwidth: BandwidthRule | float = "scott") -> None:
        super().__init__()
        if not (isinstance(bandwidth, int | float) and bandwidth > 0) and bandwidth not in BANDWIDTH_RULES:
            msg = f"bandwidth={bandwidth!r} must be one of {BANDWIDTH_RULES} or a positive factor"
            raise ValueError(msg)
        self.bandwidth = bandwidth
        self.register_buffer("points", torch.zeros(1, 1))
        self.register_buffer("whitening", torch.ones(1, 1))
        self.register_buffer("factor", torch.ones(()))
        self.register_buffer("log_normalizer", torch.zeros(()))
        self.points: torch.Tensor
        self.whitening: torch.Tensor
        self.factor: torch.Tensor
        self.log_normalizer: torch.Tensor

    def fit(self, points: torch.Tensor, shrinkage: float = 0.0, target_variance: float | None = None) -> None:
        """Fit on (n, d) points; the kernel covariance is shrunk as in ``shrunk_covariance`` when asked."""
        _check_points(points, "GaussianKde.fit", min_points=2)
        dtype = points.dtype
        data = points.double()
        num_points, dim = data.shape
        cholesky = _regularised_cholesky(shrunk_covariance(data, shrinkage, target_variance))
        eye = torch.eye(dim, dtype=data.dtype, device=data.device)
        whitening = torch.linalg.solve_triangular(cholesky, eye, upper=False).T  # x @ whitening ~ N(0, I)
        whitened = data @ whitening
        if self.bandwidth == "scott":
            factor = scott_factor(num_points, dim)
        elif self.bandwidth == "silverman":
            factor = silverman_factor(num_points, dim)
        elif self.bandwidth == "loo":
            factor = select_loo_factor(whitened)
        else:
            factor = float(self.bandwidth)
        log_det_cov = 2.0 * torch.log(torch.diagonal(cholesky)).sum()
        log_normalizer = (
            -math.log(num_points) - dim * math.log(factor) - 0.5 * log_det_cov - 0.5 * dim * math.log(2 * math.pi)
        )
        # store the points already divided by the bandwidth: forward is then one distance and one logsumexp
        self.whitening = (whitening / factor).to(dtype)
        self.points = (whitened / factor).to(dtype)
        self.factor = torch.tensor(factor, dtype=dtype, device=points.device)
        self.log_normalizer = log_normalizer.to(dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log density at each row of ``features``: shape (N,)."""
        query = features @ self.whitening
        squared = (query[:, None, :] - self.points[None, :, :]).pow(2).sum(dim=-1)
        return torch.logsumexp(-0.5 * squared, dim=1) + self.log_normalizer

    def leave_one_out_log_density(self) -> torch.Tensor:
        """Log density of every stored point with itself left out: how normal points score at test time."""
        num_points, dim = self.points.shape
        squared = torch.cdist(self.points.double(), self.points.double()).pow(2)
        squared.fill_diagonal_(float("inf"))
        # the stored normaliser divides by n; leaving one out divides by n - 1
        correction = math.log(num_points) - math.log(max(num_points - 1, 1))
        return (torch.logsumexp(-0.5 * squared, dim=1) + self.log_normalizer.double() + correction).to(
            self.points.dtype
        )


class GaussianDensity(DynamicBufferMixin):
    """A single multivariate Gaussian: log density from the Mahalanobis distance."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("whitening", torch.ones(1, 1))
        self.register_buffer("log_normalizer", torch.zeros(()))
        self.mean: torch.Tensor
        self.whitening: torch.Tensor
        self.log_normalizer: torch.Tensor

    def fit(self, points: torch.Tensor, shrinkage: float = 0.0, target_variance: float | None = None) -> None:
        """Fit on (n, d) points; the covariance is shrunk as in ``shrunk_covariance`` when asked."""
        _check_points(points, "GaussianDensity.fit", min_points=2)
        dtype = points.dtype
        data = points.double()
        dim = data.shape[1]
        cholesky = _regularised_cholesky(shrunk_covariance(data, shrinkage, target_variance))
        eye = torch.eye(dim, dtype=data.dtype, device=data.device)
        self.mean = data.mean(dim=0).to(dtype)
        self.whitening = torch.linalg.solve_triangular(cholesky, eye, upper=False).T.to(dtype)
        log_det_cov = 2.0 * torch.log(torch.diagonal(cholesky)).sum()
        self.log_normalizer = (-0.5 * log_det_cov - 0.5 * dim * math.log(2 * math.pi)).to(dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log density at each row of ``features``: shape (N,)."""
        whitened = (features - self.mean) @ self.whitening
        return -0.5 * whitened.pow(2).sum(dim=1) + self.log_normalizer


class FeatureDensity(DynamicBufferMixin):
    """Scaling, PCA and a density, fitted on normal features; ``forward`` gives the negative log density.

    A density of the PCA projection alone ignores everything outside the kept components, which is where
    anomalies often show (anomalib's Dfm scores exactly that reconstruction residual). ``residual=True`` models
    the discarded directions too, as an isotropic Gaussian with probabilistic PCA's variance sigma^2 (the mean
    discarded variance): log p(x) = log p_subspace(projection) - |residual|^2 / (2 sigma^2) - (d - k)/2
    log(2 pi sigma^2). With ``density="gaussian"`` that is the probabilistic-PCA likelihood (in-subspace
    Mahalanobis distance + residual / sigma^2); with ``density="kde"`` a KDE in the subspace times the same
    Gaussian across it. The passthrough features are never projected away, so they add no residual.

    With no more fit points than feature dimensions (a few dozen normal images, hundreds of pooled channels) the
    sample covariance is singular and its small eigenvalues are far too small: the fit then shrinks it towards its
    mean variance with Ledoit-Wolf's intensity (``shrinkage``), in the subspace density and in sigma^2 alike, so
    the density is well-posed whatever the count. With more points than dimensions nothing changes.

    ``calibrated_score`` maps that score to [0, 1] with a logistic curve centred on the median score of the
    normal fit points (leave-one-out for the KDE, so a point does not explain itself) and scaled by their
    spread: 0.5 is a typical normal image, values near 1 are far outside the normal distribution.
    """

    def __init__(
        self,
        density: DensityKind = "kde",
        bandwidth: BandwidthRule | float = "scott",
        n_components: int | float = 16,
        feature_scaling: ScalingMethod = "standardize",
        max_training_points: int = 2000,
        seed: int = 0,
        passthrough: int = 0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if density not in DENSITY_KINDS:
            msg = f"density={density!r} is not one of {DENSITY_KINDS}"
            raise ValueError(msg)
        if not (isinstance(bandwidth, int | float) and bandwidth > 0) and bandwidth not in BANDWIDTH_RULES:
            # checked for every density, so a typo in a config fails even while the KDE is not selected
            msg = f"bandwidth={bandwidth!r} must be one of {BANDWIDTH_RULES} or a positive factor"
            raise ValueError(msg)
        if max_training_points < 2:
            msg = f"max_training_points={max_training_points} must be at least 2"
            raise ValueError(msg)
        self.max_training_points = max_training_points
        self.seed = seed
        self.scaler = FeatureScaler(feature_scaling)
        # without PCA (n_components <= 0) nothing is discarded, so there is no residual to model
        self.residual = residual and n_components > 0
        self.pca = PrincipalComponents(n_components, passthrough, residual=self.residual)
        self.estimator: GaussianKde | GaussianDensity = (
            GaussianKde(bandwidth) if density == "kde" else GaussianDensity()
        )
        self.register_buffer("score_center", torch.zeros(()))
        self.register_buffer("score_scale", torch.ones(()))
        self.score_center: torch.Tensor
        self.score_scale: torch.Tensor
        # what the last fit saw and did: ``shrinkage`` > 0 when the points were no more than the dimensions
        self.fit_points, self.fit_dims, self.shrinkage, self.shrunk = 0, 0, 0.0, False

    def fit(self, features: torch.Tensor) -> int:
        """Fit on at most ``max_training_points`` rows drawn at random (seeded); returns how many were used."""
        _check_points(features, "FeatureDensity.fit", min_points=2)
        if features.shape[0] > self.max_training_points:
            generator = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(features.shape[0], generator=generator)[: self.max_training_points]
            features = features[keep.to(features.device)]
        features = features.float()
        self.scaler.fit(features)
        scaled = self.scaler(features)
        self.fit_points, self.fit_dims = scaled.shape
        too_few = self.fit_points <= SHRINK_BELOW_POINTS_PER_DIM * self.fit_dims
        self.shrunk = bool(too_few)
        self.shrinkage = ledoit_wolf_shrinkage(scaled) if too_few else 0.0
        self.pca.fit(scaled, shrinkage=self.shrinkage)
        projected = self.pca(scaled)
        self.estimator.fit(projected, shrinkage=self.shrinkage, target_variance=self.pca.target_variance)
        if isinstance(self.estimator, GaussianKde):
            normal_scores = -self.estimator.leave_one_out_log_density()
        else:
            normal_scores = -self.estimator(projected)
        if self.residual:
            normal_scores = normal_scores - self.pca.residual_log_density(scaled, projected)
        center, spread = robust_center_scale(normal_scores, min_scale=1e-3)  # median, 1.4826 MAD
        self.score_center = center.detach()
        self.score_scale = spread.detach()
        return int(features.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Negative log density (anomaly score) of each row: shape (N,).

        Clamped to a large finite value: when the normal features have (near) zero variance, any deviation
        overflows float32, and an infinite score would break min-max normalisation downstream.
        """
        scaled = self.scaler(features)
        projected = self.pca(scaled)
        log_density = self.estimator(projected)
        if self.residual:
            log_density = log_density + self.pca.residual_log_density(scaled, projected)
        return (-log_density).clamp(-MAX_SCORE, MAX_SCORE)

    def calibrated_score(self, score: torch.Tensor) -> torch.Tensor:
        """Anomaly score mapped to [0, 1]; monotone, so rankings and AUROC are unchanged."""
        return torch.sigmoid((score - self.score_center) / self.score_scale)
