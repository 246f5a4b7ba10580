"""Evaluation against the full-precision run: per-sample metrics, FID to FP, per-step divergence,
paired bootstrap confidence intervals, small error-per-step plots. Plain torch/numpy; kornia is
imported only when PSNR/SSIM are computed."""

from .fid import (
    feature_stats,
    fid_to_fp,
    frechet_distance,
    gaussian_frechet_distance,
    inception_fid_available,
    inception_fid_to_fp,
    sqrtm_psd,
)
from .metrics import class_accuracy, class_correct, latent_mse, psnr, ssim
from .plot import line_panels
from .stats import BootstrapCI, paired_bootstrap_ci
from .trajectory import TrajectoryRecorder, step_divergence

__all__ = [
    "BootstrapCI",
    "TrajectoryRecorder",
    "class_accuracy",
    "class_correct",
    "feature_stats",
    "fid_to_fp",
    "frechet_distance",
    "gaussian_frechet_distance",
    "inception_fid_available",
    "inception_fid_to_fp",
    "latent_mse",
    "line_panels",
    "paired_bootstrap_ci",
    "psnr",
    "sqrtm_psd",
    "ssim",
    "step_divergence",
]
