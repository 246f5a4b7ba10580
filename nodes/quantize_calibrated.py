"""Quantize Model (Calibrated): the model plus a calibration set → 4/8-bit weights rounded with
error compensation (issue 11's calibrated quantizers, ``quant/calibrated.py``).

The full-precision model samples the calibration set once through ComfyUI's own guider (its
conditioning, CFG and sampler), while per-layer input second moments are streamed from a
structural copy of the model that this node owns (``calibration/inputs.py``; no hook ever touches
a module of the input MODEL). Then a second copy is quantized from those statistics: GPTQ-style
rounding scored against round-to-nearest per layer on held-out calibration samples, optionally
AWQ-style input scales, and an optional byte budget spent on int8 layers and low-rank branches —
with ``mixed_precision`` (the default) also lowering the layers whose error barely reaches the image
to 3 bits to pay for more int8, each layer's share of the error measured by a sketched probe
(:class:`GuidedSketch`, a few backward passes of our float copy through ComfyUI's guider).
Optionally (``tune_iterations`` > 0) the quantized model's stored fp16 scales and zero points are then
tuned end to end against the FP model's outputs on the recorded calibration calls (``quant/tune.py``;
codes unchanged, zero extra bytes, kept only if the held-out loss drops). That is a backward pass
through the model once per iteration, run with autograd re-enabled inside ComfyUI's inference mode
on normal-tensor copies of what our copy of the model holds (ComfyUI's own training node does the
same); it needs the activation memory of one model call's backward pass, hence off by default.
The statistics live in host RAM; on a CUDA GPU their products are made there, and each layer is solved
there when its solve fits the GPU's free memory (``solve_on`` "auto"; the CPU otherwise).
Progress bar over the sampling (and the tuning), and one over the layers solved after each sampling pass;
cancel stops within one model call or one layer's solve and leaves the input untouched.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..calibration.inputs import (
    DEFAULT_ROWS_PER_K, SketchProbe, calibration_layers, calls_of_first_samples, collect_inputs, early_weight, layer_groups,
)
from ..quant import PRESETS, plan_summary
from ..quant import preset as quant_preset
from ..quant.calibrated import CalibratedConfig, CalibratedSolver, calibrated_summary
from ..quant.tune import TuneConfig, tune_grid
from . import patching
from .calibrate import CALIBRATION_SAMPLERS, GuidedRun, ancestral_noise, calibration_set

CATEGORY = "qcorrect"
#: the sketched sensitivity probe of ``mixed_precision``: the recorded calls of this many calibration
#: samples, this many Gaussian sketches (docs/BENCHMARKS.md, "Mixed precision both ways")
SKETCH_SAMPLES, SKETCHES = 8, 4
#: where the layers are solved (``solve_on``): the sampling GPU where a layer fits, or always the CPU
SOLVE_ON = ("auto", "cpu")


def collect_model_inputs(model, base, positive, negative, latent_image, seed, sampler, scheduler, steps, cfg,
                         batches, baked, early_steps_weight: float = 4.0, stats_memory_gb: float = 4.0,
                         record_calls: bool = False, consume=None) -> dict:
    """Sample ``model`` (as a patcher around our copy ``base``) over the calibration set and stream the
    per-layer input statistics of ``base``'s diffusion model.

    The statistics live in host RAM, two float32 ``K×K`` sums per layer (52 GiB for all of SD1.5's
    W4 layers); when the model samples on a GPU each call's ``x xᵀ`` is multiplied there and only the
    products are added into them (``calibration.inputs.add_gram_from``; one ``512×K`` block of VRAM
    beyond the model's, 47 MB at SD1.5's widest layer). At most ``stats_memory_gb`` are collected at once, the layers being collected in as many
    sampling passes of the calibration set as that takes (deterministic sampling: every pass sees the
    same trajectories, so the result does not depend on the bound, only the time). With ``consume``
    (:meth:`CalibratedSolver.add`) each group is solved and dropped when its pass ends, so that is
    also all the statistics ever held; without it every group is returned. Each layer keeps
    about ``DEFAULT_ROWS_PER_K × K`` input rows in all, which bounds the ``x xᵀ`` cost whatever the
    resolution. The inputs of the calls with σ ≥ 3 weigh ``early_steps_weight`` (the first steps
    make most of the final error; docs/BENCHMARKS.md, "Calibrated quantizers")."""
    work = patching.new_model_patcher(model, base, drop_patches=baked)
    max_bytes = int(float(stats_memory_gb) * 2**30)
    passes = len(layer_groups(calibration_layers(patching.diffusion_model(work)), max_bytes))
    weight = None if float(early_steps_weight) == 1.0 else early_weight(float(early_steps_weight))
    latents, noise = calibration_set(work, latent_image, seed, batches)
    bs, n = latent_image["samples"].shape[0], noise.shape[0]
    sigmas = comfy.samplers.KSampler(work, steps=steps, device=work.load_device, sampler=sampler,
                                     scheduler=scheduler).sigmas
    sample_fn = comfy.samplers.sampler_object(sampler).sampler_function
    name = "euler" if sampler == "ddim" else sampler

    def job(q, fp, x_init, sigmas, grid):
        factory = None
        if name == "euler_ancestral":
            make = ancestral_noise(int(seed), tuple(x_init.shape[1:]), x_init.device, x_init.dtype)
            factory = lambda idx: make(int(idx[0]), int(idx[0]) + len(idx))  # noqa: E731
        return collect_inputs(q, patching.diffusion_model(work), sample_fn, x_init, sigmas, {}, batch_size=bs,
                              noise_sampler_factory=factory, seed=int(seed), step_weight=weight,
                              max_bytes=max_bytes, rows_per_k=DEFAULT_ROWS_PER_K, record_calls=record_calls,
                              consume=consume)

    guider = comfy.samplers.CFGGuider(work)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    run = GuidedRun(job, noise, latents, passes * (sigmas.shape[-1] - 1) * math.ceil(n / bs))
    guider.sample(noise[:bs], latents[:bs], run, sigmas, disable_pbar=True, seed=int(seed))
    return run.result


def _normal(t):
    """A tensor made under ComfyUI's inference mode → a normal copy autograd may save (else itself)."""
    return t.clone() if torch.is_tensor(t) and t.is_inference() else t


