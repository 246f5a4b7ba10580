"""Quantization plans and presets, and ``quantize_model`` / ``quantization_plan``.

A :class:`QuantPlan` says which Linear/Conv2d layers to quantize and how (weight type, activation
type and mode), with fnmatch include/exclude patterns on the layers' qualified names. Presets are
named plans (``W8A8``, ``W4A8``, ``W4A4``, ``W8A16``, ``W4A16``) whose names go into file metadata.

The default plan keeps the first and last convolution and the time/class-embedding layers in
16-bit, as PTQD and PCR do (ALGORITHMS.md §1–§2): they are tiny and their error is amplified by
everything downstream. "First"/"last" are found by registration order, which is the data-flow
order in SD-style UNets (``input_blocks.0.0`` / ``out.2`` in ComfyUI's, ``conv_in`` / ``conv_out``
in the reference model).

A layer whose flattened input size ``K`` the plan's weight type cannot store (a group size that
does not divide ``K``, or an odd ``K`` for int4's two-codes-per-byte packing) is not a reason to
refuse the model: it gets the nearest workable type (:func:`fit_weight_type`), and the choice is
recorded per layer (``fallback`` in its plan entry, ``kept`` for layers left in 16-bit).
"""

from __future__ import annotations

import fnmatch
import json
from collections import Counter
from dataclasses import asdict, dataclass, replace

from torch import nn

from .activations import ACT_RANGES, MODES, ActQuantizer
from .context import attach_context, get_context
from .errors import QuantizationError
from .modules import QUANT_LAYERS, QuantConv2d, QuantLinear
from .qtypes import ACTIVATION, GROUP_SIZES, qtype, weight_qtype
from .weights import input_size, misfit

PLAN_FORMAT = 1
PLAN_ATTR = "qcorrect_quant_plan"
KEPT_ATTR = "qcorrect_kept_layers"
#: how the static activation ranges were calibrated (``calibration.ranges.RangeReport.info``), if they were
ACT_CALIBRATION_ATTR = "qcorrect_act_calibration"

#: names of the layers that carry the time (and class) embedding in common UNets
TIME_EMBED_PATTERNS = (
    "time_embed.*", "*.time_embed.*", "time_embedding.*", "*.time_embedding.*",
    "label_emb.*", "*.label_emb.*", "time_proj*", "*.time_proj*",
)


@dataclass(frozen=True)
class QuantPlan:
    """What to quantize and how. Serialisable with :meth:`to_json` / :meth:`from_json`.

    ``act_ranges``: how dynamic activation ranges are taken, ``per_latent`` (the passes of one latent
    in a CFG call share a range; the default) or ``per_sample`` (every sample its own: the behaviour
    before session 9, and what a plan saved without the field means). See ``quant/activations.py``."""

    weights: str = "int8"
    activations: str | None = "a8_asym"
    act_mode: str = "dynamic"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_first_last_conv: bool = True
    keep_patterns: tuple[str, ...] = TIME_EMBED_PATTERNS
    preset: str | None = None
    act_ranges: str = "per_latent"

    def validate(self) -> "QuantPlan":
        weight_qtype(self.weights)
        if self.activations is not None and qtype(self.activations).kind != ACTIVATION:
            raise QuantizationError(f"{self.activations!r} is not an activation type")
        if self.act_mode not in MODES:
            raise QuantizationError(f"unknown activation mode {self.act_mode!r}; known: {MODES}")
        if self.act_ranges not in ACT_RANGES:
            raise QuantizationError(f"unknown activation ranges {self.act_ranges!r}; known: {ACT_RANGES}")
        if self.activations is None and self.act_mode != "none":
            raise QuantizationError(f"activation mode {self.act_mode!r} needs an activation type")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        try:
            d = json.loads(text)
            d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
            d.setdefault("act_ranges", "per_sample")  # written before the field existed: per-sample ranges
            return cls(**d).validate()
        except (TypeError, ValueError) as exc:
            raise QuantizationError(f"not a valid quantization plan: {exc}") from None


PRESETS: dict[str, QuantPlan] = {
    "W8A8": QuantPlan("int8", "a8_asym", "dynamic", preset="W8A8"),
    "W4A8": QuantPlan("uint4_g64", "a8_asym", "dynamic", preset="W4A8"),
    "W4A4": QuantPlan("uint4_g64", "a4_asym", "dynamic", preset="W4A4"),
    "W8A16": QuantPlan("int8", None, "none", preset="W8A16"),
    "W4A16": QuantPlan("uint4_g64", None, "none", preset="W4A16"),
}


