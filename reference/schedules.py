"""Sampling σ schedules over a model's discrete σ grid, as ComfyUI's schedulers build them.

``get_sigmas(scheduler, model_sigmas, steps)`` returns ``steps + 1`` descending values ending in 0
(float32, like ComfyUI's ``calculate_sigmas``). ``model_sigmas`` is the model's ascending σ grid
(``reference.sigmas.scaled_linear_sigmas()`` for SD1.x: index t = training step), so σ_min =
``model_sigmas[0]`` and σ_max = ``model_sigmas[-1]``.
"""

from __future__ import annotations

import math
import operator

import torch

from .sigmas import sigma_to_t, t_to_sigma

SCHEDULERS = ("normal", "karras", "exponential", "simple")

__all__ = [
    "SCHEDULERS",
    "exponential_sigmas",
    "get_sigmas",
    "karras_sigmas",
    "normal_sigmas",
    "simple_sigmas",
]


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: ``σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``, then 0.

    With ``steps = 1`` the single value is σ_max (a ramp of one point starts at 0).
    """
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho).float()


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Log-linear schedule: ``log σ_i`` evenly spaced from log σ_max to log σ_min, then 0."""
    logs = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64)
    return _append_zero(logs.exp()).float()


def normal_sigmas(model_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """ComfyUI's ``normal``: timesteps ``linspace(t(σ_max), t(σ_min), steps)`` mapped through σ(t).

    ``t(σ)`` is the nearest grid index in log σ and ``σ(t)`` interpolates log σ between grid
    points (``reference.sigmas.sigma_to_t`` / ``t_to_sigma``, ComfyUI's ``ModelSamplingDiscrete``).
    ComfyUI drops the appended 0 only when σ(t_min) ≈ 0, which never holds for a VP grid.
    """
    grid = model_sigmas.float()
    t_max = sigma_to_t(grid[-1:], grid)[0]
    t_min = sigma_to_t(grid[:1], grid)[0]
    timesteps = torch.linspace(float(t_max), float(t_min), steps)
    return _append_zero(t_to_sigma(timesteps, grid)).float()


def simple_sigmas(model_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """ComfyUI's ``simple``: ``σ_i = grid[-(1 + ⌊i·len(grid)/steps⌋)]`` (evenly strided from the top)."""
    n = len(model_sigmas)
    idx = [-(1 + int(i * n / steps)) for i in range(steps)]
    return _append_zero(model_sigmas.float()[idx]).float()


def get_sigmas(scheduler: str, model_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps + 1`` sampling σ's (descending, last = 0) for ``scheduler`` in ``SCHEDULERS``."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULERS}")
    try:
        steps = operator.index(steps)
    except TypeError:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}") from None
    if steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    model_sigmas = torch.as_tensor(model_sigmas).detach().cpu()
    if model_sigmas.ndim != 1 or len(model_sigmas) < 2:
        raise ValueError("model_sigmas must be a 1-D ascending grid with at least 2 entries")
    sigma_min, sigma_max = float(model_sigmas[0]), float(model_sigmas[-1])
    if scheduler == "karras":
        return karras_sigmas(steps, sigma_min, sigma_max)
    if scheduler == "exponential":
        return exponential_sigmas(steps, sigma_min, sigma_max)
    if scheduler == "normal":
        return normal_sigmas(model_sigmas, steps)
    return simple_sigmas(model_sigmas, steps)
