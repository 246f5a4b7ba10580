"""GPTQ-style error-compensated rounding into the existing storage (issue 11)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcorrect.quant import QuantizationError, load_quantized, quantize_model, quantized_layers, qtype, save_quantized
from qcorrect.quant.gptq import dampened, gptq_quantize, output_error
from qcorrect.quant.weights import blob_nbytes, dequantize_weight, quantize_weight, storage_shapes

TYPES = ["uint4_g64", "int4_g64", "uint4_g32", "uint4", "int4", "int8"]


def correlated_rows(n, k, seed, rank=None):
    """Inputs with a strongly anisotropic second moment, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(99)) / k**0.5
    x = torch.randn(n, k, generator=g) @ mix + 0.2 * torch.randn(n, k, generator=g)
    return x * torch.linspace(0.2, 3.0, k)  # unequal channel energies


def rtn(w, qt):
    return dequantize_weight(quantize_weight(w, qt), qt, w.shape, torch.float32)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("act_order", [True, False])
def test_diagonal_second_moments_give_round_to_nearest_exactly(name, act_order):
    qt = qtype(name)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.1)
    got, want = gptq_quantize(w, h, qt, act_order=act_order), quantize_weight(w, qt)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("act_order", [True, False])
def test_lower_held_out_output_error_than_round_to_nearest_same_storage(name, act_order):
    qt = qtype(name)
    k, out = 256, 48
    w = 0.05 * torch.randn(out, k, generator=torch.Generator().manual_seed(2))
    fit, hold = correlated_rows(3000, k, 3), correlated_rows(1500, k, 4)
    h, h_hold = fit.T @ fit, hold.T @ hold
    storage = gptq_quantize(w, h, qt, act_order=act_order)
    want = storage_shapes(qt, out, k)
    assert {n: (tuple(t.shape), t.dtype) for n, t in storage.items()} == want
    q = dequantize_weight(storage, qt, w.shape, torch.float32)
    assert output_error(w, q, h_hold) < 0.8 * output_error(w, rtn(w, qt), h_hold)


def test_conv_as_a_matrix_over_unfolded_inputs():
    torch.manual_seed(5)
    conv = nn.Conv2d(64, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(40, 64, 6, 6).cumsum(dim=1) / 8  # correlated channels
    rows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 64 * 9)
    fit, hold = rows[: 20 * 36], rows[20 * 36 :]
    qt = qtype("uint4_g64")
    q = dequantize_weight(gptq_quantize(conv.weight, fit.T @ fit, qt), qt, conv.weight.shape, torch.float32)
    # the output error of the real convolution on the held-out half, not just the quadratic form
    xh = x[20:]
    err_g = (F.conv2d(xh, q, None, 1, 1) - F.conv2d(xh, conv.weight, None, 1, 1)).pow(2).sum()
    err_r = (F.conv2d(xh, rtn(conv.weight, qt), None, 1, 1) - F.conv2d(xh, conv.weight, None, 1, 1)).pow(2).sum()
    assert err_g < 0.8 * err_r
    assert abs(output_error(conv.weight, q, hold.T @ hold) - float(err_g)) < 1e-3 * float(err_g)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.a = nn.Linear(128, 64)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)


def test_gptq_storage_loads_with_load_quantized(tmp_path):
    m = Tiny()
    quantize_model(m, "W4A16")
    layer = quantized_layers(m)["a"]
    rows = correlated_rows(800, 128, 7)
    w = Tiny().a.weight
    layer.set_storage(gptq_quantize(w, rows.T @ rows, layer.wqtype))
    assert layer.weight.numel() == blob_nbytes(layer.wqtype, layer.weight_shape)
    save_quantized(m, str(tmp_path / "g.safetensors"))
    back = load_quantized(Tiny(), str(tmp_path / "g.safetensors"))
    assert torch.equal(quantized_layers(back)["a"].weight, layer.weight)
    x = torch.randn(3, 128)
    assert torch.equal(back.a(x), m.a(x))


