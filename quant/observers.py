"""Activation-range observers, recorded per σ, for static activation quantization.

``with ActivationObserver(qmodel) as obs: <run the sampler>`` hooks the inputs of ``qmodel``'s
quantized layers only (modules this pack created), groups what it sees by the σ published through
the model's :class:`~.context.QuantContext`, and removes every hook on exit. ``obs.apply()`` then
stores the ranges in the layers and switches them to static mode. The observer can be entered
again (progressive calibration observes one step at a time); what it recorded is kept.

Range estimators: ``minmax``; ``percentile`` (clip at the given percentile, both tails); ``mse``
(the clip ratio of the min/max range that minimises the fake-quantization MSE at the layer's
bit-width at that σ, searched on a grid, as Q-Diffusion's MSE initialisation does, ALGORITHMS.md
§1); ``auto``, which picks one of ``CANDIDATES`` per layer and σ: the one whose ranges give the
smallest error in the layer's *output* (quantized input vs unquantized input, same quantized
weights) on a few input rows kept from the calibration data (in-sample: the rows are part of the
data the candidates' ranges come from). The output error weighs the input error by the weights
that read it, which the input MSE alone does not. Percentile, MSE and auto work on a bounded
random sample per (layer, σ) (and auto on at most ``score_elements`` kept input elements, cropped
spatially or over tokens), and :meth:`finish` turns the records of a σ into ranges and frees them,
so memory stays flat over a whole schedule.

Unlike momentum-averaged ranges, nothing is mixed across σ: diffusion activations change with the
noise level, which is the point of keeping ranges per σ. A NaN or inf activation is refused with
the layer and σ named (a range cannot be made from it).
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import fake_quantize
from .context import get_context
from .errors import QuantizationError
from .plan import quantized_layers

METHODS = ("minmax", "percentile", "mse", "auto")
#: what ``auto`` chooses from, per layer and σ
CANDIDATES = ("minmax", "percentile(99.9)", "percentile(99.99)", "mse")
MISSING = ("error", "dynamic")


def sigma_key(sigma) -> float:
    """How observers key a model call's σ (first element, rounded): calls at one σ share ranges."""
    return round(float(torch.as_tensor(sigma).reshape(-1)[0]), 6)


def mse_clip(sample: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, float]:
    """The ``(ratio·lo, ratio·hi)``, ratio on a grid in [0.3, 1], with the smallest fake-quant MSE."""
    best, best_err = (lo, hi), float("inf")
    for ratio in torch.linspace(0.3, 1.0, 36).tolist():
        clo, chi = torch.tensor(lo * ratio), torch.tensor(hi * ratio)
        err = float((fake_quantize(sample, clo, chi, bits, symmetric) - sample).pow(2).mean())
        if err < best_err:
            best, best_err = (lo * ratio, hi * ratio), err
    return best


