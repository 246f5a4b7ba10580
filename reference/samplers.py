"""Standalone k-diffusion-style samplers in σ space (ComfyUI's sampler signature).

Every sampler has the signature of ComfyUI's / k-diffusion's samplers::

    sample_X(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts)

and calls a denoiser ``denoised = model(x, sigma * s_in, **extra_args)`` with ``s_in =
x.new_ones([B])`` (docs/INTERFACES.md). ``x = x0 + σ·ε`` (ALGORITHMS.md §0.1); the
probability-flow ODE of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
Generative Models", Eqs. 1 and 3 with σ(t) = t) is ``dx/dσ = (x − D(x, σ))/σ``.

The update equations and the sequence of model calls follow k-diffusion (crowsonkb/k-diffusion,
``k_diffusion/sampling.py``) as used by ComfyUI, so an engine that wraps the model callable sees
exactly the (x, σ) pairs it would see inside ComfyUI.

Noise for ancestral / churn steps comes from ``noise_sampler(sigma, sigma_next)``. When none is
given it is built from, in order: a ``generator`` option, a ``seed`` option, ``extra_args["seed"]``
(ComfyUI's convention; the key is removed before calling the model), else the global RNG. A seeded
default sampler reproduces ComfyUI's ``default_noise_sampler`` (seed + 1 on CPU), so two runs (FP
and quantized model) with the same seed receive identical noise draws.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "SAMPLERS",
    "default_noise_sampler",
    "get_ancestral_step",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_2",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "to_d",
]


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def _bcast(sigma, x: torch.Tensor):
    """Reshape a per-sample σ ``[B]`` (or a scalar) so it broadcasts against ``x``."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))
    return sigma


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative ``d = dx/dσ = (x − D(x, σ))/σ`` (Karras et al. 2022, Eqs. 1 and 3 with σ(t) = t).

    ``d`` equals the ε-prediction ε̂ of an EPS model (ALGORITHMS.md §0.1: ``D = x − σ·ε̂``).
    """
    return (x - denoised) / _bcast(sigma, x)


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step σ_from → σ_to into a deterministic part and fresh noise (ALGORITHMS.md §0.2).

    ``σ_up = min(σ_to, η·√(σ_to²(σ_from² − σ_to²)/σ_from²))`` and ``σ_down = √(σ_to² − σ_up²)``, so
    that stepping the ODE to σ_down and adding ``σ_up·z`` lands on noise level σ_to
    (σ_down² + σ_up² = σ_to²; η = 1 is the DDPM posterior variance, Ho et al. 2020 Eq. 7).
    Returns ``(sigma_down, sigma_up)``; η = 0 gives ``(σ_to, 0)``.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x: torch.Tensor, seed: Optional[int] = None, generator=None) -> NoiseSampler:
    """Standard-normal draws shaped like ``x``: ``z ~ N(0, I)``, independent of (σ, σ_next).

    With ``seed``, a private generator seeded like ComfyUI's ``default_noise_sampler`` (seed + 1 on
    CPU, since ComfyUI draws the initial latent noise from ``seed`` itself); with ``generator``,
    that generator; otherwise the global RNG.
    """
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed) + (1 if x.device.type == "cpu" else 0))

    def noise(sigma, sigma_next):
        return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)

    return noise


def _prepare(x, sigmas, extra_args, opts):
    """Common set-up: σ's as a tensor on x's device, model kwargs without ``seed``, ``s_in``, and
    the noise sampler."""
    sigmas = torch.as_tensor(sigmas, device=x.device)
    extra = dict(extra_args or {})
    seed = opts.pop("seed", None)
    extra_seed = extra.pop("seed", None)
    generator = opts.pop("generator", None)
    noise_sampler = opts.pop("noise_sampler", None)
    if opts:
        raise TypeError(f"unexpected sampler options: {sorted(opts)}")
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed if seed is not None else extra_seed, generator)
    return sigmas, extra, x.new_ones([x.shape[0]]), noise_sampler


def _steps(n: int, disable):
    """Step indices; a tqdm bar only when ``disable is False`` and tqdm is installed."""
    if disable is False:
        try:
            from tqdm.auto import trange
        except ImportError:
            return range(n)
        return trange(n)
    return range(n)


def _report(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """Karras et al. 2022 Algorithm 2, lines 4–6: raise σ_i to σ̂ = σ_i(1+γ) by adding noise.

    ``γ = min(S_churn/N, √2 − 1)`` inside [S_tmin, S_tmax], else 0; ``x̂ = x + √(σ̂² − σ²)·S_noise·z``.
    """
    sigma = sigmas[i]
    gamma = 0.0
    if s_churn > 0 and s_tmin <= sigma <= s_tmax:
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1)
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    z = noise_sampler(sigma, sigmas[i + 1]) * s_noise
    return x + z * (sigma_hat**2 - sigma**2) ** 0.5, sigma_hat


# ---------------------------------------------------------------------------------------------
# Deterministic samplers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model, x, sigmas, extra_args=None, callback=None, disable=None,
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, **opts,
):
    """Euler steps on the PF-ODE (Karras et al. 2022, Algorithm 2 without the Heun correction).

    ``x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i)·d(x̂_i, σ̂_i)``; with ``s_churn = 0`` (default) σ̂ = σ.
    One model call per step.
    """
    sigmas, extra, s_in, noise_sampler = _prepare(x, sigmas, extra_args, opts)
    for i in _steps(len(sigmas) - 1, disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    """DDIM with η = 0 (Song et al. 2021, Eq. 12), which in σ space is exactly Euler.

    ``x_{n+1} = D_n + σ_{n+1}·ε̂_n = x_n + (σ_{n+1} − σ_n)·ε̂_n`` (ALGORITHMS.md §0.2); ComfyUI's
    ``"ddim"`` sampler is its Euler sampler, and so is this one.
    """
    return sample_euler(model, x, sigmas, extra_args, callback, disable, **opts)


@torch.no_grad()
def sample_heun(
    model, x, sigmas, extra_args=None, callback=None, disable=None,
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, **opts,
):
    """Heun's 2nd-order method on the PF-ODE (Karras et al. 2022, Algorithm 2).

    ``x' = x̂ + h·d``, ``x_{i+1} = x̂ + h·(d + d(x', σ_{i+1}))/2`` with ``h = σ_{i+1} − σ̂_i``; the
    last step to σ = 0 is a plain Euler step (no second model call), as in k-diffusion.
    """
    sigmas, extra, s_in, noise_sampler = _prepare(x, sigmas, extra_args, opts)
    for i in _steps(len(sigmas) - 1, disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    model, x, sigmas, extra_args=None, callback=None, disable=None,
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, **opts,
):
    """DPM-Solver-2-style midpoint method in σ (k-diffusion's ``sample_dpm_2``; Lu et al. 2022).

    Midpoint ``σ_mid = √(σ̂_i·σ_{i+1})`` (geometric mean), ``x' = x̂ + (σ_mid − σ̂)·d``,
    ``x_{i+1} = x̂ + (σ_{i+1} − σ̂)·d(x', σ_mid)``; Euler (one call) on the last step to σ = 0.
    """
    sigmas, extra, s_in, noise_sampler = _prepare(x, sigmas, extra_args, opts)
    for i in _steps(len(sigmas) - 1, disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        sigma_next = sigmas[i + 1]
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
            continue
        sigma_mid = (torch.as_tensor(sigma_hat).log().lerp(sigma_next.log(), 0.5)).exp()
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra))
        x = x + d_2 * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) in σ space.

    With λ = −log σ, h = λ_{i+1} − λ_i: ``x_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·D̃_i`` where
    ``D̃_i = (1 + 1/(2r))·D_i − (1/(2r))·D_{i−1}``, ``r = h_{i−1}/h``; the first step and the step
    to σ = 0 use ``D̃ = D_i`` (first order). One model call per step.
    """
    sigmas, extra, s_in, _ = _prepare(x, sigmas, extra_args, opts)
    old_denoised = None
    for i in _steps(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, x, i, sigma, sigma, denoised)
        ratio = sigma_next / sigma  # = e^{−h}
        if old_denoised is None or sigma_next == 0:
            x = ratio * x - (ratio - 1) * denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_last = sigmas[i - 1].log() - sigma.log()
            r = h_last / h
            d_den = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = ratio * x - (ratio - 1) * d_den
        old_denoised = denoised
    return x


# ---------------------------------------------------------------------------------------------
# Ancestral (stochastic) samplers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, **opts,
):
    """Euler-ancestral (k-diffusion): Euler step to σ_down, then add ``σ_up·s_noise·z``.

    ``(σ_down, σ_up) = get_ancestral_step(σ_i, σ_{i+1}, η)``; ``x ← x + (σ_down − σ_i)·d + σ_up·z``
    (ALGORITHMS.md §0.2; η = 1 is DDIM with η = 1). When σ_down = 0 the result is ``D`` itself.
    """
    sigmas, extra, s_in, noise_sampler = _prepare(x, sigmas, extra_args, opts)
    for i in _steps(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta=eta)
        _report(callback, x, i, sigma, sigma, denoised)
        if sigma_down == 0:
            x = denoised
            continue
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def _ddpm_step(x_vp, sigma, sigma_next, eps, noise_sampler):
    """DDPM ancestral step x_t → x_{t−1} in VP space (Ho et al. 2020, Eq. 11 + posterior σ̃ of Eq. 7).

    ``ᾱ = 1/(1+σ²)``, ``α = ᾱ_t/ᾱ_{t−1}``; ``μ = (x_t − (1−α)/√(1−ᾱ_t)·ε̂)/√α`` and, unless
    σ_next = 0, ``+ √((1−α)(1−ᾱ_{t−1})/(1−ᾱ_t))·z``.
    """
    a_t = 1 / (1 + sigma**2)
    a_prev = 1 / (1 + sigma_next**2)
    alpha = a_t / a_prev
    mu = (x_vp - (1 - alpha) * eps / (1 - a_t).sqrt()) / alpha.sqrt()
    if sigma_next > 0:
        mu = mu + ((1 - alpha) * (1 - a_prev) / (1 - a_t)).sqrt() * noise_sampler(sigma, sigma_next)
    return mu


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    """Ancestral DDPM sampling in σ space (ComfyUI's ``sample_ddpm``).

    Each step maps ``x^VP = x/√(1+σ²)`` (ALGORITHMS.md §0.1), takes a DDPM posterior step with
    ``ε̂ = (x − D)/σ`` (see ``_ddpm_step``), and maps back with ``√(1+σ_next²)`` (not at σ_next = 0,
    where the step returns D exactly).
    """
    sigmas, extra, s_in, noise_sampler = _prepare(x, sigmas, extra_args, opts)
    for i in _steps(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, x, i, sigma, sigma, denoised)
        x_vp = x / (1 + sigma**2).sqrt()
        x = _ddpm_step(x_vp, sigma, sigma_next, to_d(x, sigma, denoised), noise_sampler)
        if sigma_next != 0:
            x = x * (1 + sigma_next**2).sqrt()
    return x


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
}


def sample(name: str, model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    """Run the sampler registered as ``name`` in ``SAMPLERS`` (ValueError for unknown names)."""
    try:
        fn = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **opts)
