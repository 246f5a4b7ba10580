"""Per-layer input statistics streamed from full-precision sampling (issue 11)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcorrect.calibration import CalibrationError
from qcorrect.calibration.inputs import collect_inputs, early_weight, layer_groups, stats_bytes
from qcorrect.reference.samplers import sample_euler


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.lin = nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        h = torch.tanh(self.conv(x))  # [B, 4, H, W]
        return self.lin(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Denoiser:
    def __init__(self, net):
        self.net = net

    def __call__(self, x, sigma, **extra):
        return x - sigma.reshape(-1, 1, 1, 1) * self.net(x)


SIGMAS = torch.tensor([5.0, 2.0, 0.5, 0.0])


def start(n=6, seed=1):
    return 5.0 * torch.randn(n, 2, 3, 3, generator=torch.Generator().manual_seed(seed))


def manual(net, x0, weight=lambda s: 1.0, hold_every=4):
    """Σ w·x xᵀ by hand: the same euler trajectories, per split."""
    sums = {k: {"conv": torch.zeros(18, 18), "lin": torch.zeros(4, 4)} for k in ("fit", "hold")}
    for i in range(x0.shape[0]):
        split = "hold" if i % hold_every == hold_every - 1 else "fit"
        x = x0[i : i + 1]
        for n in range(len(SIGMAS) - 1):
            s = SIGMAS[n]
            rows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
            h = torch.tanh(net.conv(x)).permute(0, 2, 3, 1).reshape(-1, 4)
            sums[split]["conv"] += weight(float(s)) * rows.T @ rows
            sums[split]["lin"] += weight(float(s)) * h.T @ h
            d = net(x)
            x = x + (SIGMAS[n + 1] - s) * d
    return sums


@torch.no_grad()
def test_second_moments_match_a_manual_sum_per_split_and_the_hooks_are_removed():
    net = Net()
    x0 = start()
    res = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=2)
    want = manual(net, x0)
    st = res["layers"]
    assert torch.allclose(st["conv"].h_fit, want["fit"]["conv"], rtol=1e-4, atol=1e-3)
    assert torch.allclose(st["conv"].h_hold, want["hold"]["conv"], rtol=1e-4, atol=1e-3)
    assert torch.allclose(st["lin"].h_fit, want["fit"]["lin"], rtol=1e-4, atol=1e-3)
    assert (res["n_fit"], res["n_hold"]) == (5, 1)
    assert st["conv"].rows_fit == 5 * 3 * 9 and st["conv"].rows_hold == 1 * 3 * 9
    assert st["lin"].absmax.shape == (4,) and st["conv"].absmax.shape == (2,)
    assert not net.conv._forward_pre_hooks and not net.lin._forward_pre_hooks


@torch.no_grad()
def test_step_weight_multiplies_the_rows_of_early_calls():
    net = Net()
    x0 = start()
    w = early_weight(4.0, sigma_min=3.0)
    res = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, step_weight=w)
    want = manual(net, x0, weight=w)
    assert torch.allclose(res["layers"]["lin"].h_fit, want["fit"]["lin"], rtol=1e-4, atol=1e-3)
    assert res["layers"]["lin"].wsum_fit == pytest.approx(5 * 9 * (4 + 1 + 1))


@torch.no_grad()
def test_a_memory_bound_splits_the_layers_into_passes_with_the_same_result():
    net = Net()
    x0 = start()
    one = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS)
    sizes = stats_bytes({"conv": net.conv, "lin": net.lin})
    bounded = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, max_bytes=sizes["conv"])
    assert bounded["passes"] == 2 and one["passes"] == 1
    # every group is returned, so all of them are held at the end
    assert bounded["peak_stats_bytes"] == one["peak_stats_bytes"] == sizes["conv"] + sizes["lin"]
    for n in ("conv", "lin"):
        assert torch.equal(bounded["layers"][n].h_fit, one["layers"][n].h_fit)
    assert layer_groups({"conv": net.conv, "lin": net.lin}, 1) == [["conv"], ["lin"]]


@torch.no_grad()
def test_consumed_groups_are_handed_over_one_at_a_time_and_not_kept():
    """``consume``: each group's statistics go to the consumer when its pass ends and the collector keeps
    no reference to them, so one group's sums are all it ever holds."""
    import gc
    import weakref

    net = Net()
    x0 = start()
    one = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS)
    sizes = stats_bytes({"conv": net.conv, "lin": net.lin})
    seen, alive = {}, []

    def consume(group):
        gc.collect()
        alive.append([r() is not None for r in seen.values()])  # the earlier groups' sums, after the handover
        for n, st in group.items():
            seen[n] = weakref.ref(st.h_fit)
            assert torch.equal(st.h_fit, one["layers"][n].h_fit) and torch.equal(st.h_hold, one["layers"][n].h_hold)

    res = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, max_bytes=sizes["conv"], consume=consume)
    gc.collect()
    assert list(seen) == ["conv", "lin"] and alive == [[], [False]]
    assert all(r() is None for r in seen.values())
    assert res["layers"] == {} and res["passes"] == 2 and res["peak_stats_bytes"] == sizes["conv"]


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(2, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 64, 3, padding=1)
        self.c = nn.Linear(64, 128)
        self.d = nn.Linear(128, 64)
        self.e = nn.Conv2d(64, 2, 1)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        t = self.d(torch.tanh(self.c(h.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return 0.1 * self.e(h + t)


def test_calibration_streamed_into_the_solver_gives_the_model_of_all_statistics_at_once():
    """The node's path: collect_inputs(consume=CalibratedSolver.add) under a memory bound of one layer's
    sums, then finish, is the model quantize_calibrated makes from every statistic held at once."""
    from qcorrect.quant.calibrated import CalibratedConfig, CalibratedSolver, quantize_calibrated

    net = Wide()
    x0 = start(24, 5)
    cfg = CalibratedConfig(budget=0.45, budget_options=("int8", "rank", "kept", "uint3"))
    with torch.no_grad():
        col = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=8, rows_per_k=32)
    whole = Wide()
    rep = quantize_calibrated(whole, "W4A8", col["layers"], cfg)
    solver = CalibratedSolver(Wide(), "W4A8", cfg)
    smallest = min(stats_bytes({n: net.get_submodule(n) for n in "abcde"}).values())
    with torch.no_grad():
        streamed = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=8, rows_per_k=32,
                                  max_bytes=smallest, consume=solver.add)
    rep2 = solver.finish()
    assert streamed["passes"] == 5 and streamed["peak_stats_bytes"] < col["peak_stats_bytes"]
    assert rep["layers"] == rep2["layers"] and rep["allocation"] == rep2["allocation"]
    sa, sb = whole.state_dict(), solver.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert rep["allocation"]["int8"] or rep["allocation"]["ranks"] or rep["allocation"].get("uint3")


def test_an_empty_or_too_small_calibration_set_is_refused():
    net = Net()
    with pytest.raises(CalibrationError, match="empty"):
        collect_inputs(Denoiser(net), net, sample_euler, start(0), SIGMAS)
    with pytest.raises(CalibrationError, match="at least 2"):
        collect_inputs(Denoiser(net), net, sample_euler, start(1), SIGMAS)
    one = collect_inputs(Denoiser(net), net, sample_euler, start(1), SIGMAS, holdout_every=0)
    assert one["n_hold"] == 0 and one["layers"]["lin"].rows_hold == 0


def test_nan_activations_are_a_clear_error_and_leave_no_hook():
    net = Net()
    with torch.no_grad():
        net.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="'lin'.*NaN/inf"):
        collect_inputs(Denoiser(net), net, sample_euler, start(), SIGMAS)
    assert not net.conv._forward_pre_hooks and not net.lin._forward_pre_hooks
    with pytest.raises(CalibrationError, match="latents contain NaN"):
        collect_inputs(Denoiser(Net()), Net(), sample_euler, start().fill_(float("inf")), SIGMAS)


