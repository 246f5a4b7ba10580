"""``qcorrect bench quantizers``: calibrated weight quantizers against round-to-nearest, end to end.

For every sampler and CFG scale: the FP model samples the evaluation seeds once; the per-layer input
statistics are collected once from FP sampling of the *calibration* seeds (disjoint, checked) with
the same sampler, schedule and CFG (``calibration.inputs.collect_inputs``); then for every preset the
round-to-nearest model (the baseline) and every method quantize the reference UNet and sample the
same seeds, classes and noise. Per row, against FP: latent MSE, PSNR, SSIM, FID-to-FP, class
accuracy; against round-to-nearest: the share of its latent-MSE gap closed with a 95% paired
bootstrap interval, the median per-sample gap closed, the worst per-sample latent-MSE ratio to
round-to-nearest and the share of samples made worse; the resident-bytes ratio to fp16 of the
quantized reference UNet and of the same method and budget on the SD1.5-shaped UNet (counted on a
meta-device copy, no weights allocated); and the calibration time (collecting the statistics,
shared by the methods of one sampler and CFG, plus each method's own solve and probe).

Methods (``--methods``): ``rtn`` (round-to-nearest), ``gptq`` (GPTQ with activation order, per-layer
fallback to round-to-nearest on held-out statistics), ``gptq_nofb`` (no fallback), ``gptq_natural``
(natural column order), ``awq`` (AWQ-style scales, round-to-nearest), ``awq_gptq``, ``gptq_int8`` /
``gptq_rank`` / ``gptq_budget`` (GPTQ plus the ``--budget`` spent on int8 layers, low-rank branches,
or both and the plan's 16-bit layers, weighted by each layer's measured sensitivity;
``gptq_budget_nokept`` without the plan's layers; ``gptq_budget_rel`` weighted by relative output
error, no probe; ``gptq_budget_x0`` probed in the denoised output's space instead of ε's), ``all``
(every lever); ``gptq_mixed`` (the budget spent with mixed precision both ways: 3-bit layers where the
probe measures a small share of the error pay for int8 where it measures a large one, ``quant/budget.py``)
and ``gptq_mixed_sketch`` (the same on ``calibration.inputs.SketchProbe``'s sensitivities, as the ComfyUI
node measures them); ``gptq_budget_tuned`` / ``gptq_tuned`` / ``rtn_tuned`` / ``gptq_budget_x0_tuned`` /
``gptq_mixed_tuned`` / ``gptq_mixed_sketch_tuned``: that
method followed by end-to-end tuning of the stored grid (``quant/tune.py``) on the calls the FP model
made while sampling the calibration set (a tuned method run after its base in the same run tunes a
copy of the base's model instead of solving it again); ``best``: the pack's default calibrated
quantizer, :data:`BEST`.

Two diagnostics place every method on one scale: the one-step error of the model's output on the
FP trajectory's own states, ``mean‖D_q(x_i, σ_i) − D_fp(x_i, σ_i)‖²``, over the steps with σ ≥ 3
(``early_error``: the first 7 of 20, where 83–87% of the final error is made) and over the rest
(``late_error``), each also as a ratio to round-to-nearest's and per sample. With ``--amplitudes a,…``
the bench also samples analysis rows ``rtn×a``: the round-to-nearest model with its weight error
scaled by ``a`` (every quantized layer computes with ``W + a·(Q(W) − W)``, activations quantized as
the preset says; a negative ``a`` mirrors the error), a fake quantizer that stores nothing new and
exists to show how the end-to-end gap (mean, median, tail) responds to the size and the direction
of the weight error alone.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace

import torch
from torch import nn

from ..calibration.inputs import (
    DEFAULT_ROWS_PER_K, TRI_BLOCK, SketchProbe, add_gram, calibration_layers, collect_inputs, early_weight, gram_macs,
    input_rows, layer_groups, layer_probe, probe_calls, row_cap, stats_bytes,
)
from ..evaluation import latent_mse, paired_bootstrap_ci
from ..quant import PRESETS, SigmaScopedDenoiser, preset as quant_preset, quantize_model, resolve_plan
from ..quant.activations import ACT_RANGES
from ..quant.budget import RANK_STEP, layer_bytes, lower_type
from ..quant.calibrated import CalibratedConfig, quantize_calibrated
from ..quant.gptq import FLOAT32_FROM
from ..quant.modules import QUANT_LAYERS
from ..quant.plan import set_activation_schedule
from ..quant.qtypes import qtype
from ..quant.weights import blob_nbytes, input_size
from ..quant.relax import WHERE as RELAX_WHERE, relaxed_schedule
from ..quant.tune import DRAWS, TuneConfig, tune_grid
from ..reference.model import load_reference
from ..reference.samplers import SAMPLERS
from ..reference.schedules import get_sigmas
from .common import emit_json, parse_float32_from, parse_presets, print_table, resident_bytes, set_threads
from .correct import check_disjoint, expand_methods
from .pipeline import (
    PerSampleNoise, RunConfig, decode, initial_noise, labels_for, parse_int_list, per_sample_metrics,
    sample_latents, start_latent, summary,
)
from .sd_unet import SDUNet
from .tuning import _context_dim

LATENT = (4, 14, 14)

#: method name → calibrated configuration (``budget`` filled in from ``--budget``); ``rtn`` is None
METHODS: dict[str, CalibratedConfig | None] = {
    "rtn": None,
    "gptq": CalibratedConfig(act_order="on"),
    "gptq_nofb": CalibratedConfig(act_order="on", fallback=False),
    "gptq_natural": CalibratedConfig(act_order="off"),
    "awq": CalibratedConfig(rounding="rtn", awq=True),
    "awq_gptq": CalibratedConfig(act_order="on", awq=True),
    "gptq_int8": CalibratedConfig(act_order="on", budget=0.30, budget_options=("int8",)),
    "gptq_rank": CalibratedConfig(act_order="on", budget=0.30, budget_options=("rank",)),
    "gptq_budget": CalibratedConfig(act_order="on", budget=0.30),
    "gptq_budget_nokept": CalibratedConfig(act_order="on", budget=0.30, budget_options=("int8", "rank")),
    "all": CalibratedConfig(act_order="on", awq=True, budget=0.30),
    # the budget weighted by each layer's relative output error instead of the probe (no model runs)
    "gptq_budget_rel": CalibratedConfig(act_order="on", budget=0.30),
    # the budget spent by a probe of the denoised output's error instead of ε's (session 11)
    "gptq_budget_x0": CalibratedConfig(act_order="on", budget=0.30),
    # mixed precision both ways (session 15): insensitive layers lowered to 3 bits pay for more int8
    "gptq_mixed": CalibratedConfig(act_order="on", budget=0.30, budget_options=("int8", "rank", "kept", "uint3")),
    # the same, its sensitivities from the sketched probe (``SketchProbe``: every layer at once, a few
    # backward passes) on more calibration samples instead of the per-layer probe
    "gptq_mixed_sketch": CalibratedConfig(act_order="on", budget=0.30, budget_options=("int8", "rank", "kept", "uint3")),
}
#: budgeted methods that do not run the sensitivity probe
NO_PROBE = {"gptq_budget_rel"}
#: budgeted methods whose probe measures the error of the denoised output D, not of ε (``layer_probe``'s ``space``)
PROBE_X0 = {"gptq_budget_x0"}
#: budgeted methods that measure the sensitivities with ``SketchProbe`` on ``SKETCH_SAMPLES`` calibration
#: samples' calls, ``SKETCHES`` sketches
SKETCHED = {"gptq_mixed_sketch"}
SKETCH_SAMPLES, SKETCHES = 8, 4
#: methods that are another method plus end-to-end tuning of the stored grid (``quant/tune.py``)
TUNED = {"gptq_budget_tuned": "gptq_budget", "gptq_tuned": "gptq", "rtn_tuned": "rtn",
         "gptq_budget_x0_tuned": "gptq_budget_x0", "gptq_mixed_tuned": "gptq_mixed",
         "gptq_mixed_sketch_tuned": "gptq_mixed_sketch"}
TUNED["gptq_budget_jtuned"] = "gptq_budget"
#: tuned methods whose loss adds the flow-Jacobian term (``TuneConfig.jacobian_weight``; session 13)
JACOBIAN_TUNED = {"gptq_budget_jtuned"}
#: their default weight μ and sketches per calibration sample (``--tune-jacobian``, ``--adjoints``)
JACOBIAN_WEIGHT, ADJOINTS = 1.0, 4
for _name, _base in TUNED.items():
    METHODS[_name] = METHODS[_base]
#: the default calibrated quantizer: GPTQ, the 0.30× budget spent with mixed precision both ways
#: (3-bit for the layers whose measured share of the end-to-end error is small, int8 for the ones
#: where it is large, the plan's 16-bit layers at int8 or 16-bit, low-rank branches with what is
#: left), then the stored grid tuned end to end (docs/BENCHMARKS.md, "Mixed precision both ways").
#: Chosen on development seeds 1000–1255 (euler and dpmpp_2m, CFG 3: +6.0 and +6.2 points over the
#: previous default, ``gptq_budget_tuned``, by a rule fixed before reading), then measured on fresh
#: seeds on every sampler and CFG.
BEST = "gptq_mixed_tuned"
METHODS["best"] = METHODS[BEST]


def resolve_method(name: str) -> str:
    """The method a name runs (``best`` → :data:`BEST`)."""
    return BEST if name == "best" else name


PROBE_SAMPLES = 2
#: the memory bound reported for the SD1.5-shaped UNet's statistics (one pass per group that fits)
SD15_STATS_MAX_BYTES = 8 << 30


def method_config(name: str, budget: float, outlier_ratio: float | None) -> CalibratedConfig | None:
    cfg = METHODS[name]
    if cfg is None:
        return None
    return replace(cfg, budget=budget if cfg.budget is not None else None, outlier_ratio=outlier_ratio)


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise SystemExit(f"unknown method(s) {unknown or text!r}; known: {', '.join(METHODS)}")
    return (["rtn"] if "rtn" not in names else []) + names


def _count(t: torch.Tensor) -> int:
    return t.numel() * (2 if t.is_floating_point() else t.element_size())


def sd15_bytes_ratio(preset: str, cfg: CalibratedConfig | None, budget_extra: float | None = None) -> dict:
    """Resident bytes over fp16 of the SD1.5-shaped UNet under ``preset`` and the method's structure,
    counted on a meta-device model (shapes only). Round-to-nearest and GPTQ store the same bytes;
    AWQ scales are counted on every quantized layer (an upper bound: the held-out check keeps them
    only where they help); a budget is spent up to its cap (``≤``: the layers it picks depend on
    calibration statistics an SD1.5 with random weights does not have)."""
    if cfg is not None and cfg.budget is not None and budget_extra is not None:
        cfg = replace(cfg, budget=sd15_bytes_ratio(preset, None)["ratio"] + budget_extra)
    with torch.device("meta"):
        model = SDUNet()
    total = sum(_count(t) for t in [*model.parameters(), *model.buffers()])
    decisions = resolve_plan(model, PRESETS[preset])
    base = total
    extra_cap = 0
    for name, d in decisions.items():
        if not d["weight"]:
            continue
        m = model.get_submodule(name)
        shape = tuple(m.weight.shape)
        channels = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        scale = bool(cfg and cfg.awq)
        base += layer_bytes(d["weight"], shape, m.bias is not None, channels, scale, 0) - _count(m.weight) - (
            0 if m.bias is None else _count(m.bias))
        if cfg and cfg.budget is not None:
            extra_cap += max(layer_bytes("int8", shape, False, 0, False, 0) - layer_bytes(d["weight"], shape, False, 0, False, 0),
                             0) if "int8" in cfg.budget_options else 0
            if "rank" in cfg.budget_options:
                extra_cap += layer_bytes(d["weight"], shape, False, 0, False, cfg.max_rank) - layer_bytes(
                    d["weight"], shape, False, 0, False, 0)
    out = {"fp16_bytes": total, "bytes": base, "ratio": round(base / total, 4), "bound": "exact"}
    if cfg and cfg.budget is not None:
        cap = max(base, min(base + extra_cap, int(cfg.budget * total)))
        out.update(bytes=cap, ratio=round(cap / total, 4), bound="≤ (budget cap)")
    if cfg and cfg.awq:
        out["bound"] = "≤ (scales on every layer)" if out["bound"] == "exact" else out["bound"]
    return out


def sd15_w4_layers() -> tuple[nn.Module, dict[str, nn.Module]]:
    """The SD1.5-shaped UNet on the meta device and its layers W4A8 quantizes (what calibration collects)."""
    with torch.device("meta"):
        model = SDUNet()
    decisions = resolve_plan(model, PRESETS["W4A8"])
    return model, {n: m for n, m in calibration_layers(model).items() if decisions.get(n, {}).get("weight")}


def sd15_stats_memory(max_bytes: int = SD15_STATS_MAX_BYTES) -> dict:
    """What the input statistics of the SD1.5-shaped UNet's W4 layers take (float32, fit + held-out
    sums), and how ``collect_inputs(max_bytes=…)`` bounds it: the peak and the sampling passes."""
    model, layers = sd15_w4_layers()
    sizes = stats_bytes(layers)
    groups = layer_groups(layers, max_bytes)
    largest = max(sizes, key=sizes.get)
    return {"layers": len(layers), "total_bytes": sum(sizes.values()), "largest_layer": largest,
            "largest_bytes": sizes[largest], "max_bytes": max_bytes, "passes": len(groups),
            "peak_bytes": max(sum(sizes[n] for n in g) for g in groups),
            "solver_bytes": solver_bytes(model, PRESETS["W4A8"]),
            "accumulation": [sd15_stats_macs(model, layers, samples) for samples in SD15_STATS_SAMPLES],
            "addmm_gflops": addmm_gflops(), "host_add_rate": host_add_rate()}


def solver_bytes(model: nn.Module, plan, max_rank: int = 32) -> int:
    """What ``CalibratedSolver`` keeps of ``model``'s layers once their statistics are dropped, under the
    mixed default (int8, rank, kept, uint3): per quantized layer its packed storage at its own type, at
    int8 and at 3 bits, the branch factors at ``max_rank`` (float32) and the singular values (float64);
    int8 storage for the plan's 16-bit layers. Counted from the shapes (works on the meta device; the
    storage tensors are exactly the packed blob's bytes)."""
    decisions = resolve_plan(model, plan)
    layers = {n: m for n, m in calibration_layers(model).items() if decisions.get(n, {}).get("weight")}
    kept = {n: m for n, m in calibration_layers(model).items()
            if n in decisions and decisions[n]["weight"] is None and decisions[n]["fallback"] is None}
    total = 0
    for n, m in layers.items():
        shape = tuple(m.weight.shape)
        out, k = shape[0], input_size(shape)
        own = decisions[n]["weight"]
        total += blob_nbytes(qtype(own), shape) + blob_nbytes(qtype("int8"), shape)
        low = lower_type(own, shape)
        total += 0 if low is None else blob_nbytes(qtype(low), shape)
        total += 4 * min(max_rank, out, k) * (out + k) + 8 * min(out, k)
    return total + sum(blob_nbytes(qtype("int8"), tuple(m.weight.shape)) for m in kept.values())


