"""Calibrate Errors: the FP and the quantized MODEL in lock-step over one ComfyUI schedule → STATS file.

ComfyUI prepares a model for sampling in its guider (models loaded to the device, conditioning
encoded for that model). :class:`DualModelGuider` — the pattern of core's ``Guider_DualModel`` —
prepares *both* models and answers ``guider(x, σ)`` with the quantized model's or the FP model's
post-CFG denoised value, as ``which`` says. :class:`GuidedRun` is a ComfyUI ``Sampler``:
ComfyUI calls it with the prepared guider, and it runs the library's collector
(``calibration.collect.calibrate`` or, for "auto", ``validate.calibrate_checked`` with its
cross-fitted end-to-end check) over the whole calibration set, with two denoisers that call the
guider. Every model call is an interruption point (cancel from the UI stops within one call) and
advances the node's progress bar; the file is written only at the end, atomically, so a cancelled
or failed calibration leaves nothing behind.

Choices: the calibration set is ``batches`` copies of ``latent_image``'s batch, batch i noised with
``seed + i`` (ComfyUI's ``prepare_noise``), and the collector's micro-batch is the latent's batch
size (the memory a sampling run of that batch takes); ancestral noise of the collector comes from
``seed``; the check draws each fold's ancestral noise from ``seed + 1 + first sample index``.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..calibration import CalibrationConfig, calibrate
from ..calibration.methods import USER_METHODS, calibration_engine
from ..calibration.ranges import calibrate_activation_ranges
from ..calibration.validate import calibrate_checked
from ..quant import QuantizationError
from ..quant.activations import ActQuantizer
from . import patching
from .sampling import stats_summary
from .types import STATS_FOLDER, Stats, output_path, shown_path

CATEGORY = "qcorrect"
CALIBRATION_SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "ddim")
AUTO_FOLDS = 4


class DualModelGuider(comfy.samplers.CFGGuider):
    """A CFG guider over the quantized model (its own patcher) that can also run the FP model."""

    def __init__(self, q_patcher, fp_patcher):
        super().__init__(q_patcher)
        self.fp_patcher = fp_patcher
        self.which = "q"
        self.fp_inner = None

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None, latent_shapes=None):
        raw = {k: [c.copy() for c in v] for k, v in self.conds.items()}
        self.fp_options = comfy.model_patcher.create_model_options_clone(self.fp_patcher.model_options)
        self.fp_options.setdefault("transformer_options", {})
        comfy.sampler_helpers.prepare_model_patcher(self.fp_patcher, raw, self.fp_options)
        self.fp_inner, self.fp_raw, self.fp_loaded = comfy.sampler_helpers.prepare_sampling(
            self.fp_patcher, noise.shape, raw, self.fp_options)
        self.fp_patcher.pre_run()
        try:
            return super().outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar,
                                        seed, latent_shapes=latent_shapes)
        finally:
            self.fp_patcher.cleanup()
            comfy.sampler_helpers.cleanup_models(self.fp_raw, self.fp_loaded)
            self.fp_inner = None

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                     latent_shapes=None):
        li = latent_image
        if li is not None and torch.count_nonzero(li) > 0:
            li = self.fp_inner.process_latent_in(li)
        self.fp_conds = comfy.samplers.process_conds(self.fp_inner, noise, self.fp_raw, device, li, denoise_mask, seed,
                                                     latent_shapes=latent_shapes)
        self.fp_options["transformer_options"]["sample_sigmas"] = sigmas
        return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                    disable_pbar, seed, latent_shapes=latent_shapes)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.which == "fp":
            return comfy.samplers.sampling_function(self.fp_inner, x, timestep, self.fp_conds.get("negative"),
                                                    self.fp_conds.get("positive"), self.cfg,
                                                    model_options=self.fp_options, seed=seed)
        return super().predict_noise(x, timestep, model_options, seed)


class GuidedRun(comfy.samplers.Sampler):
    """A ComfyUI ``Sampler`` that hands a job the prepared guider's denoisers.

    ComfyUI calls :meth:`sample` inside the guider's prepared context (models loaded, conditioning
    encoded); the job gets ``q`` and ``fp`` denoisers (``model(x, σ)`` → post-CFG denoised; ``fp`` only
    with a :class:`DualModelGuider`), the starting latents of the whole set ``x_init`` (ComfyUI's noise
    scaling of ``noise`` on ``latent``), the schedule and the model's training σ grid. Every model call
    is an interruption point and advances one progress bar of ``calls`` steps.
    """

    def __init__(self, job, noise: torch.Tensor, latent: torch.Tensor, calls: int):
        self.job, self.noise, self.latent, self.calls = job, noise, latent, max(1, int(calls))
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        device = noise.device
        ms = model_wrap.inner_model.model_sampling
        noise_all = self.noise.to(device=device, dtype=noise.dtype)
        lat = self.latent.to(device=device, dtype=noise.dtype)
        if torch.count_nonzero(lat) > 0:
            lat = model_wrap.inner_model.process_latent_in(lat)
        x_init = ms.noise_scaling(sigmas[0], noise_all, lat, self.max_denoise(model_wrap, sigmas))
        pbar = comfy.utils.ProgressBar(self.calls)
        done = [0]

        def denoiser(which):
            def call(x, sigma, **_):
                comfy.model_management.throw_exception_if_processing_interrupted()
                model_wrap.which = which
                try:
                    out = model_wrap(x, sigma, model_options=extra_args["model_options"], seed=extra_args.get("seed"))
                finally:
                    model_wrap.which = "q"
                done[0] += 1
                pbar.update_absolute(min(done[0], self.calls), self.calls)
                return out
            return call

        dual = isinstance(model_wrap, DualModelGuider)
        self.result = self.job(q=denoiser("q"), fp=denoiser("fp") if dual else None, x_init=x_init, sigmas=sigmas,
                               grid=ms.sigmas.detach().float().cpu())
        return latent_image if latent_image is not None else noise


def ancestral_noise(seed: int, shape: tuple, device, dtype):
    """``factory(a, b)`` → a noise sampler for samples a..b of the set, seeded ``seed + 1 + a``."""
    def factory(a, b):
        gen = torch.Generator(device="cpu").manual_seed(seed + 1 + a)
        return lambda s, s_next: torch.randn((b - a, *shape), generator=gen).to(device=device, dtype=dtype)
    return factory


def calibration_set(model, latent_image: dict, seed: int, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batches`` copies of the latent batch and their noise (batch i seeded ``seed + i``)."""
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"],
                                                    latent_image.get("downscale_ratio_spacial", None))
    noise = torch.cat([comfy.sample.prepare_noise(latent, int(seed) + i) for i in range(int(batches))])
    return latent.repeat(int(batches), *([1] * (latent.ndim - 1))), noise