@torch.no_grad()
def test_row_caps_keep_a_random_share_of_every_call():
    net = Net()
    x0 = start(8)
    capped = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=2, max_rows=5)
    calls_fit = 3 * 3  # 6 fit samples in batches of 2, 3 steps
    assert capped["layers"]["conv"].rows_fit == 5 * calls_fit and capped["layers"]["lin"].rows_fit == 5 * calls_fit
    full = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=2)
    # a share of the rows: positive semi-definite and below the full sum on the diagonal
    c, f = capped["layers"]["conv"].h_fit, full["layers"]["conv"].h_fit
    assert torch.linalg.eigvalsh(c.double()).min() > -1e-3 and (torch.diagonal(c) <= torch.diagonal(f) + 1e-4).all()
    # rows_per_k spreads about rows_per_k·K rows over the calls (at least 64 per call)
    big = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=2, rows_per_k=1000)
    assert big["layers"]["conv"].rows_fit == full["layers"]["conv"].rows_fit


@torch.no_grad()
def test_recorded_calls_are_the_fp_states_and_outputs_per_split():
    net = Net()
    x0 = start()
    den = Denoiser(net)
    res = collect_inputs(den, net, sample_euler, x0, SIGMAS, batch_size=2, record_calls=True, max_bytes=1)
    calls = res["calls"]
    assert res["passes"] == 2  # recorded on the first pass only
    # 5 fit samples in micro-batches of 2 (3 calls per step), 1 held-out sample; 3 steps each
    assert len(calls["fit"]) == 3 * 3 and len(calls["hold"]) == 3
    for x, sigma, extra, out in calls["fit"] + calls["hold"]:
        assert torch.equal(out, den(x, sigma, **extra))
    assert torch.equal(calls["hold"][0][0], x0[3:4])  # every 4th sample is held out
    assert "calls" not in collect_inputs(den, net, sample_euler, x0, SIGMAS, batch_size=2)