def addmm_gflops(rows: int = 4096, k: int = 2048, repeats: int = 3) -> float:
    """This CPU's float32 rate of the statistics' update ``H += Xᵀ X`` (``calibration.inputs.add_gram``,
    triangular at this K) with the threads torch uses now (GFLOP/s of the multiply-adds it does, best
    of ``repeats``): what turns :func:`sd15_stats_macs` into time."""
    x, h = torch.randn(rows, k), torch.zeros(k, k)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        add_gram(h, x)
        best = min(best, time.perf_counter() - t)
    return 2 * gram_macs(k, rows) / best / 1e9


def host_add_rate(k: int = 4608, rows: int = 8, repeats: int = 3) -> float:
    """This CPU's rate (values per second) of adding products made on another device into the host sums,
    ``calibration.inputs.add_gram_from``'s share on the CPU when a GPU samples (here the products are made
    on the CPU too, and only the additions are timed; at this K the sums do not fit in a cache, as on
    SD1.5), with the threads torch uses now, best of ``repeats``: what turns ``host_adds`` into time."""
    x, h = torch.randn(rows, k), torch.zeros(k, k)
    blocks = [(i, x[:, i : i + TRI_BLOCK].T @ x[:, i:]) for i in range(0, k, TRI_BLOCK)]
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for i, b in blocks:
            h[i : i + TRI_BLOCK, i:] += b
        best = min(best, time.perf_counter() - t)
    return gram_macs(k, 1) / best


#: calibration sets whose ``x xᵀ`` cost :func:`sd15_stats_macs` counts: Quantize Model (Calibrated)'s
#: default (4 batches of one latent) and the reference benchmarks' 64 samples
SD15_STATS_SAMPLES = (4, 64)


