"""The discrete noise grid of Stable Diffusion 1.x, in k-diffusion σ notation.

SD1.x trains on 1000 steps with the "scaled linear" β schedule (β from 0.00085 to 0.012, linear in
√β). In k-diffusion / ComfyUI notation a latent is ``x = x0 + σ·ε`` with ``σ = √((1−ᾱ)/ᾱ)``
(ALGORITHMS.md §0.1); the grid runs from σ ≈ 0.029 (t = 0) to σ ≈ 14.6 (t = 999).
"""

from __future__ import annotations

import torch

SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_STEPS = 1000


def scaled_linear_sigmas(
    steps: int = SD_TRAIN_STEPS, beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END
) -> torch.Tensor:
    """σ for t = 0..steps−1 (ascending), float32, as ComfyUI's ``ModelSamplingDiscrete`` builds it."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Nearest training step in log σ (ComfyUI's ``ModelSamplingDiscrete.timestep``), as float."""
    log_sigmas = sigmas.to(sigma.device).log()
    dists = sigma.float().clamp_min(1e-10).log().reshape(-1, 1) - log_sigmas.reshape(1, -1)
    return dists.abs().argmin(dim=1).reshape(sigma.shape).float()


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """σ at a (possibly fractional) training step, interpolating log σ (ComfyUI's ``sigma``)."""
    log_sigmas = sigmas.to(t.device).log()
    t = t.float().clamp(0, len(sigmas) - 1)
    low = t.floor().long()
    high = t.ceil().long()
    w = t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def sigma_to_alphas_cumprod(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ = 1/(1+σ²) (ALGORITHMS.md §0.1)."""
    return 1.0 / (1.0 + sigma**2)