def _factors(dtype):
    from qcorrect.quant.gptq import HessianFactors

    return (lambda h: None) if dtype is None else (lambda h: HessianFactors(h, 0.01, dtype))


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["float64", "float32"])
def test_dead_inputs_keep_their_weights_and_round_to_nearest(dtype):
    qt = qtype("uint4_g64")
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(8))
    rows = correlated_rows(600, 128, 9)
    rows[:, :64] = 0  # the first group never sees an input
    h = rows.T @ rows
    q = dequantize_weight(gptq_quantize(w, h, qt, factors=_factors(dtype)(h)), qt, w.shape, torch.float32)
    assert torch.equal(q[:, :64], rtn(w, qt)[:, :64])  # not zeroed, not moved


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["float64", "float32"])
def test_too_few_rows_for_the_statistics_still_quantizes_with_damping(dtype):
    qt = qtype("uint4_g64")
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(10))
    rows = correlated_rows(20, 128, 11)  # rank 20 < K = 128: singular without damping
    h = rows.T @ rows
    q = dequantize_weight(gptq_quantize(w, h, qt, factors=_factors(dtype)(h)), qt, w.shape, torch.float32)
    assert torch.isfinite(q).all()
    assert output_error(w, q, h) < output_error(w, rtn(w, qt), h)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_refused_naming_the_layer(bad):
    h = torch.eye(128)
    h[3, 5] = bad
    with pytest.raises(QuantizationError, match="'blk.a'.*NaN or inf"):
        gptq_quantize(torch.randn(4, 128), h, "uint4_g64", layer="blk.a")


def test_all_zero_statistics_and_wrong_shapes_are_refused():
    with pytest.raises(QuantizationError, match="no non-zero input"):
        gptq_quantize(torch.randn(4, 128), torch.zeros(128, 128), "uint4_g64")
    with pytest.raises(QuantizationError, match=r"\(128, 128\)"):
        gptq_quantize(torch.randn(4, 128), torch.eye(64), "uint4_g64")


def test_damping_is_relative_to_the_mean_diagonal():
    h = torch.diag(torch.tensor([2.0, 4.0, 0.0, 6.0]))
    hd, dead = dampened(h, 0.5)
    assert dead.tolist() == [False, False, True, False]
    assert torch.allclose(torch.diagonal(hd), torch.tensor([4.0, 6.0, 3.0, 8.0], dtype=torch.float64))


def test_shared_factorizations_give_the_same_solves_as_standalone_calls():
    """HessianFactors: one dampened H and one factor per column order serve every solve from that H (the
    layer's own type, int8, 3 bits, both orders) and the low-rank branch's L — the same values, bit for bit."""
    from qcorrect.quant.gptq import HessianFactors
    from qcorrect.quant.lowrank import weighted_svd

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 128, generator=g) * torch.linspace(0.2, 2.0, 128)
    h = (x.T @ x).float()
    w = torch.randn(32, 128, generator=g) * 0.05
    shared = HessianFactors(h, 0.01)
    for qt, ao in (("uint4_g64", True), ("uint4_g64", False), ("int8", True), ("uint3_g64", True)):
        alone = gptq_quantize(w, h, qt, 0.01, ao)
        again = gptq_quantize(w, h, qt, 0.01, ao, factors=shared)
        assert alone.keys() == again.keys() and all(torch.equal(alone[k], again[k]) for k in alone), (qt, ao)
    assert set(shared._upper) == {True, False}  # one factor per order, reused
    resid = torch.randn(32, 128, generator=g) * 1e-3
    for a, b in zip(weighted_svd(resid, h, 0.01), weighted_svd(resid, h, 0.01, shared)):
        assert torch.equal(a, b)
    shared.drop("act_order", "natural", "dampened", "lower")
    assert not shared._upper and shared._hd is None and shared._low is None
    assert torch.equal(shared.lower(), torch.linalg.cholesky(dampened(h, 0.01)[0]))  # recomputed on demand


