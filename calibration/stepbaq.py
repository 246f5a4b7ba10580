"""StepbaQ (ALGORITHMS.md §3): stepping back to a noisier σ, latent adjustment, step-size adaptation.

K-space form (§3a, [derived, numerically checked in the spec]): a quantized latent at σ_n whose
error has per-channel mean μ and (pooled) variance s² is, after removing μ, a latent at
``σ_τ = √(σ_n² + s²)``. The per-step parameters:

* ``latent_bias`` μ [R, C] and ``latent_var`` s² [R]: mean and variance of δ = x̂ − x as the
  quantized trajectory arrives at σ_n. Choice (§10.5 leaves it open): s² is taken around the
  per-channel means, because LA removes those (§3b recommendation).
* ``sigma_tau`` [R]: the stepback. With the model's training grid (§3b "τ > t"), σ_τ is the grid σ
  nearest to √(σ_n² + s²) in σ² (the paper's argmin, Appendix C Eq. 14) and a stepback happens
  only if its grid index exceeds σ_n's (nearest in log σ, ComfyUI's ``timestep``); otherwise, or
  without a grid, σ_τ = √(σ_n² + s²) when it exceeds σ_n by more than the relative threshold
  ``rho_min`` (§3c, off-grid models). No stepback: σ_τ = σ_n and μ = 0 (Algorithm 1 line 5).
* Sampling (§3c): LA ``x ← x − μ``; TIA: call the model at σ_τ; SSA: the step starts at σ_τ and
  ends at the sampler's own end point, ``x_{n+1} = x + (σ_end − σ_τ)·ε̂`` (σ_end = σ_{n+1}, or
  σ_down for Euler-ancestral, Appendix C). The engine realises this through a wrapped model by
  returning the *Euler-equivalent denoised* of :func:`euler_equivalent_denoised`.

Accumulation (ACC, §3b): rows are measured on the quantized trajectory, trajectories are
synchronised only after a stepback, so an error too small to step back accumulates into the next
row. :func:`analytic_stepbacks` re-derives stepbacks for another schedule from ε-space
statistics with the §8.4 rule (J ≈ 0, independent step errors): an approximation.
"""

from __future__ import annotations

import torch

from .moments import latent_moments


