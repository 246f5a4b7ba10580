"""The correction engine (plain PyTorch): per-σ statistics, calibration, and corrected sampling.

Typical use::

    from qcorrect.calibration import calibrate, CalibrationConfig, CorrectionEngine, EngineConfig
    cfg = EngineConfig.preset("ptqd_stepbaq")
    stats = calibrate(fp_denoiser, q_denoiser, noise, sigmas, {"cond": labels, "cfg_scale": 3.0},
                      engine=cfg, config=CalibrationConfig(sampler="euler"), grid_sigmas=grid,
                      meta={"model_fingerprint": model_fingerprint(unet)})
    stats.save("w4a8.stats.safetensors")
    engine = CorrectionEngine(CorrectionStats.load("w4a8.stats.safetensors"), cfg)
    x = engine.sample(sample_euler, q_denoiser, noise * sigmas[0], sigmas, extra_args)
"""

from .collect import COLLECTOR_SAMPLERS, CalibrationConfig, calibrate
from .config import SAMPLER_KINDS, EngineConfig, sampler_kind
from .engine import CorrectedDenoiser, CorrectionEngine, StepCorrector
from .errors import CalibrationError, IncompatibleStatsError, StatsError, StatsFileError
from .plan import RunPlan, build_plan
from .stats import CorrectionStats, StatsMeta, model_fingerprint

__all__ = [
    "COLLECTOR_SAMPLERS", "SAMPLER_KINDS", "CalibrationConfig", "CalibrationError", "CorrectedDenoiser",
    "CorrectionEngine", "CorrectionStats", "EngineConfig", "IncompatibleStatsError", "RunPlan", "StatsError",
    "StatsFileError", "StatsMeta", "StepCorrector", "build_plan", "calibrate", "model_fingerprint", "sampler_kind",
]