def percentile_clip(sample: torch.Tensor, lo: float, percentile: float) -> tuple[float, float]:
    q = torch.tensor([1 - percentile / 100, percentile / 100])
    qlo, qhi = torch.quantile(sample, q).tolist()
    return (min(qlo, 0.0) if lo < 0 else qlo), qhi


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
        score_elements: int = 1 << 17,
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
        self._done: dict[tuple[str, float], tuple[float, float]] = {}
        self.score_elements = score_elements
        self._rows: dict[tuple[str, float], list[torch.Tensor]] = {}
        self.choices: dict[tuple[str, float], str] = {}  # auto: the candidate chosen per (layer, σ)
        self._scoring = False
        self._handles: list = []
        self._modes: dict[str, str] = {}

    # hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> "ActivationObserver":
        self._modes = {}
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
        self._modes = {}

    def _hook(self, name: str):
        def record(_module, args):
            if not self._scoring:
                self.observe(name, args[0])

        return record

    def _sigma_key(self) -> float:
        sigma = None if self.context is None else self.context.sigma
        if sigma is None:
            raise QuantizationError(
                "observer saw a model call without σ: call the model inside quant.sigma_scope "
                "(or through SigmaScopedDenoiser) so ranges can be recorded per σ"
            )
        return sigma_key(sigma)

    def observe(self, name: str, x: torch.Tensor) -> None:
        key = (name, self._sigma_key())
        if key in self._done:
            raise QuantizationError(f"layer {name!r}: σ={key[1]} was already finished; observe a σ before finishing it")
        x = x.detach().float()
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (abs(lo) < float("inf") and abs(hi) < float("inf")):  # also catches NaN
            raise QuantizationError(
                f"layer {name!r}: NaN or inf in its input at σ={key[1]}; no range can be calibrated from it "
                "(check the model and its weight quantization; nothing was stored)"
            )
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
        if self.method == "auto":
            self._keep_rows(key, x)

    def _keep_rows(self, key: tuple[str, float], x: torch.Tensor) -> None:
        """Keep whole input rows (cropped to ``score_elements``) for auto's output-error score."""
        rows = self._rows.setdefault(key, [])
        room = self.score_elements - sum(r.numel() for r in rows)
        if room <= 0 or x.ndim < 2:
            return
        row = x[:1]
        if row.numel() > room and row.ndim == 4:  # conv input: a square spatial crop
            side = max(1, int((room / row.shape[1]) ** 0.5))
            row = row[..., : min(side, row.shape[2]), : min(side, row.shape[3])]
        elif row.numel() > room and row.ndim == 3:  # tokens: a random subset
            keep = max(1, room // row.shape[2])
            idx = torch.randperm(row.shape[1], generator=self._gen)[:keep].to(row.device)
            row = row[:, idx]
        if row.numel() <= room:
            rows.append(row.clone())

    # results -------------------------------------------------------------------------------
    @property
    def pending(self) -> list[float]:
        """σ keys observed but not finished yet."""
        return sorted({s for _, s in self._minmax})

    def _candidate(self, key: tuple[str, float], method: str) -> tuple[float, float]:
        lo, hi = self._minmax[key]
        if method == "minmax":
            return lo, hi
        sample = self._samples[key]
        if method.startswith("percentile"):
            p = float(method[len("percentile("):-1]) if "(" in method else self.percentile
            return percentile_clip(sample, lo, p)
        act = self.layers[key[0]].act
        return mse_clip(sample, lo, hi, act.bits_at(key[1]), act.qtype.symmetric)

    def _estimate(self, key: tuple[str, float]) -> tuple[float, float]:
        if self.method != "auto":
            return self._candidate(key, self.method)
        layer = self.layers[key[0]]
        act, rows = layer.act, self._rows.get(key, [])
        options = {c: self._candidate(key, c) for c in CANDIDATES}
        if not rows:
            self.choices[key] = "mse"
            return options["mse"]
        bits = act.bits_at(key[1])
        errors = {}
        mode, self._scoring, act.mode = act.mode, True, "none"
        try:
            with torch.no_grad():
                ref = [layer(r) for r in rows]
                for c, (lo, hi) in options.items():
                    lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
                    errors[c] = sum(float((layer(fake_quantize(r, lo_t.to(r.device), hi_t.to(r.device), bits,
                                                               act.qtype.symmetric)) - y).float().pow(2).sum())
                                    for r, y in zip(rows, ref))
        finally:
            act.mode, self._scoring = mode, False
        self.choices[key] = min(errors, key=errors.get)
        return options[self.choices[key]]

    def finish(self, sigmas: list[float] | None = None) -> dict[str, dict[float, tuple[float, float]]]:
        """Turn the records of the given σ keys (default: all pending) into ranges and free them.

        Returns ``{layer: {σ: (lo, hi)}}`` for those σ's. The estimate uses the bit-width the layer
        runs at that σ (its relax schedule included), which matters for ``mse``.
        """
        wanted = set(self.pending if sigmas is None else sigmas)
        out: dict[str, dict[float, tuple[float, float]]] = {}
        for key in sorted(k for k in self._minmax if k[1] in wanted):
            self._done[key] = self._estimate(key)
            out.setdefault(key[0], {})[key[1]] = self._done[key]
            del self._minmax[key]
            self._samples.pop(key, None)
            self._rows.pop(key, None)
        return out

    def ranges(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{layer: (sigmas, lo, hi)}`` from everything observed so far (pending σ's are finished)."""
        self.finish()
        if not self._done:
            raise QuantizationError("observer recorded nothing: run the model inside the `with` block")
        out: dict[str, list] = {}
        for (name, sigma), (lo, hi) in sorted(self._done.items()):
            out.setdefault(name, []).append((sigma, lo, hi))
        return {n: tuple(torch.tensor(col) for col in zip(*rows)) for n, rows in out.items()}

    def choice_counts(self) -> dict[str, dict[str, int]]:
        """``auto``: per layer, how many σ's chose each candidate."""
        out: dict[str, dict[str, int]] = {}
        for (name, _), c in sorted(self.choices.items()):
            out.setdefault(name, {}).setdefault(c, 0)
            out[name][c] += 1
        return out

    def unobserved(self) -> list[str]:
        """Quantized layers with an activation quantizer that were never called while observing."""
        seen = {n for n, _ in self._done} | {n for n, _ in self._minmax}
        return sorted(n for n in self.layers if n not in seen)

    def apply(self, missing: str = "error") -> int:
        """Store the ranges in the layers (static mode); returns how many layers got ranges.

        ``missing`` says what happens to layers never observed: ``"error"`` (default) refuses and
        changes nothing; ``"dynamic"`` keeps them quantized with dynamic per-sample ranges.
        """
        if missing not in MISSING:
            raise QuantizationError(f"missing must be one of {MISSING}, got {missing!r}")
        ranges = self.ranges()
        never = self.unobserved()
        if never and missing == "error":
            raise QuantizationError(
                f"{len(never)} layer(s) never saw an input while observing, so they have no range: "
                f"{', '.join(never[:5])}{' …' if len(never) > 5 else ''} (run them, or apply(missing='dynamic'))"
            )
        for name, (sigmas, lo, hi) in ranges.items():
            self.layers[name].act.set_static_ranges(sigmas, lo, hi)
            if name in self._modes:
                self._modes[name] = "static"
        for name in never:
            self.layers[name].act.mode = "dynamic"
            if name in self._modes:
                self._modes[name] = "dynamic"
        return len(ranges)
