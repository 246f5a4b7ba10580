import copy
import json

import pytest
import torch
from torch import nn

from qcorrect.quant import (
    PRESETS, QuantConv2d, QuantizationError, QuantLinear, QuantPlan, preset, quantization_plan,
    quantize_model, quantized_layers, resolve_plan, set_activation_schedule, sigma_scope,
)

from .toy import ToyUNet, make_toy, toy_inputs


def rel_err(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_default_plan_keeps_edges_and_time_embedding():
    d = resolve_plan(make_toy(), "W8A8")
    kept = {n for n, v in d.items() if v["weight"] is None}
    assert kept == {"conv_in", "conv_out", "time_embed.0", "time_embed.2"}
    assert {n for n, v in d.items() if v["weight"]} == {"emb_proj", "block.2", "attn_q"}


def test_include_exclude_patterns():
    plan = QuantPlan(include=("block.*", "attn_*"), exclude=("attn_q",))
    assert set(resolve_plan(make_toy(), plan)) == {"block.2"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_quantize_and_stay_close(name):
    m = make_toy()
    x, t = toy_inputs()
    ref = m(x, t).detach()
    quantize_model(m, name)
    layers = quantized_layers(m)
    assert set(layers) == {"emb_proj", "block.2", "attn_q"}
    assert isinstance(layers["block.2"], QuantConv2d) and isinstance(layers["attn_q"], QuantLinear)
    # storage is real: one uint8 blob, no float weight resident anywhere in the quantized layers
    for layer in layers.values():
        assert layer._parameters["weight"].dtype == torch.uint8 and layer.weight.ndim == 1
        assert layer.qweight.dtype in (torch.int8, torch.uint8)
        assert all(not p.is_floating_point() for n, p in layer.named_parameters() if n != "bias")
    err = rel_err(m(x, t).detach(), ref)
    assert err < {"W8A8": 1e-3, "W8A16": 1e-3, "W4A8": 3e-2, "W4A16": 3e-2, "W4A4": 0.2}[name]


def test_w4_worse_than_w8():
    x, t = toy_inputs()
    ref = make_toy()(x, t).detach()
    errs = {n: rel_err(quantize_model(make_toy(), n)(x, t).detach(), ref) for n in ("W8A8", "W4A8", "W4A4")}
    assert errs["W8A8"] < errs["W4A8"] < errs["W4A4"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compute_dtype_follows_input_and_storage_keeps_dtype(dtype):
    m = quantize_model(make_toy(), "W4A8").to(dtype)
    x, t = toy_inputs()
    assert m(x.to(dtype), t.to(dtype)).dtype == dtype
    layer = m.block[2]
    assert layer.scale.dtype == torch.float16 and layer.zero.dtype == torch.float16
    assert layer.qweight.dtype == torch.uint8 and layer.bias.dtype == dtype


def test_plan_round_trip_json():
    m = quantize_model(make_toy(), preset("W4A8", act_mode="static"))
    plan = quantization_plan(m)
    again = json.loads(json.dumps(plan))
    assert again == plan
    assert plan["preset"] == "W4A8" and plan["layers"]["block.2"]["weight"] == "uint4_g64"
    assert plan["layers"]["attn_q"]["act_mode"] == "static"
    assert QuantPlan.from_json(json.dumps(plan["plan"])) == preset("W4A8", act_mode="static")


@pytest.mark.parametrize("bad,msg", [
    ("W3A8", "unknown preset"),
    (QuantPlan(weights="int5"), "unknown quantized type"),
    (QuantPlan(activations="int8"), "not an activation type"),
    (QuantPlan(act_mode="later"), "unknown activation mode"),
    (QuantPlan(include=("nothing*",)), "selects no layer"),
])
def test_bad_plans_leave_model_untouched(bad, msg):
    m = make_toy()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(QuantizationError, match=msg):
        quantize_model(m, bad)
    assert not quantized_layers(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_failure_midway_is_atomic():
    m = make_toy()
    with torch.no_grad():
        m.attn_q.weight[0, 0] = float("nan")  # the last planned layer is bad
    with pytest.raises(QuantizationError, match="'attn_q'.*NaN"):
        quantize_model(m, "W8A8")
    assert not quantized_layers(m) and type(m.block[2]) is nn.Conv2d


def test_unsupported_conv_padding_mode():
    m = make_toy()
    m.block[2] = nn.Conv2d(64, 64, 3, padding=1, padding_mode="reflect")
    with pytest.raises(QuantizationError, match="'block.2'.*padding_mode"):
        quantize_model(m, "W8A8")
    assert not quantized_layers(m)


def test_requantizing_refused_and_single_layer_refused():
    m = quantize_model(make_toy(), "W8A8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(m, "W8A8")
    with pytest.raises(QuantizationError, match="container"):
        quantize_model(nn.Linear(64, 64), "W8A8")


def test_relax_schedule_validated_before_change():
    m = quantize_model(make_toy(), "W8A8")
    with pytest.raises(QuantizationError):
        set_activation_schedule(m, [(0.0, 1.0, 20)])
    assert all(not l.act.schedule for l in quantized_layers(m).values())
    assert set_activation_schedule(m, [(0.0, 1.0, 16)], patterns=("block.*",)) == 1
    assert quantization_plan(m)["layers"]["block.2"]["schedule"] == [[0.0, 1.0, 16]]


def test_relaxed_sigma_range_is_more_accurate():
    m = quantize_model(make_toy(), "W8A4" if False else preset("W4A4"))
    x, t = toy_inputs()
    ref = make_toy()(x, t).detach()
    set_activation_schedule(m, [(0.0, 1.0, 16)])
    with sigma_scope(m, 0.5):
        relaxed = rel_err(m(x, t).detach(), ref)
    with sigma_scope(m, 5.0):
        strict = rel_err(m(x, t).detach(), ref)
    assert relaxed < strict / 2


def test_dequantized_weight_and_no_float_copy():
    src = make_toy()
    m = quantize_model(copy.deepcopy(src), "W8A8")
    w = m.block[2].dequantized_weight()
    assert w.shape == src.block[2].weight.shape and w.dtype == torch.float32
    assert (w - src.block[2].weight).abs().max() < 0.01
    assert m.block[2].weight.dtype == torch.uint8  # the parameter named weight is the blob
    assert all(not p.is_floating_point() for n, p in m.named_parameters() if n.endswith("block.2.weight"))


def test_quantized_model_runs_on_device_and_keeps_storage_dtypes(device):
    m = quantize_model(make_toy(), "W4A8").to(device)
    x, t = toy_inputs()
    out = m(x.to(device), t.to(device))
    assert out.device.type == device.type and torch.isfinite(out).all()
    ref = quantize_model(make_toy(), "W4A8")(x, t)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    assert m.block[2].qweight.device.type == device.type and m.block[2].scale.dtype == torch.float16