def sd15_stats_calls(model: nn.Module, layers: dict, samples: int, latent: int = 64, steps: int = 20,
                     rows_per_k: float = DEFAULT_ROWS_PER_K) -> list[tuple[str, int, int, int]]:
    """``[(name, K, rows per call, calls)]`` of accumulating ``Σ x xᵀ`` for ``layers`` of the (meta-device)
    SD1.5-shaped UNet over a calibration set of ``samples`` latents of ``latent``² sampled one latent per
    call for ``steps`` steps with CFG (each call's batch is the latent's uncond and cond pass), with
    ``collect_inputs``'s row cap: ``min(rows, cap)`` per call. Shapes come from one forward on the meta
    device."""
    rows: dict[str, int] = {}

    def hook(name):
        def record(mod, args):
            rows[name] = input_rows(mod, args[0])
        return record
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.device("meta"):
            x, t, ctx = torch.empty(2, 4, latent, latent), torch.full((2,), 500.0), torch.empty(2, 77, _context_dim(model))
            model(x, t, ctx)
    finally:
        for h in handles:
            h.remove()
    calls = samples * steps
    return [(n, input_size(m.weight.shape), min(rows[n], row_cap(m, rows_per_k, calls)), calls) for n, m in layers.items()]


def sd15_stats_macs(model: nn.Module, layers: dict, samples: int, latent: int = 64, steps: int = 20,
                    rows_per_k: float = DEFAULT_ROWS_PER_K) -> dict:
    """Multiply-adds of accumulating ``Σ x xᵀ`` for ``layers`` (:func:`sd15_stats_calls`): per call and layer
    ``min(rows, cap)·K²`` (about half for the triangular sums); ``host_adds``: what the CPU adds into the
    sums when the products are made on a GPU (``add_gram_from``), one row's worth per call and layer."""
    per_layer = sd15_stats_calls(model, layers, samples, latent, steps, rows_per_k)
    macs = sum(calls * gram_macs(k, rows) for _, k, rows, calls in per_layer)
    host_adds = sum(calls * gram_macs(k, 1) for _, k, _, calls in per_layer)
    return {"samples": samples, "latent": latent, "steps": steps, "macs": macs, "host_adds": host_adds}


#: the steps whose one-step model error ``early_error`` measures (σ ≥ this: the first 7 of 20)
EARLY_SIGMA = 3.0


def _recording_sampler(sampler: str, states: list):
    """The named sampler, recording ``(x, σ̂, D_fp(x, σ̂), extra, batch)`` at every step."""
    fn = SAMPLERS[sampler]

    def run_sampler(model, x, sigmas, extra, callback, disable, **kw):
        batch = 1 + max((b for *_, b in states), default=-1)

        def record(d):
            states.append((d["x"].clone(), float(d["sigma_hat"]), d["denoised"].clone(), dict(extra), batch))
        return fn(model, x, sigmas, extra, record, disable, **kw)

    return run_sampler


@torch.no_grad()
def step_error(denoiser, states: list, sigma_min: float = EARLY_SIGMA, sigma_max: float = math.inf) -> torch.Tensor:
    """Per sample (in seed order), the mean squared one-step error of ``denoiser``'s output against
    FP's over the recorded FP states of that sample with ``sigma_min ≤ σ̂ < sigma_max``."""
    sums: dict[int, torch.Tensor] = {}
    steps: dict[int, int] = {}
    for x, sigma, den, extra, batch in states:
        if not sigma_min <= sigma < sigma_max:
            continue
        out = denoiser(x, torch.full((len(x),), sigma, dtype=x.dtype), **extra)
        err = ((out.double() - den.double()) ** 2).flatten(1).mean(1)
        sums[batch] = sums.get(batch, 0) + err
        steps[batch] = steps.get(batch, 0) + 1
    if not sums:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([sums[b] / steps[b] for b in sorted(sums)])


def early_error(denoiser, states: list) -> torch.Tensor:
    """:func:`step_error` over the steps with σ ≥ :data:`EARLY_SIGMA` (the first 7 of 20)."""
    return step_error(denoiser, states, EARLY_SIGMA, math.inf)


def late_error(denoiser, states: list) -> torch.Tensor:
    """:func:`step_error` over the remaining steps (σ < :data:`EARLY_SIGMA`)."""
    return step_error(denoiser, states, 0.0, EARLY_SIGMA)


def _step_errors(denoiser, states: list, own: torch.Tensor | None = None) -> dict:
    """The per-sample windows of one model: early and late on FP's states, and ``own_early`` when given."""
    errs = {"early": early_error(denoiser, states), "late": late_error(denoiser, states)}
    if own is not None:
        errs["own_early"] = own
    return errs


def _step_fields(per_sample: dict, rtn: dict) -> dict:
    """Per window (``early``, ``late``, ``own_early``): the mean one-step error over samples, its
    ratio to round-to-nearest's (``rtn``: the same windows of round-to-nearest) and the per-sample values."""
    out = {}
    for name, v in per_sample.items():
        mean = float(v.mean()) if len(v) else 0.0
        base = float(rtn[name].mean()) if len(rtn[name]) else 0.0
        out[f"{name}_error"] = mean
        out[f"{name}_error_ratio"] = mean / max(base, 1e-30)
        out[f"per_sample_{name}_error"] = [float(f"{float(x):.6g}") for x in v]
    return out


class OwnTrajectoryError:
    """A denoiser wrapper that, while ``denoiser`` samples its own trajectory, also runs the FP
    denoiser on the same states at the calls with σ ≥ ``sigma_min`` and keeps, per sample, the mean
    squared difference of their outputs. ``end_batch`` (``sample_latents``' ``progress``) closes a
    batch; :meth:`per_sample` returns the values in seed order."""

    def __init__(self, denoiser, fp, sigma_min: float = EARLY_SIGMA) -> None:
        self.denoiser, self.fp, self.sigma_min = denoiser, fp, sigma_min
        self.done: list[torch.Tensor] = []
        self.sum, self.calls = None, 0

    @torch.no_grad()
    def __call__(self, x, sigma, **extra):
        out = self.denoiser(x, sigma, **extra)
        if float(torch.as_tensor(sigma).max()) >= self.sigma_min:
            ref = self.fp(x, sigma, **extra)
            err = ((out.double() - ref.double()) ** 2).flatten(1).mean(1)
            self.sum = err if self.sum is None else self.sum + err
            self.calls += 1
        return out

    def end_batch(self, *_):
        if self.sum is not None:
            self.done.append(self.sum / self.calls)
        self.sum, self.calls = None, 0

    def per_sample(self) -> torch.Tensor:
        return torch.cat(self.done) if self.done else torch.zeros(0, dtype=torch.float64)


def _sample(denoiser, fp, rc, seeds, labels, grid, own_error: bool):
    """Sample the seeds; with ``own_error`` also the per-sample early error on the model's own trajectory."""
    if not own_error:
        return sample_latents(denoiser, rc, seeds, labels, grid), None
    tracker = OwnTrajectoryError(denoiser, fp)
    lat = sample_latents(tracker, rc, seeds, labels, grid, progress=tracker.end_batch)
    return lat, tracker.per_sample()


class _ScaledError:
    """A weight patch ``w ↦ W + a·(w − W)``: the layer's quantization error scaled by ``a``."""

    def __init__(self, fp: torch.Tensor, amplitude: float) -> None:
        self.fp, self.amplitude = fp.detach().float().clone(), float(amplitude)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        fp = self.fp.to(device=w.device, dtype=w.dtype)
        return fp + self.amplitude * (w - fp)


def scale_weight_error(quantized: nn.Module, fp: nn.Module, amplitude: float) -> int:
    """Patch every quantized layer of ``quantized`` (a quantized copy of ``fp``) to compute with its
    FP weight plus ``amplitude`` × its quantization error; returns the number of layers patched. A
    negative amplitude points the error the other way: ``−1`` is a model exactly as far from FP as
    round-to-nearest, layer by layer, in the mirrored direction."""
    if not math.isfinite(amplitude):
        raise SystemExit(f"amplitudes must be finite numbers, got {amplitude!r}")
    n = 0
    for name, m in quantized.named_modules():
        if isinstance(m, QUANT_LAYERS):
            m.weight_function = [_ScaledError(fp.get_submodule(name).weight, amplitude)]
            n += 1
    return n


#: a sample whose latent MSE to full precision exceeds this has visibly left the FP image (typical
#: W4A8 round-to-nearest samples sit near 0.01; two unrelated images are about 2 apart)
TIPPED_MSE = 0.1


