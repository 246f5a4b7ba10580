"""Activation quantizers: none, dynamic, static per-σ, with an optional bit-width schedule over σ.

Activations are fake-quantized per tensor (quantize, then dequantize into the compute dtype), the
setting of Q-Diffusion and PTQD (ALGORITHMS.md §1). Modes:

* ``none``: identity (weight-only presets).
* ``dynamic``: the range is the current tensor's min/max, taken per sample (along dim 0), so a
  sample quantizes the same whether it runs alone or batched with other latents (a benchmark's
  batch); "per tensor" means per image's activation tensor. With ``act_ranges="per_latent"`` (the
  presets' default since session 9) the passes of one latent in one call — CFG's cond and uncond,
  or several conds, which ComfyUI and the reference denoiser concatenate pass by pass — share one
  range, the union of theirs (:func:`share_passes`). Why: guidance returns
  ``uncond + s·(cond − uncond)``, so *independent* rounding errors of the two passes reach the
  output amplified ``√(s² + (s − 1)²)``× (3.6× at CFG 3), while errors the passes share pass through
  once. With one range, both passes round on the same grid, and where their activations agree their
  rounding errors are the same numbers. Measured on the reference model (docs/BENCHMARKS.md,
  session 9): at W4A8 CFG 3 it halves the one-step error the 8-bit activations alone make. It
  needs the call's number of distinct latents (``QuantContext.latents``, published by
  ``SigmaScopedDenoiser`` and by the ComfyUI wrapper); without it, or when a layer's batch is not
  2–16 passes of those latents, every sample keeps its own range (``per_sample``).
* ``static``: ranges calibrated per σ (see ``observers`` and ``calibration.ranges``) are looked up
  for the σ of the call: the nearest calibrated σ in log σ, which is how ranges calibrated on one
  schedule transfer to another step count or scheduler. Documented fallbacks: a σ outside the
  calibrated range gets the ranges of the nearest end (check a schedule beforehand with
  :func:`uncovered_sigmas`; the lookup itself stays sync-free); outside a σ scope (no σ published)
  the union of all calibrated ranges is used, which never clips more than any calibrated step did.
  A static layer without any range refuses to run, naming itself.

A bit-width schedule ``[(sigma_lo, sigma_hi, bits), …]`` overrides the default bit-width inside
σ ranges; it is how PCR's "relaxed" steps run at 10 or 16 bits (ALGORITHMS.md §6). All lookups
are tensor ops on the activation's device: no ``.item()``, no host sync per call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .context import QuantContext
from .errors import QuantizationError
from .qtypes import ACT_MAX_BITS, ACT_MIN_BITS, ACTIVATION, QType, qtype

MODES = ("none", "dynamic", "static")
#: how dynamic ranges are shared: each sample its own, or the passes of one latent one
ACT_RANGES = ("per_sample", "per_latent")
#: the most passes of one latent a call is taken to carry (CFG: 2; several conds batched: a few);
#: a layer whose batch is a larger multiple is not a stack of passes (e.g. tokens folded into it)
MAX_PASSES = 16
_EPS = 1e-8


def fake_quantize(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor | int, symmetric: bool
) -> torch.Tensor:
    """Quantize ``x`` to a ``bits``-bit grid spanning ``[lo, hi]`` and dequantize it again.

    While autograd records through ``x`` (``quant/tune.py`` tunes the weights' grid through the
    quantized activations) the gradient passes straight through the rounding; otherwise the result
    is the plain quantized value, bit for bit."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(x, lo, hi, bits, symmetric)
    xf = x.float()
    lo = lo.float()
    hi = hi.float()
    # In place after the first division (no further activation-sized allocations), with the zero point
    # folded into the bounds: clamp(round(x/s) + z, 0, L) − z = clamp(round(x/s), −z, L − z) exactly, as
    # every term is a small integer in float32, so the values are the textbook form's (a zero may keep
    # its sign); four elementwise passes over the activation instead of six. Tensor bounds as
    # maximum/minimum: on CPU a clamp with broadcast tensor bounds is several times slower.
    if symmetric:
        qmax = 2.0 ** (bits - 1) - 1 if isinstance(bits, int) else torch.exp2(bits.float() - 1) - 1
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(_EPS)
        q = (xf / scale).round_()
        q = q.clamp_(-qmax, qmax) if isinstance(qmax, float) else torch.minimum(torch.maximum(q, -qmax, out=q), qmax, out=q)
        return q.mul_(scale).to(x.dtype)
    levels = 2.0**bits - 1 if isinstance(bits, int) else torch.exp2(bits.float()) - 1
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / levels).clamp_min(_EPS)
    zero = torch.round(-lo / scale)
    q = (xf / scale).round_()
    q = torch.minimum(torch.maximum(q, -zero, out=q), levels - zero, out=q)
    return q.mul_(scale).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """The quantized value forward, the identity backward (the straight-through estimator). As a
    function of its own rather than ``x + (q − x).detach()``: the forward value is the quantized one
    exactly (no float round trip through ``x``), and it saves two elementwise passes over the
    activation per layer and step of the tuning loop. No gradient reaches the range ``lo``/``hi``,
    even where it was computed from ``x`` (dynamic ranges)."""

    @staticmethod
    def forward(ctx, x, lo, hi, bits, symmetric):
        with torch.no_grad():
            return fake_quantize(x, lo, hi, bits, symmetric)

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None, None


