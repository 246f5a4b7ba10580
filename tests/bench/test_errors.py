"""``bench errors --drift``: the end-to-end drift decomposition on toy denoisers with known errors."""

import torch

from qcorrect.bench.errors import drift_decomposition


def gaussian_fp(x, sigma, **extra):
    """Exact denoiser of unit-variance Gaussian data: D = x / (1 + σ²)."""
    return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def with_eps_error(err):
    """A 'quantized' denoiser whose ε differs from the FP one by err(x): D_q = D − σ·err(x)."""
    def q(x, sigma, **extra):
        return gaussian_fp(x, sigma) - sigma.reshape(-1, 1, 1, 1) * err(x)
    return q


SIGMAS = torch.tensor([14.6, 6.0, 3.0, 1.5, 0.7, 0.3, 0.0])


def _noise(seed, n=32):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]


def test_constant_channel_bias_is_fully_systematic_and_damped():
    bias = torch.tensor([0.05, -0.02, 0.03]).reshape(1, 3, 1, 1)
    res = drift_decomposition(gaussian_fp, with_eps_error(lambda x: bias.expand_as(x)), SIGMAS,
                              _noise(0), {}, _noise(1), {}, batch_size=8)
    assert len(res["rows"]) == SIGMAS.numel() - 1
    for row in res["rows"]:
        assert row["drift_mse"] > 0
        assert row["left_after_channel_mean"] < 1e-6   # the same drift for every sample
        assert row["left_after_position_mean"] < 1e-6
    # this ODE contracts perturbations by √(1+σ_end²)/√(1+σ_n²): Σ h·e over-predicts the final error
    assert res["sum_over_final"] > 2.0
    assert res["cosine_final_vs_sum"] > 0.99  # same direction (a constant bias), only damped


def test_sample_specific_error_is_not_removable_by_means():
    res = drift_decomposition(gaussian_fp, with_eps_error(lambda x: 0.05 * torch.sin(37.0 * x)), SIGMAS,
                              _noise(0, 64), {}, _noise(1, 64), {}, batch_size=16)
    last = res["rows"][-1]
    assert last["left_after_channel_mean"] > 0.9
    assert last["left_after_position_mean"] > 0.9   # position means of 64 samples fit noise, never remove it
    assert res["final_mse"] > 0


def test_batching_does_not_change_the_result():
    err = lambda x: 0.02 * torch.tanh(3 * x) + 0.01  # noqa: E731
    a = drift_decomposition(gaussian_fp, with_eps_error(err), SIGMAS, _noise(2, 12), {}, _noise(3, 12), {}, batch_size=5)
    b = drift_decomposition(gaussian_fp, with_eps_error(err), SIGMAS, _noise(2, 12), {}, _noise(3, 12), {}, batch_size=12)
    assert abs(a["final_mse"] - b["final_mse"]) < 1e-9 * max(1.0, a["final_mse"])
    for ra, rb in zip(a["rows"], b["rows"]):
        assert abs(ra["left_after_channel_mean"] - rb["left_after_channel_mean"]) < 1e-6


from qcorrect.bench.errors import correction_ceiling  # noqa: E402

INF = float("inf")


def test_ceiling_channel_mean_removes_a_constant_bias_and_perfect_removes_everything():
    bias = torch.tensor([0.05, -0.02, 0.03]).reshape(1, 3, 1, 1)
    q = with_eps_error(lambda x: bias.expand_as(x) + 0.02 * torch.sin(37.0 * x))
    res = correction_ceiling(gaussian_fp, q, SIGMAS, _noise(4, 24), {},
                             [("mean", "channel_mean", 0.0, INF), ("perfect", "perfect", 0.0, INF),
                              ("early", "perfect", 3.0, INF), ("late", "perfect", 0.0, 3.0),
                              ("gain", "channel_gain", 0.0, INF), ("pos", "position_mean", 0.0, INF)], batch_size=7)
    naive = res["naive"].mean()
    assert naive > 0 and res["perfect"].max() < 1e-12
    assert res["mean"].mean() < 0.5 * naive  # the bias was most of the error
    assert res["gain"].mean() < res["naive"].mean() and res["pos"].mean() < res["naive"].mean()
    # correcting only part of the trajectory leaves the other part's error: between perfect and naive
    for part in ("early", "late"):
        assert 1e-12 < res[part].mean() < naive


def test_ceiling_does_not_depend_on_the_batch_size():
    q = with_eps_error(lambda x: 0.02 * torch.tanh(3 * x) + 0.01)
    v = [("mean", "channel_mean", 0.0, INF), ("gain", "channel_gain", 1.0, INF)]
    a = correction_ceiling(gaussian_fp, q, SIGMAS, _noise(5, 10), {}, v, batch_size=3)
    b = correction_ceiling(gaussian_fp, q, SIGMAS, _noise(5, 10), {}, v, batch_size=10)
    for k in ("naive", "mean", "gain"):
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-12)


def test_ceiling_shrink_applies_a_fraction_of_the_correction():
    bias = torch.tensor([0.05, -0.02, 0.03]).reshape(1, 3, 1, 1)
    q = with_eps_error(lambda x: bias.expand_as(x))  # a pure constant bias: the exact mean removes all of it
    v = [("full", "channel_mean", 0.0, INF), ("half", "channel_mean", 0.0, INF, 0.5),
         ("none", "channel_mean", 0.0, INF, 0.0)]
    res = correction_ceiling(gaussian_fp, q, SIGMAS, _noise(6, 8), {}, v, batch_size=8)
    assert res["full"].max() < 1e-12
    assert torch.allclose(res["none"], res["naive"])
    # the ODE is linear here, so half the correction leaves half the drift: a quarter of the error
    assert torch.allclose(res["half"], 0.25 * res["naive"], rtol=1e-4)
