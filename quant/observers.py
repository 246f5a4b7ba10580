"""Activation-range observers, recorded per σ, for static activation quantization.

``with ActivationObserver(qmodel) as obs: <run the sampler>`` hooks the inputs of ``qmodel``'s
quantized layers only (modules this pack created), groups what it sees by the σ published through
the model's :class:`~.context.QuantContext`, and removes every hook on exit. ``obs.apply()`` then
stores the ranges in the layers and switches them to static mode.

Range estimators: ``minmax``; ``percentile`` (clip at the given percentile, both tails); ``mse``
(the clip ratio of the min/max range that minimises the fake-quantization MSE at the layer's
bit-width, searched on a grid, as Q-Diffusion's MSE initialisation does, ALGORITHMS.md §1).
Percentile and MSE work on a bounded random sample per (layer, σ) so memory stays flat.

Unlike momentum-averaged ranges, nothing is mixed across σ: diffusion activations change with the
noise level, which is the point of keeping ranges per σ.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import fake_quantize
from .context import get_context
from .errors import QuantizationError
from .plan import quantized_layers

METHODS = ("minmax", "percentile", "mse")


class ActivationObserver:
    """Context manager recording per-σ input ranges of one quantized model's layers."""

    def __init__(
        self,
        module: nn.Module,
        method: str = "minmax",
        percentile: float = 99.99,
        max_samples: int = 65536,
        quantize_inputs: bool = False,
        seed: int = 0,
    ) -> None:
        if method not in METHODS:
            raise QuantizationError(f"unknown range estimator {method!r}; known: {METHODS}")
        if not 50.0 < percentile <= 100.0:
            raise QuantizationError(f"percentile must be in (50, 100], got {percentile}")
        self.module = module
        self.layers = {n: m for n, m in quantized_layers(module).items() if m.act.qtype is not None}
        if not self.layers:
            raise QuantizationError("the model has no quantized layer with an activation quantizer to observe")
        self.context = get_context(module)
        self.method = method
        self.percentile = percentile
        self.max_samples = max_samples
        self.quantize_inputs = quantize_inputs
        self._gen = torch.Generator().manual_seed(seed)
        self._minmax: dict[tuple[str, float], list[float]] = {}
        self._samples: dict[tuple[str, float], torch.Tensor] = {}
        self._handles: list = []
        self._modes: dict[str, str] = {}

    # hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> "ActivationObserver":
        for name, layer in self.layers.items():
            self._modes[name] = layer.act.mode
            # while observing, inputs run unquantized (or dynamically quantized when asked), so
            # layers in static mode without ranges yet can run
            layer.act.mode = "dynamic" if self.quantize_inputs else "none"
            self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, mode in self._modes.items():
            self.layers[name].act.mode = mode

    def _hook(self, name: str):
        def record(_module, args):
            self.observe(name, args[0])

        return record

    def _sigma_key(self) -> float:
        sigma = None if self.context is None else self.context.sigma
        if sigma is None:
            raise QuantizationError(
                "observer saw a model call without σ: call the model inside quant.sigma_scope "
                "(or through SigmaScopedDenoiser) so ranges can be recorded per σ"
            )
        return round(float(sigma.reshape(-1)[0]), 6)

    def observe(self, name: str, x: torch.Tensor) -> None:
        key = (name, self._sigma_key())
        x = x.detach().float()
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        cur = self._minmax.get(key)
        self._minmax[key] = [min(lo, cur[0]), max(hi, cur[1])] if cur else [lo, hi]
        if self.method != "minmax":
            flat = x.reshape(-1).cpu()
            if flat.numel() > self.max_samples:
                idx = torch.randint(flat.numel(), (self.max_samples,), generator=self._gen)
                flat = flat[idx]
            pool = torch.cat([self._samples[key], flat]) if key in self._samples else flat
            if pool.numel() > self.max_samples:
                pool = pool[torch.randperm(pool.numel(), generator=self._gen)[: self.max_samples]]
            self._samples[key] = pool

    # results -------------------------------------------------------------------------------
    def _estimate(self, key: tuple[str, float], bits: int, symmetric: bool) -> tuple[float, float]:
        lo, hi = self._minmax[key]
        if self.method == "minmax":
            return lo, hi
        sample = self._samples[key]
        if self.method == "percentile":
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
            qlo, qhi = torch.quantile(sample, q).tolist()
            return min(qlo, 0.0) if lo < 0 else qlo, qhi
        best, best_err = (lo, hi), float("inf")
        for ratio in torch.linspace(0.3, 1.0, 36).tolist():
            clo, chi = torch.tensor(lo * ratio), torch.tensor(hi * ratio)
            err = float((fake_quantize(sample, clo, chi, bits, symmetric) - sample).pow(2).mean())
            if err < best_err:
                best, best_err = (lo * ratio, hi * ratio), err
        return best

    def ranges(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{layer: (sigmas, lo, hi)}`` from everything observed so far."""
        if not self._minmax:
            raise QuantizationError("observer recorded nothing: run the model inside the `with` block")
        out: dict[str, list] = {}
        for (name, sigma) in sorted(self._minmax):
            act = self.layers[name].act
            lo, hi = self._estimate((name, sigma), act.qtype.bits, act.qtype.symmetric)
            out.setdefault(name, []).append((sigma, lo, hi))
        return {n: tuple(torch.tensor(col) for col in zip(*rows)) for n, rows in out.items()}

    def apply(self) -> int:
        """Store the ranges in the layers (static mode); returns how many layers got ranges."""
        ranges = self.ranges()
        for name, (sigmas, lo, hi) in ranges.items():
            self.layers[name].act.set_static_ranges(sigmas, lo, hi)
            self._modes[name] = "static"
        return len(ranges)