class PairDenoiser:
    """Runs the net on ``[x; x + 1]`` (an "uncond" and a "cond" half) and guides like CFG."""

    def __init__(self, net, scale):
        self.net, self.scale = net, scale

    def __call__(self, x, sigma, **extra):
        e_u, e_c = self.net(torch.cat([x, x + 1.0])).chunk(2)
        return x - sigma.reshape(-1, 1, 1, 1) * (e_u + self.scale * (e_c - e_u))


@torch.no_grad()
def test_guided_statistics_take_the_guided_combination_of_paired_halves():
    net = Net()
    x0 = start(4)
    s = 3.0
    den = PairDenoiser(net, s)
    plain = collect_inputs(den, net, sample_euler, x0, SIGMAS, batch_size=4, holdout_every=0)["layers"]
    guided = collect_inputs(den, net, sample_euler, x0, SIGMAS, batch_size=4, holdout_every=0, guidance=s)["layers"]
    # by hand: the same trajectories, rows of (1 − s)·x_u + s·x_c
    want = torch.zeros(18, 18)
    x = x0.clone()
    for n in range(len(SIGMAS) - 1):
        xu, xc = x, x + 1.0
        rows = F.unfold((1 - s) * xu + s * xc, 3, padding=1).transpose(1, 2).reshape(-1, 18)
        want += rows.T @ rows
        x = x + (SIGMAS[n + 1] - SIGMAS[n]) * (x - den(x, SIGMAS[n].expand(4))) / SIGMAS[n]
    assert torch.allclose(guided["conv"].h_fit, want, rtol=1e-4, atol=1e-2)
    assert not torch.allclose(plain["conv"].h_fit, want, rtol=1e-2)
    assert guided["conv"].rows_fit * 2 == plain["conv"].rows_fit
    # ranges are those of the raw inputs either way
    assert torch.equal(guided["conv"].absmax, plain["conv"].absmax)
    # guidance 1 (or calls that are not paired) leaves the statistics as they are
    same = collect_inputs(den, net, sample_euler, x0, SIGMAS, batch_size=4, holdout_every=0, guidance=1.0)["layers"]
    assert torch.equal(same["conv"].h_fit, plain["conv"].h_fit)


