"""PTQD (ALGORITHMS.md §2): correlated-noise correction, bias correction, variance schedule calibration.

Error model (§2a): ``ε̂ = ε + Δ`` with ``Δ = k·ε + Δ'`` and Δ' ~ N(μ_c, σ_q²). Parameters per row
(§2b), all closed-form functions of the sums in ``stats.py``:

* ``k`` — least-squares slope of the error e = ε̂ − ε on ε, one scalar per row, pooled over
  samples, channels and positions. Choice: the fit has one intercept *per channel* (within-channel
  covariances pooled), consistent with PTQD's per-channel μ; it equals PTQD's ``linregress`` on
  the flattened data when the channel means of ε and e coincide. ``r2`` is its coefficient of
  determination (§2e/§3e: a low R² makes k unreliable).
  Only k > 0 is used (PTQD applies a ReLU).
* ``bias`` — μ_c, the per-channel mean of the *residual* Δ' = e − k·ε. Choice: §2b says "mean
  error per channel"; the residual's mean is what makes ``(ε̂ − μ)/(1+k)`` unbiased when ε has a
  non-zero channel mean, and it equals the plain error mean when ε is centred or k = 0.
* ``sigma_q`` — std of Δ' around the channel means (scalar; §2b "std of the residual").

Correction (§2c.1, CNC + BC): ``ε̃ = (ε̂ − μ)/(1 + k)``; with CNC off k = 0 and μ is the plain
error mean. VSC (§2c.2, K-space form) shrinks an ancestral step's fresh noise by the residual
variance left after CNC, ``s_q = σ_q/(1+k)``; see :func:`vsc_ancestral_step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .moments import eps_moments, pooled_variance, safe_div


@dataclass
class PTQDParams:
    k: torch.Tensor        # [R] correlated-noise coefficient, ReLU'd (0 when CNC is off)
    k_raw: torch.Tensor    # [R] OLS slope before the ReLU
    r2: torch.Tensor       # [R] R² of the k fit
    bias: torch.Tensor     # [R, C] μ: channel mean of the residual Δ' (BC)
    sigma_q: torch.Tensor  # [R] std of Δ' around the channel means

    @property
    def residual_std(self) -> torch.Tensor:
        """Std of the ε-error left after CNC+BC, ``σ_q/(1+k)`` (what VSC absorbs, §2c.2)."""
        return self.sigma_q / (1 + self.k)


def ptqd_params(stats, cnc: bool = True) -> PTQDParams:
    """Derive PTQD's k, R², μ and σ_q for every row of ``stats`` (ALGORITHMS.md §2b)."""
    m = eps_moments(stats)
    n = m["n"]
    # within-channel (co)variances of e = ε̂ − ε and ε, pooled over channels with weights n_c
    e_mean_c = m["m_q"] - m["m_fp"]
    var_f_c = m["e_ff"] - m["m_fp"] ** 2
    cov_c = (m["e_qf"] - m["e_ff"]) - e_mean_c * m["m_fp"]
    var_e_c = (m["e_qq"] - 2 * m["e_qf"] + m["e_ff"]) - e_mean_c**2
    tot = n.sum(-1)
    var_f = safe_div((n * var_f_c).sum(-1), tot).clamp_min(0)
    var_e = safe_div((n * var_e_c).sum(-1), tot).clamp_min(0)
    cov = safe_div((n * cov_c).sum(-1), tot)
    k_raw = safe_div(cov, var_f)
    r2 = safe_div(cov * cov, var_f * var_e).clamp(0, 1)
    k = k_raw.clamp_min(0) if cnc else torch.zeros_like(k_raw)
    kc = k.unsqueeze(-1)
    # residual r = e − k·ε per channel: mean and second moment from the sums
    bias = e_mean_c - kc * m["m_fp"]
    e2_c = m["e_qq"] - 2 * m["e_qf"] + m["e_ff"]
    ef_c = m["e_qf"] - m["e_ff"]
    r2nd = e2_c - 2 * kc * ef_c + kc * kc * m["e_ff"]
    sigma_q = pooled_variance(n, bias, r2nd).sqrt()
    return PTQDParams(k=k, k_raw=k_raw, r2=r2, bias=bias, sigma_q=sigma_q)


def ptqd_affine(params: PTQDParams, bc: bool = True):
    """CNC+BC as a per-channel affine map ε̃ = scale·ε̂ + shift: scale = 1/(1+k), shift = −μ/(1+k)."""
    scale = (1 / (1 + params.k)).unsqueeze(-1).expand_as(params.bias).clone()
    shift = -params.bias * scale if bc else torch.zeros_like(params.bias)
    return scale, shift


def correct_eps(eps_hat: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """§2c.1: ``ε̃ = (ε̂ − μ)/(1 + k)`` (k broadcastable scalar, μ broadcastable per channel)."""
    return (eps_hat - bias) / (1 + k)


def vsc_ancestral_step(sigma, sigma_next, eta, residual_std):
    """Ancestral step split with PTQD's variance schedule calibration (§2c.2, K-space form).

    ``σ_up = min(σ_{n+1}, η·√(σ_{n+1}²(σ_n² − σ_{n+1}²)/σ_n²))``, ``σ_down = √(σ_{n+1}² − σ_up²)``
    (§0.2), then ``σ_up'² = max(0, σ_up² − (σ_down − σ_n)²·s_q²)`` and
    ``σ_down' = √(σ_{n+1}² − σ_up'²)``: the residual error variance ``(σ_down − σ_n)²·s_q²``
    that the deterministic part carries replaces part of the fresh noise, so the step still
    lands at total noise σ_{n+1}. Works element-wise on tensors; returns
    ``(σ_down, σ_up, σ_down', σ_up')``.
    """
    ratio = torch.where(sigma > 0, (sigma**2 - sigma_next**2) / torch.where(sigma > 0, sigma**2, torch.ones_like(sigma)),
                        torch.zeros_like(sigma))
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * ratio).clamp_min(0).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).clamp_min(0).sqrt()
    up2 = (sigma_up**2 - (sigma_down - sigma) ** 2 * residual_std**2).clamp_min(0)
    sigma_up_v = up2.sqrt()
    sigma_down_v = (sigma_next**2 - up2).clamp_min(0).sqrt()
    return sigma_down, sigma_up, sigma_down_v, sigma_up_v