def test_wide_layers_are_solved_in_float32_at_float64_quality():
    """solve_dtype: float32 from FLOAT32_FROM inputs on (every factor, the sweep, the held-out errors);
    on the same statistics it rounds almost every weight the same way and lands within 1e-3 of float64's
    held-out error, with half the bytes per K×K factor."""
    from qcorrect.quant.gptq import FLOAT32_FROM, HessianFactors, solve_dtype
    from qcorrect.quant.lowrank import weighted_svd

    assert solve_dtype(FLOAT32_FROM - 1) == torch.float64 and solve_dtype(FLOAT32_FROM) == torch.float32
    assert solve_dtype(10**6, None) == torch.float64 and solve_dtype(1, 0) == torch.float32
    k, out = 256, 48
    w = 0.05 * torch.randn(out, k, generator=torch.Generator().manual_seed(2))
    fit, hold = correlated_rows(3000, k, 3), correlated_rows(1500, k, 4)
    h, h_hold = fit.T @ fit, hold.T @ hold
    qt = qtype("uint4_g64")
    err_rtn = output_error(w, rtn(w, qt), h_hold)
    f32, f64 = HessianFactors(h, 0.01, torch.float32), HessianFactors(h, 0.01)
    for ao in (True, False):
        a = gptq_quantize(w, h, qt, 0.01, ao, factors=f32)
        b = gptq_quantize(w, h, qt, 0.01, ao, factors=f64)
        assert {n: (t.shape, t.dtype) for n, t in a.items()} == {n: (t.shape, t.dtype) for n, t in b.items()}
        assert torch.equal(a["scale"], b["scale"]) or not ao  # static groups: the same grid
        ea = output_error(w, dequantize_weight(a, qt, w.shape, torch.float32), h_hold, torch.float32)
        eb = output_error(w, dequantize_weight(b, qt, w.shape, torch.float32), h_hold)
        assert ea < 0.8 * err_rtn and ea == pytest.approx(eb, rel=1e-3), ao
        codes_same = (dequantize_weight(a, qt, w.shape, torch.float32) == dequantize_weight(b, qt, w.shape, torch.float32))
        assert float(codes_same.float().mean()) > 0.97, ao
    assert f32.upper(True)[1].dtype == torch.float32 and f32.lower().dtype == torch.float32
    u, s, vh, low = weighted_svd(torch.randn(out, k) * 1e-3, h, 0.01, f32)
    assert low.dtype == s.dtype == torch.float32
    # output_error in float32 agrees with float64 on the same ΔW
    d = w + 1e-3 * torch.randn(out, k)
    assert output_error(w, d, h_hold, torch.float32) == pytest.approx(output_error(w, d, h_hold), rel=1e-4)


def test_float32_solves_hold_up_on_ill_conditioned_statistics():
    """Real activations have a shared mean (one dominant direction) and outlier channels, which push the
    dampened H's condition number towards its bound K / damp; float32 Cholesky is backward stable, so
    its error acts like a small change of the damping and the solve lands where float64's does."""
    from qcorrect.quant.gptq import HessianFactors

    k, qt = 768, qtype("uint4_g64")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * k, k, generator=g) * torch.linspace(0.1, 3.0, k)
    x += 5.0 * torch.randn(k, generator=g)
    x[:, :4] *= 300.0
    fit, hold = x[: 2 * k], x[2 * k :]
    h, hh = fit.T @ fit, hold.T @ hold
    hd = h.double() + 0.01 * h.diagonal().double().mean() * torch.eye(k, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(hd)
    assert float(ev[-1] / ev[0]) > 1e4  # ill-conditioned, as intended
    w = torch.randn(64, k, generator=g) * 0.02
    errs = {}
    for dt in (torch.float64, torch.float32):
        s = gptq_quantize(w, h, qt, 0.01, True, factors=HessianFactors(h, 0.01, dt))
        errs[dt] = output_error(w, dequantize_weight(s, qt, w.shape, torch.float32), hh)
    assert errs[torch.float32] == pytest.approx(errs[torch.float64], rel=1e-3)
    assert errs[torch.float64] < 0.5 * output_error(w, rtn(w, qt), hh)
