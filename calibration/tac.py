"""TAC-Diffusion (ALGORITHMS.md §4): Noise Estimation Reconstruction (NER) and Input Bias Correction (IBC).

**NER gain** ``ner_gain`` K_c per row and channel (§4b), the minimiser of a convex loss with a
masked relative-error term and a pull towards 1. Choice (§10.2 leaves the normalisation open):
each term is a *mean*, so λ1 and λ2 are dimensionless and independent of resolution and batch::

    L(K) = (1−λ1)·Σ(Kε̂−ε)²/Σε²  +  λ1·mean_mask((Kε̂−ε)/ε)²  +  λ2·(K−1)²

(sums over the channel's elements of all calibration samples; the first term is the global
relative error, rQNSR, of SegQuant's ``loss()``; the second is the per-element relative term of
its closed form restricted to the mask |ε| > κ·mean|ε|, §4b's "safe recommendation", κ fixed at
collection time). Setting dL/dK = 0 gives the closed form::

    K = [(1−λ1)·Σε̂ε/Σε² + λ1·Σ_m(ε̂/ε)/M + λ2] / [(1−λ1)·Σε̂²/Σε² + λ1·Σ_m(ε̂/ε)²/M + λ2]

Pooling sums over samples (instead of SegQuant's average of per-sample K) keeps the statistics
mergeable. If ε̂ = g·ε exactly, K = 1/g for λ2 = 0. NER is applied to every element
(``ε̃ = K ⊙ ε̂``, §4c.3); the mask only shapes the fit.

**IBC bias** ``input_bias`` b_c per row (§4b): the channel mean of the latent error x̂ − x (K-space)
as the quantized trajectory arrives at σ_n, measured progressively (earlier IBC corrections
active). Applied as ``x ← x − b`` before the model call and carried forward (§4c.1 default).
"""

from __future__ import annotations

import torch

from .moments import latent_moments, safe_div


def ner_gain(stats, lambda1: float = 0.5, lambda2: float = 0.1) -> torch.Tensor:
    """TAC NER gain K [R, C] from the sums (closed form above); rows without data give K = 1."""
    s = stats.sums
    a = 1.0 - lambda1
    syy = s["eps_sq_fp"]
    m = s["tac_mask_count"]
    num = a * safe_div(s["eps_cross"], syy) + lambda1 * safe_div(s["tac_ratio_sum"], m) + lambda2
    den = a * safe_div(s["eps_sq_q"], syy) + lambda1 * safe_div(s["tac_ratio_sq"], m) + lambda2
    return torch.where(den > 0, safe_div(num, den), torch.ones_like(den))


def input_bias(stats) -> torch.Tensor:
    """TAC IBC bias b [R, C]: per-channel mean latent error at each row's σ (K-space)."""
    return latent_moments(stats)[0]


def apply_ner(eps_hat: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """§4c.3: ``ε̃ = K ⊙ ε̂`` (gain broadcastable per channel)."""
    return gain * eps_hat