def test_the_sensitivity_probe_measures_eps_or_denoised_error_and_restores_the_layer():
    """``layer_probe``'s ``space``: ``eps`` divides each call's output error by σ (the steps near x0
    dominate), ``x0`` does not (the first steps dominate); both step-weight the calls alike."""
    from qcorrect.calibration.inputs import layer_probe

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6))

    def denoiser(x, sigma, **_):
        return net(x)

    calls = [(torch.randn(3, 6), torch.full((3,), s), {}) for s in (10.0, 0.5)]
    weight = lambda s: 4.0 if s >= 3 else 1.0  # noqa: E731
    orig = net[0].weight.detach().clone()
    new = orig + 0.1 * torch.randn_like(orig)
    eps = layer_probe(denoiser, net, calls, weight)("0", new)
    x0 = layer_probe(denoiser, net, calls, weight, space="x0")("0", new)
    assert torch.equal(net[0].weight, orig)  # the layer computes with its own weight again
    with torch.no_grad():
        errs = [(torch.nn.functional.linear(x, new, net[0].bias) - net(x)).pow(2).mean(1) for x, _, _ in calls]
    w = torch.tensor([4.0] * 3 + [1.0] * 3)
    e_eps = torch.cat([errs[0] / 100.0, errs[1] / 0.25])
    e_x0 = torch.cat(errs)
    assert eps == pytest.approx(float((e_eps * w).sum() / w.sum()), rel=1e-5)
    assert x0 == pytest.approx(float((e_x0 * w).sum() / w.sum()), rel=1e-5)
    with pytest.raises(CalibrationError, match="probe space"):
        layer_probe(denoiser, net, calls, weight, space="v")


def test_the_sketched_probe_is_the_exact_probe_for_a_linear_model_and_close_to_it_otherwise():
    """``SketchProbe`` estimates every layer's probe error from a few backward passes. For a linear
    network the first-order estimate is exact in expectation, so many sketches converge on the exact
    probe; on a non-linear one with small weight changes it stays close; it hooks only while it runs."""
    from qcorrect.calibration.inputs import SketchProbe, layer_probe

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 6))

    def linear_denoiser(x, sigma, **_):
        return lin(x)

    calls = [(torch.randn(16, 6), torch.full((16,), s), {}) for s in (10.0, 2.0, 0.5)]
    weight = lambda s: 4.0 if s >= 3 else 1.0  # noqa: E731
    new = {n: lin.get_submodule(n).weight.detach() + 0.05 * torch.randn_like(lin.get_submodule(n).weight) for n in ("0", "1")}
    for space in ("eps", "x0"):
        ex = {n: layer_probe(linear_denoiser, lin, calls, weight, space=space)(n, w) for n, w in new.items()}
        est = SketchProbe(linear_denoiser, lin, calls, weight, space=space, sketches=512).batch(new)
        chunked = SketchProbe(linear_denoiser, lin, calls, weight, space=space, sketches=512, max_batch=16).batch(new)
        for n in new:
            assert est[n] == pytest.approx(ex[n], rel=0.05)
            assert chunked[n] == pytest.approx(ex[n], rel=0.05)  # one call's backward pass at a time
    assert SketchProbe(linear_denoiser, lin, calls, weight, sketches=1)("1", new["1"]) > 0
    assert not any(m._forward_hooks for m in lin.modules())

    # a non-linear net with CFG-style doubled batches (the layers see [uncond; cond], the output is per latent)
    net = Net()

    def cfg_denoiser(x, sigma, **_):
        both = net(torch.cat([x, 0.9 * x]))
        u, c = both.chunk(2)
        return x - sigma.reshape(-1, 1, 1, 1) * (u + 3.0 * (c - u))

    calls = [(start(8, seed=s), torch.full((8,), float(sig)), {}) for s, sig in ((1, 5.0), (2, 1.0))]
    small = {n: net.get_submodule(n).weight.detach() * (1 + 0.01 * torch.randn_like(net.get_submodule(n).weight))
             for n in ("conv", "lin")}
    exact = {n: layer_probe(cfg_denoiser, net, calls, weight)(n, w) for n, w in small.items()}
    est = SketchProbe(cfg_denoiser, net, calls, weight, sketches=16).batch(small)
    for n in small:
        assert est[n] == pytest.approx(exact[n], rel=0.3)
    with pytest.raises(CalibrationError, match="at least one sketch"):
        SketchProbe(cfg_denoiser, net, calls, sketches=0)