def preset(name: str, **overrides) -> QuantPlan:
    """A named preset, optionally with fields overridden (e.g. ``act_mode="static"``)."""
    try:
        plan = PRESETS[name]
    except KeyError:
        raise QuantizationError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return replace(plan, **overrides).validate() if overrides else plan


def _as_plan(plan: QuantPlan | str | None) -> QuantPlan:
    if plan is None:
        return PRESETS["W8A8"]
    if isinstance(plan, str):
        return preset(plan)
    return plan.validate()


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def fit_weight_type(name: str, k: int) -> tuple[str | None, str | None]:
    """The weight type a layer with ``k`` inputs gets when the plan asks for ``name``, and why.

    Returns ``(name, None)`` when it fits. Otherwise, for a group type, the largest registered
    group size that divides ``k``; else per-channel int4 of the same symmetry if ``k`` is even;
    else ``None`` (keep the layer in 16-bit). The second element is a note such as
    ``"K=36 not divisible by 64 → uint4 per-channel"``.
    """
    qt = weight_qtype(name)
    why = misfit(qt, k)
    if why is None:
        return qt.name, None
    if why == "pack3":  # 3-bit rows pack eight codes per three bytes: the same group size at 4 bits
        alt = f"uint4_g{qt.group_size}"
        if misfit(qtype(alt), k) is None:
            return alt, f"K={k} not a multiple of 8 (uint3 packs eight codes per three bytes) → {alt}"
        qt = weight_qtype(alt)
    base = "int4" if qt.symmetric else "uint4"
    if qt.group_size:
        reason = f"K={k} not divisible by {qt.group_size}"
        for g in sorted(GROUP_SIZES, reverse=True):
            if k % g == 0:
                return f"{base}_g{g}", f"{reason} → {base}_g{g}"
        if k % 2 == 0:
            return base, f"{reason} → {base} per-channel"
        return None, f"{reason} and odd → kept 16-bit"
    return None, f"K={k} is odd (int4 packs two codes per byte) → kept 16-bit"


def is_float_layer(m: nn.Module) -> bool:
    """A Linear/Conv2d the quantizer can replace: the torch classes and their subclasses (ComfyUI's
    ``comfy.ops`` layers are subclasses), except MultiheadAttention's out_proj, whose weight the
    attention reads directly."""
    return isinstance(m, (nn.Linear, nn.Conv2d)) and type(m).__name__ != "NonDynamicallyQuantizableLinear"


def resolve_plan(module: nn.Module, plan: QuantPlan | str | None = None) -> dict[str, dict]:
    """Per-layer decisions: ``{name: {"type", "weight", "act", "act_mode", "act_ranges", "fallback"}}``.

    Kept layers get ``weight=None``; ``fallback`` is ``None`` unless the layer's input size made
    the plan pick another weight type (or keep it in 16-bit), in which case it says why.
    """
    plan = _as_plan(plan)
    layers = [(n, m) for n, m in module.named_modules() if is_float_layer(m)]
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    edge = {convs[0], convs[-1]} if plan.keep_first_last_conv and convs else set()
    decisions = {}
    for name, m in layers:
        if not _matches(name, plan.include) or _matches(name, plan.exclude):
            continue
        kept = name in edge or _matches(name, plan.keep_patterns)
        weight, note = (None, None) if kept else fit_weight_type(plan.weights, input_size(m.weight.shape))
        decisions[name] = {
            "type": "linear" if isinstance(m, nn.Linear) else "conv2d",
            "weight": weight,
            "act": None if weight is None else plan.activations,
            "act_mode": "none" if weight is None else plan.act_mode,
            "act_ranges": plan.act_ranges,
            "fallback": note,
        }
    return decisions


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_model(module: nn.Module, plan: QuantPlan | str | None = None) -> nn.Module:
    """Replace the planned Linear/Conv2d layers of ``module`` by quantized ones, in place.

    Every replacement is built (and every error found) before the first layer is swapped, so a
    failure leaves the model exactly as it was. Returns ``module``.
    """
    plan = _as_plan(plan)
    if any(isinstance(m, QUANT_LAYERS) for m in module.modules()):
        raise QuantizationError("model is already quantized; quantize the full-precision model instead")
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        raise QuantizationError("quantize_model needs a container module (e.g. a UNet), not a single layer")
    decisions = resolve_plan(module, plan)
    if not any(d["weight"] for d in decisions.values()):
        fell_back = any(d["fallback"] for d in decisions.values())
        raise QuantizationError(
            "the plan selects no layer to quantize ("
            + ("every selected layer's input size fits no int4 storage; try int8" if fell_back
               else "check include/exclude patterns") + ")"
        )
    context = get_context(module) or attach_context(module)
    replacements = {}
    for name, d in decisions.items():
        if d["weight"] is None:
            continue
        layer = module.get_submodule(name)
        # static layers refuse to run until an observer has stored their per-σ ranges
        act = ActQuantizer(d["act"], d["act_mode"], context, name, d["act_ranges"])
        cls = QuantLinear if d["type"] == "linear" else QuantConv2d
        replacements[name] = cls.from_float(layer, d["weight"], act, name)
        replacements[name].fallback = d["fallback"]
    for name, new in replacements.items():
        _set_submodule(module, name, new)
    module.__dict__[PLAN_ATTR] = plan
    module.__dict__[KEPT_ATTR] = {n: d["fallback"] for n, d in decisions.items() if d["weight"] is None}
    return module


