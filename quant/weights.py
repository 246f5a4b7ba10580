"""Weight quantization math: quantize, pack and dequantize (pure tensor functions).

Storage (ALGORITHMS.md §1 for the per-channel convention):

* ``int8``: per-output-channel symmetric, codes int8 ``[out, K]``, scale fp16 ``[out, 1]``.
* ``int4_gG`` / ``uint4_gG``: group-wise over the flattened input dimension ``K`` (for a conv,
  ``K = in/groups·kh·kw``), codes packed two per byte into uint8 ``[out, K/2]`` (element ``2j`` in
  the low nibble, ``2j+1`` in the high one), scale fp16 ``[out, K/G]``; the asymmetric form adds an
  integer zero point stored as fp16 ``[out, K/G]`` so that ``w ≈ (q − zero)·scale``.
* ``int4`` / ``uint4``: the same packed storage with one group per output channel (``G = K``,
  scale and zero ``[out, 1]``); ``K`` must be even to pack.
* ``uint3_gG``: 3-bit codes 0..7, eight per three bytes, uint8 ``[out, 3K/8]`` (codes ``8j … 8j+7``
  fill bits 0–23 of bytes ``3j … 3j+2``, code ``8j+i`` at bits ``3i … 3i+2``, little-endian), scale and
  zero as for ``uint4_gG``; ``K`` must be a multiple of 8. Only the byte budget chooses it
  (``budget.py``), for layers whose share of the end-to-end error is small.

Scales are rounded to fp16 *before* the codes are computed, so the stored (codes, scale) pair is
the one the rounding was done for.

A quantized layer keeps its storage as one 1-D uint8 *blob*: the codes' bytes, then the scale's
bytes, then (asymmetric types) the zero point's, each fp16 part starting on an even byte so it can
be viewed in place (:func:`blob_layout`, :func:`encode_blob`, :func:`decode_blob`). One tensor is
what ComfyUI's ModelPatcher backs up, patches and restores per ``<layer>.weight`` key.
"""

from __future__ import annotations

import torch

from .errors import QuantizationError
from .qtypes import PER_CHANNEL, QType

