"""Corrected KSampler, Correction Sampler, Load Correction Stats.

The correction engine wraps the *sampler function* of any ComfyUI ``KSAMPLER``: the engine sees
the solver's exact x and σ and the post-CFG denoised value (ARCHITECTURE.md, "ComfyUI integration
points"), so every built-in sampler inherits the correction. What the engine applied — and for
"auto" why — is returned as the node's UI text, never only logged.
"""

from __future__ import annotations

import os
import warnings

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io, ui

from ..calibration import CorrectionEngine, CorrectionStats, IncompatibleStatsError
from ..calibration.methods import USER_METHODS, sampling_engine
from . import patching
from .types import STATS_FOLDER, Stats

CATEGORY = "qcorrect"


def check_model(model, stats: CorrectionStats) -> tuple[str, str]:
    """Refuse statistics that do not belong to ``model``; returns (fingerprint, prediction)."""
    fp = patching.fingerprint(model)
    meta = stats.meta
    if meta.quant_fingerprint and fp == meta.model_fingerprint and fp != meta.quant_fingerprint:
        raise IncompatibleStatsError(
            "this is the full-precision model these statistics were measured against; connect the quantized model "
            "(the output of Quantize Model, or the quantized model given to Calibrate Errors)")
    pred = patching.prediction_type(model)
    channels = patching.latent_channels(model)
    stats.check_compatible(fingerprint=fp, prediction=pred, channels=channels)
    return fp, pred


def make_engine(model, stats: CorrectionStats, method: str) -> tuple[CorrectionEngine, str]:
    if stats is None:
        raise IncompatibleStatsError("connect correction statistics (Calibrate Errors or Load Correction Stats)")
    stats.validate()
    fp, pred = (None, None) if model is None else check_model(model, stats)
    cfg, reason = sampling_engine(method, stats)
    return CorrectionEngine(stats, cfg, fingerprint=fp, prediction=pred), reason


def corrected_ksampler(base, engine: CorrectionEngine, sampler_name: str | None = None):
    """A ``KSAMPLER`` that runs ``base``'s sampler function with the engine's corrections."""
    if not isinstance(base, comfy.samplers.KSAMPLER):
        raise IncompatibleStatsError(
            f"the sampler is a {type(base).__name__}, not one of ComfyUI's k-diffusion samplers (KSAMPLER); the "
            "correction engine wraps those only")
    fn = engine.wrap(base.sampler_function, sampler_name=sampler_name)
    return comfy.samplers.KSAMPLER(fn, dict(base.extra_options), dict(base.inpaint_options))


def describe_run(engine: CorrectionEngine, reason: str, cfg: float | None, caught) -> str:
    lines = [reason]
    meta = engine.stats.meta
    if cfg is not None and abs(float(cfg) - float(meta.cfg)) > 1e-6:
        lines.append(f"note: calibrated at cfg {meta.cfg:g}, sampling at cfg {float(cfg):g}; the post-CFG error "
                     "differs — calibrate at the cfg you sample with")
    plan = engine.last_plan
    if plan is not None and plan.identity and engine.config.any_enabled:
        lines.append("the statistics' corrections are all neutral here: sampled exactly as uncorrected")
    for w in caught:
        lines.append(f"note: {w.message}")
    return "\n".join(lines)


class CorrectedKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectCorrectedKSampler",
            display_name="Corrected KSampler",
            category=CATEGORY,
            description="KSampler with the quantization-error correction: at every model call the engine rewrites "
                        "σ, the latent and the model output from the statistics (StepbaQ, TAC, TCEC, PTQD).",
            inputs=[
                io.Model.Input("model", tooltip="The quantized model the statistics were calibrated for."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS)),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS)),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                Stats.Input("stats"),
                io.Combo.Input("method", options=USER_METHODS, default="auto",
                               tooltip="auto: TCEC where the calibration's cross-fitted check showed a gain, else "
                                       "no correction (the node says which and why)."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                stats, method) -> io.NodeOutput:
        engine, reason = make_engine(model, stats, method)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"],
                                                        latent_image.get("downscale_ratio_spacial", None))
        if latent.shape[1] != stats.channels:
            raise IncompatibleStatsError(f"the latent has {latent.shape[1]} channels but the statistics "
                                         f"{stats.channels}: they are for another model family")
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise).sigmas
        sampler = corrected_ksampler(comfy.samplers.sampler_object(sampler_name), engine, sampler_name)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                                 noise_mask=latent_image.get("noise_mask"), callback=callback,
                                                 disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out.pop("downscale_ratio_spacial", None)
        out.pop("downscale_ratio_temporal", None)
        out["samples"] = samples
        return io.NodeOutput(out, ui=ui.PreviewText(describe_run(engine, reason, cfg, caught)))


class CorrectionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectCorrectionSampler",
            display_name="Correction Sampler",
            category=CATEGORY,
            description="Wraps a SAMPLER (KSamplerSelect …) with the correction engine, for SamplerCustomAdvanced "
                        "graphs.",
            inputs=[
                io.Sampler.Input("sampler"),
                Stats.Input("stats"),
                io.Combo.Input("method", options=USER_METHODS, default="auto"),
                io.Model.Input("model", optional=True,
                               tooltip="The quantized model, to check that the statistics belong to it."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, sampler, stats, method, model=None) -> io.NodeOutput:
        engine, reason = make_engine(model, stats, method)
        text = reason if model is not None else reason + "\n(no model connected: fingerprint not checked)"
        return io.NodeOutput(corrected_ksampler(sampler, engine), ui=ui.PreviewText(text))


def stats_summary(stats: CorrectionStats) -> str:
    m = stats.meta
    check = m.validation or {}
    lines = [f"{m.quantization or 'quantized model'} · {m.sampler}, {m.steps} steps, {m.scheduler or '?'} scheduler, "
             f"cfg {m.cfg:g} · {m.n_samples} samples · methods {', '.join(m.methods) or 'none'}"]
    if check:
        lines.append(f"check ({check.get('folds', 1)} folds): {100 * float(check.get('gap_closed', 0)):+.1f}% of the "
                     f"naive gap")
    lines.append(sampling_engine("auto", stats)[1])
    return "\n".join(lines)


class LoadCorrectionStats(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectLoadCorrectionStats",
            display_name="Load Correction Stats",
            category=CATEGORY,
            description="Load a statistics file (made by Calibrate Errors, here or by someone else) from "
                        "models/qcorrect/.",
            inputs=[io.Combo.Input("stats_name", options=folder_paths.get_filename_list(STATS_FOLDER))],
            outputs=[Stats.Output()],
        )

    @classmethod
    def execute(cls, stats_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(STATS_FOLDER, stats_name)
        stats = CorrectionStats.load(path)
        return io.NodeOutput(stats, ui=ui.PreviewText(stats_summary(stats)))

    @classmethod
    def fingerprint_inputs(cls, stats_name):
        """Re-run when the file changes (a new calibration under the same name)."""
        path = folder_paths.get_full_path(STATS_FOLDER, stats_name)
        return None if path is None else os.path.getmtime(path)


NODES = [CorrectedKSampler, CorrectionSampler, LoadCorrectionStats]
