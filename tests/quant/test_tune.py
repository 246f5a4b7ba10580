"""End-to-end tuning of the stored grid (quant/tune.py, issue 11)."""

import copy

import pytest
import torch

from qcorrect.quant import QuantizationError, SigmaScopedDenoiser, quantize_model
from qcorrect.quant.activations import fake_quantize
from qcorrect.quant.modules import QUANT_LAYERS
from qcorrect.quant.tune import TuneConfig, _subsample, _weighted_draws, calls_loss, tune_grid
from qcorrect.quant.weights import decode_blob

from .toy import make_toy


class Denoiser:
    """``D(x, σ) = x − σ·net(x, temb(σ))`` around the toy UNet (the denoiser protocol)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, sigma, **extra):
        s = sigma.reshape(-1).float()
        freqs = torch.arange(16, dtype=torch.float32)
        temb = torch.cat([torch.sin(s[:, None] * freqs), torch.cos(s[:, None] * freqs)], dim=1)
        return x - s.reshape(-1, 1, 1, 1) * self.net(x, temb.expand(x.shape[0], -1))


def calls(fp, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(n):
            sigma = torch.full((4,), [8.0, 3.5, 1.0, 0.3][i % 4])
            x = sigma[0] * torch.randn(4, 4, 8, 8, generator=g)
            out.append((x, sigma, {}, fp(x, sigma)))
    return out


def quantized(preset="W4A8"):
    fp = Denoiser(make_toy())
    q = Denoiser(copy.deepcopy(fp.net))
    quantize_model(q.net, preset)
    return fp, q, SigmaScopedDenoiser(q, q.net)


@pytest.mark.parametrize("preset,factor,lr", [("W4A8", 0.95, 3e-3), ("W8A8", 0.99, 1e-3)])  # W8A8: mostly activation error
def test_tuning_lowers_the_held_out_loss_keeps_every_code_and_costs_no_bytes(preset, factor, lr):
    fp, q, qd = quantized(preset)
    fit, hold = calls(fp, 24, 1), calls(fp, 8, 2)
    layers = [m for m in q.net.modules() if isinstance(m, QUANT_LAYERS)]
    before = [decode_blob(m.weight, m.wqtype, m.weight_shape) for m in layers]
    sizes = [m.weight.numel() for m in layers]
    floats = {n: p.detach().clone() for n, p in q.net.named_parameters() if p.is_floating_point()}
    flags = {n: p.requires_grad for n, p in q.net.named_parameters()}
    rep = tune_grid(qd, q.net, fit, hold, TuneConfig(iterations=60, lr=lr))
    assert rep["kept"], rep
    assert rep["hold_loss_after"] < factor * rep["hold_loss_before"]
    assert rep["hold_loss_after"] == pytest.approx(calls_loss(qd, hold))
    changed = 0
    for m, b, n in zip(layers, before, sizes):
        after = decode_blob(m.weight, m.wqtype, m.weight_shape)
        assert torch.equal(after["qweight"], b["qweight"])  # the rounding is not touched
        assert m.weight.numel() == n and m.weight.dtype == torch.uint8
        changed += int(not torch.equal(after["scale"], b["scale"]))
        assert m.calib["grid_tuned"] is True
        assert not m.weight_function  # the tuning hooks are gone
    assert changed == len(layers)
    # nothing else of the model was trained (biases, norms, 16-bit layers), and its flags are as they were
    for n, p in q.net.named_parameters():
        assert p.requires_grad == flags[n]
        if n in floats:
            assert torch.equal(p, floats[n]), n


def test_a_tuning_that_does_not_help_on_held_out_calls_is_undone_exactly():
    fp, q, qd = quantized()
    fit = calls(fp, 16, 1)
    with torch.no_grad():  # held-out "targets" are the quantized model's own outputs: its loss is 0 already
        hold = [(x, s, e, qd(x, s)) for x, s, e, _ in calls(fp, 4, 2)]
    blobs = [m.weight.detach().clone() for m in q.net.modules() if isinstance(m, QUANT_LAYERS)]
    rep = tune_grid(qd, q.net, fit, hold, TuneConfig(iterations=20, lr=3e-3))
    assert not rep["kept"] and "restored" in rep["note"]
    for m, b in zip([m for m in q.net.modules() if isinstance(m, QUANT_LAYERS)], blobs):
        assert torch.equal(m.weight, b)
        assert m.calib["grid_tuned"] is False


def test_bad_inputs_are_refused_with_clear_errors():
    fp, q, qd = quantized()
    with pytest.raises(QuantizationError, match="recorded calibration calls"):
        tune_grid(qd, q.net, [], [])
    bad = [(x, s, e, torch.full_like(t, float("nan"))) for x, s, e, t in calls(fp, 2, 1)]
    with pytest.raises(QuantizationError, match="not finite"):
        tune_grid(qd, q.net, bad, bad)
    with pytest.raises(QuantizationError, match="no quantized layers"):
        tune_grid(fp, fp.net, calls(fp, 2, 1), [])
    layer = next(m for m in q.net.modules() if isinstance(m, QUANT_LAYERS))
    layer.weight_function = [lambda w: w]
    with pytest.raises(QuantizationError, match="weight patches"):
        tune_grid(qd, q.net, calls(fp, 2, 1), [])
    with pytest.raises(QuantizationError, match="iteration"):
        TuneConfig(iterations=0).validate()
    with pytest.raises(QuantizationError, match="batch"):
        TuneConfig(batch=-1).validate()
    with pytest.raises(QuantizationError, match="draw"):
        TuneConfig(draw="importance").validate()
    with pytest.raises(QuantizationError, match="low-pass weight"):
        TuneConfig(lowpass_weight=float("nan")).validate()
    with pytest.raises(QuantizationError, match="pooling factor"):
        TuneConfig(lowpass_weight=1.0, lowpass=0).validate()


def test_a_sub_sampled_call_keeps_each_sample_with_its_own_sigma_conditioning_and_target():
    n = 6
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 2, 3, 3).clone()
    sigma = torch.arange(n, dtype=torch.float32) + 10
    extra = {"cond": torch.arange(n) + 100, "cfg_scale": 3.0, "shared": torch.ones(2, 5)}
    call = (x, sigma, extra, -x)
    got = _subsample(call, 4, torch.Generator().manual_seed(0))
    gx, gs, ge, gt = got
    picked = gx[:, 0, 0, 0].long()
    assert len(picked) == 4 and len(set(picked.tolist())) == 4 and torch.equal(picked, picked.sort().values)
    assert torch.equal(gs, sigma[picked]) and torch.equal(ge["cond"], extra["cond"][picked])
    assert torch.equal(gt, -x[picked]) and ge["cfg_scale"] == 3.0 and ge["shared"] is extra["shared"]
    assert _subsample(call, 0, torch.Generator()) is call and _subsample(call, n, torch.Generator()) is call
    scalar = (x, torch.tensor(2.0), {}, x)
    assert _subsample(scalar, 2, torch.Generator().manual_seed(1))[1].ndim == 0


def test_tuning_on_sub_sampled_calls_still_lowers_the_held_out_loss_and_is_seeded():
    fp, q, qd = quantized()
    fit, hold = calls(fp, 24, 1), calls(fp, 8, 2)
    copies = [copy.deepcopy(q) for _ in range(2)]
    cfg = TuneConfig(iterations=60, lr=3e-3, batch=2)
    rep = tune_grid(qd, q.net, fit, hold, cfg)
    assert rep["kept"] and rep["batch"] == 2 and rep["hold_loss_after"] < 0.97 * rep["hold_loss_before"]
    again = tune_grid(SigmaScopedDenoiser(copies[0], copies[0].net), copies[0].net, fit, hold, cfg)
    assert again["hold_loss_after"] == rep["hold_loss_after"]  # same seed: same draws, same grid
    whole = tune_grid(SigmaScopedDenoiser(copies[1], copies[1].net), copies[1].net, fit, hold,
                      TuneConfig(iterations=60, lr=3e-3))
    assert whole["hold_loss_after"] != rep["hold_loss_after"]  # the batch option does act on the steps


def test_weighted_draws_spend_the_steps_in_proportion_to_the_step_weight_at_the_same_expected_loss():
    # 3 early calls (σ ≥ 3) of 10, weight 4: early share of the draws 12/19, each loss weighted by w̄ = 1.9
    recorded = [(None, torch.full((2,), s), {}, None) for s in [8.0, 5.0, 3.0] + [1.0] * 7]
    cfg = TuneConfig(iterations=20000, early_weight=4.0, early_sigma=3.0, draw="weighted")
    order, w = _weighted_draws(recorded, cfg, torch.Generator().manual_seed(0))
    assert len(order) == cfg.iterations and w == pytest.approx(1.9)
    early = sum(i < 3 for i in order) / len(order)
    assert early == pytest.approx(12 / 19, abs=0.01)
    counts = torch.bincount(torch.tensor(order), minlength=10).double() / len(order)
    assert counts[:3].min() > 3 * counts[3:].max()  # each early call 4× as often as each late one
    # the expected weighted loss equals uniform's Σ wᵢ·Lᵢ / N for any per-call losses
    losses = torch.rand(10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    uniform = float((torch.tensor([4.0] * 3 + [1.0] * 7, dtype=torch.float64) * losses).mean())
    assert w * float((counts * losses).sum()) == pytest.approx(uniform, rel=0.02)
    again, _ = _weighted_draws(recorded, cfg, torch.Generator().manual_seed(0))
    assert again == order  # seeded


def test_tuning_with_weighted_draws_lowers_the_held_out_loss_and_differs_from_uniform_the_default():
    fp, q, qd = quantized()
    fit, hold = calls(fp, 24, 1), calls(fp, 8, 2)
    other = copy.deepcopy(q)
    rep = tune_grid(qd, q.net, fit, hold, TuneConfig(iterations=60, lr=3e-3, draw="weighted"))
    assert rep["kept"] and rep["draw"] == "weighted" and rep["hold_loss_after"] < 0.95 * rep["hold_loss_before"]
    uni = tune_grid(SigmaScopedDenoiser(other, other.net), other.net, fit, hold, TuneConfig(iterations=60, lr=3e-3))
    assert uni["draw"] == "uniform" and uni["hold_loss_after"] != rep["hold_loss_after"]


def test_activation_fake_quantization_is_unchanged_without_autograd_and_straight_through_with_it():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    lo, hi = x.amin(), x.amax()
    plain = fake_quantize(x, lo, hi, 4, False)
    xg = x.clone().requires_grad_(True)
    y = fake_quantize(xg, lo, hi, 4, False)
    assert torch.equal(y.detach(), plain)
    y.sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    with torch.no_grad():
        assert torch.equal(fake_quantize(xg, lo, hi, 4, False), plain)
    # a dynamic range taken from x itself passes no gradient either: the estimator is the identity
    xd = x.clone().requires_grad_(True)
    yd = fake_quantize(xd, xd.amin(), xd.amax(), 4, False)
    assert torch.equal(yd.detach(), plain)
    (yd * torch.arange(150.0).reshape(3, 50)).sum().backward()
    assert torch.equal(xd.grad, torch.arange(150.0).reshape(3, 50))


@pytest.mark.parametrize("kind,wtype", [
    ("linear", "uint4_g64"), ("linear", "int4_g32"), ("linear", "int8"), ("linear", "uint3_g64"),
    ("conv", "uint4_g64"), ("conv", "uint3_g32"), ("conv_same", "uint4_g64"), ("conv_strided", "int8"),
])
def test_the_memory_lean_grid_op_has_plain_autograds_output_and_gradients(kind, wtype):
    """``_GridOp`` rebuilds each weight in the backward pass instead of saving it; its output and the
    gradients for the input and for the grid (scale multipliers, zero offsets) must be plain autograd's."""
    from torch import nn

    from qcorrect.quant.activations import ActQuantizer
    from qcorrect.quant.modules import QuantConv2d, QuantLinear
    from qcorrect.quant.tune import _Grid

    torch.manual_seed(0)
    if kind == "linear":
        layer = QuantLinear.from_float(nn.Linear(128, 24), wtype, ActQuantizer(None, "none", None, "l"), "l")
        x = torch.randn(3, 5, 128)
    else:
        conv = {"conv": nn.Conv2d(64, 8, 3, padding=1), "conv_same": nn.Conv2d(64, 8, 3, padding="same"),
                "conv_strided": nn.Conv2d(64, 8, 3, stride=2, padding=(1, 0))}[kind]
        layer = QuantConv2d.from_float(conv, wtype, ActQuantizer(None, "none", None, "c"), "c")
        x = torch.randn(2, 64, 9, 9)
    grid = _Grid(layer)
    with torch.no_grad():  # a grid away from its start, so every term of the gradient matters
        for p in grid.params():
            p.uniform_(-0.2, 0.2)
    target = torch.randn_like(layer(x))

    def grads(use_op):
        xg = x.clone().requires_grad_()
        for p in grid.params():
            p.grad = None
        layer.grid_op = grid.op if use_op else None
        if use_op:
            y = layer(xg)
        else:
            b = None if layer.bias is None else layer.bias.float()
            y = layer._op(layer.act(xg), grid.stored(), b)
        layer.grid_op = None
        ((y - target) ** 2).sum().backward()
        return y.detach(), xg.grad, [p.grad.clone() for p in grid.params()]

    y0, gx0, gp0 = grads(False)
    y1, gx1, gp1 = grads(True)
    assert len(gp1) == (1 if wtype.startswith("int") else 2)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    for a, b in zip(gp1, gp0):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_low_pass_term_weights_coarse_early_errors_only():
    """``lowpass_weight`` λ: an early call's loss adds λ × its error pooled over k×k latent pixels — a
    smooth error counts (1 + λ)×, one that alternates at the pixel scale is pooled away and counts 1×;
    late calls are unchanged; tuning with it still lowers the held-out loss and gives another grid."""
    from qcorrect.quant.tune import _call_loss

    ident = lambda x, sigma, **e: x  # noqa: E731 — the "error" is x itself against a zero target
    zero = torch.zeros(2, 4, 8, 8)
    smooth, rough = torch.ones(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    rough[..., ::2, :] = -1
    cfg, lp = TuneConfig(), TuneConfig(lowpass_weight=3.0, lowpass=2)
    early, late = torch.full((2,), 8.0), torch.full((2,), 1.0)
    loss = lambda x, s, c: float(_call_loss(ident, (x, s, {}, zero), c))  # noqa: E731
    assert loss(smooth, early, lp) == pytest.approx(4 * loss(smooth, early, cfg))
    assert loss(rough, early, lp) == pytest.approx(loss(rough, early, cfg))
    assert loss(smooth, late, lp) == loss(smooth, late, cfg)

    fp, q, qd = quantized()
    fit, hold = calls(fp, 24, 1), calls(fp, 8, 2)
    other = copy.deepcopy(q)
    rep = tune_grid(qd, q.net, fit, hold, TuneConfig(iterations=60, lr=3e-3, lowpass_weight=4.0))
    assert rep["kept"] and rep["lowpass_weight"] == 4.0 and rep["hold_loss_after"] < 0.95 * rep["hold_loss_before"]
    plain = tune_grid(SigmaScopedDenoiser(other, other.net), other.net, fit, hold, TuneConfig(iterations=60, lr=3e-3))
    assert "lowpass_weight" not in plain and plain["hold_loss_after"] != rep["hold_loss_after"]


def test_the_jacobian_term_is_the_sketched_final_error_of_each_call_and_needs_adjoints():
    """``jacobian_weight`` μ: a call ``(x, σ, extra, D_fp, g)`` adds ``μ·mean_{j,n}(g_jn·δ_n)²/numel``
    (not step-weighted) to ``w(σ)·mean δ²``; a call without adjoints is refused; sub-sampling keeps
    each sample's adjoints; tuning with the term lowers the held-out loss and differs from plain."""
    from qcorrect.quant.tune import _call_loss

    ident = lambda x, sigma, **e: x  # noqa: E731 — the error δ is x itself against a zero target
    g = torch.Generator().manual_seed(3)
    d, adj = torch.randn(2, 4, 8, 8, generator=g), torch.randn(3, 2, 4, 8, 8, generator=g)
    zero, early = torch.zeros(2, 4, 8, 8), torch.full((2,), 8.0)
    plain = float(_call_loss(ident, (d, early, {}, zero, adj), TuneConfig()))
    with_j = float(_call_loss(ident, (d, early, {}, zero, adj), TuneConfig(jacobian_weight=2.5)))
    want = 2.5 * float(sum(float((adj[j, n] * d[n]).sum()) ** 2 for j in range(3) for n in range(2))) / 6 / d[0].numel()
    assert plain == pytest.approx(4 * float(d.pow(2).mean()))
    assert with_j - plain == pytest.approx(want, rel=1e-5)
    with pytest.raises(QuantizationError, match="adjoints"):
        _call_loss(ident, (d, early, {}, zero), TuneConfig(jacobian_weight=1.0))
    with pytest.raises(QuantizationError, match="Jacobian"):
        TuneConfig(jacobian_weight=-1.0).validate()
    sub = _subsample((d, early, {}, zero, adj), 1, torch.Generator().manual_seed(0))
    n = 0 if torch.equal(sub[0][0], d[0]) else 1
    assert torch.equal(sub[4], adj[:, n : n + 1])

    fp, q, qd = quantized()
    fit, hold = calls(fp, 24, 1), calls(fp, 8, 2)
    rnd = torch.Generator().manual_seed(9)
    # adjoints stand-in: random directions with early calls' sketches small, as the flow makes them
    with_adj = lambda cs: [c + (torch.randn(2, *c[3].shape, generator=rnd) * (0.1 if float(c[1][0]) > 3 else 1.0),)  # noqa: E731
                           for c in cs]
    fit_j, hold_j = with_adj(fit), with_adj(hold)
    other = copy.deepcopy(q)
    rep = tune_grid(qd, q.net, fit_j, hold_j, TuneConfig(iterations=60, lr=3e-3, jacobian_weight=10.0))
    assert rep["kept"] and rep["jacobian_weight"] == 10.0 and rep["hold_loss_after"] < 0.95 * rep["hold_loss_before"]
    base = tune_grid(SigmaScopedDenoiser(other, other.net), other.net, fit_j, hold_j, TuneConfig(iterations=60, lr=3e-3))
    assert "jacobian_weight" not in base and base["hold_loss_after"] != rep["hold_loss_after"]
