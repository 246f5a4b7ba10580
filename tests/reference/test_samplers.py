"""Samplers on a Gaussian data distribution, where the exact denoiser and PF-ODE are closed-form.

x0 ~ N(m, s²) per dimension, x = x0 + σ·ε  ⇒  D(x, σ) = (s²·x + σ²·m)/(s² + σ²) and the ODE
dx/dσ = (x − D)/σ has the solution x(σ) = m + (x(σ0) − m)·√((s² + σ²)/(s² + σ0²)).
"""

import math

import pytest
import torch

from qcorrect.reference import samplers as S
from qcorrect.reference.schedules import get_sigmas
from qcorrect.reference.sigmas import scaled_linear_sigmas

M = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
SD = torch.tensor([0.5, 2.0, 1.0, 0.3], dtype=torch.float64)
DETERMINISTIC = ["euler", "heun", "dpm_2", "dpmpp_2m", "ddim"]
ANCESTRAL = ["euler_ancestral", "ddpm"]


class GaussianDenoiser:
    """Exact denoiser for N(M, SD²); counts calls and records the σ's it is asked about."""

    def __init__(self):
        self.calls = 0
        self.sigmas = []

    def __call__(self, x, sigma, **extra):
        assert not extra, f"unexpected model kwargs {extra}"
        self.calls += 1
        self.sigmas.append(float(sigma[0]))
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (SD**2 * x + sig**2 * M) / (SD**2 + sig**2)


def exact_flow(x, sigma_from, sigma_to):
    return M + (x - M) * ((SD**2 + sigma_to**2) / (SD**2 + sigma_from**2)).sqrt()


def log_sigmas(n, hi=10.0, lo=0.1):
    return torch.linspace(math.log(hi), math.log(lo), n + 1, dtype=torch.float64).exp()


def karras(n):
    return get_sigmas("karras", scaled_linear_sigmas(), n).double()


