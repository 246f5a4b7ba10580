"""Calibrated quantization: per-layer rounding, scales, low-rank branches and precision from
calibration statistics, into the pack's storage (the plan records every per-layer choice).

:func:`quantize_calibrated` is :func:`~.plan.quantize_model` with :class:`~.layerinputs.LayerInputs`
per layer. For every layer the plan quantizes it

1. checks the statistics (a layer without usable statistics is rounded to nearest, with a note);
2. **activation outliers**: if the largest per-channel ``|x|`` is ``outlier_ratio``× the median
   channel's or more and the preset quantizes activations, the layer's activations stay 16-bit
   (a per-tensor 8- or 4-bit grid spanning such an outlier rounds every other channel to a few
   levels); reported per layer;
3. **AWQ-style scales** (``awq=True``, :mod:`.awq`): searched on the fit statistics, kept only if
   they lower the held-out error;
4. **rounding**: round-to-nearest and GPTQ (:mod:`.gptq`; activation order with static groups,
   natural order with on-the-fly groups, or both) are scored on the *held-out* statistics and the
   lowest output error wins: the per-layer fallback to round-to-nearest where GPTQ does not help;
5. **budget** (``budget``, a ratio of the model's fp16 bytes, :mod:`.budget`): extra bytes go where
   they remove the most error — int8 for the most sensitive layers and/or a low-rank branch
   (:mod:`.lowrank`, rank chosen per layer) — weighted by each layer's measured sensitivity when
   given, else by its relative output error.

Nothing in the model changes until every layer's solution is computed (a failure leaves it as it
was). Every choice goes into the layer's ``calib`` entry of the plan (saved by ``save_quantized``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .awq import expand, scaled_error, search_scales
from .errors import QuantizationError
from .gptq import DEFAULT_DAMP, FLOAT32_FROM, HessianFactors, gptq_quantize, output_error, reduced_float32, solve_dtype
from .layerinputs import LayerInputs
from .modules import QuantConv2d, QuantLinear
from .activations import ActQuantizer
from .context import attach_context, get_context
from .plan import KEPT_ATTR, QuantPlan, _as_plan, _set_submodule, quantize_model, quantized_layers, resolve_plan
from .qtypes import qtype
from .weights import dequantize_weight, quantize_weight

ROUNDINGS = ("rtn", "gptq")
ACT_ORDERS = ("on", "off", "both")
#: what a byte budget may do: raise 4-bit layers to int8, add low-rank branches, store the plan's
#: 16-bit layers (time embedding, first/last conv) at int8 where that costs less error than the
#: bytes it frees buy elsewhere, or (``uint3``) lower insensitive 4-bit layers to 3 bits to pay for
#: the others (``budget.py``)
BUDGET_OPTIONS = ("int8", "rank", "kept", "uint3")
CALIB_ATTR = "qcorrect_calibration"


@dataclass(frozen=True)
class CalibratedConfig:
    """What a calibrated quantizer does (each lever can be switched alone, for ablations)."""

    rounding: str = "gptq"
    act_order: str = "both"
    damp: float = DEFAULT_DAMP
    fallback: bool = True
    awq: bool = False
    budget: float | None = None
    budget_options: tuple[str, ...] = ("int8", "rank", "kept")
    max_rank: int = 32
    outlier_ratio: float | None = 1000.0
    min_rows: int = 16
    #: layers with at least this many inputs are solved in float32, narrower ones in float64
    #: (``gptq`` module docstring, "Precision"); None: every layer in float64
    float32_from: int | None = FLOAT32_FROM

    def validate(self) -> "CalibratedConfig":
        if self.rounding not in ROUNDINGS:
            raise QuantizationError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.act_order not in ACT_ORDERS:
            raise QuantizationError(f"act_order must be one of {ACT_ORDERS}, got {self.act_order!r}")
        if not self.damp > 0:
            raise QuantizationError(f"damping must be positive, got {self.damp!r}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise QuantizationError(f"the byte budget is a ratio of the fp16 bytes in (0, 1], got {self.budget!r}")
        if self.float32_from is not None and (isinstance(self.float32_from, bool) or not isinstance(self.float32_from, int)
                                              or self.float32_from < 0):
            raise QuantizationError(f"float32_from is a layer width K ≥ 0 or None, got {self.float32_from!r}")
        unknown = set(self.budget_options) - set(BUDGET_OPTIONS)
        if unknown:
            raise QuantizationError(f"unknown budget option(s) {sorted(unknown)}; known: {', '.join(BUDGET_OPTIONS)}")
        return self


@dataclass
class LayerSolution:
    """One layer's quantized weight and the choices that made it."""

    weight_type: str
    storage: dict
    input_scale: torch.Tensor | None = None
    lowrank: tuple | None = None
    act_16bit: bool = False
    calib: dict = field(default_factory=dict)
    kept: bool = False  # a layer the plan keeps in 16-bit, solved at int8 as a budget candidate
    # for the budget: held-out output errors, and what the allocation may give the layer
    # (``budget.prepare``, solved while the statistics exist)
    err_hold: float = 0.0
    err_rtn_hold: float = 0.0
    out_energy_hold: float = 0.0
    candidates: object | None = None


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().reshape(w.shape[0], -1)