def _tail(per: dict) -> dict:
    """The upper tail of the per-sample latent MSE to full precision, in absolute terms."""
    mse = per["latent_mse"]
    return {"p95_mse": float(torch.quantile(mse.double(), 0.95)), "max_mse": float(mse.max()),
            "tipped": int((mse > TIPPED_MSE).sum()), "per_sample_latent_mse": [float(f"{float(v):.7g}") for v in mse]}


class StepWindow:
    """Denoiser that runs ``quantized`` on the steps of a window and ``fp`` on every other step.

    A call belongs to step ``i`` of the schedule when ``σ_{i+1} < σ ≤ σ_i`` (so a sampler's intermediate
    evaluations, e.g. Heun's second one, count with their step, and a σ above σ_0 with step 0);
    ``steps`` is a set of step indices."""

    def __init__(self, quantized, fp, sigmas: torch.Tensor, steps) -> None:
        self.quantized, self.fp, self.steps = quantized, fp, frozenset(steps)
        self._edges = [float(s) for s in sigmas]

    def step_of(self, sigma: float) -> int:
        e = self._edges
        for i in range(len(e) - 2):
            if sigma > e[i + 1] * (1 + 1e-6):  # the call at exactly σ_{i+1} opens step i + 1
                return i
        return len(e) - 2

    def __call__(self, x, sigma, **extra):
        s = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
        return (self.quantized if self.step_of(s) in self.steps else self.fp)(x, sigma, **extra)

    def __getattr__(self, name):
        return getattr(self.__dict__["fp"], name)


def parse_windows(text: str | None, steps: int) -> dict[str, range]:
    """``"0-3,4-6,7"`` → step windows (inclusive index ranges of a ``steps``-step schedule)."""
    out: dict[str, range] = {}
    for part in (t.strip() for t in (text or "").split(",")):
        if not part:
            continue
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise SystemExit(f"--windows: {part!r} is not a step range like 0-3") from None
        if not 0 <= lo <= hi < steps:
            raise SystemExit(f"--windows: {part!r} is outside steps 0-{steps - 1}")
        out[f"{lo}-{hi}"] = range(lo, hi + 1)
    return out


@torch.no_grad()
def _window_fields(qden, fp, rc, seeds, labels, grid, sigmas, windows: dict, lat_fp, full_mse, rtn: dict | None) -> dict:
    """Each window's final latent MSE to FP when only its steps run quantized, per sample and as a mean,
    its ratio to round-to-nearest's same window (``rtn``: that row's fields), how many samples it tips,
    ``tipped_in_no_window``: samples the fully quantized run tips (latent MSE > TIPPED_MSE) that no
    window alone tips — a final error made by the windows' errors together — and, when the windows that
    do not overlap an earlier one (in the order given) partition the steps, ``windows_partition`` (their
    names) and ``windows_sum_over_full``: their mean latent MSEs summed, over the fully quantized run's
    (1 when the steps' contributions add up, below 1 when they compound, above 1 when they cancel)."""
    out, tipped_any = {}, torch.zeros(len(seeds), dtype=torch.bool)
    for name, steps in windows.items():
        lat = sample_latents(StepWindow(qden, fp, sigmas, steps), rc, seeds, labels, grid)
        mse = latent_mse(lat, lat_fp)
        tipped_any |= mse > TIPPED_MSE
        w = {"latent_mse": float(mse.mean()), "tipped": int((mse > TIPPED_MSE).sum()),
             "per_sample_latent_mse": [float(f"{float(v):.7g}") for v in mse]}
        if rtn is not None and name in rtn["windows"]:
            w["x_rtn"] = w["latent_mse"] / max(rtn["windows"][name]["latent_mse"], 1e-30)
        out[name] = w
    full = full_mse > TIPPED_MSE
    res = {"windows": out, "tipped_in_no_window": int((full & ~tipped_any).sum())}
    taken: list[str] = []  # the windows, in the order given, that do not overlap an earlier one
    for name, steps in windows.items():
        if not any(set(steps) & set(windows[t]) for t in taken):
            taken.append(name)
    if sorted(i for t in taken for i in windows[t]) == list(range(len(sigmas) - 1)):  # they partition the steps
        res["windows_partition"] = taken
        res["windows_sum_over_full"] = sum(out[t]["latent_mse"] for t in taken) / max(float(full_mse.mean()), 1e-30)
    return res


def _against(per: dict, base: dict) -> dict:
    """Gap closed against ``base``'s latent MSE (paired bootstrap), ΔPSNR, median per-sample gap,
    worst per-sample ratio and share of samples made worse."""
    mse, mse_b = per["latent_mse"], base["latent_mse"]
    ratio = mse / mse_b.clamp_min(1e-30)
    worst = int(ratio.argmax())
    return {"gap_closed": _ci(paired_bootstrap_ci(mse.numpy(), mse_b.numpy(), stat="ratio")),
            "psnr_delta": _ci(paired_bootstrap_ci(per["psnr"].numpy(), base["psnr"].numpy())),
            "median_gap_closed": float((1 - ratio).median()), "worst_ratio": float(ratio.max()),
            "worst_index": worst, "worst_mse": float(mse[worst]), "worst_base_mse": float(mse_b[worst]),
            "share_of_mse_in_worst": float(mse[worst] / mse.sum().clamp_min(1e-30)),
            "worse_share": float((ratio > 1).double().mean()), "over_2x": int((ratio > 2).sum())}


def _corrected_row(ref, qden, corr, rc, qrow, per_q, per_rtn, calib_seeds, classes, seeds, labels, lat_fp, img_fp,
                   preset, method, log) -> dict:
    """A correction calibrated (bench quality's protocol) on top of a calibrated quantizer."""
    from .correct import auto_reason, calibrate_method, corrected_sampler

    stats, secs = calibrate_method(ref, qden, corr, rc, calib_seeds, classes, f"{preset}:{method}")
    t0 = time.perf_counter()
    lat = sample_latents(qden, rc, seeds, labels, ref.denoiser.sigmas, sampler_fn=corrected_sampler(stats, corr, rc.sampler))
    img = decode(ref.autoencoder, lat)
    per = per_sample_metrics(lat, lat_fp, img, img_fp)
    row = {**{k: qrow[k] for k in ("preset", "sampler", "cfg", "bytes_ratio", "sd15_bytes_ratio", "sd15_bound")},
           "method": f"{method}+{corr}", "quantizer": method, "correction": corr,
           **summary(lat, lat_fp, img, img_fp, labels, ref.classifier), **_tail(per), **_against(per, per_rtn),
           "calib_seconds": round(qrow["calib_seconds"] + secs, 1), "correction_calib_seconds": round(secs, 1),
           "sample_seconds": round(time.perf_counter() - t0, 1)}
    row["vs_quantizer"] = _against(per, per_q)
    if corr == "auto":
        row["auto"] = auto_reason(stats)
    log(f"# {rc.sampler} cfg {rc.cfg}: {preset} {method} + {corr}: correction calibrated in {secs:.1f} s"
        + (f"; {row['auto']}" if corr == "auto" else ""))
    return row


def _amplitude_row(ref, qd, amplitude, rc, seeds, labels, grid, lat_fp, img_fp, states, per_rtn, rtn_early, rtn_row,
                   own_error, log) -> dict:
    """The analysis row ``rtn×a``: round-to-nearest's model with its weight error scaled by ``a``."""
    qa = copy.deepcopy(qd)
    scale_weight_error(qa.unet, ref.denoiser.unet, amplitude)
    qaden = SigmaScopedDenoiser(qa, qa.unet)
    t0 = time.perf_counter()
    lat, own = _sample(qaden, ref.denoiser, rc, seeds, labels, grid, own_error)
    img = decode(ref.autoencoder, lat)
    per = per_sample_metrics(lat, lat_fp, img, img_fp)
    early = _step_fields(_step_errors(qaden, states, own), rtn_early)
    row = {"preset": rtn_row["preset"], "method": f"rtn×{amplitude:g}", "amplitude": float(amplitude), "analysis": True,
           "sampler": rc.sampler, "cfg": rc.cfg, **summary(lat, lat_fp, img, img_fp, labels, ref.classifier), **_tail(per),
           "bytes_ratio": None, "sd15_bytes_ratio": None, "sd15_bound": "analysis row: stores nothing",
           "calib_seconds": 0.0, "sample_seconds": round(time.perf_counter() - t0, 1),
           **early, **_against(per, per_rtn)}
    row["worst_seed"] = seeds[row["worst_index"]]
    log(f"# {rc.sampler} cfg {rc.cfg}: {row['preset']} {row['method']} (weight error scaled) sampled in "
        f"{row['sample_seconds']:.1f} s")
    return row


