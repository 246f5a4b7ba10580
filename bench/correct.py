"""Correction methods as the benchmarks name them, calibration on held-out seeds, corrected samplers.

The methods themselves (engine configuration + ACC switch) are ``calibration/methods.py``'s table,
shared with the ComfyUI nodes.
"""

from __future__ import annotations

import time

import torch

from ..calibration import CalibrationConfig, CorrectionEngine, CorrectionStats, EngineConfig, calibrate, model_fingerprint
from ..calibration.collect import COLLECTOR_SAMPLERS
from ..calibration.methods import METHODS, calibration_engine, sampling_engine
from ..calibration.validate import auto_config, calibrate_checked
from ..reference.samplers import SAMPLERS
from ..reference.schedules import get_sigmas
from .pipeline import PerSampleNoise, RunConfig, initial_noise, labels_for, start_latent

ALONE = ["ptqd", "tac_ner", "tac", "tcec", "stepbaq"]
COMBOS = ["ptqd_ibc", "ptqd_stepbaq", "tac_ner_stepbaq", "tcec_stepbaq"]
ABLATION = ["none", "stepbaq_tia", "stepbaq_tia_la", "stepbaq_tia_la_ssa", "stepbaq"]
BEST = "ptqd_stepbaq"
#: what the demo (and the Corrected KSampler) uses: "auto" = TCEC guarded by a cross-fitted
#: end-to-end check on the calibration seeds. On the reference model's W4A8 no method closes the gap
#: (docs/BENCHMARKS.md); TCEC is the least harmful, and the guard makes the default fall back to
#: uncorrected sampling where the check shows no gain on calibration samples held out from the fit.
DEFAULT_METHOD = "auto"
#: folds of auto's cross-fitted check (calibration/validate.py)
AUTO_FOLDS = 4


def expand_methods(text: str, samplers: list[str]) -> list[str]:
    """``all`` = naive + every method alone + combinations (+ VSC for ancestral samplers) + the
    default ("auto");
    ``ablation`` = StepbaQ's cumulative ablation; otherwise a comma-separated list."""
    if text == "all":
        vsc = ["ptqd_vsc"] if any(s in ("euler_ancestral", "ddpm") for s in samplers) else []
        return ["none", *ALONE, *vsc, *COMBOS, "auto"]
    if text == "ablation":
        return list(ABLATION)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}, all, ablation")
    return names


def engine_config(method: str, stats: CorrectionStats | None = None) -> EngineConfig:
    return sampling_engine(method, stats)[0]


def calibrate_method(ref, qden, method: str, rc: RunConfig, seeds: list[int], classes: list[int],
                     quantization: str, mode: str = "progressive") -> tuple[CorrectionStats, float]:
    """Calibrate ``method`` for the quantized denoiser on the given (held-out) seeds; returns (stats, seconds)."""
    if rc.sampler not in COLLECTOR_SAMPLERS and rc.sampler != "ddim":
        raise SystemExit(f"calibration steps {COLLECTOR_SAMPLERS} only; got sampler {rc.sampler!r}")
    engine, acc = calibration_engine(method)
    sigmas = get_sigmas(rc.scheduler, ref.denoiser.sigmas, rc.steps)
    labels = labels_for(seeds, classes)
    noise = initial_noise(seeds, (4, 14, 14))
    calib_cfg = CalibrationConfig(mode=mode, sampler="euler" if rc.sampler == "ddim" else rc.sampler, acc=acc,
                                  batch_size=rc.batch_size)
    meta = {"model_fingerprint": model_fingerprint(ref.denoiser.unet), "quantization": quantization,
            "scheduler": rc.scheduler}
    cond = {"cond": labels, "cfg_scale": rc.cfg}
    t0 = time.perf_counter()
    if method == "auto":  # the guard: calibrate in folds, sample each fold FP / naive / corrected-by-the-others
        shape = tuple(noise.shape[1:])
        stats = calibrate_checked(
            ref.denoiser, qden, noise, sigmas, cond, engine=engine, sample_fn=SAMPLERS[rc.sampler],
            sampler_name=rc.sampler, x_init=start_latent(noise, sigmas, ref.denoiser.sigmas), folds=AUTO_FOLDS,
            noise_factory=lambda a, b: PerSampleNoise(seeds[a:b], shape), config=calib_cfg,
            grid_sigmas=ref.denoiser.sigmas, meta=meta)
    else:
        stats = calibrate(ref.denoiser, qden, noise, sigmas, cond, engine=engine, config=calib_cfg,
                          grid_sigmas=ref.denoiser.sigmas, meta=meta)
    return stats, time.perf_counter() - t0


def auto_reason(stats: CorrectionStats) -> str:
    return auto_config(stats)[1]


def corrected_sampler(stats: CorrectionStats, method: str, sampler: str):
    engine = CorrectionEngine(stats, engine_config(method, stats))
    return engine.wrap(SAMPLERS[sampler], sampler_name=sampler)


def check_disjoint(calib_seeds: list[int], eval_seeds: list[int]) -> None:
    overlap = sorted(set(calib_seeds) & set(eval_seeds))
    if overlap:
        raise SystemExit(f"calibration and evaluation seeds overlap ({overlap[:5]}...): never tune on evaluation seeds")


@torch.no_grad()
def plain_cost(ref, qden, rc: RunConfig, seeds, classes, sample_latents) -> float:
    """Seconds to sample the calibration set with the FP and the quantized model (plain sampler)."""
    labels = labels_for(seeds, classes)
    t0 = time.perf_counter()
    sample_latents(ref.denoiser, rc, seeds, labels, ref.denoiser.sigmas)
    sample_latents(qden, rc, seeds, labels, ref.denoiser.sigmas)
    return time.perf_counter() - t0