def _dequant(storage, qt, shape):
    return dequantize_weight(storage, qt, shape, torch.float32)


def _effective_weight(sol: LayerSolution, shape) -> torch.Tensor:
    """The float weight a solution computes with (input scales undone), in the layer's shape."""
    from .budget import _effective

    return _effective(sol, tuple(shape)).float().reshape(shape)


def outlier_ratio(stats: LayerInputs) -> float:
    """Largest per-channel ``|x|`` over the median channel's (1 for a layer without inputs)."""
    med = float(stats.absmax.median())
    top = float(stats.absmax.max())
    return top / med if med > 0 else (float("inf") if top > 0 else 1.0)


def solve_layer(name: str, w: torch.Tensor, stats: LayerInputs | None, weight_type: str, act: str | None,
                cfg: CalibratedConfig, factors: HessianFactors | None = None) -> LayerSolution:
    """Rounding (and scales) for one layer; see the module docstring for the order of the steps.
    ``factors``: a :class:`~.gptq.HessianFactors` of ``stats.h_fit`` to share with later solves (the
    budget's candidates); used for the rounding unless AWQ scales change ``H``."""
    qt = qtype(weight_type)
    w2 = _flat(w)
    rtn_storage = quantize_weight(w2, qt, name)
    if stats is None or stats.rows_fit < cfg.min_rows or stats.rows_hold == 0:
        why = ("no calibration statistics" if stats is None else
               f"{stats.rows_fit} fit rows < {cfg.min_rows}" if stats.rows_fit < cfg.min_rows else "no held-out rows")
        return LayerSolution(weight_type, rtn_storage, calib={"rounding": "rtn", "note": f"{why} → round-to-nearest"})
    stats.check(name)
    if stats.k != w2.shape[1]:
        raise QuantizationError(f"layer {name!r}: statistics for K={stats.k}, the weight has K={w2.shape[1]}")
    calib: dict = {}
    act_qt = None if act is None else qtype(act)
    dtype = solve_dtype(stats.k, cfg.float32_from) if factors is None else factors.dtype
    if dtype == torch.float32:  # recorded only where it applies, so float64 layers' entries stay as before
        calib["solve_dtype"] = "float32"
    ratio = outlier_ratio(stats)
    act_16bit = False
    if cfg.outlier_ratio is not None and act_qt is not None and ratio >= cfg.outlier_ratio:
        act_16bit, act_qt = True, None
        calib["outliers"] = f"channel |x| max/median {ratio:.3g}× ≥ {cfg.outlier_ratio:g}× → activations kept 16-bit"
    h_hold = stats.h_hold  # float32: output_error converts it per call, so no K×K float64 copy is
    # held while GPTQ factorizes (the same values as converting once)
    err_rtn = output_error(w2, _dequant(rtn_storage, qt, w2.shape), h_hold, dtype)
    scale = None
    if cfg.awq:
        s, alpha, _ = search_scales(w2, stats, qt, act_qt, dtype=dtype)
        ones = torch.ones_like(s)
        if alpha > 0 and (scaled_error(w2, stats, qt, act_qt, s, "hold", dtype)
                          < scaled_error(w2, stats, qt, act_qt, ones, "hold", dtype)):
            scale = s
            calib["awq_alpha"] = alpha
        else:
            calib["awq_alpha"] = 0.0
    sk = None if scale is None else expand(scale, w2.shape[1]).double()
    ws = w2 if sk is None else (w2.double() * sk).float()
    # the scaled H is its own matrix; else the caller's factors (or a new set) serve every order
    hs_fit = stats.h_fit if sk is None else stats.h_fit.to(dtype) / sk.to(dtype)[:, None] / sk.to(dtype)[None, :]
    shared = factors if sk is None and factors is not None else HessianFactors(hs_fit, cfg.damp, dtype)

    def effective(storage):
        q = _dequant(storage, qt, w2.shape).double()
        return q if sk is None else q / sk

    candidates = {"rtn": quantize_weight(ws, qt, name) if sk is not None else rtn_storage}
    if cfg.rounding == "gptq":
        orders = {"on": [True], "off": [False], "both": [True, False]}[cfg.act_order]
        for ao in orders:
            try:
                candidates["gptq_act_order" if ao else "gptq"] = gptq_quantize(ws, hs_fit, qt, cfg.damp, ao, layer=name,
                                                                               factors=shared)
            except QuantizationError as exc:
                calib["gptq_error"] = str(exc)
    # round-to-nearest's error is known unless AWQ scales made it another weight (each is out·K² work)
    errs = {k: (err_rtn if k == "rtn" and sk is None else output_error(w2, effective(st), h_hold, dtype))
            for k, st in candidates.items()}
    if cfg.fallback or cfg.rounding == "rtn":
        chosen = min(errs, key=errs.get)
    else:
        chosen = next((k for k in ("gptq_act_order", "gptq") if k in errs), "rtn")
    calib["rounding"] = chosen
    calib["held_out_error_vs_rtn"] = round(errs[chosen] / err_rtn, 4) if err_rtn > 0 else 1.0
    if chosen == "rtn" and cfg.rounding == "gptq" and len(errs) > 1:
        best_g = min(v for k, v in errs.items() if k != "rtn")
        calib["note"] = f"GPTQ {best_g / err_rtn:.3f}× round-to-nearest's held-out error → round-to-nearest"
    out_energy = output_error(torch.zeros_like(w2), w2, h_hold, dtype)  # tr(W H Wᵀ)
    return LayerSolution(weight_type, candidates[chosen], input_scale=scale, act_16bit=act_16bit, calib=calib,
                         err_hold=errs[chosen], err_rtn_hold=err_rtn, out_energy_hold=out_energy)