def _normal_tree(obj):
    """Conditioning lists/dicts with every inference tensor replaced by a normal copy."""
    if torch.is_tensor(obj):
        return _normal(obj)
    if isinstance(obj, dict):
        return {k: _normal_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_normal_tree(v) for v in obj)
    return obj


def _normal_module(module: torch.nn.Module) -> int:
    """Replace the module tree's inference-mode parameters and buffers by normal copies (our copy of
    the model only); returns how many were replaced."""
    n = 0
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[k] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                n += 1
        for k, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[k] = b.clone()
                n += 1
    return n


class GuidedSketch:
    """The budget's sensitivities (``quantize_calibrated(sensitivity=…)``'s ``batch``) measured on our float
    copy ``base`` of the model through ComfyUI's guider (its conditioning and CFG): a
    :class:`~..calibration.inputs.SketchProbe` over the recorded FP calls of the first calibration
    samples, a few backward passes with autograd on, on normal-tensor copies (as :func:`tune_model`).
    Hooks only on ``base``'s layers, only while it runs."""

    def __init__(self, model, base, baked, positive, negative, latent_image, seed, sigmas, cfg, calls: list,
                 early_steps_weight: float):
        self.model, self.base, self.baked = model, base, baked
        self.positive, self.negative, self.latent_image, self.seed = positive, negative, latent_image, seed
        self.sigmas, self.cfg = sigmas, cfg
        self.calls = calls_of_first_samples(calls, SKETCH_SAMPLES)
        self.weight = None if float(early_steps_weight) == 1.0 else early_weight(float(early_steps_weight))

    def batch(self, weights: dict) -> dict:
        work = patching.new_model_patcher(self.model, self.base, drop_patches=self.baked)
        bs = int(self.latent_image["samples"].shape[0])
        with torch.inference_mode(False):
            _normal_module(self.base)
            pos, neg = _normal_tree(self.positive), _normal_tree(self.negative)
            latents, noise = calibration_set(work, self.latent_image, self.seed, 1)

            def job(q, fp, x_init, sigmas, grid):
                dev = x_init.device
                calls = [(x.clone().to(dev), s.clone().to(dev), {}) for x, s, *_ in self.calls]
                probe = SketchProbe(q, patching.diffusion_model(work), calls, self.weight, sketches=SKETCHES,
                                    max_batch=bs)
                return probe.batch(weights)

            guider = comfy.samplers.CFGGuider(work)
            guider.set_conds(pos, neg)
            guider.set_cfg(self.cfg)
            run = GuidedRun(job, noise, latents, SKETCHES * len(self.calls))
            try:
                guider.sample(noise, latents, run, self.sigmas.clone(), disable_pbar=True, seed=int(self.seed))
            except torch.OutOfMemoryError as exc:
                raise RuntimeError(
                    "mixed_precision measures each layer's share of the error with backward passes through the model "
                    f"on one latent batch ({bs} latents), which ran out of memory; use a smaller latent batch for "
                    "the calibration set (more batches) or turn mixed_precision off") from exc
        return run.result