def _ci(ci) -> dict:
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high}


def _span(seeds):
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds


def _fp16_ref_bytes(unet) -> int:
    return sum(_count(t) for t in [*unet.parameters(), *unet.buffers()])


def _relax(unet, plan, sigmas, relax) -> None:
    fraction, where, bits = relax
    if plan.activations is None:
        raise SystemExit(f"--relax needs quantized activations; preset {plan.preset!r} has none")
    schedule, _, _ = relaxed_schedule(sigmas, fraction, where, bits, qtype(plan.activations).bits)
    if schedule:
        set_activation_schedule(unet, schedule)


def run(presets, methods, samplers, cfgs, seeds, calib_seeds, classes, steps=20, scheduler="normal", budget=0.30,
        step_weight=1.0, outlier_ratio=1000.0, batch_size=64, log=print, keep_images=False, rows_per_k=DEFAULT_ROWS_PER_K,
        budget_extra=None, corrections=(), correct_on=("best",), damp=None, calib_sets=1, amplitudes=(),
        own_error=False, guided=False, tune=None, act_ranges=None, relax=None, windows=None,
        jacobian=(JACOBIAN_WEIGHT, ADJOINTS), float32_from=FLOAT32_FROM):
    """``budget``: the budgeted methods' cap, × each model's fp16 bytes; with ``budget_extra`` the cap is
    instead each model's round-to-nearest ratio plus that much (the same headroom on the reference
    model and on the SD1.5-shaped UNet, whose fixed 16-bit share differs tenfold). ``corrections``:
    correction methods (``bench quality``'s names, ``auto`` included) calibrated on the calibration seeds
    on top of each quantizer method in ``correct_on`` and scored against that quantizer uncorrected.
    ``damp``: GPTQ's damping for every calibrated method (default: each method's own). ``float32_from``:
    the layer width from which every calibrated method solves in float32 (None: all float64;
    ``CalibratedConfig.float32_from``). ``calib_sets``: each
    calibrated method also calibrated on K − 1 further disjoint calibration sets (the seeds shifted by their
    count, rows ``method#k``), and each compared per sample with set 1 (``set_comparisons``): how far two
    equally made quantizers lie apart, sample by sample. ``amplitudes``: after each preset's
    round-to-nearest row, analysis rows ``rtn×a`` with its weight error scaled by ``a``. ``own_error``:
    every row also gets ``own_early_error``, the early one-step error against FP on the states of the
    model's *own* trajectory (FP runs on them alongside; sampling costs about a third more). ``act_ranges``: the
    presets' dynamic activation ranges, ``per_latent`` or ``per_sample`` (``None``: the presets' own,
    ``per_latent`` since session 9; ``per_sample`` reproduces the rows measured before). ``relax``:
    ``(fraction, where, bits)``, PCR's relaxing (``quant.relax``) applied to every row's quantized
    model after it is made and tuned, as the Relax Timesteps node does after Quantize Model: that
    share of the steps near ``where`` ("xT" or "x0") runs its activations at ``bits``. ``windows``: step
    windows (:func:`parse_windows`); every row of the first calibration set (analysis rows excepted) is
    also sampled with its quantized model on each window's steps only and FP on the others
    (:func:`_window_fields`): where along the trajectory its final error is made, and whether the
    samples it tips are tipped by one window or by several together. ``jacobian``: ``(μ, sketches)`` of the
    methods in :data:`JACOBIAN_TUNED` (their recorded calls carry that many flow-adjoint sketches; the
    time those take counts in their calibration time only)."""
    if calib_sets < 1:
        raise SystemExit("--calib-sets must be at least 1")
    if any(m in JACOBIAN_TUNED for m in methods) and (jacobian[1] < 1 or not jacobian[0] >= 0):
        raise SystemExit(f"the Jacobian-tuned methods need --adjoints ≥ 1 and --tune-jacobian ≥ 0, got {jacobian}")
    all_calib = [s + k * len(calib_seeds) for k in range(calib_sets) for s in calib_seeds]
    check_disjoint(all_calib, seeds)
    ref = load_reference()
    plans = {p: quant_preset(p, **({} if act_ranges is None else {"act_ranges": act_ranges})) for p in presets}
    grid = ref.denoiser.sigmas
    labels = labels_for(seeds, classes)
    fp16_ref = _fp16_ref_bytes(ref.unet)
    sd15 = {}
    rows, images, collections, set_comparisons, rtn_ratios, rtn_early = [], {}, [], [], {}, {}
    rtn_windows: dict = {}
    for sampler in samplers:
        for cfg_scale in cfgs:
            rc = RunConfig(sampler, scheduler, steps, cfg_scale, batch_size).validate()
            sigmas = get_sigmas(scheduler, grid, steps)
            t0 = time.perf_counter()
            states: list = []
            lat_fp = sample_latents(ref.denoiser, rc, seeds, labels, grid, sampler_fn=_recording_sampler(sampler, states))
            img_fp = decode(ref.autoencoder, lat_fp)
            images[(sampler, cfg_scale, "FP")] = img_fp
            log(f"# {sampler} cfg {cfg_scale}: FP sampled in {time.perf_counter() - t0:.1f} s")
            pers = {}
            for k in range(1, calib_sets + 1):
                cal = [s + (k - 1) * len(calib_seeds) for s in calib_seeds]
                x0 = start_latent(initial_noise(cal, LATENT), sigmas, grid)
                extra = {"cond": labels_for(cal, classes), "cfg_scale": cfg_scale}
                factory = lambda idx, cal=cal: PerSampleNoise([cal[i] for i in idx], LATENT)  # noqa: E731
                weight = None if step_weight == 1.0 else early_weight(step_weight)
                if all(METHODS[m] is None and resolve_method(m) not in TUNED for m in methods):  # round-to-nearest (and analysis rows) only
                    col = {"layers": {}}
                else:
                    col = collect_inputs(ref.denoiser, ref.denoiser.unet, SAMPLERS[sampler], x0, sigmas, extra,
                                         noise_sampler_factory=factory, step_weight=weight, batch_size=16,
                                         rows_per_k=rows_per_k, guidance=cfg_scale if guided else None,
                                         record_calls=any(resolve_method(m) in TUNED for m in methods),
                                         adjoints=jacobian[1] if any(m in JACOBIAN_TUNED for m in methods) else 0,
                                         progress=lambda d, t: log(f"# {sampler} cfg {cfg_scale}: input statistics, "
                                                                   f"batch {d}/{t}"))
                if col["layers"]:
                    collections.append({"sampler": sampler, "cfg": cfg_scale, "calib_set": k,
                                        "seconds": round(col["seconds"], 1), "peak_stats_bytes": col["peak_stats_bytes"],
                                        "n_fit": col["n_fit"], "n_hold": col["n_hold"],
                                        **({"adjoint_seconds": round(col["adjoint_seconds"], 1)}
                                           if "adjoint_seconds" in col else {})})
                    log(f"# {sampler} cfg {cfg_scale}: input statistics of {len(cal)} calibration samples (set {k}) in "
                        f"{col['seconds']:.1f} s ({col['peak_stats_bytes'] / 2**20:.0f} MiB)")
                probe_set = sketch_set = None
                solved: dict = {}  # (preset, method) → (quantized denoiser, report, solve seconds): bases of tuned methods
                keep_bases = any(resolve_method(m) in TUNED for m in methods)
                for preset in presets:
                    base = pers.get((preset, "rtn", 1))
                    for method in (methods if k == 1 else [m for m in methods if m != "rtn"]):
                        mcfg = method_config(method, budget, outlier_ratio)
                        if mcfg is not None and damp is not None:
                            mcfg = replace(mcfg, damp=damp)
                        if mcfg is not None:
                            mcfg = replace(mcfg, float32_from=float32_from)
                        if mcfg is not None and mcfg.budget is not None and budget_extra is not None:
                            mcfg = replace(mcfg, budget=rtn_ratios[preset] + budget_extra)
                        name = resolve_method(method)
                        t1 = time.perf_counter()
                        report = None
                        made = solved.get((preset, TUNED[name])) if name in TUNED else None
                        if made is not None:  # a tuned method whose base this run has made: tune a copy of it
                            qd, report, base_solve = copy.deepcopy(made[0]), made[1], made[2]
                            t1 -= base_solve
                        elif mcfg is None:
                            qd = copy.deepcopy(ref.denoiser)
                            quantize_model(qd.unet, plans[preset])
                        else:
                            qd = copy.deepcopy(ref.denoiser)
                            probe = None
                            base_name = TUNED.get(name, name)
                            if mcfg.budget is not None and base_name in SKETCHED:
                                if sketch_set is None:
                                    sketch_set = probe_calls(SAMPLERS[sampler], x0, sigmas, extra, samples=SKETCH_SAMPLES,
                                                             noise_sampler_factory=factory, denoiser=ref.denoiser)
                                probe = SketchProbe(qd, qd.unet, sketch_set, weight, sketches=SKETCHES)
                            elif mcfg.budget is not None and base_name not in NO_PROBE:
                                if probe_set is None:
                                    probe_set = probe_calls(SAMPLERS[sampler], x0, sigmas, extra, samples=PROBE_SAMPLES,
                                                            noise_sampler_factory=factory, denoiser=ref.denoiser)
                                probe = layer_probe(qd, qd.unet, probe_set, weight,
                                                    space="x0" if base_name in PROBE_X0 else "eps")
                            report = quantize_calibrated(qd.unet, plans[preset], col["layers"], mcfg, sensitivity=probe)
                        if keep_bases and name not in TUNED and made is None:
                            solved[(preset, name)] = (copy.deepcopy(qd), report, time.perf_counter() - t1)
                        qden = SigmaScopedDenoiser(qd, qd.unet)
                        tuned = None
                        if name in TUNED:
                            tcfg = tune or TuneConfig()
                            if name in JACOBIAN_TUNED:
                                tcfg = replace(tcfg, jacobian_weight=jacobian[0])
                            tuned = tune_grid(qden, qd.unet, col["calls"]["fit"], col["calls"]["hold"], tcfg,
                                              progress=lambda d, t: d % 50 == 0 and log(f"# {sampler} cfg {cfg_scale}: "
                                                                                        f"{method} tuning {d}/{t}"))
                            log(f"# {sampler} cfg {cfg_scale}: {preset} {method}: grid tuned in {tuned['seconds']:.0f} s, "
                                f"held-out loss {tuned['hold_loss_before']:.4g} -> {tuned['hold_loss_after']:.4g}"
                                f"{'' if tuned['kept'] else ' (not kept)'}")
                        solve = time.perf_counter() - t1
                        if relax is not None:
                            _relax(qd.unet, plans[preset], sigmas, relax)
                        t2 = time.perf_counter()
                        lat, own = _sample(qden, ref.denoiser, rc, seeds, labels, grid, own_error)
                        img = decode(ref.autoencoder, lat)
                        per = per_sample_metrics(lat, lat_fp, img, img_fp)
                        row = {"preset": preset, "method": method + ("" if k == 1 else f"#{k}"), "sampler": sampler,
                               "cfg": cfg_scale, "calib_seeds": _span(cal),
                               **summary(lat, lat_fp, img, img_fp, labels, ref.classifier),
                               **_tail(per),
                               "bytes_ratio": round(resident_bytes(copy.deepcopy(qd.unet).half()) / fp16_ref, 4),
                               "calib_seconds": 0.0 if mcfg is None and tuned is None else round(
                                   col["seconds"] - (0.0 if name in JACOBIAN_TUNED else col.get("adjoint_seconds", 0.0))
                                   + solve, 1),
                               "solve_seconds": round(solve, 1), "sample_seconds": round(time.perf_counter() - t2, 1)}
                        errs = _step_errors(qden, states, own)
                        key = (preset, method)
                        if method == "rtn":
                            rtn_ratios[preset] = row["bytes_ratio"]
                            rtn_early[preset] = errs
                        row.update(_step_fields(errs, rtn_early[preset]))
                        if windows and k == 1:
                            row.update(_window_fields(qden, ref.denoiser, rc, seeds, labels, grid, sigmas, windows, lat_fp,
                                                      per["latent_mse"], rtn_windows.get(preset)))
                            if method == "rtn":
                                rtn_windows[preset] = row
                            log(f"# {sampler} cfg {cfg_scale}: {preset} {method}: step windows "
                                + ", ".join(f"{n} {w['latent_mse']:.5f}" for n, w in row["windows"].items()))
                        if mcfg is not None and mcfg.budget is not None:
                            row["budget"] = round(mcfg.budget, 4)
                        if key not in sd15:
                            sd15[key] = sd15_bytes_ratio(preset, mcfg, budget_extra)
                        row["sd15_bytes_ratio"] = sd15[key]["ratio"]
                        row["sd15_bound"] = sd15[key]["bound"]
                        if tuned is not None:
                            row["tuning"] = tuned
                        if report is not None:
                            row["summary"] = report["summary"]
                            if report.get("allocation"):
                                a = report["allocation"]
                                row["allocation"] = {f: a[f] for f in ("int8", "uint3", "ranks", "kept_int8", "spent_bytes", "weighting")
                                                     if f in a}
                                if "note" in a:
                                    row["allocation"]["note"] = a["note"]
                        pers[(preset, method, k)] = per
                        if method == "rtn":
                            base = per
                        else:
                            row.update(_against(per, base))
                            row["worst_seed"] = seeds[row["worst_index"]]
                        if keep_images:
                            images[(sampler, cfg_scale, preset, method)] = img
                        rows.append(row)
                        log(f"# {sampler} cfg {cfg_scale}: {preset} {method} in {solve:.1f} s + sampling "
                            f"{row['sample_seconds']:.1f} s")
                        if method == "rtn" and k == 1:
                            for a in amplitudes:
                                rows.append(_amplitude_row(ref, qd, a, rc, seeds, labels, grid, lat_fp, img_fp, states,
                                                           base, rtn_early[preset], row, own_error, log))
                        if k > 1:
                            set_comparisons.append({"preset": preset, "sampler": sampler, "cfg": cfg_scale,
                                                    "a": row["method"], "b": method,
                                                    **_against(per, pers[(preset, method, 1)])})
                        if k == 1 and method != "rtn" and method in correct_on:
                            for corr in (c for c in corrections if c != "none"):
                                rows.append(_corrected_row(ref, qden, corr, rc, row, per, base, cal, classes, seeds,
                                                           labels, lat_fp, img_fp, preset, method, log))
    res = {"amplitudes": list(amplitudes), "early_sigma": EARLY_SIGMA, "steps": steps, "scheduler": scheduler, "corrections": list(corrections), "n": len(seeds), "seeds": _span(seeds),
           "calib_seeds": _span(calib_seeds), "classes": classes, "budget": budget, "budget_extra": budget_extra,
           "step_weight": step_weight, "guided_stats": bool(guided),
           "act_ranges": {p: plan.act_ranges for p, plan in plans.items()},
           "relax": None if relax is None else {"fraction": relax[0], "where": relax[1], "bits": relax[2]},
           "windows": {n: [w.start, w.stop - 1] for n, w in (windows or {}).items()},
           "outlier_ratio": outlier_ratio, "rows_per_k": rows_per_k, "best": BEST, "collections": collections, "rows": rows,
           "set_comparisons": set_comparisons, "damp": damp, "float32_from": float32_from, "calib_sets": calib_sets,
           "sd15": {f"{p}/{m}": v for (p, m), v in sd15.items()}, "sd15_stats": sd15_stats_memory()}
    if keep_images:
        res["images"] = images
    return res