def quantize_calibrated(module: nn.Module, plan: QuantPlan | str | None, inputs: dict[str, LayerInputs],
                        config: CalibratedConfig | None = None, sensitivity: dict[str, float] | None = None,
                        progress=None) -> dict:
    """Quantize ``module`` in place like :func:`quantize_model`, with every quantized layer's weight
    chosen from ``inputs`` (per layer name; a layer without statistics is rounded to nearest).
    ``sensitivity`` (per layer, e.g. its measured share of the end-to-end error) weights the budget:
    a dict, a probe ``probe(name, weight)`` called per layer, or an object with ``batch({name: weight})``
    (``calibration.inputs.SketchProbe``) called once for every layer.
    Returns a report: per-layer choices, counts and seconds. (:class:`CalibratedSolver` does the same
    with the statistics arriving in groups, each of which may be dropped once solved.)"""
    solver = CalibratedSolver(module, plan, config, progress)
    solver.add(inputs)
    return solver.finish(sensitivity)


class CalibratedSolver:
    """:func:`quantize_calibrated` in two halves, for statistics that do not fit in memory together.

    :meth:`add` solves the layers of a group of statistics — the rounding, and everything a byte budget
    may give them (``budget.prepare``) — and keeps only the solutions (packed storage, a few vectors
    and factors), so the caller can drop that group's ``K×K`` sums before collecting the next
    (``calibration.inputs.collect_inputs(consume=solver.add)``). :meth:`finish` rounds the layers no
    statistics arrived for to nearest, measures the sensitivities, allocates the budget and writes
    the model. The result is the same whatever the grouping: every layer is solved from its own
    statistics only, and the allocation sees the layers in the plan's order.

    ``module`` holds the float weights to solve from and is quantized in place by :meth:`finish`; the
    statistics may live on another device than its weights (each weight is read onto theirs).

    ``solve_device`` (e.g. the GPU that samples, while the statistics live in host RAM): each layer is
    solved there when it fits — its statistics copied over, the solution copied back to theirs — and
    where the statistics are otherwise. A layer fits when :func:`solve_bytes` is at most the device's
    free memory (its own free memory plus what torch has cached there); one that runs out of memory
    anyway is solved where its statistics are. A CUDA device whose float32 products are TF32
    (``gptq.reduced_float32``) is not used: TF32 would keep about three digits of the factorizations
    and sweeps the CPU computes in full float32 (or float64). ``placement`` counts where the layers
    went (the report's ``"placement"``)."""

    def __init__(self, module: nn.Module, plan: QuantPlan | str | None, config: CalibratedConfig | None = None,
                 progress=None, solve_device: torch.device | str | None = None) -> None:
        self.cfg = (config or CalibratedConfig()).validate()
        self.module, self.plan = module, _as_plan(plan)
        self.progress = progress
        self.decisions = resolve_plan(module, self.plan)
        self.todo = {n: d for n, d in self.decisions.items() if d["weight"]}
        # the plan's 16-bit layers (not misfits), solved at int8 as budget candidates
        self.kept = ([n for n, d in self.decisions.items() if d["weight"] is None and d["fallback"] is None]
                     if self.cfg.budget is not None and "kept" in self.cfg.budget_options else [])
        self.solutions: dict[str, LayerSolution] = {}
        self.seconds = 0.0
        self.finished = False
        self.solve_device = None if solve_device is None else torch.device(solve_device)
        #: layers solved on ``solve_device``; where their statistics live instead: too large for its free
        #: memory, out of memory while solving, or its float32 products are TF32
        self.placement = {"solve_device": 0, "too_large": 0, "out_of_memory": 0, "tf32": 0}

    @property
    def layers(self) -> list[str]:
        """The layers whose statistics this solver uses (the others' are ignored by :meth:`add`)."""
        return [*self.todo, *self.kept]

    def add(self, inputs: dict[str, LayerInputs | None]) -> None:
        """Solve the layers of ``inputs`` (``None``: no statistics, round-to-nearest); layers the plan does
        not quantize are ignored, a layer given twice is an error (its statistics are not summed)."""
        if self.finished:
            raise QuantizationError("this calibrated solver has already written its model")
        t0 = time.perf_counter()
        for name, stats in inputs.items():
            if name not in self.todo and name not in self.kept:
                continue
            if name in self.solutions:
                raise QuantizationError(f"layer {name!r}: statistics given twice")
            self._solve(name, stats)
        self.seconds += time.perf_counter() - t0

    def _solve(self, name: str, stats: LayerInputs | None) -> None:
        kept = name not in self.todo
        sol = None
        device = self._target(name, stats)
        if device is not None:
            try:
                sol = _moved(self._solution(name, stats.to(device), kept), stats.h_fit.device)
                self.placement["solve_device"] += 1
            except torch.OutOfMemoryError:  # everything it allocated is freed with the frames
                self.placement["out_of_memory"] += 1
        if sol is None:
            sol = self._solution(name, stats, kept)
        self.solutions[name] = sol
        if self.progress is not None and not kept:
            self.progress(sum(1 for n in self.solutions if n in self.todo), len(self.todo))

    def _target(self, name: str, stats: LayerInputs | None) -> torch.device | None:
        """Where to solve a layer if not where its statistics are (None: there)."""
        dev = self.solve_device
        if dev is None or stats is None or stats.on(dev):  # no device, no statistics, or already there
            return None
        if reduced_float32(dev):
            self.placement["tf32"] += 1
            return None
        if dev.type == "cuda":
            out = self.module.get_submodule(name).weight.shape[0]
            if solve_bytes(stats.k, out, solve_dtype(stats.k, self.cfg.float32_from)) > free_bytes(dev):
                self.placement["too_large"] += 1
                return None
        return dev

    def _solution(self, name: str, stats: LayerInputs | None, kept: bool) -> LayerSolution:
        from .budget import prepare

        w = self.module.get_submodule(name).weight
        if stats is not None:
            w = w.detach().to(stats.h_fit.device)
        # one set of factorizations of H for the rounding and every budget candidate of this layer
        factors = None if stats is None else HessianFactors(stats.h_fit, self.cfg.damp,
                                                            solve_dtype(stats.k, self.cfg.float32_from))
        sol = solve_layer(name, w, stats, "int8" if kept else self.todo[name]["weight"],
                          None if kept else self.todo[name]["act"], self.cfg, factors)
        sol.kept = kept
        if factors is not None:
            factors.drop("natural")  # the candidates are solved in activation order
        prepare(name, w, sol, stats, self.cfg, factors)
        del factors
        return sol

    def finish(self, sensitivity=None) -> dict:
        """Round the layers without statistics to nearest, spend the budget (weighted by
        ``sensitivity``, as :func:`quantize_calibrated`'s) and quantize the module; returns the report."""
        from .budget import allocate, apply_allocation

        if self.finished:
            raise QuantizationError("this calibrated solver has already written its model")
        t0 = time.perf_counter()
        cfg, module, plan = self.cfg, self.module, self.plan
        for name in self.layers:
            if name not in self.solutions:
                self._solve(name, None)
        self.finished = True
        solutions = {n: self.solutions[n] for n in self.layers}  # the plan's order, whatever the groups'
        floats = {n: module.get_submodule(n) for n in solutions}
        allocation = None
        if cfg.budget is not None and hasattr(sensitivity, "batch"):  # a probe of every layer at once
            sensitivity = {n: float(v) for n, v in sensitivity.batch(
                {n: _effective_weight(sol, floats[n].weight.shape) for n, sol in solutions.items()}).items()}
        elif cfg.budget is not None and callable(sensitivity):  # a probe: measure each layer's share now
            sensitivity = {n: float(sensitivity(n, _effective_weight(sol, floats[n].weight.shape)))
                           for n, sol in solutions.items()}
        if cfg.budget is not None:
            allocation = allocate(module, plan, floats, solutions, cfg, sensitivity)
            apply_allocation(floats, solutions, allocation, cfg)
            for name in allocation.get("kept_16bit", []):
                del solutions[name]
        context = get_context(module) or attach_context(module)
        demoted = {}
        for name, sol in solutions.items():
            if sol.kept:  # stored at int8 with 16-bit activations, like a W8A16 layer
                cls = QuantLinear if isinstance(floats[name], nn.Linear) else QuantConv2d
                demoted[name] = cls.from_float(floats[name], "int8", ActQuantizer(None, "none", context, name), name)
                sol.calib["budget"] = "int8 (kept 16-bit by the plan; int8 weights, 16-bit activations)"
        quantize_model(module, plan)
        for name, new in demoted.items():
            _set_submodule(module, name, new)
            module.__dict__[KEPT_ATTR].pop(name, None)
        layers = quantized_layers(module)
        for name, sol in solutions.items():
            layer = layers[name]
            if sol.weight_type != layer.wqtype.name:
                cls = QuantLinear if isinstance(layer, QuantLinear) else QuantConv2d
                new = cls.from_float(floats[name], sol.weight_type, layer.act, name)
                new.fallback = layer.fallback
                _set_submodule(module, name, new)
                layer = new
            layer.set_storage(sol.storage)
            layer.set_input_scale(sol.input_scale)
            if sol.lowrank is not None:
                layer.set_lowrank(*sol.lowrank)
            if sol.act_16bit:
                layer.act.qtype, layer.act.mode = None, "none"
            layer.calib = sol.calib
        report = {
            "config": asdict(cfg),
            "layers": {n: s.calib for n, s in solutions.items()},
            "seconds": round(self.seconds + time.perf_counter() - t0, 2),
            "allocation": allocation,
            **({"placement": dict(self.placement)} if self.solve_device is not None else {}),
        }
        module.__dict__[CALIB_ATTR] = {k: v for k, v in report.items() if k != "layers"}
        report["summary"] = calibrated_summary(module)
        self.solutions.clear()
        return report


