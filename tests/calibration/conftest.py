"""Synthetic setting with a known truth for the correction engine's tests.

"FP" model: the exact denoiser of Gaussian data x0 ~ N(m_c, s_c²) (element-wise, per channel):
``D(x, σ) = m + s²/(s² + σ²)·(x − m)``. "Quantized" model: the same with an injected ε-error
``ε̂ = (1 + k)·g_c·ε + μ_c + r·z(x)``, where z(x) = √2·sin(5x + φ) with a fixed random phase φ per
element is a deterministic, zero-mean, unit-variance pseudo-noise with a small Jacobian
(quantization error is a smooth deterministic function of x).
"""

from types import SimpleNamespace

import pytest
import torch

from qcorrect.reference.schedules import get_sigmas
from qcorrect.reference.sigmas import scaled_linear_sigmas

C = 4


class GaussianDenoiser:
    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.var = torch.as_tensor(std, dtype=torch.float32) ** 2
        self.calls = 0

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        m = self.mean.reshape(1, -1, *([1] * (x.ndim - 2)))
        v = self.var.reshape(1, -1, *([1] * (x.ndim - 2)))
        return m + v / (v + s**2) * (x - m)


class InjectedError:
    def __init__(self, fp, gain=None, bias=None, k=0.0, noise=0.0):
        self.fp, self.k, self.noise = fp, k, noise
        self.gain = torch.ones(C) if gain is None else torch.as_tensor(gain, dtype=torch.float32)
        self.bias = torch.zeros(C) if bias is None else torch.as_tensor(bias, dtype=torch.float32)

    def __call__(self, x, sigma, **extra):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        eps = (x - self.fp(x, sigma)) / s
        e_hat = (1 + self.k) * self.gain.reshape(shape) * eps + self.bias.reshape(shape)
        if self.noise:
            phase = torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(7)) * 6.2832
            e_hat = e_hat + self.noise * torch.sin(x * 5.0 + phase) * 2**0.5
        return x - s * e_hat


@pytest.fixture(scope="session")
def synth():
    grid = scaled_linear_sigmas()
    fp = GaussianDenoiser([0.0, 0.5, -0.3, 0.2], [1.0, 0.8, 1.2, 0.5])
    fp0 = GaussianDenoiser([0.0] * C, [1.0, 0.8, 1.2, 0.5])  # centred data: ε has zero channel means
    bias = torch.tensor([0.05, -0.03, 0.02, 0.04])
    return SimpleNamespace(
        C=C, grid=grid, fp=fp, fp0=fp0, bias=bias,
        GaussianDenoiser=GaussianDenoiser, InjectedError=InjectedError,
        # a W4A8-like error: mostly a constant bias, some correlated noise, some random noise
        q=InjectedError(fp, bias=bias, k=0.03, noise=0.05),
        sigmas=lambda steps=10, scheduler="karras": get_sigmas(scheduler, grid, steps),
        noise=lambda n, seed, hw=8: torch.randn(n, C, hw, hw, generator=torch.Generator().manual_seed(seed)),
    )