def _fmt_ci(ci, pct=True):
    if not ci:
        return "-"
    k = 100 if pct else 1
    return f"{k * ci['estimate']:+.1f} [{k * ci['low']:+.1f}, {k * ci['high']:+.1f}]"


def table_rows(res: dict) -> list[list]:
    out = []
    for r in res["rows"]:
        rtn = r["method"] == "rtn"
        out.append([r["preset"], r["method"], r["sampler"], f"{r['cfg']:g}", f"{r['latent_mse']:.5f}",
                    f"{r['psnr']:.2f}", f"{r['fid_to_fp']:.3f}", f"{100 * r['class_acc']:.1f}",
                    "-" if rtn else _fmt_ci(r["gap_closed"]), "-" if rtn else f"{100 * r['median_gap_closed']:+.1f}",
                    "-" if rtn else _fmt_ci(r["psnr_delta"], pct=False),
                    "-" if rtn else f"{r['worst_ratio']:.2f}", "-" if rtn else f"{100 * r['worse_share']:.0f}",
                    "-" if r["bytes_ratio"] is None else f"{r['bytes_ratio']:.4f}",
                    "-" if r["sd15_bytes_ratio"] is None else
                    ("≤" if r["sd15_bound"] != "exact" else "") + f"{r['sd15_bytes_ratio']:.4f}",
                    f"{r['calib_seconds']:.0f}", _fmt_ci(r["vs_quantizer"]["gap_closed"]) if "vs_quantizer" in r else "-",
                    "-" if "early_error_ratio" not in r else f"{r['early_error_ratio']:.3f}",
                    "-" if "late_error_ratio" not in r else f"{r['late_error_ratio']:.3f}"])
    return out