def grid_index(sigma: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest training step in log σ (ComfyUI ``ModelSamplingDiscrete.timestep``), long tensor."""
    lg = grid.to(sigma.device, torch.float64).log()
    d = sigma.double().clamp_min(1e-12).log().reshape(-1, 1) - lg.reshape(1, -1)
    return d.abs().argmin(-1).reshape(sigma.shape)


def stepback_rule(sigma: torch.Tensor, var: torch.Tensor, grid: torch.Tensor | None = None, rho_min: float = 0.0):
    """σ_τ and the stepback flag for rows at σ (``[R]``) with latent error variance ``var`` (§3b)."""
    sigma = sigma.double()
    cand = (sigma**2 + var.double().clamp_min(0)).sqrt()
    if grid is not None:
        g = grid.to(torch.float64)
        j = (g.reshape(1, -1) ** 2 - cand.reshape(-1, 1) ** 2).abs().argmin(-1)
        snapped = g[j]
        flag = (j > grid_index(sigma, g)) & (snapped > sigma)
        return torch.where(flag, snapped, sigma), flag
    flag = cand > sigma * (1.0 + rho_min)
    flag &= var > 0
    return torch.where(flag, cand, sigma), flag


def stepback_decisions(stats):
    """Per row of ``stats``: ``(sigma_tau [R], stepback [R] bool, latent_bias μ [R, C])`` (§3b)."""
    mean, var = latent_moments(stats)
    tau, flag = stepback_rule(stats.sigma, var, stats.grid_sigmas, stats.meta.rho_min)
    mu = torch.where(flag.unsqueeze(-1), mean, torch.zeros_like(mean))
    return tau, flag, mu


def analytic_stepbacks(sched: torch.Tensor, res_mean: torch.Tensor, res_var: torch.Tensor, *, grid=None,
                       rho_min: float = 0.0, ancestral_eta: float | None = None, ssa: bool = True):
    """Re-derive StepbaQ for a new schedule (ALGORITHMS.md §8.4, "analytic StepbaQ").

    ``sched`` has N+1 σ's (last may be 0); ``res_mean`` [N, C] and ``res_var`` [N] are the ε-error
    mean and variance left after the active output correction, at each σ_n. Walks the schedule
    with ``M += h·μ_ε``, ``V += h²·s_ε²`` (h = σ_end − σ_start; σ_end = σ_down for ancestral
    samplers, whose shared noise adds no error), emits a stepback at σ_n when the rule of
    :func:`stepback_rule` fires for V, then resets M and V (ACC). Returns ``(sigma_tau [N], mu [N, C])``.
    """
    sched = sched.double().cpu()
    n_steps = sched.numel() - 1
    tau = sched[:-1].clone()
    mu = torch.zeros(n_steps, res_mean.shape[-1], dtype=torch.float64)
    acc_m = torch.zeros(res_mean.shape[-1], dtype=torch.float64)
    acc_v = torch.zeros((), dtype=torch.float64)
    for n in range(n_steps):
        s, s_next = sched[n], sched[n + 1]
        if n > 0 and float(acc_v) > 0:
            t, flag = stepback_rule(s.reshape(1), acc_v.reshape(1), grid, rho_min)
            if bool(flag[0]):
                tau[n], mu[n] = t[0], acc_m
                acc_m = torch.zeros_like(acc_m)
                acc_v = torch.zeros_like(acc_v)
        start = tau[n] if ssa else s
        h = _step_end(s, s_next, ancestral_eta) - start
        acc_m = acc_m + h * res_mean[n].double()
        acc_v = acc_v + h * h * res_var[n].double()
    return tau, mu


def analytic_input_bias(sched: torch.Tensor, res_mean: torch.Tensor, ancestral_eta: float | None = None):
    """TAC IBC bias for a new schedule: with IBC every step, ``b_n = h_{n−1}·μ_ε(σ_{n−1})`` (§8.4 rule)."""
    sched = sched.double().cpu()
    b = torch.zeros(sched.numel() - 1, res_mean.shape[-1], dtype=torch.float64)
    for n in range(1, sched.numel() - 1):
        h = _step_end(sched[n - 1], sched[n], ancestral_eta) - sched[n - 1]
        b[n] = h * res_mean[n - 1].double()
    return b


def _step_end(s, s_next, ancestral_eta):
    """Where the deterministic part of a step ends: σ_{n+1}, or σ_down for ancestral (§0.2)."""
    if ancestral_eta is None or float(s_next) <= 0:
        return s_next
    up = torch.minimum(s_next, ancestral_eta * (s_next**2 * (s**2 - s_next**2) / s**2).clamp_min(0).sqrt())
    return (s_next**2 - up**2).clamp_min(0).sqrt()


def euler_equivalent_denoised(x, x_in, eps, sigma_n, sigma_start, sigma_end, sigma_end_sampler):
    """The denoised value that makes a first-order sampler land where StepbaQ wants (§3c).

    The sampler, holding x at σ_n, computes ``x_next = x + (σ_e − σ_n)·(x − D)/σ_n =
    r·x + (1 − r)·D`` with ``r = σ_e/σ_n`` (σ_e = ``sigma_end_sampler``: σ_{n+1}, or σ_down for
    Euler-ancestral). StepbaQ wants ``T = x_in + (σ_end − σ_start)·ε̃`` (x_in = x after LA/IBC,
    σ_start = σ_τ under SSA, σ_end possibly VSC's σ_down'). Returning ``D = (T − r·x)/(1 − r)``
    makes both equal exactly; with x_in = x and σ_start = σ_n it reduces to ``x − σ_n·ε̃``. At the final step (σ_e = 0) it is T itself.
    """
    target = x_in + (sigma_end - sigma_start) * eps
    r = sigma_end_sampler / sigma_n
    return (target - r * x) / (1 - r)