def _per_sample_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim < 2:
        return torch.aminmax(x)
    flat = x.reshape(x.shape[0], -1)
    if x.device.type == "cpu":  # torch's CPU aminmax along a dim is 5-10x slower than the two reductions
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    else:
        lo, hi = torch.aminmax(flat, dim=1)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return lo.reshape(shape), hi.reshape(shape)


def share_passes(lo: torch.Tensor, hi: torch.Tensor, latents: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ranges ``[B, 1, …]`` → one range per latent, the union over its passes.

    The batch is taken as ``k`` passes of ``latents`` latents stacked pass by pass (sample ``i`` of
    pass ``p`` at ``p·latents + i``, how ComfyUI's ``calc_cond_batch`` and the reference denoiser's
    ``cat`` lay it out). Anything else — ``latents`` unknown, a batch that is not 2 to
    :data:`MAX_PASSES` times ``latents``, a scalar range — is returned unchanged."""
    b = lo.shape[0] if lo.ndim else 0
    if not latents or not b or b % latents or not 2 <= b // latents <= MAX_PASSES:
        return lo, hi
    k, rest = b // latents, lo.shape[1:]
    lo = lo.reshape(k, latents, *rest).amin(0, keepdim=True).expand(k, latents, *rest).reshape(lo.shape)
    hi = hi.reshape(k, latents, *rest).amax(0, keepdim=True).expand(k, latents, *rest).reshape(hi.shape)
    return lo, hi


def _check_schedule(schedule: list, layer: str) -> list[tuple[float, float, int]]:
    clean = []
    for entry in schedule:
        try:
            lo, hi, bits = entry
        except (TypeError, ValueError):
            raise QuantizationError(
                f"layer {layer!r}: schedule entries are (sigma_lo, sigma_hi, bits), got {entry!r}"
            ) from None
        if not isinstance(bits, int) or not ACT_MIN_BITS <= bits <= ACT_MAX_BITS:
            raise QuantizationError(
                f"layer {layer!r}: schedule bit-width {bits!r} is outside {ACT_MIN_BITS}..{ACT_MAX_BITS}"
            )
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) or lo == -math.inf) or hi < lo:
            raise QuantizationError(f"layer {layer!r}: bad schedule σ range ({lo}, {hi})")
        clean.append((lo, hi, bits))
    return clean


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer; one per quantized layer input.

    ``ranges`` (dynamic mode only): ``per_sample`` or ``per_latent`` (see the module docstring).
    The constructor's default is ``per_sample``, how every quantizer behaved before ``per_latent``
    existed; the presets ask for ``per_latent`` (``QuantPlan.act_ranges``)."""

    def __init__(
        self,
        qt: QType | str | None,
        mode: str = "dynamic",
        context: QuantContext | None = None,
        layer: str = "?",
        ranges: str = "per_sample",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise QuantizationError(f"layer {layer!r}: unknown activation mode {mode!r}; known: {MODES}")
        if ranges not in ACT_RANGES:
            raise QuantizationError(f"layer {layer!r}: unknown activation ranges {ranges!r}; known: {ACT_RANGES}")
        self.ranges = ranges
        self.qtype = None if qt is None else qtype(qt)
        if self.qtype is not None and self.qtype.kind != ACTIVATION:
            raise QuantizationError(f"layer {layer!r}: {self.qtype.name!r} is not an activation type")
        if mode != "none" and self.qtype is None:
            raise QuantizationError(f"layer {layer!r}: activation mode {mode!r} needs an activation type")
        self.mode = mode if self.qtype is not None else "none"
        self.layer = layer
        self.context = context
        self.schedule: list[tuple[float, float, int]] = []
        self.register_buffer("range_sigmas", torch.empty(0))
        self.register_buffer("range_lo", torch.empty(0))
        self.register_buffer("range_hi", torch.empty(0))
        self.register_buffer("_sched", torch.empty(0, 3), persistent=False)

    # configuration -------------------------------------------------------------------------
    def set_static_ranges(self, sigmas: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Store calibrated ranges per σ and switch to static mode."""
        if self.qtype is None:
            raise QuantizationError(f"layer {self.layer!r}: weight-only layer has no activation quantizer")
        sigmas, lo, hi = (torch.as_tensor(t, dtype=torch.float32).reshape(-1) for t in (sigmas, lo, hi))
        if not (len(sigmas) == len(lo) == len(hi)) or len(sigmas) == 0:
            raise QuantizationError(f"layer {self.layer!r}: static ranges need equal, non-empty σ/lo/hi")
        if not all(torch.isfinite(t).all() for t in (sigmas, lo, hi)) or (sigmas <= 0).any():
            raise QuantizationError(f"layer {self.layer!r}: static ranges must be finite with σ > 0")
        if (hi < lo).any():
            raise QuantizationError(f"layer {self.layer!r}: static range with hi < lo")
        order = torch.argsort(sigmas)
        device = self.range_lo.device
        self.range_sigmas = sigmas[order].to(device)
        self.range_lo = lo[order].to(device)
        self.range_hi = hi[order].to(device)
        self.mode = "static"

    def add_static_range(self, sigma: float, lo: float, hi: float) -> None:
        """Add (or replace) the range of one σ, keeping the others: progressive calibration."""
        sigmas, los, his = self.range_sigmas.tolist(), self.range_lo.tolist(), self.range_hi.tolist()
        keep = [i for i, s in enumerate(sigmas) if not math.isclose(s, sigma, rel_tol=1e-6)]
        self.set_static_ranges(
            [sigmas[i] for i in keep] + [sigma], [los[i] for i in keep] + [lo], [his[i] for i in keep] + [hi]
        )

    def clear_static_ranges(self) -> None:
        device = self.range_lo.device
        self.range_sigmas, self.range_lo, self.range_hi = (torch.empty(0, device=device) for _ in range(3))

    def calibrated_sigma_range(self) -> tuple[float, float] | None:
        """``(smallest, largest)`` calibrated σ, or ``None`` without static ranges."""
        if len(self.range_sigmas) == 0:
            return None
        return float(self.range_sigmas[0]), float(self.range_sigmas[-1])

    def bits_at(self, sigma: float | None) -> int:
        """The bit-width used at ``sigma`` (host-side twin of :meth:`current_bits`, for calibration)."""
        bits = self.qtype.bits
        if sigma is not None:
            for lo, hi, b in self.schedule:  # the last matching entry wins
                if lo <= sigma <= hi:
                    bits = b
        return bits

    def set_schedule(self, schedule: list) -> None:
        """Bit-width overrides by σ range; an empty list restores the default bit-width."""
        self.schedule = _check_schedule(schedule, self.layer)
        rows = [[lo, hi, float(b)] for lo, hi, b in self.schedule]
        self._sched = torch.tensor(rows, dtype=torch.float32).reshape(-1, 3).to(self.range_lo.device)

    # lookup --------------------------------------------------------------------------------
    def _sigma(self) -> torch.Tensor | None:
        sigma = None if self.context is None else self.context.sigma
        if sigma is None:
            return None
        return sigma.reshape(-1)[:1].to(self.range_lo.device, torch.float32)

    def current_bits(self, sigma: torch.Tensor | None) -> torch.Tensor | int:
        bits = self.qtype.bits
        if not self.schedule or sigma is None:
            return bits
        s = self._sched
        inside = (sigma >= s[:, 0]) & (sigma <= s[:, 1])
        # the last matching entry wins; no match → default bits
        idx = torch.where(inside, torch.arange(len(s), device=s.device), -1).amax()
        return torch.where(idx >= 0, s[idx.clamp_min(0), 2], torch.tensor(float(bits), device=s.device))

    def static_range(self, sigma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.range_sigmas) == 0:
            raise QuantizationError(
                f"layer {self.layer!r}: static activation mode but no calibrated ranges; run the observer first"
            )
        if sigma is None:
            return self.range_lo.amin(), self.range_hi.amax()
        idx = (self.range_sigmas.log() - sigma.clamp_min(1e-10).log()).abs().argmin()
        return self.range_lo[idx], self.range_hi[idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        sigma = self._sigma()
        if self.mode == "dynamic":
            lo, hi = _per_sample_range(x.detach())
            if self.ranges == "per_latent" and self.context is not None:
                lo, hi = share_passes(lo, hi, self.context.latents)
        else:
            lo, hi = self.static_range(sigma)
        return fake_quantize(x, lo, hi, self.current_bits(sigma), self.qtype.symmetric)

    def describe(self) -> dict:
        return {
            "act": None if self.qtype is None else self.qtype.name,
            "act_mode": self.mode,
            "act_ranges": self.ranges,
            "schedule": [list(e) for e in self.schedule],
            "static_points": int(len(self.range_sigmas)),
        }

    def extra_repr(self) -> str:
        extra = f", ranges={self.ranges}" if self.mode == "dynamic" else ""
        return f"{None if self.qtype is None else self.qtype.name}, mode={self.mode}{extra}"


def uncovered_sigmas(module: nn.Module, sigmas, rtol: float = 0.05) -> list[float]:
    """The model-call σ's of ``sigmas`` (σ > 0) outside the calibrated σ range of ``module``'s static
    layers by more than ``rtol`` (relative): where static ranges fall back to the nearest end.

    Empty when every σ is covered or no layer is static. The σ range is the one all static layers
    share (the intersection), so a σ is reported if any static layer lacks coverage there.
    """
    spans = [m.calibrated_sigma_range() for m in module.modules()
             if isinstance(m, ActQuantizer) and m.mode == "static"]
    spans = [s for s in spans if s is not None]
    if not spans:
        return []
    lo, hi = max(s[0] for s in spans), min(s[1] for s in spans)
    values = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1) if float(s) > 0]
    return [s for s in values if s < lo * (1 - rtol) or s > hi * (1 + rtol)]