def test_flow_adjoints_are_the_transposed_jacobian_of_the_rest_of_the_sampling():
    """``flow_adjoints`` gives, per call k, ``g_k[j] = ∂(u_j·x_N)/∂D_k``: checked against a finite
    difference (a perturbation of one call's output carried through the rest of the sampling, later
    model calls included), for euler and the two-step dpmpp_2m; for euler the last call's output is
    the final latent, so its adjoint is the sketch direction u itself."""
    from qcorrect.calibration.inputs import flow_adjoints
    from qcorrect.reference.samplers import sample_dpmpp_2m

    net = Net().double()
    den = Denoiser(net)
    x0 = start(3).double()
    sigmas = SIGMAS.double()
    for fn in (sample_euler, sample_dpmpp_2m):
        adj = flow_adjoints(den, fn, x0, sigmas, sketches=2, seed=5)
        assert len(adj) == len(sigmas) - 1 and adj[0].shape == (2, *x0.shape)
        u = adj[-1]  # x_N = D_last (euler, and dpmpp_2m's first-order last step)
        assert not torch.equal(u[0], u[1])
        for k in range(len(sigmas) - 1):
            delta = 1e-6 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
            seen = []

            def bumped(x, sigma, **e):
                out = den(x, sigma, **e)
                seen.append(None)
                return out + delta if len(seen) == k + 1 else out
            with torch.no_grad():
                moved = fn(bumped, x0, sigmas) - fn(den, x0, sigmas)
            for j in range(2):
                want = float((u[j].double() * moved).sum())
                got = float((adj[k][j].double() * delta).sum())
                assert got == pytest.approx(want, rel=1e-3, abs=1e-12)
        again = flow_adjoints(den, fn, x0, sigmas, sketches=2, seed=5)
        assert all(torch.equal(a, b) for a, b in zip(adj, again))  # seeded


def test_recorded_calls_carry_their_adjoints_and_the_statistics_are_unchanged():
    net = Net()
    x0 = start()
    den = Denoiser(net)
    plain = collect_inputs(den, net, sample_euler, x0, SIGMAS, batch_size=2, record_calls=True)
    res = collect_inputs(den, net, sample_euler, x0, SIGMAS, batch_size=2, record_calls=True, adjoints=3)
    for name, s in plain["layers"].items():  # the differentiable passes run outside the hooks
        assert torch.equal(s.h_fit, res["layers"][name].h_fit) and s.calls == res["layers"][name].calls
    assert res["adjoint_seconds"] > 0 and "adjoint_seconds" not in plain
    for split in ("fit", "hold"):
        assert len(res["calls"][split]) == len(plain["calls"][split])
        for c, p in zip(res["calls"][split], plain["calls"][split]):
            assert len(c) == 5 and len(p) == 4 and torch.equal(c[3], p[3])
            assert c[4].shape == (3, *c[3].shape) and bool(c[4].abs().sum() > 0)
    # a micro-batch's last call (σ → 0, euler) moves the final latent one for one: its adjoint is u
    last = res["calls"]["fit"][len(SIGMAS) - 2]
    assert float(last[4].pow(2).mean()) == pytest.approx(1.0, rel=0.5)


def test_calls_of_the_first_samples_are_whole_micro_batches_in_recording_order():
    from qcorrect.calibration.inputs import calls_of_first_samples

    net = Net()
    col = collect_inputs(Denoiser(net), net, sample_euler, start(8), SIGMAS, batch_size=3, record_calls=True)
    fit = col["calls"]["fit"]  # 6 fit samples in micro-batches of 3 and 3, 3 calls each
    assert len(fit) == 6
    assert calls_of_first_samples(fit, 2) == fit[:3]
    assert calls_of_first_samples(fit, 3) == fit[:3]
    assert calls_of_first_samples(fit, 4) == fit
    assert calls_of_first_samples(fit, 100) == fit


