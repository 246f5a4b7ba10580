"""Moments derived from the sufficient statistics of ``stats.py`` (shared by the method modules).

All functions return float64 CPU tensors with one entry per row ([R]) or per row and channel
([R, C]); rows without data give neutral values (0 means, 0 variances) rather than NaN, so an
unfilled row never poisons an interpolation.
"""

from __future__ import annotations

import torch


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num/den`` where ``den > 0``, else 0."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def eps_moments(stats) -> dict:
    """Per row and channel: n, E[ε], E[ε̂], E[ε²], E[ε̂²], E[ε̂ε] (ε = FP, ε̂ = quantized, §0.3)."""
    s = stats.sums
    n = s["eps_count"]
    return {
        "n": n,
        "m_fp": safe_div(s["eps_sum_fp"], n), "m_q": safe_div(s["eps_sum_q"], n),
        "e_ff": safe_div(s["eps_sq_fp"], n), "e_qq": safe_div(s["eps_sq_q"], n),
        "e_qf": safe_div(s["eps_cross"], n),
    }


def pooled_variance(count: torch.Tensor, mean: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Variance around the per-channel means, pooled over channels: Σ_c n_c·Var_c / Σ_c n_c → [R]."""
    var_c = (second - mean * mean).clamp_min(0)
    return safe_div((count * var_c).sum(-1), count.sum(-1))


def residual_after_affine(stats, scale: torch.Tensor, shift: torch.Tensor):
    """ε-error left after a per-channel affine output correction ε̃ = scale·ε̂ + shift.

    Returns ``(mean [R, C], pooled variance [R])`` of ``ε̃ − ε``, computed exactly from the sums:
    E[r] = a·E ε̂ + b − E ε and E[r²] = a²E ε̂² + b² + E ε² + 2ab·E ε̂ − 2a·E ε̂ε − 2b·E ε.
    Used to predict StepbaQ's latent error on another schedule (ALGORITHMS.md §8.4).
    """
    m = eps_moments(stats)
    a, b = scale, shift
    mean = a * m["m_q"] + b - m["m_fp"]
    second = a * a * m["e_qq"] + b * b + m["e_ff"] + 2 * a * b * m["m_q"] - 2 * a * m["e_qf"] - 2 * b * m["m_fp"]
    return mean, pooled_variance(m["n"], mean, second)


def latent_moments(stats):
    """StepbaQ / TAC-IBC latent error (K-space): per-channel mean [R, C] and pooled variance [R]."""
    s = stats.sums
    mean = safe_div(s["lat_sum"], s["lat_count"])
    return mean, pooled_variance(s["lat_count"], mean, safe_div(s["lat_sq"], s["lat_count"]))