#: a layer's solve at its peak, in ``K×K`` matrices of its solve dtype beyond its statistics (measured by
#: ``qcorrect bench solve``: 4.3 in float64 and 2.0 float64-sized, i.e. 4 float32, at 1280×11520; up to 6
#: at narrow widths, where the ``out×K`` terms add; docs/BENCHMARKS.md, "Cost")
SOLVE_MATRICES = 4.5


def solve_bytes(k: int, out: int, dtype: torch.dtype) -> int:
    """What solving a layer of ``out × K`` on a device takes there: its two float32 ``K×K`` sums, about
    :data:`SOLVE_MATRICES` ``K×K`` matrices of the solve ``dtype`` and 16 ``out×K`` ones."""
    size = torch.empty((), dtype=dtype).element_size()
    return int(8 * k * k + SOLVE_MATRICES * size * k * k + 16 * size * out * k)


def free_bytes(device: torch.device) -> int:
    """Memory a CUDA device can still give this process: the driver's free memory plus what torch's
    allocator has cached there but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _moved(obj, device: torch.device):
    """``obj`` with every tensor in it (dicts, tuples, lists, dataclasses such as a solution and its
    budget candidates, which are changed in place) moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_moved(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_moved(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _moved(getattr(obj, f.name), device))
    return obj


def calibrated_summary(module: nn.Module) -> str:
    """One line: how many layers got which rounding, scales, branches, int8 and 16-bit activations."""
    layers = quantized_layers(module)
    calib = [m.calib or {} for m in layers.values()]
    n = len(layers)
    gptq = sum(1 for c in calib if str(c.get("rounding", "")).startswith("gptq"))
    fell = sum(1 for c in calib if c.get("rounding") == "rtn" and "note" in c)
    ratios = sorted(c["held_out_error_vs_rtn"] for c in calib if "held_out_error_vs_rtn" in c)
    parts = [f"{n} layers: {gptq} GPTQ, {n - gptq} round-to-nearest ({fell} by the held-out check)"]
    if ratios:
        parts.append(f"median held-out output error {ratios[len(ratios) // 2]:.2f}× round-to-nearest's")
    awq = sum(1 for m in layers.values() if m.has_input_scale)
    if awq:
        parts.append(f"{awq} with input scales")
    ranked = [m.rank for m in layers.values() if m.rank]
    if ranked:
        parts.append(f"{len(ranked)} with a low-rank branch (rank {min(ranked)}–{max(ranked)})")
    int8 = sum(1 for c in calib if c.get("budget") == "int8")
    if int8:
        parts.append(f"{int8} raised to int8 by the budget")
    low = sum(1 for c in calib if str(c.get("budget", "")).startswith("uint3"))
    if low:
        parts.append(f"{low} lowered to 3 bits by the budget")
    kept = sum(1 for c in calib if str(c.get("budget", "")).startswith("int8 (kept"))
    if kept:
        parts.append(f"{kept} of the plan's 16-bit layers stored at int8 by the budget")
    out = sum(1 for c in calib if "outliers" in c)
    if out:
        parts.append(f"{out} with 16-bit activations (outliers)")
    f32 = sum(1 for c in calib if c.get("solve_dtype") == "float32")
    if f32:
        parts.append(f"{f32} solved in float32 (the widest)")
    return ", ".join(parts)