CONVS = [
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(3, 5, (3, 2), stride=2, padding=(1, 2), dilation=(2, 1)),
    nn.Conv2d(3, 5, 1),
    nn.Conv2d(3, 5, 4, stride=(1, 3)),
    nn.Conv2d(3, 5, (4, 3), padding="same", dilation=(1, 2)),
    nn.Conv2d(3, 5, 2, padding="valid"),
]


@torch.no_grad()
@pytest.mark.parametrize("conv", CONVS)
def test_a_convs_rows_times_its_weight_are_its_output(conv):
    """The unfolded rows the statistics sum are the conv's own inputs: rows @ Wᵀ + b is its output,
    for integer, "same" (odd total padding too) and "valid" padding, strides and dilations."""
    from qcorrect.calibration.inputs import _padded, input_rows
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(3))
    rows = F.unfold(_padded(x, conv), conv.kernel_size, conv.dilation, 0, conv.stride).transpose(1, 2)
    y = conv(x)
    assert input_rows(conv, x) == y.shape[0] * y.shape[-2] * y.shape[-1]
    got = (rows @ conv.weight.reshape(5, -1).T + conv.bias).transpose(1, 2).reshape(y.shape)
    assert torch.allclose(got, y, atol=1e-5)


@pytest.mark.parametrize("conv", CONVS)
def test_a_capped_conv_gathers_exactly_the_unfolded_rows_it_draws(conv):
    """Capped convs gather only the drawn patches instead of unfolding the call: the rows must be
    the unfolded rows with those indices, bit for bit."""
    from qcorrect.calibration.inputs import _padded, _patches
    x = _padded(torch.randn(4, 3, 9, 11, generator=torch.Generator().manual_seed(3)), conv)
    full = F.unfold(x, conv.kernel_size, conv.dilation, 0, conv.stride).transpose(1, 2)
    full = full.reshape(-1, full.shape[-1])
    idx = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(4))[:17]
    assert torch.equal(_patches(x, conv, idx), full[idx])


@torch.no_grad()
def test_capped_statistics_are_the_sums_of_the_drawn_unfolded_rows():
    """The whole capped collection against a manual one that unfolds every call and keeps the rows
    the same generator draws."""
    net = Net()
    x0 = start(4)
    got = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=4, max_rows=7, holdout_every=0, seed=5)
    gen = torch.Generator().manual_seed(5)
    h = {"conv": torch.zeros(18, 18), "lin": torch.zeros(4, 4)}
    x = x0
    for n in range(len(SIGMAS) - 1):
        s = SIGMAS[n]
        rows = {"conv": F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18),
                "lin": torch.tanh(net.conv(x)).permute(0, 2, 3, 1).reshape(-1, 4)}
        for name in ("conv", "lin"):  # the hooks fire in forward order, one draw per call and layer
            r = rows[name]
            keep = r[torch.randperm(r.shape[0], generator=gen)[:7]]
            h[name] += keep.T @ keep
        x = x + (SIGMAS[n + 1] - s) * net(x)
    for name in ("conv", "lin"):
        assert torch.allclose(got["layers"][name].h_fit, h[name], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_conv_with_string_padding_is_collected():
    """padding="same"/"valid" convs (their padding is not a number F.unfold takes) are collected, with
    and without a row cap."""
    class Same(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(2, 2, (2, 3), padding="same")

        def forward(self, x):
            return torch.tanh(self.conv(x))
    net = Same()
    x0 = start(4)
    full = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=4, holdout_every=0)
    h, x = torch.zeros(12, 12), x0
    for n in range(len(SIGMAS) - 1):
        rows = F.unfold(F.pad(x, (1, 1, 0, 1)), (2, 3)).transpose(1, 2).reshape(-1, 12)
        h += rows.T @ rows
        x = x + (SIGMAS[n + 1] - SIGMAS[n]) * net(x)
    assert torch.allclose(full["layers"]["conv"].h_fit, h, rtol=1e-5, atol=1e-4)
    capped = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=4, holdout_every=0, max_rows=5)
    assert capped["layers"]["conv"].rows_fit == 5 * 3


