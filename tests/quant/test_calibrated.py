"""quantize_calibrated: per-layer rounding, fallback, scales, outliers and budget from statistics (issue 11)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcorrect.bench.common import resident_bytes
from qcorrect.quant import QuantizationError, load_quantized, quantization_plan, quantize_model, quantized_layers, save_quantized
from qcorrect.quant.budget import fp16_bytes
from qcorrect.quant.calibrated import CalibratedConfig, CalibratedSolver, calibrated_summary, quantize_calibrated
from qcorrect.quant.layerinputs import LayerInputs


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(4, 64, 3, padding=1)
        self.mid = nn.Conv2d(64, 64, 3, padding=1)
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 64)
        self.conv_out = nn.Conv2d(64, 4, 3, padding=1)

    def forward(self, x):
        h = self.mid(self.conv_in(x))
        t = self.b(torch.tanh(self.a(h.flatten(2).transpose(1, 2))))
        return self.conv_out(h + t.transpose(1, 2).reshape(h.shape))


def mixing(k, seed):
    return torch.randn(k, k, generator=torch.Generator().manual_seed(seed)) / k**0.5


@torch.no_grad()
def batches(n, seed):
    """Correlated inputs to the whole net (so every layer's inputs are anisotropic)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 6, 6, generator=g).cumsum(1)
    return z + 0.3 * torch.randn(n, 4, 6, 6, generator=g)


@torch.no_grad()
def stats_of(net, fit, hold, spike=None):
    """LayerInputs from explicit inputs (hooks on the float net)."""
    rows = {}

    def grab(name, m):
        def hook(mod, args):
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                r = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride).transpose(1, 2).reshape(-1, mod.weight[0].numel())
            else:
                r = x.reshape(-1, x.shape[-1])
            rows.setdefault(name, []).append(r)
        return hook

    out = {}
    handles = [m.register_forward_pre_hook(grab(n, m)) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for x in (fit, hold):
        rows.clear()
        net(x)
        for n, r in rows.items():
            out.setdefault(n, []).append(torch.cat(r))
    for h in handles:
        h.remove()
    res = {}
    for n, (f, h) in out.items():
        m = net.get_submodule(n)
        c = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        if spike is not None and n == spike:
            f, h = f.clone(), h.clone()
            f[0, 0] = h[0, 0] = 1e5
        res[n] = LayerInputs.from_rows(f, h, channels=c, kind="linear" if isinstance(m, nn.Linear) else "conv2d")
    return res


def output_mse(model, ref, x):
    return float((model(x) - ref(x)).pow(2).mean())


@pytest.fixture(scope="module")
def setting():
    net = Net().eval()
    fit, hold, test = batches(48, 1), batches(24, 2), batches(24, 3)
    return net, stats_of(net, fit, hold), test


@pytest.mark.parametrize("preset", ["W4A16", "W4A8", "W8A8"])
def test_gptq_lowers_the_output_error_of_round_to_nearest_with_the_same_bytes(setting, preset):
    net, stats, test = setting
    rtn = quantize_model(Net(), preset)
    cal = Net()
    rep = quantize_calibrated(cal, preset, stats)
    with torch.no_grad():
        assert output_mse(cal, net, test) < output_mse(rtn, net, test)
    assert resident_bytes(cal) == resident_bytes(rtn)
    for name, layer in quantized_layers(cal).items():
        assert layer.weight.shape == quantized_layers(rtn)[name].weight.shape
        assert layer.calib["rounding"] in ("rtn", "gptq", "gptq_act_order")
    assert any(c["rounding"].startswith("gptq") for c in rep["layers"].values())
    assert "GPTQ" in rep["summary"] and calibrated_summary(cal) == rep["summary"]


def test_the_choices_are_saved_and_load_with_load_quantized(setting, tmp_path):
    net, stats, test = setting
    cal = Net()
    quantize_calibrated(cal, "W4A8", stats, CalibratedConfig(awq=True))
    save_quantized(cal, str(tmp_path / "c.safetensors"))
    back = load_quantized(Net(), str(tmp_path / "c.safetensors"))
    assert quantization_plan(back)["layers"] == quantization_plan(cal)["layers"]
    with torch.no_grad():
        assert torch.equal(back(test), cal(test))


def test_the_held_out_check_falls_back_to_round_to_nearest(setting):
    net, stats, _ = setting
    # statistics whose fit half says nothing about the held-out half: GPTQ optimises the wrong thing
    bad = {n: LayerInputs(**{**s.__dict__, "h_fit": torch.diag(torch.rand(s.k) * 1e-3) + s.h_fit.flip(0).flip(1)})
           for n, s in stats.items()}
    rep = quantize_calibrated(Net(), "W4A16", bad)
    rtn_layers = [n for n, c in rep["layers"].items() if c["rounding"] == "rtn"]
    assert rtn_layers and all("held-out" in rep["layers"][n]["note"] for n in rtn_layers)
    assert all(c["held_out_error_vs_rtn"] <= 1.0 for c in rep["layers"].values())


def test_without_statistics_or_with_too_few_rows_a_layer_is_rounded_to_nearest(setting):
    net, stats, _ = setting
    some = {k: v for k, v in stats.items() if k != "mid"}
    few = LayerInputs.from_rows(torch.randn(3, 576), torch.randn(2, 576), channels=64, kind="conv2d")
    rep = quantize_calibrated(Net(), "W4A16", {**some, "mid": few} if False else some)
    assert rep["layers"]["mid"] == {"rounding": "rtn", "note": "no calibration statistics → round-to-nearest"}
    rep = quantize_calibrated(Net(), "W4A16", {**some, "mid": few})
    assert rep["layers"]["mid"]["note"] == "3 fit rows < 16 → round-to-nearest"
    rtn = quantize_model(Net(), "W4A16")
    cal = Net()
    quantize_calibrated(cal, "W4A16", some)
    assert torch.equal(quantized_layers(cal)["mid"].weight, quantized_layers(rtn)["mid"].weight)


def test_non_finite_statistics_are_refused_and_leave_the_model_alone(setting):
    net, stats, _ = setting
    bad = dict(stats)
    broken = LayerInputs(**{**stats["b"].__dict__})
    broken.h_hold = broken.h_hold.clone()
    broken.h_hold[0, 1] = float("nan")
    bad["b"] = broken
    m = Net()
    with pytest.raises(QuantizationError, match="'b'.*NaN or inf"):
        quantize_calibrated(m, "W4A16", bad)
    assert not quantized_layers(m)


def test_activation_outliers_keep_that_layer_16_bit(setting):
    net, _, _ = setting
    stats = stats_of(net, batches(48, 1), batches(24, 2), spike="b")
    cal = Net()
    rep = quantize_calibrated(cal, "W4A8", stats)
    assert "activations kept 16-bit" in rep["layers"]["b"]["outliers"]
    layers = quantized_layers(cal)
    assert layers["b"].act.qtype is None and layers["a"].act.qtype is not None
    assert "1 with 16-bit activations (outliers)" in rep["summary"]
    rep16 = quantize_calibrated(Net(), "W4A16", stats)  # nothing to protect without activation quantization
    assert "outliers" not in rep16["layers"]["b"]


def test_awq_is_never_worse_on_held_out_and_stores_no_scale_it_did_not_choose(setting):
    """The toy net's input channels are too alike for power-of-two scales to help, so AWQ keeps s = 1
    everywhere here (a layer where it does scale: the test after the float32 ones)."""
    net, stats, test = setting
    cal = Net()
    rep = quantize_calibrated(cal, "W4A16", stats, CalibratedConfig(rounding="rtn", awq=True))
    for n, m in quantized_layers(cal).items():
        assert m.has_input_scale == (rep["layers"][n]["awq_alpha"] > 0), n
    assert all(c["held_out_error_vs_rtn"] <= 1.0 for c in rep["layers"].values())


@pytest.mark.parametrize("options", [("int8",), ("rank",), ("int8", "rank")])
def test_a_budget_is_spent_within_the_bytes_and_lowers_the_error(setting, options):
    net, stats, test = setting
    plain = Net()
    quantize_calibrated(plain, "W4A16", stats)
    base = resident_bytes(copy.deepcopy(plain).half())
    fp16 = fp16_bytes(Net())
    assert fp16 == resident_bytes(Net().half())
    budget = (base + 0.05 * fp16) / fp16
    cal = Net()
    rep = quantize_calibrated(cal, "W4A16", stats, CalibratedConfig(budget=budget, budget_options=options))
    alloc = rep["allocation"]
    got = resident_bytes(copy.deepcopy(cal).half())
    assert base < got <= budget * fp16
    assert got == alloc["base_bytes"] + alloc["spent_bytes"]
    assert alloc["int8"] or alloc["ranks"]
    if "int8" not in options:
        assert not alloc["int8"]
    if "rank" not in options:
        assert not alloc["ranks"]
    with torch.no_grad():
        assert output_mse(cal, net, test) < output_mse(plain, net, test)


def test_a_budget_below_the_base_spends_nothing_and_says_so(setting):
    net, stats, _ = setting
    rep = quantize_calibrated(Net(), "W4A16", stats, CalibratedConfig(budget=0.01))
    assert rep["allocation"]["spent_bytes"] == 0 and "nothing to spend" in rep["allocation"]["note"]


def test_bad_configs_are_refused():
    for bad in (dict(rounding="adaround"), dict(act_order="maybe"), dict(damp=0.0), dict(budget=1.5),
                dict(budget_options=("int2",)), dict(float32_from=-1), dict(float32_from=1.5), dict(float32_from=True)):
        with pytest.raises(QuantizationError):
            CalibratedConfig(**bad).validate()


def test_the_budget_can_store_the_plans_16_bit_layers_at_int8_to_make_room(setting, tmp_path):
    net, stats, test = setting
    plain = Net()
    quantize_calibrated(plain, "W4A16", stats)
    base = resident_bytes(copy.deepcopy(plain).half())
    fp16 = fp16_bytes(Net())
    cal = Net()
    rep = quantize_calibrated(cal, "W4A16", stats, CalibratedConfig(budget=base / fp16))  # no headroom as planned
    alloc = rep["allocation"]
    assert set(alloc["kept_int8"]) | set(alloc["kept_16bit"]) == {"conv_in", "conv_out"}
    assert alloc["kept_int8"] and (alloc["int8"] or alloc["ranks"])
    got = resident_bytes(copy.deepcopy(cal).half())
    assert got <= base and got == alloc["base_bytes"] + alloc["spent_bytes"]
    demoted = quantized_layers(cal)[alloc["kept_int8"][0]]
    assert demoted.wqtype.name == "int8" and demoted.act.qtype is None
    assert "16-bit layers stored at int8" in rep["summary"]
    save_quantized(cal, str(tmp_path / "k.safetensors"))
    back = load_quantized(Net(), str(tmp_path / "k.safetensors"))
    assert set(quantization_plan(back)["kept"]) == set(alloc["kept_16bit"])
    with torch.no_grad():
        assert torch.equal(back(test), cal(test))
        assert output_mse(cal, net, test) < output_mse(plain, net, test)
    no_kept = quantize_calibrated(Net(), "W4A16", stats, CalibratedConfig(budget=base / fp16, budget_options=("int8", "rank")))
    assert no_kept["allocation"]["spent_bytes"] == 0


def test_uint3_lowers_an_insensitive_layer_to_pay_for_int8_where_the_error_counts(setting, tmp_path):
    """Mixed precision both ways: with ``uint3`` the budget may store a layer whose share of the end-to-end
    error is small at 3 bits and spend what that frees on the layers that matter, within the same bytes."""
    net, stats, test = setting
    plain = Net()
    quantize_calibrated(plain, "W4A16", stats)
    base = resident_bytes(copy.deepcopy(plain).half())
    fp16 = fp16_bytes(Net())
    # room for less than one layer at int8 (each of "a" and "b" takes 3,840 bytes more at int8)
    budget = (base + 3500) / fp16
    # "mid" (64×576 weights, the largest 4-bit layer) barely reaches the output; "a" and "b" dominate it
    sens = {"mid": 1e-9, "a": 1.0, "b": 1.0}
    cfg = CalibratedConfig(budget=budget, budget_options=("int8", "uint3"))
    cal = Net()
    rep = quantize_calibrated(cal, "W4A16", stats, cfg, sensitivity=sens)
    alloc = rep["allocation"]
    assert alloc["uint3"] == ["mid"] and set(alloc["int8"]) == {"a", "b"}
    layers = quantized_layers(cal)
    assert layers["mid"].wqtype.name == "uint3_g64" and layers["a"].wqtype.name == "int8"
    assert "1 lowered to 3 bits by the budget" in rep["summary"] and rep["layers"]["mid"]["budget"] == "uint3_g64"
    got = resident_bytes(copy.deepcopy(cal).half())
    assert got <= budget * fp16 and got == alloc["base_bytes"] + alloc["spent_bytes"]
    # the same bytes without the option: too few for one int8 layer, so nothing moves
    same = quantize_calibrated(Net(), "W4A16", stats, CalibratedConfig(budget=budget, budget_options=("int8",)),
                               sensitivity=sens)["allocation"]
    assert not same.get("uint3") and not same["int8"]
    # the weighted error the allocation minimises is lower with the option, at no more bytes
    with torch.no_grad():
        err_mixed = sum(sens[n] * float((cal.get_submodule(n).dequantized_weight() - net.get_submodule(n).weight).pow(2).sum())
                        for n in ("mid", "a", "b"))
        err_plain = sum(sens[n] * float((plain.get_submodule(n).dequantized_weight() - net.get_submodule(n).weight).pow(2).sum())
                        for n in ("mid", "a", "b"))
    assert err_mixed < 0.1 * err_plain
    # 3-bit storage and the plan round-trip through the file
    save_quantized(cal, str(tmp_path / "m.safetensors"))
    back = load_quantized(Net(), str(tmp_path / "m.safetensors"))
    assert quantized_layers(back)["mid"].wqtype.name == "uint3_g64"
    with torch.no_grad():
        assert torch.equal(back(test), cal(test))


def test_uint3_with_a_budget_nothing_fits_in_changes_nothing_and_says_so(setting):
    net, stats, _ = setting
    rep = quantize_calibrated(Net(), "W4A16", stats, CalibratedConfig(budget=0.01, budget_options=("int8", "uint3")))
    assert not rep["allocation"].get("uint3") and not rep["allocation"]["int8"]
    assert "nothing changed" in rep["allocation"]["note"]


def test_layers_whose_input_size_does_not_fit_group_64_still_get_calibrated_rounding():
    from tests.quant.test_fallback import EXPECTED, Mixed, inputs
    from qcorrect.quant import plan_summary

    net = Mixed().eval()
    rows = {}

    def grab(name):
        def hook(mod, args):
            x = args[0]
            r = (F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride).transpose(1, 2).reshape(-1, mod.weight[0].numel())
                 if isinstance(mod, nn.Conv2d) else x.reshape(-1, x.shape[-1]))
            rows.setdefault(name, []).append(r)
        return hook

    hs = [m.register_forward_pre_hook(grab(n)) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for seed in range(40):
            net(torch.randn(2, 128, 6, 6, generator=torch.Generator().manual_seed(seed)).cumsum(1) / 8)
    for h in hs:
        h.remove()
    stats = {}
    for n, r in rows.items():
        r = torch.cat(r)
        m = net.get_submodule(n)
        stats[n] = LayerInputs.from_rows(r[: len(r) * 3 // 4], r[len(r) * 3 // 4 :],
                                         channels=m.in_features if isinstance(m, nn.Linear) else m.in_channels,
                                         kind="linear" if isinstance(m, nn.Linear) else "conv2d")
    cal = Mixed()
    rep = quantize_calibrated(cal, "W4A8", stats)
    layers = quantized_layers(cal)
    for name, (weight, note) in EXPECTED.items():
        if weight is None:
            assert name not in layers
        else:
            assert layers[name].wqtype.name == weight and layers[name].fallback == note
            assert rep["layers"][name]["held_out_error_vs_rtn"] <= 1.0
    assert any(rep["layers"][n]["rounding"].startswith("gptq") for n in ("c36", "c32", "l36", "l96"))
    assert "with a fallback" in plan_summary(cal)
    with torch.no_grad():
        convs, lin = cal(inputs())
    assert torch.isfinite(convs).all() and torch.isfinite(lin).all()


def test_statistics_singular_even_after_damping_fall_back_to_round_to_nearest(setting, monkeypatch):
    from qcorrect.quant import gptq as gptq_mod

    net, stats, _ = setting

    def never(*a, **k):
        raise RuntimeError("not positive definite")

    with pytest.raises(QuantizationError, match="singular even after damping"):
        monkeypatch.setattr(gptq_mod.torch.linalg, "cholesky", never)
        gptq_mod.gptq_quantize(torch.randn(4, 64), torch.eye(64), "uint4_g64")
    rep = quantize_calibrated(Net(), "W4A16", stats)
    assert all(c["rounding"] == "rtn" and "singular" in c["gptq_error"] for c in rep["layers"].values())


def _same_model(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("cfg", [
    CalibratedConfig(budget=0.45),
    CalibratedConfig(budget=0.45, awq=True),
    CalibratedConfig(budget=0.45, budget_options=("int8", "rank", "kept", "uint3"), act_order="both"),
    CalibratedConfig(budget=0.45, budget_options=("rank",), max_rank=6),
    CalibratedConfig(),
    CalibratedConfig(budget=0.45, budget_options=("int8", "rank", "kept", "uint3"), float32_from=0),
], ids=["greedy", "awq", "mixed", "rank", "no-budget", "mixed-float32"])
def test_statistics_added_in_groups_give_the_same_model_as_all_at_once(setting, cfg):
    """CalibratedSolver: layers solved group by group (any order, each group's statistics then dropped)
    give the model quantize_calibrated makes from all statistics at once, bit for bit: each layer's
    budget candidates are solved from its own statistics and the allocation sees the plan's order."""
    net, stats, test = setting
    whole = Net()
    rep = quantize_calibrated(whole, "W4A8", stats, cfg, sensitivity={"mid": 0.5, "a": 2.0, "b": 1.0})
    solver = CalibratedSolver(Net(), "W4A8", cfg)
    names = list(stats)
    for group in (names[3:], names[1:3], names[:1]):
        solver.add({n: LayerInputs(**vars(stats[n])) for n in group})
    rep2 = solver.finish(sensitivity={"mid": 0.5, "a": 2.0, "b": 1.0})
    assert _same_model(whole, solver.module)
    assert rep["layers"] == rep2["layers"] and rep["allocation"] == rep2["allocation"]
    if cfg.budget is not None:
        assert rep["allocation"]["int8"] or rep["allocation"]["ranks"] or rep["allocation"].get("uint3")


def test_the_solver_keeps_no_statistics_and_refuses_misuse(setting):
    import gc
    import weakref

    net, stats, _ = setting
    solver = CalibratedSolver(Net(), "W4A16", CalibratedConfig(budget=0.3, budget_options=("int8", "rank", "kept", "uint3")))
    group = {n: LayerInputs(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in vars(stats[n]).items()})
             for n in ("mid", "a")}
    refs = [weakref.ref(s.h_fit) for s in group.values()] + [weakref.ref(s.h_hold) for s in group.values()]
    solver.add(group)
    del group
    gc.collect()
    assert all(r() is None for r in refs)  # nothing the solver keeps refers to the K×K sums
    with pytest.raises(QuantizationError, match="given twice"):
        solver.add({"mid": stats["mid"]})
    solver.add({"not_a_layer": stats["mid"]})  # layers the plan does not quantize are ignored
    rep = solver.finish()
    # conv_in, b and conv_out got no statistics: rounded to nearest, with a note
    assert "no calibration statistics" in rep["layers"]["b"]["note"]
    assert rep["layers"]["mid"]["rounding"].startswith(("gptq", "rtn")) and "note" not in rep["layers"]["a"]
    for call in (lambda: solver.add({"a": stats["a"]}), solver.finish):
        with pytest.raises(QuantizationError, match="already written"):
            call()


def test_the_held_out_errors_of_every_rank_match_a_direct_computation(setting):
    """budget.prepare's rank errors (one R·K² product for all ranks) equal tr(ΔW H ΔWᵀ) of each branch."""
    from qcorrect.quant.budget import _effective, _flat, prepare, reachable_ranks
    from qcorrect.quant.calibrated import solve_layer
    from qcorrect.quant.gptq import output_error

    net, stats, _ = setting
    cfg = CalibratedConfig(budget=0.3, budget_options=("rank",), max_rank=10).validate()
    m = net.get_submodule("mid")
    sol = solve_layer("mid", m.weight, stats["mid"], "uint4_g64", None, cfg)
    prepare("mid", m.weight, sol, stats["mid"], cfg)
    cand = sol.candidates
    assert sorted(cand.rank_errors) == reachable_ranks(10, cand.s.numel()) == [4, 8, 10]
    w2 = _flat(m.weight)
    for r, err in cand.rank_errors.items():
        eff = _effective(sol, tuple(m.weight.shape)) + cand.a[:, :r].double() @ cand.b[:r].double()
        assert err == pytest.approx(output_error(w2, eff, stats["mid"].h_hold), rel=1e-9)
    assert cand.rank_errors[10] < cand.rank_errors[4] < sol.err_hold
    assert reachable_ranks(32, 3) == [3] and reachable_ranks(0, 50) == []


def test_layers_solved_in_float32_match_float64_and_narrow_layers_are_untouched(setting):
    """float32_from: the layers at least that wide are solved in float32 (factorizations, sweep, held-out
    errors, rank errors) and land where float64 does; below it nothing changes, bit for bit."""
    from qcorrect.quant.budget import _effective, _flat, prepare
    from qcorrect.quant.calibrated import solve_layer
    from qcorrect.quant.gptq import output_error

    net, stats, test = setting
    mixed = dict(budget=0.45, budget_options=("int8", "rank", "kept", "uint3"))
    f64, f32 = Net(), Net()
    rep64 = quantize_calibrated(f64, "W4A8", stats, CalibratedConfig(float32_from=None, **mixed))
    rep32 = quantize_calibrated(f32, "W4A8", stats, CalibratedConfig(float32_from=0, **mixed))
    assert rep32["config"]["float32_from"] == 0
    assert all(c["solve_dtype"] == "float32" for c in rep32["layers"].values() if "held_out_error_vs_rtn" in c)
    assert not any("solve_dtype" in c for c in rep64["layers"].values())
    n = sum(1 for c in rep32["layers"].values() if "held_out_error_vs_rtn" in c)
    assert f"{n} solved in float32" in rep32["summary"] and "float32" not in rep64["summary"]
    for name, c64 in rep64["layers"].items():
        assert rep32["layers"][name]["held_out_error_vs_rtn"] == pytest.approx(c64["held_out_error_vs_rtn"], abs=2e-3), name
    with torch.no_grad():
        assert output_mse(f32, net, test) == pytest.approx(output_mse(f64, net, test), rel=0.05)
    default = Net()  # every layer here is far narrower than the default threshold: float64, the same model
    quantize_calibrated(default, "W4A8", stats, CalibratedConfig(**mixed))
    assert _same_model(default, f64)
    cfg = CalibratedConfig(budget=0.3, budget_options=("rank",), max_rank=10, float32_from=0).validate()
    m = net.get_submodule("mid")
    sol = solve_layer("mid", m.weight, stats["mid"], "uint4_g64", None, cfg)
    prepare("mid", m.weight, sol, stats["mid"], cfg)
    cand = sol.candidates
    assert cand.s.dtype == torch.float32
    for r, err in cand.rank_errors.items():
        eff = _effective(sol, tuple(m.weight.shape)) + cand.a[:, :r].double() @ cand.b[:r].double()
        assert err == pytest.approx(output_error(_flat(m.weight), eff, stats["mid"].h_hold), rel=1e-4)


def test_awq_scales_a_layer_whose_input_channels_differ_a_lot_in_either_precision():
    """Inputs whose channel magnitudes span 300× (the toy net's barely differ, so AWQ keeps s = 1 there):
    AWQ picks power-of-two scales that lower the held-out error, and its search (the out·K² products
    in the layer's solve dtype) lands on the same α and error in float32 as in float64."""
    g = torch.Generator().manual_seed(0)
    k = 256
    mag = torch.logspace(-1, 1.5, k)[torch.randperm(k, generator=g)]
    stats = LayerInputs.from_rows(torch.randn(2000, k, generator=g) * mag, torch.randn(1000, k, generator=g) * mag)
    got = {}
    for f32 in (None, 0):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(k, 64))
        nn.init.normal_(net[0].weight, std=0.05)
        cfg = CalibratedConfig(rounding="rtn", awq=True, float32_from=f32)
        got[f32] = (quantize_calibrated(net, "W4A16", {"0": LayerInputs(**vars(stats))}, cfg)["layers"]["0"],
                    quantized_layers(net)["0"].input_scale.float())
    (c64, s64), (c32, s32) = got[None], got[0]
    assert c64["awq_alpha"] > 0 and c64["held_out_error_vs_rtn"] < 0.9
    assert torch.equal(torch.exp2(torch.round(torch.log2(s64))), s64) and float(s64.max() / s64.min()) > 1
    assert c32["awq_alpha"] == c64["awq_alpha"] and torch.equal(s32, s64)
    assert c32["held_out_error_vs_rtn"] == pytest.approx(c64["held_out_error_vs_rtn"], abs=1e-3)


MIXED = CalibratedConfig(budget=0.45, budget_options=("int8", "rank", "kept", "uint3"))
SENS = {"mid": 0.5, "a": 2.0, "b": 1.0}


def _moved_counter(monkeypatch):
    """Make every layer's statistics look as if they lived elsewhere than the solve device (the CPU here),
    so the solver takes its copy-over / copy-back path; returns the list of layers it copied."""
    copied = []
    real_to = LayerInputs.to

    def to(self, device):
        copied.append(self.k)
        return real_to(self, device) if not torch.device(device).type == "cpu" else LayerInputs(**vars(self))

    monkeypatch.setattr(LayerInputs, "on", lambda self, device: False)
    monkeypatch.setattr(LayerInputs, "to", to)
    return copied


def test_layers_solved_on_a_solve_device_give_the_same_model(setting, monkeypatch):
    """CalibratedSolver(solve_device=…): each layer's statistics are copied to that device, solved there and
    the solution (storage, branch, budget candidates) copied back; the model, the choices and the
    allocation are those of solving where the statistics are (bit for bit on the same device)."""
    net, stats, _ = setting
    whole = Net()
    rep = quantize_calibrated(whole, "W4A8", stats, MIXED, sensitivity=SENS)
    copied = _moved_counter(monkeypatch)
    solver = CalibratedSolver(Net(), "W4A8", MIXED, solve_device="cpu")
    solver.add(stats)
    rep2 = solver.finish(sensitivity=SENS)
    assert len(copied) == len(stats) == rep2["placement"]["solve_device"]
    assert rep2["placement"] == {"solve_device": len(stats), "too_large": 0, "out_of_memory": 0, "tf32": 0}
    assert _same_model(whole, solver.module)
    assert rep["layers"] == rep2["layers"] and rep["allocation"] == rep2["allocation"]
    assert "placement" not in rep  # only reported when a solve device was given


def test_a_layer_out_of_memory_on_the_solve_device_is_solved_where_its_statistics_are(setting, monkeypatch):
    net, stats, _ = setting
    whole = Net()
    quantize_calibrated(whole, "W4A8", stats, MIXED, sensitivity=SENS)
    _moved_counter(monkeypatch)
    solver = CalibratedSolver(Net(), "W4A8", MIXED, solve_device="cpu")
    real = solver._solution
    tries = []

    def solution(name, st, kept):
        tries.append(name)
        if name == "mid" and tries.count("mid") == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(name, st, kept)

    monkeypatch.setattr(solver, "_solution", solution)
    solver.add(stats)
    rep = solver.finish(sensitivity=SENS)
    assert tries.count("mid") == 2 and rep["placement"]["out_of_memory"] == 1
    assert rep["placement"]["solve_device"] == len(stats) - 1
    assert _same_model(whole, solver.module)


def test_a_solve_device_with_tf32_products_is_not_used(setting, monkeypatch):
    import qcorrect.quant.calibrated as calibrated

    net, stats, _ = setting
    copied = _moved_counter(monkeypatch)
    monkeypatch.setattr(calibrated, "reduced_float32", lambda device: True)
    solver = CalibratedSolver(Net(), "W4A16", CalibratedConfig(), solve_device="cpu")
    solver.add(stats)
    rep = solver.finish()
    solved = len(solver.layers)  # the plan's quantized layers (3 of the 5)
    assert not copied and rep["placement"] == {"solve_device": 0, "too_large": 0, "out_of_memory": 0, "tf32": solved}


def test_statistics_already_on_the_solve_device_are_not_copied(setting):
    net, stats, _ = setting
    st = stats["mid"]
    assert st.on("cpu") and st.to("cpu") is st and not st.on("meta")
    moved = st.to("meta")
    assert moved.h_fit.device.type == "meta" and moved.rows_fit == st.rows_fit and st.h_fit.device.type == "cpu"
    solver = CalibratedSolver(Net(), "W4A16", CalibratedConfig(), solve_device="cpu")
    solver.add(stats)
    assert solver.finish()["placement"]["solve_device"] == 0


def test_the_solve_size_counts_the_statistics_and_the_solve_dtypes_matrices():
    from qcorrect.quant.calibrated import SOLVE_MATRICES, solve_bytes

    k, out = 23040, 1280
    f32, f64 = solve_bytes(k, out, torch.float32), solve_bytes(k, out, torch.float64)
    assert f32 == int(8 * k * k + SOLVE_MATRICES * 4 * k * k + 16 * 4 * out * k)
    assert 12 * 2**30 < f32 < 16 * 2**30 < f64  # SD1.5's widest layer: about 14 GiB in float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_solved_on_a_gpu_match_the_cpu_solve(setting, monkeypatch):
    """The statistics on the CPU, the solve on the GPU: the solutions come back to the CPU and make a model
    whose layers close to the CPU solve's held-out errors; a device without room is not used."""
    import qcorrect.quant.calibrated as calibrated

    net, stats, test = setting
    cpu = Net()
    rep = quantize_calibrated(cpu, "W4A8", stats, MIXED, sensitivity=SENS)
    solver = CalibratedSolver(Net(), "W4A8", MIXED, solve_device="cuda")
    solver.add(stats)
    rep2 = solver.finish(sensitivity=SENS)
    assert rep2["placement"]["solve_device"] == len(stats) and rep2["placement"]["tf32"] == 0
    assert all(t.device.type == "cpu" for t in solver.module.state_dict().values())
    for name, calib in rep["layers"].items():
        if "held_out_error_vs_rtn" in calib:
            assert rep2["layers"][name]["held_out_error_vs_rtn"] == pytest.approx(calib["held_out_error_vs_rtn"], abs=2e-3)
    monkeypatch.setattr(calibrated, "free_bytes", lambda device: 0)
    small = CalibratedSolver(Net(), "W4A16", CalibratedConfig(), solve_device="cuda")
    small.add(stats)
    assert small.finish()["placement"]["too_large"] == len(small.layers)
