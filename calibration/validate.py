"""End-to-end check of a calibration, and the "auto" default built on it.

Per-step statistics can look useful and still not help the finished image: on the reference
model the quantized sampler damps most early drift by itself, so the systematic part of the
per-step error mostly cancels before the last step, and subtracting it then *adds* an offset
(``qcorrect bench errors --drift``; docs/BENCHMARKS.md). Only an end-to-end comparison sees that.

:func:`end_to_end_check` samples a set of starting latents three times — full precision, quantized
naive, quantized with the engine — with identical conditioning and ancestral noise, and reports the
latent MSE of both quantized runs against FP and the share of the naive gap the correction closes,
``1 − MSE(corrected)/MSE(naive)``. Run it on calibration samples only (never on evaluation seeds);
the result is stored in ``stats.meta.validation`` and travels with the statistics file.

:func:`auto_config` is the Corrected KSampler's default ("auto"): the preferred correction
(TCEC, the least harmful method on the reference model's measured samplers) when the stored check
shows it lowers the error, otherwise no correction. Choices (ALGORITHMS.md is silent on this):

* "shows" means the one-sided 95% lower bound of the gap closed — a paired bootstrap over the
  check's samples, 2000 resamples, fixed seed — is above ``min_gain`` (default 0). A point estimate
  is not enough: the check runs on the samples the statistics were fitted on, so it is optimistic,
  and on the reference model an in-sample +1.8% point estimate (64 samples, static W4A8) came with
  −8.9% on held-out seeds (docs/BENCHMARKS.md).
* A missing check counts as "not shown to help".

Known limit (measured, docs/BENCHMARKS.md): the rule is still optimistic when per-sample errors are
heavy-tailed and the gap is tiny. On W8A8 euler_ancestral the check gave +84.6% (lower bound
+11.7%) on the 64 calibration samples, and TCEC then gave −19.4% [−65.2, +7.2] on held-out seeds.
Checking on calibration samples the statistics were *not* fitted on (a split) is the next step.
"""

from __future__ import annotations

import dataclasses

import torch

from .collect import slice_extra
from .config import EngineConfig
from .engine import CorrectionEngine
from .errors import CalibrationError

AUTO_PREFERRED = "tcec"
N_BOOT = 2000


def gap_bootstrap(mse_corrected: torch.Tensor, mse_naive: torch.Tensor, n_boot: int = N_BOOT, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """One-sided ``level`` lower and upper bounds of ``1 − mean(corrected)/mean(naive)`` (paired bootstrap)."""
    a, b = mse_corrected.double().reshape(-1), mse_naive.double().reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(a.numel(), (n_boot, a.numel()), generator=gen)
    den = b[idx].mean(1)
    gaps = torch.where(den > 0, 1 - a[idx].mean(1) / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(den))
    lo, hi = torch.quantile(gaps, torch.tensor([1 - level, level], dtype=gaps.dtype)).tolist()
    return lo, hi


@torch.no_grad()
def end_to_end_check(fp_model, q_model, stats, engine_cfg: EngineConfig, sample_fn, x_init: torch.Tensor, sigmas,
                     extra_args: dict | None = None, *, sampler_name: str, noise_factory=None, batch_size: int = 16,
                     seed: int = 0) -> dict:
    """FP, naive and corrected sampling of the same latents; latent MSEs and the gap closed.

    ``x_init`` [N, C, ...] are the starting latents (already scaled for σ_0); ``extra_args`` the
    conditioning (per-sample tensors are sliced per batch); ``noise_factory(start, stop)`` returns a
    fresh ``noise_sampler(σ, σ_next)`` for samples ``start:stop`` — called once per run so the three
    runs see the same draws. Without it, ancestral noise comes from a generator seeded with
    ``seed + start`` (the same for the three runs).
    """
    if x_init is None or x_init.ndim < 3 or x_init.shape[0] == 0:
        raise CalibrationError("the end-to-end check needs at least one starting latent [N ≥ 1, C, H, W]")
    n = x_init.shape[0]
    extra = dict(extra_args or {})
    engine = CorrectionEngine(stats, engine_cfg)

    def noise_for(start, stop, shape):
        if noise_factory is not None:
            return noise_factory(start, stop)
        gen = torch.Generator(device=x_init.device).manual_seed(int(seed) + start)
        return lambda sigma, sigma_next: torch.randn(shape, generator=gen, device=x_init.device, dtype=x_init.dtype)

    def run(model, corrected: bool) -> torch.Tensor:
        out = []
        for start in range(0, n, max(1, int(batch_size))):
            sl = slice(start, min(start + batch_size, n))
            x = x_init[sl]
            ex = slice_extra(extra, sl, n)
            ns = noise_for(sl.start, sl.stop, x.shape)
            if corrected:
                out.append(engine.sample(sample_fn, model, x, sigmas, ex, None, True, sampler_name=sampler_name,
                                         noise_sampler=ns))
            else:
                out.append(sample_fn(model, x, sigmas, ex, None, True, noise_sampler=ns))
        return torch.cat(out)

    fp = run(fp_model, False)
    naive = run(q_model, False)
    corr = run(q_model, True)
    per_naive = (naive - fp).double().pow(2).reshape(n, -1).mean(1)
    per_corr = (corr - fp).double().pow(2).reshape(n, -1).mean(1)
    mse_naive, mse_corr = float(per_naive.mean()), float(per_corr.mean())
    if not (torch.isfinite(torch.tensor([mse_naive, mse_corr])).all()):
        raise CalibrationError("the end-to-end check produced NaN/inf latents; check the model and the statistics")
    gap = 1.0 - mse_corr / mse_naive if mse_naive > 0 else 0.0
    low, high = gap_bootstrap(per_corr, per_naive, seed=seed)
    return {"methods": list(engine_cfg.methods()), "sampler": sampler_name, "n": int(n),
            "naive_mse": mse_naive, "corrected_mse": mse_corr, "gap_closed": gap,
            "gap_closed_low": low, "gap_closed_high": high}


def with_validation(stats, check: dict):
    """A copy of ``stats`` whose metadata carries ``check`` (saved with the file)."""
    out = stats.head(stats.rows)
    out.meta = dataclasses.replace(stats.meta, validation=dict(check))
    return out


def auto_config(stats, preferred: str = AUTO_PREFERRED, min_gain: float = 0.0) -> tuple[EngineConfig, str]:
    """The "auto" engine configuration and a one-line reason (for the node's log and the demo)."""
    want = EngineConfig.preset(preferred)
    check = stats.meta.validation or {}
    if not check:
        return EngineConfig(), (f"auto: no end-to-end check stored with these statistics; {preferred} not shown to "
                                "help, sampling uncorrected")
    if sorted(check.get("methods", [])) != sorted(want.methods()):
        return EngineConfig(), (f"auto: the stored check is for {check.get('methods')}, not {preferred}; sampling "
                                "uncorrected")
    gain = float(check.get("gap_closed", 0.0))
    low = float(check.get("gap_closed_low", float("-inf")))
    told = (f"{preferred} closed {100 * gain:+.1f}% of the naive gap (95% lower bound {100 * low:+.1f}%) on "
            f"{check.get('n')} calibration samples")
    if low > min_gain:
        return want, f"auto: {told}; correcting"
    return EngineConfig(), f"auto: {told}: no gain shown; sampling uncorrected"