def needs_static_ranges(model) -> bool:
    """Whether the model has static-mode activation quantizers without calibrated ranges."""
    return any(getattr(m, "mode", None) == "static" and len(m.range_sigmas) == 0
               for m in patching.diffusion_model(model).modules() if isinstance(m, ActQuantizer))


def check_pair(fp_model, q_model) -> tuple[str, str]:
    """Refuse pairs that cannot be calibrated together; returns both fingerprints."""
    if fp_model is q_model or fp_model.model is q_model.model:
        raise patching.ModelMismatchError("the full-precision and the quantized input are the same model; connect "
                                          "the model before Quantize Model as fp_model and its output as "
                                          "quantized_model")
    if patching.is_qcorrect_quantized(fp_model):
        raise patching.ModelMismatchError("fp_model is a qcorrect-quantized model; connect the full-precision one")
    for what, get in (("latent channels", patching.latent_channels), ("prediction types", patching.prediction_type)):
        a, b = get(fp_model), get(q_model)
        if a != b:
            raise patching.ModelMismatchError(f"the two models have different {what} ({a} vs {b}): they are not the "
                                              "same model family")
    f_fp, f_q = patching.fingerprint(fp_model), patching.fingerprint(q_model)
    if f_fp == f_q and not q_model.patches:
        raise patching.ModelMismatchError("the full-precision and the quantized model have identical weights; connect "
                                          "a quantized model (Quantize Model, an fp8 or int8 checkpoint)")
    return f_fp, f_q


def quantization_label(q_model) -> str:
    dm = patching.diffusion_model(q_model)
    plan = dm.__dict__.get("qcorrect_quant_plan")
    if plan is not None:
        return plan.preset or f"{plan.weights}/{plan.activations or 'a16'}"
    return patching.foreign_quantization(q_model) or "quantized elsewhere"


