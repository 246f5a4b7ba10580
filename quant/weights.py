"""Weight quantization math: quantize, pack and dequantize (pure tensor functions).

Storage (ALGORITHMS.md §1 for the per-channel convention):

* ``int8``: per-output-channel symmetric, codes int8 ``[out, K]``, scale fp16 ``[out, 1]``.
* ``int4_gG`` / ``uint4_gG``: group-wise over the flattened input dimension ``K`` (for a conv,
  ``K = in/groups·kh·kw``), codes packed two per byte into uint8 ``[out, K/2]`` (element ``2j`` in
  the low nibble, ``2j+1`` in the high one), scale fp16 ``[out, K/G]``; the asymmetric form adds an
  integer zero point stored as fp16 ``[out, K/G]`` so that ``w ≈ (q − zero)·scale``.
* ``int4`` / ``uint4``: the same packed storage with one group per output channel (``G = K``,
  scale and zero ``[out, 1]``); ``K`` must be even to pack.

Scales are rounded to fp16 *before* the codes are computed, so the stored (codes, scale) pair is
the one the rounding was done for.
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


def _group(qt: QType, k: int) -> int:
    """Elements per scale: the whole row for per-channel types, else the type's group size."""
    return k if qt.granularity == PER_CHANNEL else qt.group_size


def _grouped(w2d: torch.Tensor, group: int) -> torch.Tensor:
    out, k = w2d.shape
    return w2d.reshape(out, k // group, group)


def quantize_weight(weight: torch.Tensor, qt: QType, layer: str = "?") -> dict[str, torch.Tensor]:
    """Quantize a Linear/Conv2d weight; returns the storage tensors (``qweight``, ``scale``[, ``zero``])."""
    if not torch.isfinite(weight).all():
        raise QuantizationError(f"layer {layer!r}: weight has NaN or inf values; refusing to quantize")
    w = weight.detach().float().reshape(weight.shape[0], -1)
    out, k = w.shape
    if not qt.packed:
        scale = (w.abs().amax(dim=1, keepdim=True) / qt.qmax).clamp_min(_FP16_TINY).half()
        q = torch.round(w / scale.float()).clamp_(qt.qmin, qt.qmax).to(torch.int8)
        return {"qweight": q, "scale": scale}
    group = _group(qt, k)
    if k % 2:
        raise QuantizationError(
            f"layer {layer!r}: int4 codes are packed two per byte, and its input size {k} is odd "
            f"(weight shape {tuple(weight.shape)}); exclude the layer or keep it at 8 bits"
        )
    if k % group:
        raise QuantizationError(
            f"layer {layer!r}: group size {group} does not divide its input size {k} "
            f"(weight shape {tuple(weight.shape)}); choose another group size or exclude the layer"
        )
    g = _grouped(w, group)
    if qt.symmetric:
        scale = (g.abs().amax(dim=2, keepdim=True) / qt.qmax).clamp_min(_FP16_TINY).half()
        q = torch.round(g / scale.float()).clamp_(qt.qmin, qt.qmax) - qt.qmin  # stored as 0..14
        return {"qweight": pack_int4(q.reshape(out, k).to(torch.uint8)), "scale": scale.squeeze(2)}
    lo = g.amin(dim=2, keepdim=True).clamp(max=0.0)
    hi = g.amax(dim=2, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / qt.qmax).clamp_min(_FP16_TINY).half()
    zero = torch.round(-lo / scale.float()).clamp_(qt.qmin, qt.qmax)
    q = (torch.round(g / scale.float()) + zero).clamp_(qt.qmin, qt.qmax)
    return {
        "qweight": pack_int4(q.reshape(out, k).to(torch.uint8)),
        "scale": scale.squeeze(2),
        "zero": zero.squeeze(2).half(),
    }


def dequantize_weight(
    storage: dict[str, torch.Tensor], qt: QType, shape: torch.Size | tuple, dtype: torch.dtype
) -> torch.Tensor:
    """Rebuild the weight of ``shape`` in ``dtype`` from its quantized storage."""
    q = storage["qweight"]
    scale = storage["scale"]
    if not qt.packed:
        return (q.to(dtype) * scale.to(dtype)).reshape(shape)
    codes = unpack_int4(q).to(dtype)
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
        "qweight": ((out, k // 2), torch.uint8),
        "scale": ((out, groups), torch.float16),
    }
    if not qt.symmetric:
        shapes["zero"] = ((out, groups), torch.float16)
    return shapes
