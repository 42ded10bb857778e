"""The torch density models of ``anomalib_ext.models.components.kde``: correctness against scipy, bandwidth
selection, degenerate inputs, checkpoint and export friendliness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalib_ext.models.components.kde import (
    FeatureDensity,
    FeatureScaler,
    GaussianDensity,
    GaussianKde,
    PrincipalComponents,
    scott_factor,
    silverman_factor,
)


def _correlated_points(num_points: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return torch.randn(num_points, dim, generator=generator, dtype=torch.float64) @ mixing + 3.0


@pytest.mark.parametrize("bandwidth", ["scott", "silverman", 0.25])
def test_kde_matches_scipy_gaussian_kde(bandwidth: str | float) -> None:
    stats = pytest.importorskip("scipy.stats")
    points = _correlated_points(250, 4, seed=0)
    queries = torch.cat([points[:20] + 0.1, 3.0 + 2.5 * torch.randn(30, 4, dtype=torch.float64)])
    kde = GaussianKde(bandwidth)
    kde.fit(points)
    reference = stats.gaussian_kde(points.numpy().T, bw_method=bandwidth)
    assert float(kde.factor) == pytest.approx(reference.factor, rel=1e-12)
    np.testing.assert_allclose(kde(queries).numpy(), reference.logpdf(queries.numpy().T), rtol=1e-6, atol=1e-7)
    # float32, what runs at inference, stays close too
    kde32 = GaussianKde(bandwidth)
    kde32.fit(points.float())
    np.testing.assert_allclose(kde32(queries.float()).numpy(), reference.logpdf(queries.numpy().T), atol=2e-3)


def test_bandwidth_rules_follow_scipy_formulas() -> None:
    assert scott_factor(100, 3) == pytest.approx(100 ** (-1 / 7))
    assert silverman_factor(100, 3) == pytest.approx((100 * 5 / 4) ** (-1 / 7))


def test_leave_one_out_bandwidth_beats_a_badly_chosen_one_on_held_out_normals() -> None:
    # a two-cluster distribution: Scott's rule over-smooths it, a tiny bandwidth over-fits it
    generator = torch.Generator().manual_seed(1)

    def sample(count: int) -> torch.Tensor:
        centres = torch.tensor([[-4.0, 0.0, 0.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
        which = torch.randint(0, 2, (count,), generator=generator)
        return centres[which] + 0.5 * torch.randn(count, 3, generator=generator, dtype=torch.float64)

    train, held_out = sample(300), sample(300)
    likelihood = {}
    for bandwidth in ("loo", "scott", 0.01, 3.0):
        kde = GaussianKde(bandwidth)
        kde.fit(train)
        likelihood[bandwidth] = float(kde(held_out).mean())
    assert likelihood["loo"] > likelihood[0.01] + 1.0, likelihood
    assert likelihood["loo"] > likelihood[3.0] + 0.5, likelihood
    assert likelihood["loo"] >= likelihood["scott"], likelihood


def test_leave_one_out_density_of_the_fit_points_matches_a_refit_without_them() -> None:
    points = _correlated_points(40, 3, seed=2)
    kde = GaussianKde(0.5)
    kde.fit(points)
    loo = kde.leave_one_out_log_density()
    # the factor multiplies the covariance of all points, so fix the whitening and drop one point by hand
    query = points[7:8] @ (kde.whitening.double())
    others = torch.cat([kde.points[:7], kde.points[8:]]).double()
    squared = (query - others).pow(2).sum(dim=1)
    expected = torch.logsumexp(-0.5 * squared, dim=0) + kde.log_normalizer + np.log(40) - np.log(39)
    assert float(loo[7]) == pytest.approx(float(expected), abs=1e-9)


def test_gaussian_density_matches_scipy_multivariate_normal() -> None:
    stats = pytest.importorskip("scipy.stats")
    points = _correlated_points(500, 5, seed=3)
    density = GaussianDensity()
    density.fit(points)
    reference = stats.multivariate_normal(points.mean(0).numpy(), np.cov(points.numpy().T))
    queries = points[:10] * 1.5
    np.testing.assert_allclose(density(queries).numpy(), reference.logpdf(queries.numpy()), rtol=1e-6)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("density", ["kde", "gaussian"])
@pytest.mark.parametrize("scaling", ["none", "scale", "standardize", "norm"])
def test_constant_features_give_finite_scores(density: str, scaling: str, residual: bool) -> None:
    constant = torch.full((30, 12), 0.5)
    model = FeatureDensity(density=density, feature_scaling=scaling, n_components=4, bandwidth="loo", residual=residual)
    model.fit(constant)
    same = model(torch.full((3, 12), 0.5))
    different = model(torch.full((3, 12), 0.9))
    zeros = model(torch.zeros(3, 12))
    for scores in (same, different, zeros):
        assert torch.isfinite(scores).all(), scores
        assert torch.isfinite(model.calibrated_score(scores)).all()
    if scaling != "norm":  # unit-length projection maps every constant vector to the same point
        assert (different > same).all()


def test_feature_density_ranks_outliers_above_normals_and_calibrates_to_unit_interval() -> None:
    generator = torch.Generator().manual_seed(4)
    normal = torch.randn(600, 64, generator=generator) * torch.linspace(0.1, 3.0, 64)
    outliers = normal[:20] + 6.0 * torch.randn(20, 64, generator=generator)
    model = FeatureDensity(n_components=8, max_training_points=200, bandwidth="loo")
    used = model.fit(normal[:500])
    assert used == 200  # the cap holds
    normal_scores = model(normal[500:])
    outlier_scores = model(outliers)
    assert float(outlier_scores.min()) > float(normal_scores.median())
    calibrated = model.calibrated_score(torch.cat([normal_scores, outlier_scores]))
    assert float(calibrated.min()) >= 0.0
    assert float(calibrated.max()) <= 1.0
    # held-out normals sit around the middle (a little below: PCA fitted on the training points inflates
    # their spread along the kept components), outliers near 1
    assert 0.1 < float(model.calibrated_score(normal_scores).median()) < 0.7
    assert float(model.calibrated_score(outlier_scores).min()) > 0.9


def test_principal_components_passthrough_keeps_the_last_features_unprojected() -> None:
    features = torch.randn(50, 10, dtype=torch.float64)
    pca = PrincipalComponents(n_components=3, passthrough=2)
    pca.fit(features)
    projected = pca(features)
    assert projected.shape == (50, 5)
    torch.testing.assert_close(projected[:, 3:], features[:, 8:] - features[:, 8:].mean(0))


def test_fitted_density_survives_a_state_dict_round_trip() -> None:
    features = torch.randn(100, 20)
    model = FeatureDensity(n_components=5)
    model.fit(features)
    fresh = FeatureDensity(n_components=5)
    fresh.load_state_dict(model.state_dict())  # buffers resize to the fitted shapes
    torch.testing.assert_close(fresh(features[:10]), model(features[:10]))


def test_bad_input_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        GaussianKde("wide")
    with pytest.raises(ValueError, match="feature_scaling"):
        FeatureScaler("minmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="density"):
        FeatureDensity(density="gmm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        FeatureDensity().fit(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        GaussianKde().fit(torch.zeros(1, 3))


def test_gaussian_with_residual_is_the_probabilistic_pca_likelihood() -> None:
    """density=gaussian + residual = log N(x; mean, V diag(lambda) V^T + sigma^2 (I - V V^T)), sigma^2 = mean
    discarded eigenvalue: the probabilistic-PCA model with the sample variances inside the subspace."""
    stats = pytest.importorskip("scipy.stats")
    points = _correlated_points(300, 10, seed=5)
    pca = PrincipalComponents(3, residual=True)
    pca.fit(points)
    gaussian = GaussianDensity()
    gaussian.fit(pca(points))
    model = FeatureDensity(density="gaussian", n_components=3, feature_scaling="none", residual=True)
    model.fit(points)  # the same chain, in float32
    centred = points - points.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / (len(points) - 1))
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    kept = eigenvectors[:, :3]
    sigma2 = eigenvalues[3:].mean()
    cov = kept @ torch.diag(eigenvalues[:3]) @ kept.T + sigma2 * (torch.eye(10, dtype=torch.float64) - kept @ kept.T)
    reference = stats.multivariate_normal(points.mean(0).numpy(), cov.numpy())
    queries = points[:10] * 1.5
    torch.testing.assert_close(float(pca.residual_variance), float(sigma2), rtol=1e-6, atol=0)
    log_density = gaussian(pca(queries)) + pca.residual_log_density(queries)
    np.testing.assert_allclose(log_density.numpy(), reference.logpdf(queries.numpy()), rtol=1e-6)
    np.testing.assert_allclose(-model(queries.float()).numpy(), reference.logpdf(queries.numpy()), rtol=1e-4)


def test_residual_sees_an_anomaly_outside_the_kept_components() -> None:
    # normal data lives (mostly) in a 3-D subspace of 20-D; the anomaly moves only along a discarded direction
    generator = torch.Generator().manual_seed(6)
    basis = torch.linalg.qr(torch.randn(20, 20, generator=generator, dtype=torch.float64))[0]
    coefficients = torch.randn(400, 20, generator=generator, dtype=torch.float64) * torch.tensor([5.0] * 3 + [0.1] * 17)
    basis, coefficients = basis.float(), coefficients.float()
    normal = coefficients @ basis.T
    anomaly = normal[300:310] + 2.0 * basis[:, -1]
    subspace_only = FeatureDensity(density="gaussian", n_components=3, feature_scaling="none")
    with_residual = FeatureDensity(density="gaussian", n_components=3, feature_scaling="none", residual=True)
    subspace_only.fit(normal[:300])
    with_residual.fit(normal[:300])
    # the projection barely moves: the subspace density cannot tell the anomaly from its normal source
    torch.testing.assert_close(subspace_only(anomaly), subspace_only(normal[300:310]), rtol=0.05, atol=0.5)
    assert float(with_residual(anomaly).min()) > float(with_residual(normal[300:]).max())


def test_n_components_as_a_variance_fraction() -> None:
    generator = torch.Generator().manual_seed(7)
    points = torch.randn(200, 6, generator=generator, dtype=torch.float64) * torch.tensor(
        [10.0, 5.0, 1.0, 0.1, 0.1, 0.1]
    )
    for fraction, expected in ((0.5, 1), (0.95, 2), (0.999, 3)):
        pca = PrincipalComponents(fraction)
        pca.fit(points)
        assert pca.output_dim == expected, (fraction, pca.output_dim)
    with pytest.raises(ValueError, match="n_components"):
        PrincipalComponents(2.5)


def test_residual_leaves_a_direction_with_variance_out_and_survives_a_state_dict_round_trip() -> None:
    points = torch.randn(10, 30)  # rank 9: keeping 9 or more components would leave no variance outside
    model = FeatureDensity(density="gaussian", n_components=20, residual=True)
    model.fit(points)
    assert model.pca.output_dim == 8
    assert float(model.pca.residual_variance) > 1e-3
    fresh = FeatureDensity(density="gaussian", n_components=20, residual=True)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(points), model(points))