_FP16_TINY = 2.0**-24  # smallest positive fp16: keeps all-zero rows/groups finite


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (uint8 in 0..15, last dim even) two per byte."""
    if codes.shape[-1] % 2:
        raise QuantizationError(f"cannot pack an odd number ({codes.shape[-1]}) of int4 codes")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., n]`` → uint8 codes ``[..., 2n]``."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


_SHIFT3 = tuple(3 * i for i in range(8))


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 3-bit codes (0..7, last dim a multiple of 8) eight per three bytes."""
    n = codes.shape[-1]
    if n % 8:
        raise QuantizationError(f"cannot pack {n} 3-bit codes: eight share three bytes, so the count must be a multiple of 8")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], n // 8, 8)
    word = c[..., 0]
    for i in range(1, 8):
        word = word | (c[..., i] << _SHIFT3[i])
    out = torch.stack((word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF), dim=-1)
    return out.to(torch.uint8).reshape(*codes.shape[:-1], n // 8 * 3)


def unpack_int3(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int3`: uint8 ``[..., 3n]`` → uint8 codes ``[..., 8n]``."""
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], packed.shape[-1] // 3, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    codes = torch.stack([(word >> s) & 0x7 for s in _SHIFT3], dim=-1)
    return codes.to(torch.uint8).flatten(-2)


_PACKERS = {4: (pack_int4, unpack_int4), 3: (pack_int3, unpack_int3)}


def _packer(bits: int):
    if bits not in _PACKERS:
        raise QuantizationError(f"no packed storage for {bits}-bit codes")
    return _PACKERS[bits]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes of a sub-byte weight type (:func:`pack_int4` or :func:`pack_int3`)."""
    return _packer(bits)[0](codes)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the codes as uint8, ``[out, K]``."""
    return _packer(bits)[1](packed)


def packed_width(qt: QType, k: int) -> int:
    """Bytes per row of ``k`` codes of a packed type."""
    return k * qt.bits // 8


def _group(qt: QType, k: int) -> int:
    """Elements per scale: the whole row for per-channel types, else the type's group size."""
    return k if qt.granularity == PER_CHANNEL else qt.group_size


def _grouped(w2d: torch.Tensor, group: int) -> torch.Tensor:
    out, k = w2d.shape
    return w2d.reshape(out, k // group, group)


def input_size(weight_shape: torch.Size | tuple) -> int:
    """``K``, the flattened input size of a Linear/Conv2d weight (``in/groups·kh·kw`` for a conv)."""
    k = 1
    for d in tuple(weight_shape)[1:]:
        k *= d
    return k


def misfit(qt: QType, k: int) -> str | None:
    """Why a weight type cannot store rows of ``k`` inputs (``None`` when it can)."""
    if qt.packed and qt.bits == 4 and k % 2:
        return "odd"
    if qt.packed and qt.bits == 3 and k % 8:
        return "pack3"
    if qt.group_size and k % qt.group_size:
        return "group"
    return None


def check_fits(qt: QType, weight_shape: torch.Size | tuple, layer: str = "?") -> None:
    """Raise a :class:`QuantizationError` naming the layer if ``qt`` cannot store this weight."""
    k = input_size(weight_shape)
    why = misfit(qt, k)
    if why == "odd":
        raise QuantizationError(
            f"layer {layer!r}: int4 codes are packed two per byte, and its input size {k} is odd "
            f"(weight shape {tuple(weight_shape)}); exclude the layer or keep it at 8 bits"
        )
    if why == "pack3":
        raise QuantizationError(
            f"layer {layer!r}: 3-bit codes are packed eight per three bytes, and its input size {k} is not a "
            f"multiple of 8 (weight shape {tuple(weight_shape)}); keep the layer at 4 or 8 bits"
        )
    if why == "group":
        raise QuantizationError(
            f"layer {layer!r}: group size {qt.group_size} does not divide its input size {k} "
            f"(weight shape {tuple(weight_shape)}); choose another group size or exclude the layer"
        )


def weight_grid(w2d: torch.Tensor, qt: QType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest's grid for a float weight ``[out, K]``: ``(scale, zero)`` as float32
    ``[out, groups]`` holding fp16-exact values (``zero`` is ``None`` for symmetric types).

    The grid every weight quantizer of the pack rounds onto, so that error-compensated rounding
    (``gptq.py``) stores exactly what round-to-nearest would, only with other codes.
    """
    out, k = w2d.shape
    if not qt.packed:
        return (w2d.abs().amax(dim=1, keepdim=True) / qt.qmax).clamp_min(_FP16_TINY).half().float(), None
    g = _grouped(w2d, _group(qt, k))
    if qt.symmetric:
        return (g.abs().amax(dim=2) / qt.qmax).clamp_min(_FP16_TINY).half().float(), None
    lo = g.amin(dim=2).clamp(max=0.0)
    hi = g.amax(dim=2).clamp(min=0.0)
    scale = ((hi - lo) / qt.qmax).clamp_min(_FP16_TINY).half().float()
    zero = torch.round(-lo / scale).clamp_(qt.qmin, qt.qmax)
    return scale, zero


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qt: QType) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (as stored: int8 values, or 0..15 for int4) and their dequantized values for ``w``
    on the grid ``scale``/``zero`` (broadcastable to ``w``)."""
    if zero is None:
        q = torch.round(w / scale).clamp_(qt.qmin, qt.qmax)
        return (q.to(torch.int8) if not qt.packed else q - qt.qmin), q * scale
    q = (torch.round(w / scale) + zero).clamp_(qt.qmin, qt.qmax)
    return q, (q - zero) * scale


def storage_from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qt: QType) -> dict[str, torch.Tensor]:
    """Stored codes ``[out, K]`` and the grid ``[out, groups]`` → the storage tensors of ``qt``."""
    if not qt.packed:
        return {"qweight": codes.to(torch.int8), "scale": scale.half()}
    storage = {"qweight": pack_codes(codes.to(torch.uint8), qt.bits), "scale": scale.half()}
    if zero is not None:
        storage["zero"] = zero.half()
    return storage


def quantize_weight(weight: torch.Tensor, qt: QType, layer: str = "?") -> dict[str, torch.Tensor]:
    """Quantize a Linear/Conv2d weight to nearest; returns the storage tensors (``qweight``, ``scale``[, ``zero``])."""
    if not torch.isfinite(weight).all():
        raise QuantizationError(f"layer {layer!r}: weight has NaN or inf values; refusing to quantize")
    w = weight.detach().float().reshape(weight.shape[0], -1)
    out, k = w.shape
    if qt.packed:
        check_fits(qt, weight.shape, layer)
    scale, zero = weight_grid(w, qt)
    group = _group(qt, k)
    g = _grouped(w, group)
    codes, _ = round_to_grid(g, scale.unsqueeze(2), None if zero is None else zero.unsqueeze(2), qt)
    return storage_from_codes(codes.reshape(out, k), scale, zero, qt)


def dequantize_weight(
    storage: dict[str, torch.Tensor], qt: QType, shape: torch.Size | tuple, dtype: torch.dtype
) -> torch.Tensor:
    """Rebuild the weight of ``shape`` in ``dtype`` from its quantized storage."""
    q = storage["qweight"]
    scale = storage["scale"]
    if not qt.packed:
        return (q.to(dtype) * scale.to(dtype)).reshape(shape)
    codes = unpack_codes(q, qt.bits).to(dtype)
    out, k = codes.shape
    group = _group(qt, k)
    g = codes.reshape(out, k // group, group)
    offset = storage["zero"] if not qt.symmetric else None
    if offset is None:
        g = g + qt.qmin
    else:
        g = g - offset.to(dtype).unsqueeze(2)
    return (g * scale.to(dtype).unsqueeze(2)).reshape(shape)


def storage_shapes(qt: QType, out: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the storage tensors, to rebuild empty modules before loading a file."""
    if not qt.packed:
        return {"qweight": ((out, k), torch.int8), "scale": ((out, 1), torch.float16)}
    groups = k // _group(qt, k)
    shapes = {
        "qweight": ((out, packed_width(qt, k)), torch.uint8),
        "scale": ((out, groups), torch.float16),
    }
    if not qt.symmetric:
        shapes["zero"] = ((out, groups), torch.float16)
    return shapes


def blob_layout(qt: QType, weight_shape: torch.Size | tuple) -> tuple[dict[str, tuple[int, tuple, torch.dtype]], int]:
    """Where each storage tensor lies in the blob: ``({name: (byte offset, shape, dtype)}, total bytes)``.

    The parts follow one another in the order codes, scale, zero; a part starts at the next
    multiple of its item size (at most one padding byte, before the scale when the codes' byte
    count is odd).
    """
    check_fits(qt, weight_shape)
    layout, offset = {}, 0
    for name, (shape, dtype) in storage_shapes(qt, weight_shape[0], input_size(weight_shape)).items():
        offset = -(-offset // dtype.itemsize) * dtype.itemsize
        layout[name] = (offset, shape, dtype)
        n = 1
        for d in shape:
            n *= d
        offset += n * dtype.itemsize
    return layout, offset


def blob_nbytes(qt: QType, weight_shape: torch.Size | tuple) -> int:
    return blob_layout(qt, weight_shape)[1]


def encode_blob(storage: dict[str, torch.Tensor], qt: QType, weight_shape: torch.Size | tuple) -> torch.Tensor:
    """Storage tensors → one uint8 blob (on the storage's device)."""
    layout, total = blob_layout(qt, weight_shape)
    device = storage["qweight"].device
    blob = torch.zeros(total, dtype=torch.uint8, device=device)
    for name, (offset, shape, dtype) in layout.items():
        t = storage[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise QuantizationError(
                f"storage tensor {name!r} is {t.dtype} {tuple(t.shape)}; {qt.name} needs {dtype} {shape}"
            )
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        blob[offset : offset + raw.numel()] = raw.to(device)
    return blob


def decode_blob(blob: torch.Tensor, qt: QType, weight_shape: torch.Size | tuple) -> dict[str, torch.Tensor]:
    """uint8 blob → storage tensors (``qweight``, ``scale``[, ``zero``]): views into the blob, no copy."""
    layout, total = blob_layout(qt, weight_shape)
    if blob.dtype != torch.uint8 or tuple(blob.shape) != (total,):
        raise QuantizationError(
            f"a {qt.name} blob for weight shape {tuple(weight_shape)} is uint8 ({total},), "
            f"got {blob.dtype} {tuple(blob.shape)}"
        )
    if blob.storage_offset() % 2 or not blob.is_contiguous():
        blob = blob.clone()  # a misaligned slice of a larger buffer cannot be viewed as fp16
    storage = {}
    for name, (offset, shape, dtype) in layout.items():
        n = 1
        for d in shape:
            n *= d
        storage[name] = blob[offset : offset + n * dtype.itemsize].view(dtype).view(shape)
    return storage


def quantize_to_blob(weight: torch.Tensor, qt: QType, layer: str = "?") -> torch.Tensor:
    """:func:`quantize_weight` then :func:`encode_blob`."""
    check_fits(qt, weight.shape, layer)
    return encode_blob(quantize_weight(weight, qt, layer), qt, weight.shape)


def dequantize_blob(
    blob: torch.Tensor, qt: QType, shape: torch.Size | tuple, dtype: torch.dtype
) -> torch.Tensor:
    return dequantize_weight(decode_blob(blob, qt, shape), qt, shape, dtype)