def test_string_padded_convs_get_calibrated_rounding_end_to_end():
    """collect_inputs → quantize_calibrated on a net whose convs pad "same" (even kernel, odd total) and
    "valid": every layer is solved from its statistics and the model's error is below round-to-nearest's."""
    from qcorrect.quant import quantize_model
    from qcorrect.quant.calibrated import quantize_calibrated

    class StringPadded(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Conv2d(2, 64, (2, 3), padding="same")
            self.b = nn.Conv2d(64, 64, 3, padding="same")
            self.c = nn.Conv2d(64, 2, 1, padding="valid")

        def forward(self, x):
            return 0.1 * self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    net = StringPadded()
    with torch.no_grad():
        col = collect_inputs(Denoiser(net), net, sample_euler, start(24, 5), SIGMAS, batch_size=8, rows_per_k=32)
    assert set(col["layers"]) == {"a", "b", "c"} and all(s.rows_fit > 0 for s in col["layers"].values())
    cal = StringPadded()
    rep = quantize_calibrated(cal, "W4A16", col["layers"])
    assert rep["layers"]["b"]["rounding"].startswith("gptq")
    rtn = quantize_model(StringPadded(), "W4A16")
    x = start(8, 9)
    with torch.no_grad():
        assert (cal(x) - net(x)).pow(2).mean() < (rtn(x) - net(x)).pow(2).mean()


@pytest.mark.parametrize("k", [100, 1024, 1300, 2048])
def test_the_triangular_gram_update_is_the_full_one(k):
    """add_gram + mirror_upper: the same symmetric Σ w·x xᵀ as a full addmm (the upper blocks are the same
    dot products, bit for bit here; the lower ones their mirror), at about half the multiply-adds."""
    from qcorrect.calibration.inputs import TRI_BLOCK, add_gram, gram_macs, mirror_upper

    g = torch.Generator().manual_seed(k)
    full, tri = torch.zeros(k, k), torch.zeros(k, k)
    for n, w in ((37, 1.0), (300, 4.0)):
        x = torch.randn(n, k, generator=g)
        full.addmm_(x.T, x, alpha=w)
        add_gram(tri, x, w)
    mirror_upper(tri)
    assert torch.equal(tri, tri.T)
    assert torch.allclose(tri, full, rtol=1e-6, atol=1e-4)
    assert torch.equal(torch.triu(tri), torch.triu(full)) or k < 2 * TRI_BLOCK
    if k < 2 * TRI_BLOCK:
        assert torch.equal(tri, full) and gram_macs(k, 10) == 10 * k * k
    else:
        assert gram_macs(k, 10) <= 0.75 * 10 * k * k  # (1 + TRI_BLOCK/K)/2 of the full update
        assert gram_macs(k, 10) == 10 * sum(min(TRI_BLOCK, k - i) * (k - i) for i in range(0, k, TRI_BLOCK))


@torch.no_grad()
def test_a_wide_layers_triangular_statistics_match_a_manual_sum():
    """Through collect_inputs: a Linear with K = 1100 (triangular update) gets the full symmetric sums."""
    class WideLinear(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up = nn.Linear(2, 1100)
            self.down = nn.Linear(1100, 2)

        def forward(self, x):
            t = x.permute(0, 2, 3, 1)
            return 0.1 * self.down(torch.tanh(self.up(t))).permute(0, 3, 1, 2)

    net = WideLinear()
    x0 = start(4, 3)
    res = collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS, batch_size=2, holdout_every=0)
    want = torch.zeros(1100, 1100, dtype=torch.float64)
    for i in range(4):
        x = x0[i : i + 1]
        for n in range(len(SIGMAS) - 1):
            h = torch.tanh(net.up(x.permute(0, 2, 3, 1))).reshape(-1, 1100).double()
            want += h.T @ h
            x = x + (SIGMAS[n + 1] - SIGMAS[n]) * net(x)
    got = res["layers"]["down"].h_fit
    assert torch.equal(got, got.T)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [100, 1300])
