"""Optional extras of the quantized layers: AWQ-style input scales and a low-rank branch (issue 11)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcorrect.bench.common import resident_bytes
from qcorrect.quant import (
    ActQuantizer, QuantConv2d, QuantLinear, QuantizationError, load_quantized, quantization_plan, quantize_model,
    quantized_layers, save_quantized,
)
from qcorrect.quant.weights import quantize_to_blob


def with_extras(layer, scale=True, rank=3, seed=0):
    """Give a quantized layer input scales (blob re-quantized as W·diag(s)) and a random branch."""
    g = torch.Generator().manual_seed(seed)
    c, out = layer.in_channels_count(), layer.weight_shape[0]
    k = layer.weight_shape[1] if len(layer.weight_shape) == 2 else layer.weight_shape[1] * 9
    w = layer.dequantized_weight()
    if scale:
        s = (torch.rand(c, generator=g) + 0.5).half().float()
        layer.set_input_scale(s)
        view = s.reshape(1, -1, *([1] * (w.ndim - 2)))
        layer.weight = nn.Parameter(quantize_to_blob(w * view, layer.wqtype), requires_grad=False)
    if rank:
        layer.set_lowrank(0.01 * torch.randn(out, rank, generator=g), 0.01 * torch.randn(rank, k, generator=g))
    return layer


def qlinear(act=None):
    torch.manual_seed(1)
    fp = nn.Linear(128, 16)
    return QuantLinear.from_float(fp, "uint4_g64", ActQuantizer(act, "dynamic" if act else "none"), "l")


def qconv():
    torch.manual_seed(2)
    fp = nn.Conv2d(64, 8, 3, padding=1)
    return QuantConv2d.from_float(fp, "uint4_g64", ActQuantizer(None, "none"), "c")


def test_linear_forward_is_the_effective_weight_and_branch():
    q = with_extras(qlinear())
    x = torch.randn(5, 7, 128)  # tokens: the channel is the last dim
    s = q.input_scale.float()
    main = F.linear(x / s, q.stored_weight(), q.bias)
    branch = x @ q.lowrank_down.float().T @ q.lowrank_up.float().T
    assert torch.allclose(q(x), main + branch, atol=1e-6)
    assert torch.allclose(q(x), F.linear(x, q.dequantized_weight(), q.bias), atol=1e-4)


def test_conv_forward_is_the_effective_weight():
    q = with_extras(qconv())
    x = torch.randn(2, 64, 5, 5)
    assert torch.allclose(q(x), F.conv2d(x, q.dequantized_weight(), q.bias, 1, 1), atol=1e-4)


def test_input_scale_reaches_the_activation_quantizer():
    q = with_extras(qlinear("a8_asym"), rank=0)
    x = torch.randn(4, 128)
    want = F.linear(q.act(x / q.input_scale.float()), q.stored_weight(), q.bias)
    assert torch.equal(q(x), want)


@pytest.mark.parametrize("make", [qlinear, qconv])
def test_convert_and_set_weight_round_trip_keeps_the_blob(make):
    q = with_extras(make())
    blob = q.weight.clone()
    w = q.convert_weight(q.weight.to(torch.float32, copy=True))
    assert torch.equal(w, q.dequantized_weight())
    assert q.set_weight(w) is None and torch.equal(q.weight, blob)


def test_a_lora_patch_is_added_to_the_effective_weight():
    q = with_extras(qlinear())
    delta = 0.02 * torch.randn(16, 128)
    patched = q.convert_weight(q.weight.to(torch.float32, copy=True)) + delta
    q.set_weight(patched)
    # only the rounding of the patched weight's main part differs from the exact patched weight
    x = torch.randn(64, 128)
    exact = F.linear(x, patched, q.bias)
    plain = qlinear()
    plain.set_weight(patched)  # the same patch on a layer without extras
    assert (q(x) - exact).pow(2).mean() < 2 * (plain(x) - exact).pow(2).mean()
    assert q.rank == 3 and q.has_input_scale  # the extras stay


def test_weight_functions_patch_the_effective_weight():
    q = with_extras(qlinear())
    x = torch.randn(3, 128)
    dw = 0.02 * torch.randn(16, 128)
    want = F.linear(x, q.dequantized_weight() + dw, q.bias)
    q.weight_function.append(lambda w: w + dw)
    assert torch.allclose(q(x), want, atol=1e-4)


def test_bad_extras_are_refused():
    q = qlinear()
    with pytest.raises(QuantizationError, match="128 finite positive"):
        q.set_input_scale(torch.zeros(128))
    with pytest.raises(QuantizationError, match=r"\[16, r\]"):
        q.set_lowrank(torch.zeros(16, 2), torch.zeros(3, 128))
    with pytest.raises(QuantizationError, match="NaN or inf"):
        q.set_lowrank(torch.full((16, 2), float("nan")), torch.zeros(2, 128))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv_in = nn.Conv2d(4, 64, 3, padding=1)
        self.mid = nn.Conv2d(64, 64, 3, padding=1)
        self.lin = nn.Linear(128, 32)
        self.conv_out = nn.Conv2d(64, 4, 3, padding=1)


def test_extras_and_choices_round_trip_through_files_and_count_as_bytes(tmp_path):
    m = quantize_model(Net(), "W4A8")
    before = resident_bytes(m)
    layers = quantized_layers(m)
    with_extras(layers["mid"], rank=2)
    with_extras(layers["lin"], scale=False, rank=4)
    layers["mid"].calib = {"rounding": "gptq", "held_out_error_vs_rtn": 0.4}
    added = 64 * 2 + 2 * (64 + 576) * 2 + 4 * (32 + 128) * 2
    assert resident_bytes(m) - before == added
    plan = quantization_plan(m)["layers"]
    assert plan["mid"]["rank"] == 2 and plan["mid"]["input_scale"] is True and plan["mid"]["calib"]["rounding"] == "gptq"
    assert plan["lin"]["rank"] == 4 and "input_scale" not in plan["lin"]
    save_quantized(m, str(tmp_path / "x.safetensors"))
    back = load_quantized(Net(), str(tmp_path / "x.safetensors"))
    assert quantization_plan(back)["layers"] == plan
    x, v = torch.randn(2, 64, 6, 6), torch.randn(2, 128)
    assert torch.equal(back.mid(x), m.mid(x)) and torch.equal(back.lin(v), m.lin(v))


def test_half_keeps_the_blob_and_converts_the_extras():
    q = with_extras(qlinear())
    blob = q.weight.clone()
    m = copy.deepcopy(q).to(torch.bfloat16)
    assert torch.equal(m.weight, blob) and m.lowrank_up.dtype == torch.bfloat16
