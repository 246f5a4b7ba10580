"""Schedules: shape, endpoints, monotonicity, and agreement with their ComfyUI definitions."""

import math

import numpy as np
import pytest
import torch

from qcorrect.reference.schedules import SCHEDULERS, get_sigmas
from qcorrect.reference.sigmas import scaled_linear_sigmas

GRID = scaled_linear_sigmas()
SMIN, SMAX = float(GRID[0]), float(GRID[-1])


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_shape_monotonic_and_ends_in_zero(name, steps):
    sig = get_sigmas(name, GRID, steps)
    assert sig.shape == (steps + 1,) and sig.dtype == torch.float32
    assert sig[-1] == 0 and bool((sig[:-1] > 0).all())
    assert bool((sig[1:] < sig[:-1]).all())
    assert float(sig[0]) == pytest.approx(SMAX, rel=1e-6)
    assert float(sig[:-1].min()) >= SMIN * (1 - 1e-6)


@pytest.mark.parametrize("name", ["normal", "karras", "exponential"])
def test_reaches_sigma_min(name):
    assert float(get_sigmas(name, GRID, 10)[-2]) == pytest.approx(SMIN, rel=1e-5)


def test_karras_formula():
    n, rho = 12, 7.0
    sig = get_sigmas("karras", GRID, n)[:-1].double()
    inv = sig ** (1 / rho)  # Karras et al. 2022 Eq. 5: σ^{1/ρ} is linear in i
    expected = SMAX ** (1 / rho) + torch.arange(n, dtype=torch.float64) / (n - 1) * (SMIN ** (1 / rho) - SMAX ** (1 / rho))
    assert torch.allclose(inv, expected, rtol=1e-6)


def test_exponential_is_log_linear():
    n = 9
    logs = get_sigmas("exponential", GRID, n)[:-1].double().log()
    expected = torch.linspace(math.log(SMAX), math.log(SMIN), n, dtype=torch.float64)
    assert torch.allclose(logs, expected, atol=1e-5)


def test_simple_is_evenly_strided_over_the_grid():
    sig = get_sigmas("simple", GRID, 10)
    assert torch.equal(sig[:-1], GRID[[999 - 100 * i for i in range(10)]])
    assert torch.equal(get_sigmas("simple", GRID, 1000)[:-1], GRID.flip(0))
    sig7 = get_sigmas("simple", GRID, 7)
    assert torch.equal(sig7[:-1], GRID[[len(GRID) - 1 - int(i * 1000 / 7) for i in range(7)]])


def test_normal_interpolates_log_sigma_in_t():
    n = 10
    sig = get_sigmas("normal", GRID, n)[:-1].double().numpy()
    t = np.linspace(999.0, 0.0, n)
    expected = np.exp(np.interp(t, np.arange(1000), np.log(GRID.double().numpy())))
    assert np.allclose(sig, expected, rtol=1e-5)
    # With one step per training step it is the grid itself, top to bottom.
    assert torch.allclose(get_sigmas("normal", GRID, 1000)[:-1], GRID.flip(0), rtol=1e-5)


def test_other_grids():
    grid = torch.linspace(0.1, 10.0, 100)
    sig = get_sigmas("simple", grid, 4)
    assert torch.allclose(sig, torch.tensor([10.0, grid[74], grid[49], grid[24], 0.0]))
    assert float(get_sigmas("karras", grid, 5)[0]) == pytest.approx(10.0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", None])
def test_bad_steps(bad):
    with pytest.raises(ValueError, match="steps"):
        get_sigmas("normal", GRID, bad)


def test_unknown_scheduler():
    with pytest.raises(ValueError, match="unknown scheduler"):
        get_sigmas("beta", GRID, 10)


def test_accepts_numpy_int_steps():
    assert get_sigmas("karras", GRID, np.int64(5)).shape == (6,)