def test_products_made_where_the_rows_are_add_the_same_blocks_into_the_sums(k):
    """add_gram_from (what a GPU's inputs use: the products on their device, the sums in host RAM) updates
    the same blocks as add_gram — the whole K×K when narrow, the upper block rows when wide — so the
    mirrored result is the same symmetric sum."""
    from qcorrect.calibration.inputs import TRI_BLOCK, add_gram, add_gram_from, mirror_upper

    g = torch.Generator().manual_seed(k)
    ref, got = torch.zeros(k, k), torch.zeros(k, k)
    for n, w in ((37, 1.0), (300, 4.0)):
        x = torch.randn(n, k, generator=g)
        add_gram(ref, x, w)
        add_gram_from(got, x, w)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-4)
    if k >= 2 * TRI_BLOCK:  # only the upper block rows are filled until the mirror
        assert torch.count_nonzero(got[TRI_BLOCK:, :TRI_BLOCK]) == 0
    mirror_upper(got), mirror_upper(ref)
    assert torch.equal(got, got.T) and torch.allclose(got, ref, rtol=1e-6, atol=1e-4)


class ConvThenWide(nn.Module):
    """A capped conv (64 positions per sample) and a Linear with K = 1100 (triangular update)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.up = nn.Linear(4, 1100)
        self.down = nn.Linear(1100, 2)

    def forward(self, x):
        t = torch.tanh(self.conv(x)).permute(0, 2, 3, 1)
        return 0.1 * self.down(torch.tanh(self.up(t))).permute(0, 3, 1, 2)


@torch.no_grad()
def test_statistics_of_inputs_on_the_sampling_device_are_host_sums_equal_to_copying_the_inputs(device):
    """products="inputs" (default) multiplies on the device the model samples on and keeps the sums in
    host RAM; the same rows (drawn by the CPU generator) and the same sums as copying every input to the
    host first — bit for bit on the CPU, to float32 rounding on a GPU."""
    net = ConvThenWide().to(device)
    x0 = (5.0 * torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(4))).to(device)
    runs = {p: collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS.to(device), batch_size=2, rows_per_k=2,
                              products=p)["layers"] for p in ("inputs", "host")}
    for name in ("conv", "up", "down"):
        a, b = runs["inputs"][name], runs["host"][name]
        assert a.h_fit.device.type == "cpu" and a.absmax.device.type == "cpu"
        assert (a.rows_fit, a.rows_hold) == (b.rows_fit, b.rows_hold) and a.rows_fit > 0
        for t in ("h_fit", "h_hold", "absmax", "absmean", "hi", "lo"):
            if device.type == "cpu":
                assert torch.equal(getattr(a, t), getattr(b, t)), (name, t)
            else:
                assert torch.allclose(getattr(a, t), getattr(b, t), rtol=1e-5, atol=1e-4), (name, t)
    # the conv was capped: fewer rows than its 64 positions × 3 calls × 5 fit samples
    assert runs["inputs"]["conv"].rows_fit < 64 * 3 * 5
    with pytest.raises(CalibrationError, match="products"):
        collect_inputs(Denoiser(net), net, sample_euler, x0, SIGMAS.to(device), products="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_products_on_a_gpu_with_tf32_enabled_are_made_in_float64():
    """A process-wide TF32 setting (another node pack's) would cost H about three digits: add_gram_from
    notices it and multiplies in float64 instead, without changing the setting."""
    from qcorrect.calibration.inputs import add_gram_from, mirror_upper, reduced_float32

    x = torch.randn(4096, 1300, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, 2, 1300)
    want = (x.double().T @ x.double())
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert reduced_float32(torch.device("cuda"))
        h = torch.zeros(1300, 1300)
        add_gram_from(h, x.cuda())
        assert torch.backends.cuda.matmul.allow_tf32  # left as it was
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    mirror_upper(h)
    assert torch.allclose(h.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))  # TF32: ~1e-3
    assert not reduced_float32(torch.device("cpu"))
