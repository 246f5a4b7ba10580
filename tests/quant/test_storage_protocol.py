"""One uint8 blob per quantized layer, and the weight-patching protocol ComfyUI's ModelPatcher uses."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcorrect.quant import ActQuantizer, QuantConv2d, QuantizationError, QuantLinear, QTYPES, qtype
from qcorrect.quant.qtypes import WEIGHT
from qcorrect.quant.weights import (
    blob_layout, decode_blob, dequantize_weight, encode_blob, quantize_to_blob, quantize_weight, storage_shapes,
)

WEIGHT_TYPES = [n for n, t in QTYPES.items() if t.kind == WEIGHT]


def linear(wq="uint4_g64", k=128, out=24, bias=True, act=None, seed=0):
    torch.manual_seed(seed)
    fp = nn.Linear(k, out, bias=bias)
    a = ActQuantizer(act, "dynamic" if act else "none", layer="l")
    return fp, QuantLinear.from_float(fp, wq, a, "blocks.1.proj")


def conv(wq="uint4_g64", seed=0):
    torch.manual_seed(seed)
    fp = nn.Conv2d(64, 16, 3, padding=1)
    return fp, QuantConv2d.from_float(fp, wq, ActQuantizer(None, "none"), "blocks.2.conv")


def codes_nbytes(qt, out, k):
    return out * k * qt.bits // 8  # int8 one byte a code, int4 two codes a byte, uint3 eight codes in three bytes


@pytest.mark.parametrize("name", WEIGHT_TYPES)
@pytest.mark.parametrize("out", [8, 3])
def test_blob_is_exactly_the_packed_bytes(name, out):
    qt = qtype(name)
    k = 128
    _, q = linear(name, k=k, out=out)
    codes = codes_nbytes(qt, out, k)
    groups = 1 if qt.group_size is None else k // qt.group_size
    fp16_parts = (1 if qt.symmetric else 2) * out * groups * 2
    pad = codes % 2  # the scale starts on an even byte
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (codes + pad + fp16_parts,)
    assert dict(q.named_parameters(recurse=False)).keys() == {"weight", "bias"}
    assert not list(q.buffers(recurse=False))  # no other storage anywhere in the layer


def test_odd_code_bytes_pad_one_byte_before_the_scale():
    layout, total = blob_layout(qtype("int8"), (3, 5))
    assert layout["qweight"][0] == 0 and layout["scale"][0] == 16 and total == 16 + 3 * 2


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_views_have_the_storage_shapes_and_share_the_blob(name):
    qt = qtype(name)
    _, q = linear(name)
    want = storage_shapes(qt, 24, 128)
    start = q.weight.data_ptr()
    end = start + q.weight.numel()
    for part, (shape, dtype) in want.items():
        t = getattr(q, part)
        assert t.shape == shape and t.dtype == dtype
        assert start <= t.data_ptr() < end  # a view, not a copy
    assert (q.zero is None) == qt.symmetric
    with pytest.raises(AttributeError):
        q.scale = torch.zeros(1)  # read-only


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_encode_decode_round_trip(name):
    qt = qtype(name)
    w = torch.randn(6, 8, 4, 4)  # K = 128
    storage = quantize_weight(w, qt)
    back = decode_blob(encode_blob(storage, qt, w.shape), qt, w.shape)
    assert back.keys() == storage.keys() and all(torch.equal(back[k], storage[k]) for k in storage)
    assert torch.equal(quantize_to_blob(w, qt), encode_blob(storage, qt, w.shape))


def test_decode_refuses_a_blob_of_the_wrong_size():
    with pytest.raises(QuantizationError, match=r"uint8 \(\d+,\)"):
        decode_blob(torch.zeros(7, dtype=torch.uint8), qtype("int8"), (4, 4))


@pytest.mark.parametrize("name", WEIGHT_TYPES)
@pytest.mark.parametrize("cast", [torch.float32, torch.float16, torch.bfloat16])
def test_convert_weight_of_a_float_copy_of_the_blob_is_the_dequantized_weight(name, cast):
    _, q = linear(name)
    w = q.convert_weight(q.weight.to(cast, copy=True), inplace=True)
    assert w.dtype == cast and w.shape == (24, 128)
    assert torch.equal(w, q.dequantized_weight(cast))


def test_convert_weight_of_the_raw_blob_is_fp32_and_conv_shaped():
    _, q = conv()
    w = q.convert_weight(q.weight)
    assert w.dtype == torch.float32 and w.shape == (16, 64, 3, 3)
    assert torch.equal(w, q.dequantized_weight())


def test_convert_weight_refuses_a_float_weight_instead_of_a_blob():
    _, q = linear()
    with pytest.raises(QuantizationError, match="'blocks.1.proj'.*convert_weight"):
        q.convert_weight(q.dequantized_weight())


@pytest.mark.parametrize("name", ["int8", "uint4_g64", "int4", "uint4"])
def test_set_weight_requantizes_and_restoring_the_backup_restores_the_output(name):
    fp, q = linear(name)
    x = torch.randn(5, 128)
    before = q(x)
    backup = q.weight  # what ModelPatcher keeps (weight.to(offload_device, copy=False))
    delta = 0.01 * torch.randn(24, 128)
    # ModelPatcher.patch_weight_to_device: cast a copy, convert, add the LoRA delta, set
    patched = q.convert_weight(q.weight.to(torch.float32, copy=True), inplace=True) + delta
    assert q.set_weight(patched, inplace_update=False, seed=1234, return_weight=False) is None
    patched_fp = copy.deepcopy(fp)
    with torch.no_grad():
        patched_fp.weight.copy_(patched)
    fresh = QuantLinear.from_float(patched_fp, name, ActQuantizer(None, "none"), "fresh")
    assert torch.equal(q.weight, fresh.weight) and torch.equal(q(x), fresh(x))
    assert isinstance(q.weight, nn.Parameter) and not q.weight.requires_grad
    assert not torch.equal(q(x), before)
    q.weight = nn.Parameter(backup, requires_grad=False)  # ModelPatcher.unpatch_model: set_attr_param
    assert torch.equal(q(x), before)


def test_set_weight_return_weight_leaves_the_layer_alone():
    _, q = linear()
    old = q.weight
    blob = q.set_weight(q.dequantized_weight() + 0.1, return_weight=True)
    assert q.weight is old and blob.dtype == torch.uint8 and blob.shape == old.shape
    assert not torch.equal(blob, old)


def test_set_weight_inplace_update_writes_into_the_current_blob():
    _, q = linear()
    param = q.weight
    w = q.dequantized_weight() + 0.05
    q.set_weight(w, inplace_update=True)
    assert q.weight is param and torch.equal(param, quantize_to_blob(w, qtype("uint4_g64")))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_set_weight_refuses_non_finite_weights_naming_the_layer(bad):
    _, q = linear()
    old = q.weight.clone()
    w = q.dequantized_weight()
    w[2, 7] = bad
    with pytest.raises(QuantizationError, match="'blocks.1.proj'.*NaN or inf"):
        q.set_weight(w)
    assert torch.equal(q.weight, old)


def test_set_weight_refuses_the_wrong_shape():
    _, q = linear()
    with pytest.raises(QuantizationError, match="'blocks.1.proj'.*shape"):
        q.set_weight(torch.zeros(24 * 128))


def test_patch_attributes_are_per_instance():
    _, a = linear()
    _, b = linear()
    assert a.comfy_cast_weights is False and a.weight_function == [] and a.bias_function == []
    assert a.weight_function is not b.weight_function and a.bias_function is not b.bias_function
    for cls in (QuantLinear, QuantConv2d):
        assert not {"weight_function", "bias_function"} & set(vars(cls))


@pytest.mark.parametrize("act", [None, "a8_asym"])
def test_forward_applies_weight_and_bias_functions(act):
    _, q = linear("uint4_g64", act=act)
    x = torch.randn(3, 7, 128)
    dw, db = 0.02 * torch.randn(24, 128), 0.1 * torch.randn(24)
    q.weight_function.append(lambda w: w + dw)
    q.bias_function.append(lambda b: b * 2)
    q.bias_function.append(lambda b: b + db)
    want = F.linear(q.act(x), q.dequantized_weight() + dw, q.bias * 2 + db)
    assert torch.equal(q(x), want)


def test_conv_forward_applies_weight_functions():
    _, q = conv()
    x = torch.randn(2, 64, 5, 5)
    dw = 0.02 * torch.randn(16, 64, 3, 3)
    q.weight_function = [lambda w: w + dw]
    want = F.conv2d(x, q.dequantized_weight() + dw, q.bias, 1, 1)
    assert torch.equal(q(x), want)


def test_half_and_bfloat16_leave_the_blob_alone():
    _, q = linear()
    blob = q.weight.clone()
    for dtype in (torch.float16, torch.bfloat16):
        m = copy.deepcopy(q).to(dtype)
        assert m.weight.dtype == torch.uint8 and torch.equal(m.weight, blob)
        assert m.bias.dtype == dtype
    assert torch.equal(q.half().weight, blob) and q.bias.dtype == torch.float16
    assert q(torch.randn(2, 128).half()).dtype == torch.float16


def test_offloaded_blob_is_moved_for_the_call(device):
    fp, q = linear("uint4_g64", act="a8_asym")
    x = torch.randn(4, 128)
    ref = q(x)
    # low-VRAM: the layer stays on the CPU, the input is on the compute device
    out = q(x.to(device))
    assert out.device.type == device.type and q.weight.device.type == "cpu"
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    q.weight_function.append(lambda w: w + 1.0)
    assert q(x.to(device)).device.type == device.type


def test_module_to_device_moves_the_blob(device):
    _, q = conv()
    q = q.to(device)
    assert q.weight.device.type == device.type and q.weight.dtype == torch.uint8
    assert q.scale.device.type == device.type
    x = torch.randn(1, 64, 4, 4, device=device)
    torch.testing.assert_close(q(x), F.conv2d(x, q.dequantized_weight(), q.bias, 1, 1))


def test_dequantize_weight_of_the_views_matches_the_layer():
    _, q = linear("uint4_g64")
    storage = {"qweight": q.qweight, "scale": q.scale, "zero": q.zero}
    assert torch.equal(dequantize_weight(storage, q.wqtype, q.weight_shape, torch.float32), q.dequantized_weight())


@pytest.mark.parametrize("name", WEIGHT_TYPES)
@pytest.mark.parametrize("cast", [torch.float32, torch.float16, torch.bfloat16])
def test_unpatched_round_trip_keeps_the_blob(name, cast):
    # ModelPatcher(force_cast=True) converts and sets a weight it has no patch for
    _, q = linear(name)
    old = q.weight.clone()
    q.set_weight(q.convert_weight(q.weight.to(cast, copy=True)))
    assert torch.equal(q.weight, old)
    assert torch.equal(q.set_weight(q.dequantized_weight(cast), return_weight=True), old)


def test_lowvram_function_runs_before_the_weight_functions():
    # ComfyUI's dynamic-VRAM patcher sets weight_lowvram_function (a LoRA patch) on the module
    _, q = linear("int8")
    x = torch.randn(2, 128)
    q.weight_lowvram_function = lambda w: w * 2
    q.weight_function = [lambda w: w + 1]
    q.bias_lowvram_function = None
    assert torch.equal(q(x), F.linear(x, q.dequantized_weight() * 2 + 1, q.bias))
