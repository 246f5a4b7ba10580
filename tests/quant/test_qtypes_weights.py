import pytest
import torch

from qcorrect.quant import QTYPES, QuantizationError, activation_qtype, qtype, weight_qtype
from qcorrect.quant.qtypes import WEIGHT
from qcorrect.quant.weights import (
    dequantize_blob, dequantize_weight, pack_int3, pack_int4, quantize_to_blob, quantize_weight, storage_shapes, unpack_int3,
    unpack_int4,
)

WEIGHT_TYPES = [n for n, t in QTYPES.items() if t.kind == WEIGHT]


def test_registry_names_and_ranges():
    assert set(WEIGHT_TYPES) == {"int8", "int4", "uint4", "int4_g32", "int4_g64", "int4_g128",
                                 "uint4_g32", "uint4_g64", "uint4_g128", "uint3_g32", "uint3_g64", "uint3_g128"}
    assert qtype("uint3_g64").packed and (qtype("uint3_g64").qmin, qtype("uint3_g64").qmax) == (0, 7)
    assert qtype("uint4").packed and qtype("uint4").granularity == qtype("int8").granularity
    assert (qtype("int8").qmin, qtype("int8").qmax) == (-127, 127)
    assert (qtype("uint4_g64").qmin, qtype("uint4_g64").qmax) == (0, 15)
    assert (qtype("int4_g128").qmin, qtype("int4_g128").qmax) == (-7, 7)
    for b in range(4, 17):
        assert activation_qtype(b).bits == b and activation_qtype(b, symmetric=False).qmax == 2**b - 1


@pytest.mark.parametrize("bad", ["int3", "fp8", "", "INT8"])
def test_unknown_type_names(bad):
    with pytest.raises(QuantizationError, match="unknown quantized type"):
        qtype(bad)


@pytest.mark.parametrize("bits", [3, 17, 0, 8.0])
def test_activation_bits_outside_registry(bits):
    with pytest.raises(QuantizationError, match="outside the registry"):
        activation_qtype(bits)


def test_weight_qtype_rejects_activation_types():
    with pytest.raises(QuantizationError, match="not a weight type"):
        weight_qtype("a8")


@pytest.mark.parametrize("bits, pack, unpack", [(4, pack_int4, unpack_int4), (3, pack_int3, unpack_int3)])
def test_packed_codes_round_trip_exactly(bits, pack, unpack):
    codes = torch.arange(2 ** bits, dtype=torch.uint8).repeat(3, 64 >> bits)  # every code, [3, 64]
    codes = codes[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    packed = pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 64 * bits // 8)
    assert torch.equal(unpack(packed), codes)


def test_packed_code_layouts():
    # int4: the low nibble holds the even element
    assert int(pack_int4(torch.tensor([[3, 12]], dtype=torch.uint8))) == 3 | (12 << 4)
    # int3: code i of each eight at bits 3i..3i+2 of a little-endian 24-bit word
    eight = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(eight[0]))
    assert pack_int3(eight).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
    with pytest.raises(QuantizationError, match="multiple of 8"):
        pack_int3(torch.zeros(1, 12, dtype=torch.uint8))


def test_uint3_takes_three_bits_a_weight_and_is_coarser_than_uint4():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    b3, b4 = quantize_to_blob(w, qtype("uint3_g64")), quantize_to_blob(w, qtype("uint4_g64"))
    assert b3.numel() == 16 * 128 * 3 // 8 + 2 * 2 * 16 * 2  # codes, then fp16 scale and zero per group
    assert b4.numel() - b3.numel() == 16 * 128 // 8
    e3 = (dequantize_blob(b3, qtype("uint3_g64"), w.shape, torch.float32) - w).pow(2).mean()
    e4 = (dequantize_blob(b4, qtype("uint4_g64"), w.shape, torch.float32) - w).pow(2).mean()
    assert 3 < e3 / e4 < 6  # eight levels against sixteen: about (15/7)² more error
    with pytest.raises(QuantizationError, match="packed eight per three bytes.*input size 36"):
        quantize_weight(torch.randn(4, 36), qtype("uint3_g32"), "l3")


def test_pack_odd_length_fails():
    with pytest.raises(QuantizationError, match="odd"):
        pack_int4(torch.zeros(1, 3, dtype=torch.uint8))


@pytest.mark.parametrize("name", WEIGHT_TYPES)
@pytest.mark.parametrize("shape", [(32, 128), (16, 128, 3, 3), (8, 256)])
def test_weight_round_trip_error_bound(name, shape):
    qt = qtype(name)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    storage = quantize_weight(w, qt)
    for key, (sh, dt) in storage_shapes(qt, shape[0], w[0].numel()).items():
        assert storage[key].shape == sh and storage[key].dtype == dt
    back = dequantize_weight(storage, qt, w.shape, torch.float32)
    scale = storage["scale"].float()
    if qt.group_size:
        per_elem = scale.repeat_interleave(qt.group_size, dim=1).reshape(w.shape)
    else:
        assert scale.shape == (shape[0], 1)
        per_elem = scale.expand(shape[0], w[0].numel()).reshape(w.shape)
    # symmetric: half a step; asymmetric with an integer zero point: at most one step at the ends
    bound = per_elem * (0.5 if qt.symmetric else 1.0) * (1 + 1e-3)
    assert ((back - w).abs() <= bound).all()
    # and the grid is not degenerate: the error is well below the weights' own scale
    assert (back - w).pow(2).mean() < (0.05 if qt.bits >= 4 else 0.1) * w.pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_into_compute_dtype(dtype):
    w = torch.randn(8, 64)
    s = quantize_weight(w, qtype("uint4_g64"))
    out = dequantize_weight(s, qtype("uint4_g64"), w.shape, dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), dequantize_weight(s, qtype("uint4_g64"), w.shape, torch.float32),
                               atol=0.02, rtol=0.02)


def test_int8_more_precise_than_int4():
    w = torch.randn(64, 512)
    err = {n: (dequantize_weight(quantize_weight(w, qtype(n)), qtype(n), w.shape, torch.float32) - w).pow(2).mean()
           for n in ("int8", "int4_g64", "int4_g128", "int4", "uint4_g64", "uint4")}
    assert err["int8"] < err["int4_g64"] < err["int4_g128"] * 1.01
    # one scale per row is coarser than one per group
    assert err["int4_g128"] < err["int4"] and err["uint4_g64"] < err["uint4"]


def test_all_zero_rows_stay_finite():
    w = torch.zeros(4, 128)
    for n in WEIGHT_TYPES:
        s = quantize_weight(w, qtype(n))
        assert torch.equal(dequantize_weight(s, qtype(n), w.shape, torch.float32), w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_named(bad):
    w = torch.randn(4, 64)
    w[1, 3] = bad
    with pytest.raises(QuantizationError, match="'blocks.3.proj'.*NaN or inf"):
        quantize_weight(w, qtype("int8"), "blocks.3.proj")


def test_per_channel_int4_packs_and_needs_an_even_row():
    w = torch.randn(6, 40)  # 40 is not a multiple of any group size: per-channel still works
    s = quantize_weight(w, qtype("uint4"))
    assert s["qweight"].shape == (6, 20) and s["qweight"].dtype == torch.uint8 and s["zero"].shape == (6, 1)
    with pytest.raises(QuantizationError, match="'odd.layer'.*input size 9 is odd"):
        quantize_weight(torch.randn(4, 9), qtype("int4"), "odd.layer")


def test_group_must_divide():
    with pytest.raises(QuantizationError, match="group size 64 does not divide its input size 96"):
        quantize_weight(torch.randn(4, 96), qtype("int4_g64"), "l")