def quantization_plan(module: nn.Module) -> dict:
    """The JSON-able per-layer plan of a quantized module (what ``load_quantized`` rebuilds from).

    ``layers`` describes each quantized layer (with a ``fallback`` note where its input size made
    the plan choose another weight type); ``kept`` maps the layers the plan left in 16-bit to
    ``None`` (kept by the plan: edges, time embedding) or the fallback note that kept them.
    """
    layers = {name: m.describe() for name, m in module.named_modules() if isinstance(m, QUANT_LAYERS)}
    plan = module.__dict__.get(PLAN_ATTR)
    return {
        "format": PLAN_FORMAT,
        "preset": None if plan is None else plan.preset,
        "plan": None if plan is None else json.loads(plan.to_json()),
        "layers": layers,
        "kept": dict(module.__dict__.get(KEPT_ATTR, {})),
        "act_calibration": module.__dict__.get(ACT_CALIBRATION_ATTR),
    }


def plan_summary(module: nn.Module) -> str:
    """One line, e.g. ``"W4A8: 120 layers quantized, 3 with a fallback (2 per-channel, 1 kept
    16-bit), 4 kept 16-bit by the plan"``."""
    layers = quantized_layers(module)
    plan = module.__dict__.get(PLAN_ATTR)
    if plan is None:
        title = "quantized model"
    else:
        title = plan.preset or f"{plan.weights}/{plan.activations or 'a16'} {plan.act_mode}"
    if not layers:
        return f"{title}: no quantized layer"
    kept = module.__dict__.get(KEPT_ATTR, {})
    kinds = Counter()
    for m in layers.values():
        if m.fallback:
            kinds[f"group {m.wqtype.group_size}" if m.wqtype.group_size else "per-channel"] += 1
    kinds["kept 16-bit"] = sum(1 for note in kept.values() if note)
    n_fallback = sum(kinds.values())
    order = sorted((k for k in kinds if k.startswith("group")), key=lambda k: -int(k.split()[1]))
    detail = ", ".join(f"{kinds[k]} {k}" for k in [*order, "per-channel", "kept 16-bit"] if kinds[k])
    text = f"{title}: {len(layers)} layer{'s' if len(layers) != 1 else ''} quantized"
    text += f", {n_fallback} with a fallback ({detail})" if n_fallback else ", no fallback"
    return text + f", {sum(1 for note in kept.values() if not note)} kept 16-bit by the plan"


def quantized_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, QUANT_LAYERS)}


def set_activation_schedule(module: nn.Module, schedule: list, patterns: tuple[str, ...] = ("*",)) -> int:
    """Give matching quantized layers a bit-width schedule over σ; returns how many changed.

    All schedules are validated before any layer changes (never a half-relaxed model).
    """
    targets = [
        m for n, m in quantized_layers(module).items() if m.act.qtype is not None and _matches(n, patterns)
    ]
    if not targets:
        raise QuantizationError("no quantized layer with an activation quantizer matches the patterns")
    probe = ActQuantizer(targets[0].act.qtype, "dynamic", layer="schedule")
    probe.set_schedule(schedule)  # raises on bad input before anything changes
    for m in targets:
        m.act.set_schedule(schedule)
    return len(targets)


__all__ = [
    "PRESETS", "QuantPlan", "fit_weight_type", "plan_summary", "preset", "quantize_model",
    "quantization_plan", "quantized_layers", "resolve_plan", "set_activation_schedule",
    "TIME_EMBED_PATTERNS",
]