class CalibrateErrors(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectCalibrateErrors",
            display_name="Calibrate Errors",
            category=CATEGORY,
            description="Run the full-precision and the quantized model on the same inputs over a sampling schedule "
                        "and record per-σ error statistics for the corrections; saved in models/qcorrect/.",
            inputs=[
                io.Model.Input("fp_model", tooltip="The full-precision model."),
                io.Model.Input("quantized_model", tooltip="Quantize Model's output, or a model quantized elsewhere "
                                                          "(fp8 weight dtype, int8 checkpoint)."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="One batch of the calibration set (e.g. Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the calibration set (batch i uses seed + i); kept fixed so a re-run "
                                     "reproduces the file."),
                io.Combo.Input("sampler", options=list(CALIBRATION_SAMPLERS), default="euler",
                               tooltip="The sampler the statistics are fitted for (they transfer to others)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal"),
                io.Int.Input("steps", default=20, min=1, max=1000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01),
                io.Int.Input("batches", default=4, min=1, max=1024,
                             tooltip="How many latent batches to calibrate on (batch i uses seed + i)."),
                io.Combo.Input("methods", options=[m for m in USER_METHODS if m != "none"], default="auto",
                               tooltip="auto: what the Corrected KSampler's auto needs (TCEC + a cross-fitted "
                                       "end-to-end check)."),
                io.String.Input("filename", default="calibration/stats"),
            ],
            outputs=[Stats.Output(),
                     io.Model.Output(display_name="quantized_model",
                                     tooltip="The quantized model the statistics belong to: the input, or — when its "
                                             "activations are static — a copy with its per-σ ranges calibrated "
                                             "(connect this one to the sampler).")],
        )

    @classmethod
    def execute(cls, fp_model, quantized_model, positive, negative, latent_image, seed, sampler, scheduler, steps,
                cfg, denoise, batches, methods, filename) -> io.NodeOutput:
        if sampler not in CALIBRATION_SAMPLERS:
            raise QuantizationError(f"calibration steps {', '.join(CALIBRATION_SAMPLERS)}; got {sampler!r}")
        path = output_path(STATS_FOLDER, filename)
        f_fp, _ = check_pair(fp_model, quantized_model)
        ranges = needs_static_ranges(quantized_model)
        # static activations are calibrated on a copy: the input MODEL stays as it was
        q_patcher = patching.new_model_patcher(quantized_model, patching.copy_model(quantized_model)) if ranges \
            else quantized_model
        engine, acc = calibration_engine(methods)
        latents, noise = calibration_set(q_patcher, latent_image, seed, batches)
        bs, n = latent_image["samples"].shape[0], noise.shape[0]
        sigmas = comfy.samplers.KSampler(q_patcher, steps=steps, device=q_patcher.load_device, sampler=sampler,
                                         scheduler=scheduler, denoise=denoise).sigmas
        n_steps, chunks = sigmas.shape[-1] - 1, math.ceil(n / bs)
        calls = n_steps * chunks * (3 if engine.latent_method != "none" else 2)
        calls += 3 * n_steps * (chunks + AUTO_FOLDS) if methods == "auto" else 0
        calls += 2 * n_steps * chunks if ranges else 0
        name = "euler" if sampler == "ddim" else sampler
        sample_fn = comfy.samplers.sampler_object(sampler).sampler_function
        config = CalibrationConfig(mode="progressive", sampler=name, acc=acc, batch_size=bs, seed=int(seed))
        report = {}

        def job(q, fp, x_init, sigmas, grid):
            dm = patching.diffusion_model(q_patcher)
            if ranges:  # PCR's progressive calibration, on this model's own trajectory (ALGORITHMS.md §6)
                opts = {"noise_sampler": ancestral_noise(int(seed), tuple(x_init.shape[1:]), x_init.device,
                                                         x_init.dtype)(0, n)} if name == "euler_ancestral" else {}
                report["ranges"] = calibrate_activation_ranges(q, dm, x_init, sigmas, {}, sample_fn=sample_fn,
                                                               trajectory="progressive", batch_size=bs,
                                                               missing="dynamic", sampler_opts=opts, seed=int(seed))
            meta = {"model_fingerprint": f_fp, "quant_fingerprint": patching.fingerprint(q_patcher),
                    "quantization": quantization_label(q_patcher), "prediction": patching.prediction_type(q_patcher),
                    "scheduler": scheduler, "cfg": float(cfg), "denoise": float(denoise)}
            noise_dev = noise.to(x_init)
            if methods == "auto":
                return calibrate_checked(
                    fp, q, noise_dev, sigmas, {}, engine=engine, sample_fn=sample_fn, sampler_name=name, x_init=x_init,
                    folds=AUTO_FOLDS, noise_factory=ancestral_noise(int(seed), tuple(x_init.shape[1:]), x_init.device,
                                                                    x_init.dtype),
                    config=config, grid_sigmas=grid, meta=meta, calibrate_from_x_init=True)
            return calibrate(fp, q, noise_dev, sigmas, {}, engine=engine, config=config, grid_sigmas=grid,
                             meta=meta, x_init=x_init)

        guider = DualModelGuider(q_patcher, fp_model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        run = GuidedRun(job, noise, latents, calls)
        guider.sample(noise[:bs], latents[:bs], run, sigmas, disable_pbar=True, seed=int(seed))
        stats = run.result
        stats.save(path)
        lines = [f"saved models/{shown_path(STATS_FOLDER, path)}", stats_summary(stats)]
        if "ranges" in report:
            r = report["ranges"]
            lines.insert(1, f"static activation ranges calibrated progressively on {r.n_samples} samples, "
                            f"{len(r.sigmas)} σ's, {r.layers} layers" + (f" ({len(r.missing)} never observed: "
                                                                        "dynamic)" if r.missing else ""))
        return io.NodeOutput(stats, q_patcher, ui=ui.PreviewText("\n".join(lines)))


NODES = [CalibrateErrors]