def tune_model(out, positive, negative, latent_image, seed, sigmas, cfg, calls: dict, iterations: int,
               early_steps_weight: float) -> dict:
    """Tune the stored grid of ``out`` (our quantized MODEL) on the recorded FP calls, through ComfyUI's
    guider (its conditioning and CFG), with autograd on; returns :func:`tune_grid`'s report."""
    config = TuneConfig(iterations=int(iterations), early_weight=float(early_steps_weight)).validate()
    fit, hold = calls["fit"], calls["hold"]
    with torch.inference_mode(False):
        _normal_module(out.model)
        pos, neg = _normal_tree(positive), _normal_tree(negative)
        latents, noise = calibration_set(out, latent_image, seed, 1)

        def job(q, fp, x_init, sigmas, grid):
            dev = x_init.device

            def move(c):
                x, s, ex, d = c
                return x.clone().to(dev), s.clone().to(dev), {}, d.clone().to(dev)
            return tune_grid(q, patching.diffusion_model(out), [move(c) for c in fit], [move(c) for c in hold],
                             config)

        guider = comfy.samplers.CFGGuider(out)
        guider.set_conds(pos, neg)
        guider.set_cfg(cfg)
        total = config.iterations + 2 * (len(hold) or len(fit))  # the held-out loss before and after
        run = GuidedRun(job, noise, latents, total)
        guider.sample(noise, latents, run, sigmas.clone(), disable_pbar=True, seed=int(seed))
    return run.result