HEADERS = ["preset", "method", "sampler", "cfg", "latent MSE", "PSNR dB", "FID-to-FP", "acc %",
           "gap closed vs RTN % [95% CI]", "median gap %", "ΔPSNR dB [95% CI]", "worst ratio", "worse %",
           "bytes × fp16", "SD1.5 bytes × fp16", "calib s", "correction: gap closed vs its quantizer % [95% CI]",
           "early error × RTN", "late error × RTN"]


def print_result(res: dict) -> None:
    print(f"calibrated quantizers vs round-to-nearest — reference model, {res['scheduler']} schedule, {res['steps']} "
          f"steps, N={res['n']}, seeds {res['seeds']}; input statistics from calibration seeds {res['calib_seeds']}"
          f" (early-step weight {res['step_weight']:g}, rows per K {res.get('rows_per_k') or 'all'}), budget "
          + (f"round-to-nearest + {res['budget_extra']:g}× fp16" if res.get("budget_extra") is not None
             else f"{res['budget']:g}× fp16"))
    print_table(HEADERS, table_rows(res))
    for c in res["collections"]:
        print(f"input statistics, {c['sampler']} cfg {c['cfg']:g}: {c['n_fit']} fit + {c['n_hold']} held-out samples "
              f"in {c['seconds']:.0f} s, {c['peak_stats_bytes'] / 2**20:.0f} MiB")
    m = res.get("sd15_stats")
    if m:
        print(f"SD1.5-shaped UNet: input statistics of its {m['layers']} W4 layers take {m['total_bytes'] / 2**30:.1f} GiB "
              f"(largest {m['largest_layer']}: {m['largest_bytes'] / 2**30:.2f} GiB); bounded to "
              f"{m['peak_bytes'] / 2**30:.2f} GiB at max_bytes={m['max_bytes'] / 2**30:.0f} GiB by {m['passes']} "
              "sampling passes, each group solved and dropped when its pass ends")
        if "solver_bytes" in m:
            print(f"  what the solver keeps of every layer instead (packed storage at its own type, int8 and 3 bits, "
                  f"rank-32 branch factors): {m['solver_bytes'] / 2**30:.2f} GiB")
        for a in m.get("accumulation", []):
            hours = f", about {2 * a['macs'] / (m['addmm_gflops'] * 1e9) / 3600:.1f} h" if m.get("addmm_gflops") else ""
            print(f"  accumulating them for {a['samples']} latents of {a['latent'] * 8}x{a['latent'] * 8} px, {a['steps']} "
                  f"steps with CFG: {a['macs']:.3g} multiply-adds; on a CPU that samples{hours} at this "
                  f"CPU's {m.get('addmm_gflops', 0):.0f} GFLOP/s float32 addmm with {torch.get_num_threads()} thread(s)")
            if m.get("host_add_rate") and "host_adds" in a:
                print(f"    with the model sampling on a GPU the products are made there and the CPU adds "
                      f"{a['host_adds']:.3g} values into the sums: about {a['host_adds'] / m['host_add_rate'] / 60:.1f} min "
                      f"at this CPU's {m['host_add_rate'] / 1e9:.2f} G additions/s (plus the GPU's products and the "
                      "transfers, not measured here)")
    if res.get("set_comparisons"):
        print("\nthe same method calibrated on another calibration set, per sample against set 1:")
        print_table(["preset", "sampler", "cfg", "A vs B", "mean MSE A/B", "median ratio", "worst ratio", "> 2x", "worse %"],
                    [[c["preset"], c["sampler"], f"{c['cfg']:g}", f"{c['a']} vs {c['b']}",
                      f"{1 - c['gap_closed']['estimate']:.3f}", f"{1 - c['median_gap_closed']:.3f}", f"{c['worst_ratio']:.2f}",
                      str(c["over_2x"]), f"{100 * c['worse_share']:.0f}"] for c in res["set_comparisons"]])
    print(f"\nthe tail in absolute terms (latent MSE to FP per sample; 'tipped': above {TIPPED_MSE:g}):")
    print_table(["preset", "method", "sampler", "cfg", "95th percentile", "max", "tipped"],
                [[r["preset"], r["method"], r["sampler"], f"{r['cfg']:g}", f"{r['p95_mse']:.4f}", f"{r['max_mse']:.4f}",
                  f"{r['tipped']} of {res['n']}"] for r in res["rows"] if "p95_mse" in r])
    if res.get("windows"):
        names = list(res["windows"])
        print("\nstep windows (quantized on those steps only, FP on the rest): mean latent MSE to FP, × round-to-nearest's "
              "same window, tipped samples")
        print_table(["preset", "method", "sampler", "cfg", "all steps"] + names + ["windows' sum / all", "tipped in no window"],
                    [[r["preset"], r["method"], r["sampler"], f"{r['cfg']:g}", f"{r['latent_mse']:.5f} ({r['tipped']})"]
                     + [f"{w['latent_mse']:.5f}" + (f" ×{w['x_rtn']:.2f}" if "x_rtn" in w else "") + f" ({w['tipped']})"
                        for w in (r["windows"][n] for n in names)]
                     + ["-" if "windows_sum_over_full" not in r else f"{r['windows_sum_over_full']:.2f}",
                        f"{r['tipped_in_no_window']} of {r['tipped']}"]
                     for r in res["rows"] if "windows" in r])
    for r in res["rows"]:
        if "worst_seed" in r:
            print(f"{r['preset']} {r['method']} {r['sampler']} cfg {r['cfg']:g}: worst sample seed {r['worst_seed']}, latent MSE "
                  f"{r['worst_base_mse']:.4f} (round-to-nearest) -> {r['worst_mse']:.4f}, {100 * r['share_of_mse_in_worst']:.0f}% "
                  f"of the method's summed latent MSE; {r['over_2x']} sample(s) more than 2x worse")
        if "auto" in r:
            print(f"{r['preset']} {r['method']} {r['sampler']} cfg {r['cfg']:g}: {r['auto']}")
        if "summary" in r:
            line = f"{r['preset']} {r['method']} {r['sampler']} cfg {r['cfg']:g}: {r['summary']}"
            if "allocation" in r:
                a = r["allocation"]
                spent = a.get("note") or (f"{len(a['int8'])} int8, " + (f"{len(a['uint3'])} uint3, " if a.get("uint3") else "") + f"ranks {a['ranks']}")
                line += f"; budget: {spent}"
            print(line)


def compare_saved(res: dict, a: str, b: str) -> list[dict]:
    """Per preset, sampler and CFG of a saved run (its ``--json`` object): method ``b`` against method
    ``a`` sample by sample, from the per-sample latent MSEs — the share of ``a``'s latent MSE that ``b``
    removes (paired bootstrap 95% interval, as ``gap closed`` against round-to-nearest), the median
    per-sample share, the samples ``b`` makes worse and more than 2× worse."""
    out = []
    rows = {(r["preset"], r["sampler"], r["cfg"], r["method"]): r for r in res["rows"] if "per_sample_latent_mse" in r}
    for (preset, sampler, cfg, method), ra in rows.items():
        rb = rows.get((preset, sampler, cfg, b))
        if method != a or rb is None:
            continue
        ma = torch.tensor(ra["per_sample_latent_mse"], dtype=torch.float64)
        mb = torch.tensor(rb["per_sample_latent_mse"], dtype=torch.float64)
        ratio = mb / ma.clamp_min(1e-30)
        out.append({"preset": preset, "sampler": sampler, "cfg": cfg, "a": a, "b": b, "n": int(ma.numel()),
                    "mse_removed": _ci(paired_bootstrap_ci(mb.numpy(), ma.numpy(), stat="ratio")),
                    "median_removed": float((1 - ratio).median()), "worse_share": float((ratio > 1).double().mean()),
                    "over_2x": int((ratio > 2).sum())})
    return out


