"""TCEC (ALGORITHMS.md §5): per-step, per-channel error gain and the optional m = 1 window.

**Gain** (§5c): ``K_c = Σ ε̂(ε̂ − ε) / (Σ ε̂² + λ_reg)``, the ridge least-squares fit of the error on
the quantized output, so that ``e ≈ K ⊙ ε̂`` and the compensated estimate is ``ε̃ = (1 − K) ⊙ ε̂``
(§5d default, exact when J ≈ 0 and the error is proportional to ε̂). Choice: λ_reg =
``ridge · n`` (n = the channel's element count), so the ridge strength does not depend on the
calibration-set size. Relation to TAC: 1 − K_TCEC = K_TAC with λ1 = λ2 = 0 (§5c).

**Window, m = 1** (experimental, default off). §5d/§10.1: the paper's Eq. 13 could not be read,
and whatever the exact form it must not double-count an error already removed at step n−1. Our
choice: estimate step n's error from the current and the cached previous quantized output,
``ê_n = K_n ⊙ ((1−λ₁)·ε̂_n + λ₁·ε̂_{n−1})``, ``ε̃_n = ε̂_n − ê_n``. Each step only removes an
estimate of its *own* error (no double counting); λ₁ trades the noise of a one-sample estimate
against the drift of the output between adjacent steps. This is ours, not the paper's Eq. 18.
"""

from __future__ import annotations

import torch

from .moments import safe_div


def tcec_gain(stats, ridge: float = 1e-4) -> torch.Tensor:
    """TCEC K [R, C] (§5c); rows without data give K = 0 (no correction)."""
    s = stats.sums
    return safe_div(s["eps_sq_q"] - s["eps_cross"], s["eps_sq_q"] + ridge * s["eps_count"])


def apply_tcec(eps_hat: torch.Tensor, gain: torch.Tensor, prev_eps_hat: torch.Tensor | None = None,
               lambda1: float = 0.0) -> torch.Tensor:
    """``ε̃ = ε̂ − K ⊙ ((1−λ₁)ε̂ + λ₁ε̂_prev)``; without a cached ε̂_prev, ``(1 − K) ⊙ ε̂``."""
    if prev_eps_hat is None or lambda1 == 0.0:
        return eps_hat - gain * eps_hat
    return eps_hat - gain * ((1 - lambda1) * eps_hat + lambda1 * prev_eps_hat)