class QuantizeModelCalibrated(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectQuantizeModelCalibrated",
            display_name="Quantize Model (Calibrated)",
            category=CATEGORY,
            description="Quantize Model with error-compensating rounding fitted to a calibration set the model "
                        "samples itself (GPTQ-style, per-layer fallback to round-to-nearest on held-out samples; "
                        "optional AWQ scales and a byte budget). Same storage as Quantize Model.",
            inputs=[
                io.Model.Input("model", tooltip="The full-precision model (LoRA before this node is baked in)."),
                io.Combo.Input("preset", options=list(PRESETS), default="W4A8"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="One batch of the calibration set (e.g. Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False),
                io.Combo.Input("sampler", options=list(CALIBRATION_SAMPLERS), default="euler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal"),
                io.Int.Input("steps", default=20, min=1, max=1000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Int.Input("batches", default=4, min=1, max=1024,
                             tooltip="How many latent batches the model samples (batch i uses seed + i); a quarter "
                                     "of the samples is held out to check each layer's rounding."),
                io.Combo.Input("rounding", options=["gptq", "rtn"], default="gptq"),
                io.Boolean.Input("awq", default=False, tooltip="Search AWQ-style input-channel scales per layer."),
                io.Float.Input("budget", default=0.30, min=0.0, max=1.0, step=0.01,
                               tooltip="Byte budget as a share of the model's fp16 bytes (0.30 = the measured best, see docs; 0 = the preset's bytes "
                                       "only); extra bytes go to int8 layers and low-rank branches."),
                io.Float.Input("early_steps_weight", default=4.0, min=1.0, max=100.0, step=0.5, optional=True,
                               tooltip="How much more the inputs of the first, noisiest steps (σ ≥ 3) count in the "
                                       "calibration statistics (1 = all steps alike; 4 = the measured default)."),
                io.Float.Input("stats_memory_gb", default=4.0, min=0.25, max=1024.0, step=0.25, optional=True,
                               tooltip="Host RAM the per-layer input statistics may take at once. Layers that do not "
                                       "fit together are collected in further sampling passes (slower, same result)."),
                io.Int.Input("tune_iterations", default=0, min=0, max=10000, optional=True,
                             tooltip="Then tune the stored scales and zero points end to end against the full-"
                                     "precision outputs for this many steps (one model call and its backward pass "
                                     "each; 200 = the measured setting, +0.7 to +1.4 dB PSNR on the reference model). "
                                     "Needs the memory of one backward pass; 0 = off."),
                io.Boolean.Input("mixed_precision", default=True, optional=True,
                                 tooltip="With a budget: also store layers whose error barely reaches the image at 3 bits "
                                         "and spend the bytes that frees on int8 for the layers that matter, each layer's "
                                         "share measured by a few backward passes of the model on the calibration samples "
                                         "(on the reference model +1.1 to +1.8 dB PSNR, up to +10.7 points of the gap closed, same bytes). Off = int8 "
                                         "layers and low-rank branches only, chosen without running the model."),
                io.Combo.Input("solve_on", options=list(SOLVE_ON), default="auto", optional=True,
                               tooltip="Where the layers are solved from their statistics. auto: on the GPU ComfyUI "
                                       "samples on, each layer whose solve fits its free memory (the others, and "
                                       "everything without a CUDA GPU, on the CPU); cpu: always on the CPU (hours for "
                                       "SD1.5's widest layers, but no VRAM)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, preset, positive, negative, latent_image, seed, sampler, scheduler, steps, cfg, batches,
                rounding, awq, budget, early_steps_weight=4.0, stats_memory_gb=4.0, tune_iterations=0,
                mixed_precision=True, solve_on="auto") -> io.NodeOutput:
        plan = quant_preset(preset)
        mixed = bool(mixed_precision) and float(budget) > 0
        options = ("int8", "rank", "kept") + (("uint3",) if mixed else ())
        config = CalibratedConfig(rounding=rounding, awq=bool(awq), budget=float(budget) or None,
                                  budget_options=options).validate()
        sample_base, baked = patching.baked_copy(model, plan)
        # the copy that is quantized (never loaded by ComfyUI): each group of layers is solved from its
        # statistics as soon as their sampling pass ends, and the statistics are dropped
        base, baked_q = patching.baked_copy(model, plan)
        solve_bar = comfy.utils.ProgressBar(1)

        def solved(done, total):  # a second bar over the layers solved (between sampling passes); cancel point
            comfy.model_management.throw_exception_if_processing_interrupted()
            solve_bar.update_absolute(done, total)

        solve_device = _solve_device(solve_on)
        solver = CalibratedSolver(base.diffusion_model, plan, config, progress=solved, solve_device=solve_device)
        collected = collect_model_inputs(model, sample_base, positive, negative, latent_image, seed, sampler,
                                         scheduler, steps, cfg, batches, baked, early_steps_weight, stats_memory_gb,
                                         record_calls=int(tune_iterations) > 0 or mixed, consume=solver.add)
        sensitivity = None
        if mixed:  # the sensitivities come from the sampled float copy, before a fresh copy is quantized
            work = patching.new_model_patcher(model, sample_base, drop_patches=baked)
            sigmas = comfy.samplers.KSampler(work, steps=steps, device=work.load_device, sampler=sampler,
                                             scheduler=scheduler).sigmas
            sensitivity = GuidedSketch(model, sample_base, baked, positive, negative, latent_image, seed, sigmas, cfg,
                                       collected["calls"]["fit"], early_steps_weight)
        with torch.no_grad():
            solved_report = solver.finish(sensitivity)
        del sample_base, sensitivity
        out = patching.new_model_patcher(model, base, drop_patches=baked_q)
        tuned = None
        if int(tune_iterations) > 0:
            sigmas = comfy.samplers.KSampler(out, steps=steps, device=out.load_device, sampler=sampler,
                                             scheduler=scheduler).sigmas
            tuned = tune_model(out, positive, negative, latent_image, seed, sigmas, cfg, collected["calls"],
                               int(tune_iterations), early_steps_weight)
        lines = [plan_summary(base.diffusion_model), calibrated_summary(base.diffusion_model),
                 f"calibration: {collected['n_fit']} + {collected['n_hold']} held-out samples, input statistics "
                 f"{collected['seconds']:.1f} s in {collected['passes']} sampling pass(es), at most "
                 f"{collected['peak_stats_bytes'] / 2**20:.1f} MiB of them held at once",
                 _solve_line(len(solved_report["layers"]), mixed, config.budget is not None, solved_report["seconds"],
                             solved_report.get("placement"), solve_device),
                 f"model size {out.model_size() / 2**20:.1f} MiB (input {model.model_size() / 2**20:.1f} MiB)"]
        if tuned is not None:
            lines.append(f"grid tuning: {tuned['iterations']} iterations in {tuned['seconds']:.1f} s, held-out loss "
                         f"{tuned['hold_loss_before']:.4g} → {tuned['hold_loss_after']:.4g}"
                         + ("" if tuned["kept"] else f" — not kept ({tuned.get('note', '')})"))
        return io.NodeOutput(out, ui=ui.PreviewText("\n".join(lines)))


def _solve_device(solve_on: str) -> torch.device | None:
    """The device the solver may solve layers on: ComfyUI's torch device when it is a CUDA GPU and
    ``solve_on`` is "auto" (None: where the statistics are, host RAM)."""
    if solve_on not in SOLVE_ON:
        raise ValueError(f"solve_on must be one of {SOLVE_ON}, got {solve_on!r}")
    if solve_on == "cpu":
        return None
    device = comfy.model_management.get_torch_device()
    return device if torch.device(device).type == "cuda" else None


def _solve_line(layers: int, probe: bool, budget: bool, seconds: float, placement: dict | None = None,
                device=None) -> str:
    """The report's line on the solver's share of the time (the statistics have their own line), and
    with a solve device, where the layers were solved."""
    what = [f"solving {layers} layers"] + (["the sensitivity probe"] if probe else []) + (["the byte budget"] if budget else [])
    head = what[0] if len(what) == 1 else ", ".join(what[:-1]) + " and " + what[-1]
    line = f"{head}: {seconds:.1f} s"
    if placement is not None:
        why = [f"{placement[k]} {text}" for k, text in (("too_large", "too large for its free memory"),
                                                         ("out_of_memory", "out of memory while solving"),
                                                         ("tf32", "not solved there because its float32 products are TF32"))
               if placement[k]]
        rest = sum(placement[k] for k in ("too_large", "out_of_memory", "tf32"))
        line += (f" ({placement['solve_device']} layers solved on {device}"
                 + (f", {rest} on the CPU: {', '.join(why)}" if rest else "") + ")")
    return line


NODES = [QuantizeModelCalibrated]
