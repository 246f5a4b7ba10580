"""Activation-aware per-input-channel scales (AWQ, Lin et al. 2024, §3.2), folded into the weights.

A layer ``y = W x`` computes the same with ``y = (W·diag(s)) (x / s)``; quantizing ``W·diag(s)``
instead of ``W`` rounds the columns of the channels with large inputs on a finer effective grid
(their weights grow by ``s``, the group's range grows less). AWQ chooses ``s = mean|x|^α`` per
input channel with ``α`` searched on a grid against the layer's quantized output error; here the
error is the quadratic form of the calibration inputs (``tr(ΔW H ΔWᵀ)``, no activations stored),
plus, where the preset quantizes activations, a model of the activation quantizer's error:

* dynamic per-sample asymmetric ``b``-bit quantization has step ``Δ = range(x/s)/(2^b − 1)``, so
  rounding adds noise of variance ``Δ²/12`` per input element and ``‖W·diag(s)‖²_F·Δ²/12`` to the
  summed squared output per row. ``range(x/s)`` is estimated from the per-channel mean per-sample
  max and min (``LayerInputs.hi`` / ``lo``). Scaling channels up therefore has a cost at A8/A4: it
  widens the range every other channel is quantized with.

Scales are rounded to powers of two: exact in fp16, bf16 and fp32 (a ComfyUI cast of the model to
bf16 does not move them) and exact to divide by, so the division adds no rounding of its own. A
conv's scale is per input channel and applies to all its kernel taps. The stored vector is ``C``
fp16 values per layer (counted in the layer's bytes).
"""

from __future__ import annotations

import torch

from .layerinputs import LayerInputs
from .qtypes import QType
from .weights import dequantize_weight, quantize_weight

ALPHAS = tuple(i / 10 for i in range(11))
MAX_LOG2 = 8


def channel_scales(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x|^α`` normalised to a geometric mean of 1 over the channels, rounded to powers of two
    within ``2^±8`` (channels that never saw an input get 1)."""
    a = absmean.double()
    live = a > 0
    if alpha == 0 or not bool(live.any()):
        return torch.ones_like(a, dtype=torch.float32)
    s = torch.ones_like(a)
    s[live] = a[live] ** alpha
    s[live] = s[live] / torch.exp(torch.log(s[live]).mean())
    return torch.exp2(torch.round(torch.log2(s)).clamp(-MAX_LOG2, MAX_LOG2)).float()


def expand(scale: torch.Tensor, k: int) -> torch.Tensor:
    """A per-channel scale ``[C]`` → per column of the flattened weight ``[K]`` (channel-major taps)."""
    return scale.repeat_interleave(k // scale.numel())


def act_noise(stats: LayerInputs, scale: torch.Tensor, stored: torch.Tensor, act: QType | None,
              split: str = "fit") -> float:
    """Modelled summed squared output error of the activation quantizer over the ``split`` rows."""
    if act is None:
        return 0.0
    hi = float((stats.hi / scale).amax().clamp_min(0.0))
    lo = float((stats.lo / scale).amin().clamp_max(0.0))
    levels = 2**act.bits - 1
    step = (hi - lo) / levels
    wsum = stats.wsum_fit if split == "fit" else stats.wsum_hold
    return wsum * float(stored.double().pow(2).sum()) * step**2 / 12.0


def scaled_error(w: torch.Tensor, stats: LayerInputs, qt: QType, act: QType | None, scale: torch.Tensor,
                 split: str = "fit", dtype: torch.dtype = torch.float64) -> float:
    """Output error (weight rounding + modelled activation rounding) of round-to-nearest on
    ``W·diag(s)`` with inputs ``x/s``, over the ``split`` statistics (the ``out·K²`` product in
    ``dtype``, the layer's solve dtype; summed in float64)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    sk = expand(scale, w2.shape[1])
    stored = dequantize_weight(quantize_weight(w2 * sk, qt), qt, w2.shape, torch.float32)
    d = (stored / sk - w2).to(dtype)
    h = (stats.h_fit if split == "fit" else stats.h_hold).to(dtype)
    return float(((d @ h) * d).double().sum()) + act_noise(stats, scale, stored, act, split)


def search_scales(w: torch.Tensor, stats: LayerInputs, qt: QType, act: QType | None,
                  alphas=ALPHAS, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float, dict]:
    """AWQ's grid search: ``(scale [C], alpha, {alpha: fit error})``; ``α = 0`` (no scaling) is always
    a candidate, so the chosen scales never model worse than none on the fit statistics."""
    errors, best = {}, None
    for alpha in sorted({0.0, *alphas}):
        s = channel_scales(stats.absmean, alpha)
        err = scaled_error(w, stats, qt, act, s, dtype=dtype)
        errors[alpha] = err
        if best is None or err < best[1]:
            best = (s, err, alpha)
    return best[0], best[2], errors