def print_comparisons(comps: list[dict]) -> None:
    print_table(["preset", "sampler", "cfg", "B vs A", "N", "A's latent MSE removed by B % [95% CI]", "median %",
                 "B worse on %", "B > 2× A"],
                [[c["preset"], c["sampler"], f"{c['cfg']:g}", f"{c['b']} vs {c['a']}", str(c["n"]),
                  _fmt_ci(c["mse_removed"]), f"{100 * c['median_removed']:+.1f}", f"{100 * c['worse_share']:.0f}",
                  str(c["over_2x"])] for c in comps])


def main(args) -> int:
    if args.compare:
        a, _, b = args.compare.partition(",")
        comps = []
        for path in args.compare_json:
            with open(path) as f:
                comps += compare_saved(json.loads(f.read().strip().splitlines()[-1]), a.strip(), b.strip())
        if not comps:
            raise SystemExit(f"no setting with both {a!r} and {b!r} rows in {', '.join(args.compare_json)}")
        print_comparisons(comps)
        if args.json:
            emit_json({"comparisons": comps})
        return 0
    set_threads(args.threads)
    res = run(parse_presets(args.preset), parse_methods(args.methods), args.sampler.split(","),
              [float(c) for c in args.cfg.split(",")] if args.cfg else [load_reference().default_cfg],
              parse_int_list(args.seeds), parse_int_list(args.calib_seeds), parse_int_list(args.classes),
              args.steps, args.scheduler, args.budget, args.step_weight, args.outlier_ratio or None, args.batch,
              rows_per_k=args.rows_per_k or None, budget_extra=args.budget_extra,
              corrections=expand_methods(args.corrections, args.sampler.split(",")) if args.corrections else (),
              correct_on=tuple(m.strip() for m in args.correct_on.split(",")), damp=args.damp,
              calib_sets=args.calib_sets,
              amplitudes=[float(a) for a in args.amplitudes.split(",") if a.strip()] if args.amplitudes else (),
              own_error=args.own_error, guided=args.guided, act_ranges=args.act_ranges,
              relax=None if args.relax is None else (args.relax, args.relax_where, args.relax_bits),
              windows=parse_windows(args.windows, args.steps),
              tune=TuneConfig(iterations=args.tune_iters, lr=args.tune_lr, early_weight=args.step_weight,
                              batch=args.tune_batch, draw=args.tune_draw, lowpass_weight=args.tune_lowpass,
                              lowpass=args.tune_lowpass_k, seed=args.tune_seed,
                              early_sigma=args.tune_early_sigma),
              jacobian=(args.tune_jacobian, args.adjoints),
              float32_from=args.float32_from)
    print_result(res)
    if args.json:
        emit_json(res)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("quantizers", help="calibrated weight quantizers (GPTQ, AWQ, low-rank, budget) vs round-to-nearest")
    p.add_argument("--preset", default="W4A8", help="comma-separated presets, or 'all'")
    p.add_argument("--methods", default="rtn,gptq,best", help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--sampler", default="euler", help="comma-separated samplers")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", default=None, help="comma-separated CFG scales (default: the reference model's)")
    p.add_argument("--seeds", default="1000-1127", help="evaluation seeds")
    p.add_argument("--calib-seeds", default="0-31", help="calibration seeds (must not overlap --seeds)")
    p.add_argument("--classes", default="0-9", help="class labels, cycled over the seeds")
    p.add_argument("--budget", type=float, default=0.30, help="byte budget of the budgeted methods, × the model's fp16 bytes")
    p.add_argument("--budget-extra", type=float, default=None,
                   help="instead of --budget: each model's round-to-nearest ratio plus this (0.0166 = what 0.30 leaves on "
                        "the SD1.5-shaped UNet)")
    p.add_argument("--step-weight", type=float, default=1.0,
                   help="weight of the calibration inputs of steps with σ ≥ 3 (the first 7 of 20), others 1")
    p.add_argument("--outlier-ratio", type=float, default=1000.0,
                   help="channel |x| max/median from which a layer keeps 16-bit activations (0: off)")
    p.add_argument("--rows-per-k", type=float, default=DEFAULT_ROWS_PER_K,
                   help="input-statistics rows kept per layer, × its input size (0: every row; cost grows with it)")
    p.add_argument("--corrections", default=None,
                   help="correction methods (bench quality's names, 'all') calibrated on top of --correct-on")
    p.add_argument("--correct-on", default="best", help="the quantizer methods the corrections run on")
    p.add_argument("--damp", type=float, default=None,
                   help="GPTQ damping, × the mean diagonal of the input second moments, for every calibrated method "
                        "(default: each method's, 0.01)")
    p.add_argument("--float32-from", type=parse_float32_from, default=FLOAT32_FROM, metavar="K",
                   help=f"calibrated methods solve layers with at least K inputs in float32 (default {FLOAT32_FROM}, "
                        "which leaves every reference-model layer in float64; 0: all float32; none: all float64)")
    p.add_argument("--calib-sets", type=int, default=1,
                   help="also calibrate every method on K-1 further disjoint calibration sets (seeds shifted by their "
                        "count) and compare each with set 1 sample by sample")
    p.add_argument("--amplitudes", default=None,
                   help="comma-separated a: analysis rows 'rtn×a' with round-to-nearest's weight error scaled by a "
                        "(how the gap responds to the size of the weight error; they store nothing); a negative a "
                        "mirrors the error (write --amplitudes=-1,-0.3)")
    p.add_argument("--own-error", action="store_true",
                   help="also measure each model's early one-step error against FP on its own trajectory's states")
    p.add_argument("--guided", action="store_true",
                   help="guided input statistics: CFG calls enter GPTQ's H as (1 − s)·x_uncond + s·x_cond")
    p.add_argument("--act-ranges", default=None, choices=ACT_RANGES,
                   help="dynamic activation ranges: per_latent (the presets' default: a latent's CFG passes share "
                        "one range) or per_sample (each sample its own; how rows before session 9 were measured)")
    p.add_argument("--relax", type=float, default=None, metavar="FRACTION",
                   help="PCR's relaxing on every quantized row after it is made (and tuned): this share of the "
                        "steps, near --relax-where, runs its activations at --relax-bits")
    p.add_argument("--windows", default=None, metavar="A-B,…",
                   help="analysis: also sample every row with its quantized model on these steps only (0-based, "
                        "inclusive) and FP elsewhere, e.g. 0-3,4-6,7-12,13-19")
    p.add_argument("--relax-where", default="xT", choices=RELAX_WHERE)
    p.add_argument("--relax-bits", type=int, default=10)
    p.add_argument("--tune-iters", type=int, default=TuneConfig.iterations,
                   help="iterations of the *_tuned methods' grid tuning (one recorded calibration call each)")
    p.add_argument("--tune-lr", type=float, default=TuneConfig.lr, help="learning rate of the grid tuning")
    p.add_argument("--tune-draw", default=TuneConfig.draw, choices=DRAWS,
                   help="how tuning iterations pick their recorded call: uniform (each call once per pass) or "
                        "weighted (drawn in proportion to the step weight)")
    p.add_argument("--tune-lowpass", type=float, default=TuneConfig.lowpass_weight, metavar="W",
                   help="early calls' tuning loss also counts their error pooled over --tune-lowpass-k latent pixels, W times")
    p.add_argument("--tune-lowpass-k", type=int, default=TuneConfig.lowpass)
    p.add_argument("--tune-early-sigma", type=float, default=TuneConfig.early_sigma, metavar="SIGMA",
                   help="the grid tuning weights calls with σ ≥ SIGMA by --step-weight (the input statistics keep σ ≥ 3)")
    p.add_argument("--tune-jacobian", type=float, default=JACOBIAN_WEIGHT, metavar="MU",
                   help="weight of the flow-Jacobian term in the tuning loss of the *_jtuned methods")
    p.add_argument("--adjoints", type=int, default=ADJOINTS, metavar="K",
                   help="flow-adjoint sketches per calibration sample for the *_jtuned methods")
    p.add_argument("--tune-seed", type=int, default=TuneConfig.seed,
                   help="seed of the tuning's call order (and sub-sampling): how much the result depends on it")
    p.add_argument("--tune-batch", type=int, default=TuneConfig.batch,
                   help="samples of a recorded call each tuning iteration uses (random, seeded; 0 = all of it)")
    p.add_argument("--compare", default=None, metavar="A,B",
                   help="instead of running: compare method B with method A sample by sample in saved --json outputs")
    p.add_argument("--compare-json", nargs="+", default=[], metavar="FILE",
                   help="saved outputs of 'bench quantizers --json' (their last line) for --compare")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