def noise_at(sigma, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return M + torch.randn(n, 4, generator=g, dtype=torch.float64) * (SD**2 + sigma**2).sqrt()


# ------------------------------------------------------------------- deterministic samplers


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2", "dpmpp_2m"])
def test_pf_ode_order_of_convergence(name):
    x0 = noise_at(10.0, 16)
    errs = []
    for n in (20, 40, 80):
        sig = log_sigmas(n)
        out = S.sample(name, GaussianDenoiser(), x0, sig)
        errs.append((out - exact_flow(x0, sig[0], sig[-1])).abs().max().item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    if name == "euler":  # first order: error halves when steps double
        assert all(1.7 < r < 2.3 for r in ratios), (errs, ratios)
    else:  # second order: error quarters
        assert all(3.4 < r < 4.6 for r in ratios), (errs, ratios)


def test_second_order_samplers_beat_euler():
    x0 = noise_at(10.0, 16)
    sig = log_sigmas(40)
    ref = exact_flow(x0, sig[0], sig[-1])
    err = {n: (S.sample(n, GaussianDenoiser(), x0, sig) - ref).abs().max() for n in ["euler", "heun", "dpm_2", "dpmpp_2m"]}
    for name in ["heun", "dpm_2", "dpmpp_2m"]:
        assert err[name] < err["euler"] / 10, err


@pytest.mark.parametrize("name,steps", [("euler", 100), ("ddim", 100), ("heun", 40), ("dpm_2", 40), ("dpmpp_2m", 40)])
def test_deterministic_samplers_reach_data_distribution(name, steps):
    sig = karras(steps)
    x = noise_at(float(sig[0]), 8000)
    out = S.sample(name, GaussianDenoiser(), x, sig)
    # The map is the ODE flow from σ_max to 0 (linear per dimension) up to discretisation error ...
    slope = ((out - M) * (x - M)).sum(0) / (x - M).square().sum(0)
    exact_slope = (exact_flow(x, sig[0], 0.0) - M)[0] / (x - M)[0]
    tol = 0.03 if name in ("euler", "ddim") else 0.01
    assert torch.allclose(slope / exact_slope, torch.ones(4, dtype=torch.float64), atol=tol)
    # ... so the samples follow N(M, SD²).
    assert torch.allclose(out.mean(0), M, atol=0.05)
    assert torch.allclose(out.std(0) / SD, torch.ones(4, dtype=torch.float64), atol=0.04)


def test_euler_equals_ddim_exactly():
    x = noise_at(14.6, 32)
    sig = get_sigmas("normal", scaled_linear_sigmas(), 12)
    a = S.sample_euler(GaussianDenoiser(), x, sig)
    b = S.sample_ddim(GaussianDenoiser(), x, sig)
    assert torch.equal(a, b)
    assert torch.equal(S.sample("ddim", GaussianDenoiser(), x, sig), a)


def test_heun_and_dpm2_model_calls_match_k_diffusion():
    sig = karras(6)
    heun, dpm2 = GaussianDenoiser(), GaussianDenoiser()
    S.sample_heun(heun, noise_at(14.6, 4), sig)
    S.sample_dpm_2(dpm2, noise_at(14.6, 4), sig)
    n = len(sig) - 1
    assert heun.calls == dpm2.calls == 2 * n - 1  # no second evaluation on the step to σ = 0
    s = sig.tolist()
    expected_heun = [v for i in range(n - 1) for v in (s[i], s[i + 1])] + [s[n - 1]]
    expected_dpm2 = [v for i in range(n - 1) for v in (s[i], math.sqrt(s[i] * s[i + 1]))] + [s[n - 1]]
    assert heun.sigmas == pytest.approx(expected_heun)
    assert dpm2.sigmas == pytest.approx(expected_dpm2)


def test_dpmpp_2m_uses_previous_denoised():
    sig = torch.tensor([8.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    x = noise_at(8.0, 4)
    model = GaussianDenoiser()
    d0 = model(x, sig[0].expand(4))
    x1 = (sig[1] / sig[0]) * x + (1 - sig[1] / sig[0]) * d0  # first step: first order
    d1 = model(x1, sig[1].expand(4))
    h, h_last = math.log(sig[1] / sig[2]), math.log(sig[0] / sig[1])
    r = h_last / h
    d_mix = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    x2 = (sig[2] / sig[1]) * x1 + (1 - sig[2] / sig[1]) * d_mix
    x3 = model(x2, sig[2].expand(4))  # last step to 0: x = D
    counting = GaussianDenoiser()
    out = S.sample_dpmpp_2m(counting, x, sig)
    assert counting.calls == 3
    assert torch.allclose(out, x3, atol=1e-12, rtol=0)


# ------------------------------------------------------------------- ancestral samplers


@pytest.mark.parametrize("name", ANCESTRAL)
def test_ancestral_samplers_reach_data_distribution(name):
    sig = karras(200)
    x = noise_at(float(sig[0]), 20000, seed=3)
    out = S.sample(name, GaussianDenoiser(), x, sig, seed=11)
    assert torch.allclose(out.mean(0), M, atol=0.05)
    assert torch.allclose(out.std(0) / SD, torch.ones(4, dtype=torch.float64), atol=0.04)


def test_euler_ancestral_eta0_is_euler():
    x, sig = noise_at(14.6, 8), karras(10)
    a = S.sample_euler_ancestral(GaussianDenoiser(), x, sig, eta=0.0, seed=0)
    b = S.sample_euler(GaussianDenoiser(), x, sig)
    assert torch.allclose(a, b, atol=1e-12)


def test_get_ancestral_step():
    down, up = S.get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0), eta=1.0)
    assert float(up) == pytest.approx(math.sqrt(1 * (4 - 1) / 4))
    assert float(down) ** 2 + float(up) ** 2 == pytest.approx(1.0)
    assert S.get_ancestral_step(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    down, up = S.get_ancestral_step(torch.tensor(2.0), torch.tensor(0.0))
    assert float(down) == 0 and float(up) == 0


def test_to_d_is_eps():
    x, eps = torch.randn(3, 4), torch.randn(3, 4)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    x0 = x - sigma[:, None] * eps
    assert torch.allclose(S.to_d(x, sigma, x0), eps, atol=1e-6)


def test_euler_ancestral_single_step_uses_seeded_noise():
    sig = torch.tensor([3.0, 1.0], dtype=torch.float64)
    x = noise_at(3.0, 5)
    model = GaussianDenoiser()
    den = model(x, sig[0].expand(5))
    down, up = S.get_ancestral_step(sig[0], sig[1])
    z = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(42 + 1))  # ComfyUI: seed + 1 on CPU
    expected = x + (x - den) / sig[0] * (down - sig[0]) + z * up
    assert torch.allclose(S.sample_euler_ancestral(GaussianDenoiser(), x, sig, seed=42), expected, atol=1e-12)


def test_ddpm_last_step_returns_denoised():
    sig = torch.tensor([0.7, 0.0], dtype=torch.float64)
    x = noise_at(0.7, 5)
    out = S.sample_ddpm(GaussianDenoiser(), x, sig, seed=0)
    assert torch.allclose(out, GaussianDenoiser()(x, sig[0].expand(5)), atol=1e-12)


# ------------------------------------------------------------------- noise, seeds, callback


@pytest.mark.parametrize("name", ANCESTRAL)
def test_seed_makes_runs_reproducible(name):
    x, sig = noise_at(14.6, 6), karras(8)
    a = S.sample(name, GaussianDenoiser(), x, sig, seed=5)
    b = S.sample(name, GaussianDenoiser(), x, sig, seed=5)
    c = S.sample(name, GaussianDenoiser(), x, sig, seed=6)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    gen = S.sample(name, GaussianDenoiser(), x, sig, generator=torch.Generator().manual_seed(7))
    assert torch.equal(gen, c)  # an explicit generator = seed + 1 on CPU, like ComfyUI
    # ComfyUI passes the seed in extra_args; it must not reach the model.
    d = S.sample(name, GaussianDenoiser(), x, sig, extra_args={"seed": 5})
    assert torch.equal(a, d)


@pytest.mark.parametrize("name", ANCESTRAL)
def test_custom_noise_sampler_is_used(name):
    x, sig = noise_at(14.6, 6), karras(8)
    seen = []

    def zeros(sigma, sigma_next):
        seen.append((float(sigma), float(sigma_next)))
        return torch.zeros_like(x)

    S.sample(name, GaussianDenoiser(), x, sig, noise_sampler=zeros)
    assert seen == [(float(sig[i]), float(sig[i + 1])) for i in range(len(sig) - 2)]


def test_euler_churn_is_seeded_and_raises_sigma():
    x, sig = noise_at(14.6, 6), karras(10)
    hats = []
    a = S.sample_euler(GaussianDenoiser(), x, sig, s_churn=1.0, seed=1, callback=lambda p: hats.append(p))
    b = S.sample_euler(GaussianDenoiser(), x, sig, s_churn=1.0, seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, S.sample_euler(GaussianDenoiser(), x, sig))
    assert all(float(p["sigma_hat"]) > float(p["sigma"]) for p in hats)


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_callback_once_per_step(name):
    x, sig = noise_at(14.6, 3), karras(7)
    payloads = []
    S.sample(name, GaussianDenoiser(), x, sig, callback=payloads.append, seed=0)
    assert [p["i"] for p in payloads] == list(range(len(sig) - 1))
    for i, p in enumerate(payloads):
        assert set(p) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(p["sigma"]) == float(sig[i]) and p["x"].shape == x.shape
    assert torch.equal(payloads[0]["x"], x)


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_model_receives_batched_sigma_and_extra_args(name):
    x, sig = noise_at(14.6, 3).float(), karras(4).float()
    seen = []

    def model(xx, sigma, cond=None, cfg_scale=None):
        seen.append((sigma.shape, cond, cfg_scale))
        return xx * 0.5

    out = S.sample(name, model, x, sig, extra_args={"cond": "c", "cfg_scale": 2.0, "seed": 1})
    assert out.shape == x.shape and out.dtype == torch.float32
    assert seen and all(s == (torch.Size([3]), "c", 2.0) for s in seen)


def test_registry_and_errors():
    assert set(S.SAMPLERS) == {"euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "ddim", "ddpm"}
    with pytest.raises(ValueError, match="unknown sampler"):
        S.sample("nope", GaussianDenoiser(), noise_at(1.0, 2), karras(2))
    with pytest.raises(TypeError, match="unexpected sampler options"):
        S.sample("dpmpp_2m", GaussianDenoiser(), noise_at(1.0, 2), karras(2), bogus=1)


def test_sigmas_as_list():
    x = noise_at(4.0, 3)
    sig = [4.0, 2.0, 1.0, 0.0]
    a = S.sample("heun", GaussianDenoiser(), x, sig)
    b = S.sample("heun", GaussianDenoiser(), x, torch.tensor(sig))
    assert torch.equal(a, b)
