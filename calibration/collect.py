"""The calibration collector: FP and quantized denoisers in lock-step over one schedule.

:func:`calibrate` starts both trajectories from the same noise and conditioning (and, for
Euler-ancestral, the same per-step noise draws), processes the whole calibration set step by step
in micro-batches, and streams the sums of ``stats.py``: only the current latents of the set (and
dpmpp_2m's previous denoised) are held, never whole trajectories.

Modes (ALGORITHMS.md §2b, §3b, §4b, §8.2):

* ``teacher_forced`` — ε statistics with both models evaluated on the FP trajectory (PTQD).
* ``progressive`` — ε statistics with both models evaluated on the *quantized* trajectory, on
  which the corrections of earlier steps are already active (TAC's timestep-aware fitting, PCR).

In both modes, if a latent correction is configured (StepbaQ or TAC IBC), the quantized
trajectory runs with the engine's own correction math (engine.StepCorrector) and the latent
error δ = x̂ − x at each σ_n is accumulated. Order of §8.2: at step n the output-correction row n
is completed over the whole set *before* it is applied to the quantized update of step n, and
StepbaQ's stepback for σ_{n+1} is decided on the error left with the output correction active.
StepbaQ follows Algorithm 1 with ACC: trajectories are synchronised only after a stepback (LA
and TIA then apply to both, as in the paper); with ``acc=False`` the quantized latent is reset to
the FP one after every step without a stepback (the paper's "ACC off" ablation).

Rows are keyed by the schedule's σ_n, the σ the sampler passes and the engine looks up. When
StepbaQ's TIA is on, the models of step n are called at σ_τ,n, so that row's ε statistics are
measured at σ_τ,n: exactly the condition under which the engine applies them.

Cost: progressive mode evaluates Q(x̂) and FP(x̂) (plus FP(x) for the FP trajectory when a latent
correction is calibrated, shared with FP(x̂) while both trajectories coincide); teacher-forced mode
evaluates FP(x) and Q(x) (plus Q(x̂) with a latent correction): at most 1.5× sampling the set with
both models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import EngineConfig, canonical_sampler
from .engine import StepCorrector
from .errors import CalibrationError
from .plan import build_plan
from .ptqd import vsc_ancestral_step
from .stats import CorrectionStats, StatsMeta
from .stepbaq import stepback_decisions

COLLECTOR_SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m")


@dataclass
class CalibrationConfig:
    """How to calibrate. ``sampler`` is stepped by the collector itself (one of
    ``COLLECTOR_SAMPLERS``; ``ddim`` = euler); ``seed`` seeds the shared ancestral noise."""

    mode: str = "progressive"
    sampler: str = "euler"
    eta: float = 1.0
    batch_size: int = 16
    acc: bool = True
    tac_mask_kappa: float = 0.5
    rho_min: float = 0.0
    seed: int = 0


def slice_extra(extra: dict, sl: slice, n: int) -> dict:
    out = {}
    for k, v in extra.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            if v.shape[0] == n:
                v = v[sl]
            elif v.shape[0] != 1:
                raise CalibrationError(f"extra_args[{k!r}] has batch {v.shape[0]} but the calibration set has "
                                       f"{n} samples; give one entry per sample (or one shared entry)")
        out[k] = v
    return out


class _Trajectory:
    """Current latents of one trajectory for the whole set, plus dpmpp_2m's history."""

    def __init__(self, x):
        self.x = x
        self.old = None  # previous returned denoised (dpmpp_2m)

    def copy_from(self, other: "_Trajectory"):
        self.x = other.x.clone()
        self.old = None if other.old is None else other.old.clone()


def _step(sampler, x, d_ret, sched, n, eta, z, old):
    """One sampler update from σ_n to σ_{n+1} given the returned denoised (k-diffusion equations)."""
    s, s_next = sched[n], sched[n + 1]
    if sampler == "euler":
        return x + (s_next - s) * (x - d_ret) / s
    if sampler == "euler_ancestral":
        down, up, _, _ = vsc_ancestral_step(s, s_next, eta, torch.zeros_like(s))
        if float(down) == 0.0:
            return d_ret
        return x + (down - s) * (x - d_ret) / s + z * up
    ratio = s_next / s  # dpmpp_2m
    if old is None or float(s_next) == 0.0:
        return ratio * x - (ratio - 1) * d_ret
    h = s.log() - s_next.log()
    r = (sched[n - 1].log() - s.log()) / h
    return ratio * x - (ratio - 1) * ((1 + 1 / (2 * r)) * d_ret - (1 / (2 * r)) * old)


def _eps(x_in, denoised, sigma_call):
    return (x_in - denoised) / sigma_call.reshape(-1, *([1] * (x_in.ndim - 1)))


@torch.no_grad()
def calibrate(fp_model, q_model, noise: torch.Tensor, sigmas, extra_args: dict | None = None, *,
              engine: EngineConfig | None = None, config: CalibrationConfig | None = None, grid_sigmas=None,
              meta: dict | None = None, progress=None, x_init: torch.Tensor | None = None) -> CorrectionStats:
    """Calibrate the corrections of ``engine`` for ``q_model`` against ``fp_model``.

    ``noise`` [N, C, ...] is the standard-normal initial noise of the N calibration samples
    (x_T = σ_0·noise); ``sigmas`` the schedule (N_steps + 1 values, last 0); ``extra_args`` the
    conditioning (tensors with first dimension N are split per sample, others shared);
    ``grid_sigmas`` the model's training σ grid (StepbaQ's "τ > t" test); ``meta`` extra
    :class:`StatsMeta` fields (``model_fingerprint``, ``quantization``, ``scheduler``, ``cfg``…);
    ``progress(step, total)`` is called after every step. ``x_init`` [N, C, ...] is the latent both
    trajectories start from (default ``σ_0·noise``); ComfyUI starts from ``latent + noise·√(1+σ_0²)``
    at full denoise and ``latent + σ_0·noise`` below it, which the nodes pass here.
    """
    engine = engine or EngineConfig.preset("ptqd_stepbaq")
    config = config or CalibrationConfig()
    sampler = canonical_sampler(config.sampler)
    if sampler not in COLLECTOR_SAMPLERS:
        raise CalibrationError(f"the collector steps {COLLECTOR_SAMPLERS} (and ddim); got {config.sampler!r}")
    if config.mode not in ("progressive", "teacher_forced"):
        raise CalibrationError("mode must be 'progressive' or 'teacher_forced'")
    if noise is None or noise.ndim < 3 or noise.shape[0] == 0:
        raise CalibrationError("the calibration set is empty: give at least one noise sample [N ≥ 1, C, H, W]")
    sched_h = torch.as_tensor(sigmas).detach().double().cpu().reshape(-1)
    if sched_h.numel() < 2:
        raise CalibrationError("the schedule needs at least two σ's (one step)")
    extra = dict(extra_args or {})
    n_set, channels, steps = noise.shape[0], noise.shape[1], sched_h.numel() - 1
    sched = sched_h.to(device=noise.device, dtype=noise.dtype)
    bs = max(1, int(config.batch_size))
    chunks = [slice(i, min(i + bs, n_set)) for i in range(0, n_set, bs)]
    for sl in chunks[:1]:
        slice_extra(extra, sl, n_set)  # fail early on batch mismatch

    q_cfg = dataclasses.replace(engine, ptqd_vsc=False, tcec_window=False)
    fp_cfg = EngineConfig(stepbaq_la=engine.stepbaq_la, stepbaq_tia=engine.stepbaq_tia, stepbaq_ssa=engine.stepbaq_ssa)
    latent = engine.latent_method
    info = dict(meta or {})
    if isinstance(extra.get("cfg_scale", 1.0), (int, float)):
        info.setdefault("cfg", float(extra.get("cfg_scale", 1.0)))
    smeta = StatsMeta(**{**info, "sampler": sampler, "steps": steps, "n_samples": n_set, "methods": engine.methods(),
                         "mode": config.mode, "output_method": engine.output_method, "latent_method": latent,
                         "eta": float(config.eta), "acc": bool(config.acc), "tac_mask_kappa": float(config.tac_mask_kappa),
                         "rho_min": float(config.rho_min)})
    stats = CorrectionStats.empty(sched_h, channels, smeta, grid_sigmas)

    need_q = config.mode == "progressive" or latent != "none"
    need_fp = config.mode == "teacher_forced" or latent != "none"
    x0 = noise * sched[0] if x_init is None else x_init.to(device=noise.device, dtype=noise.dtype)
    if x0.shape != noise.shape:
        raise CalibrationError(f"x_init has shape {tuple(x0.shape)} but the noise has {tuple(noise.shape)}")
    q = _Trajectory(x0.clone()) if need_q else None
    fp = _Trajectory(x0.clone()) if need_fp else None
    synced = True
    gen = torch.Generator(device=noise.device).manual_seed(int(config.seed))

    for n in range(steps):
        plan_args = dict(sampler=sampler, eta=config.eta, device=noise.device, exact=True, warn=False)
        pre_q = StepCorrector(build_plan(stats.head(n + 1), q_cfg, sched_h, **plan_args), q_cfg)
        pre_f = StepCorrector(build_plan(stats.head(n + 1), fp_cfg, sched_h, **plan_args), fp_cfg)
        d_q = torch.empty_like(noise) if need_q else None
        d_f = torch.empty_like(noise) if need_fp else None
        for sl in chunks:
            ex = slice_extra(extra, sl, n_set)
            sig = sched[n].expand(sl.stop - sl.start)
            same = ctx_q = None
            if need_q:
                ctx_q = pre_q.prepare(q.x[sl], sig, n)
                call = pre_q.model_sigma(ctx_q, sig)
                d_q[sl] = _finite(q_model(ctx_q["x_in"], call, **ex), "quantized", n)
                if config.mode == "progressive":
                    same = _finite(fp_model(ctx_q["x_in"], call, **ex), "full-precision", n)
                    stats.add_eps(n, _eps(ctx_q["x_in"], same, ctx_q["call"]), _eps(ctx_q["x_in"], d_q[sl], ctx_q["call"]))
            if need_fp:
                ctx = pre_f.prepare(fp.x[sl], sig, n)
                call = pre_f.model_sigma(ctx, sig)
                if (same is not None and synced and torch.equal(ctx["x_in"], ctx_q["x_in"])
                        and torch.equal(ctx["call"], ctx_q["call"])):
                    d_f[sl] = same  # identical input: reuse the FP evaluation
                else:
                    d_f[sl] = _finite(fp_model(ctx["x_in"], call, **ex), "full-precision", n)
                if config.mode == "teacher_forced":
                    tf = _finite(q_model(ctx["x_in"], call, **ex), "quantized", n)
                    stats.add_eps(n, _eps(ctx["x_in"], d_f[sl], ctx["call"]), _eps(ctx["x_in"], tf, ctx["call"]))
        # row n is complete: apply the corrections of step n and advance both trajectories
        post_q = StepCorrector(build_plan(stats.head(n + 1), q_cfg, sched_h, **plan_args), q_cfg)
        z = None
        if sampler == "euler_ancestral":
            z = torch.randn(noise.shape, generator=gen, device=noise.device, dtype=noise.dtype)
        for traj, pre, post, dd in ((q, pre_q, post_q, d_q), (fp, pre_f, pre_f, d_f)):
            if traj is None:
                continue
            new_x, new_old = torch.empty_like(traj.x), torch.empty_like(traj.x)
            for sl in chunks:
                sig = sched[n].expand(sl.stop - sl.start)
                ctx = pre.prepare(traj.x[sl], sig, n)
                d_ret = post.finish(traj.x[sl], dd[sl], ctx)
                old = None if traj.old is None else traj.old[sl]
                new_x[sl] = _step(sampler, traj.x[sl], d_ret, sched, n, config.eta, None if z is None else z[sl], old)
                new_old[sl] = d_ret
            traj.x, traj.old = new_x, new_old
        synced = False
        if latent != "none" and float(sched_h[n + 1]) > 0:
            for sl in chunks:
                stats.add_latent(n + 1, q.x[sl] - fp.x[sl])
            if latent == "stepbaq":
                flag = bool(stepback_decisions(stats.head(n + 2))[1][n + 1])
                if flag:
                    fp.copy_from(q)
                    synced = True
                elif not config.acc:
                    q.copy_from(fp)
                    synced = True
        if progress is not None:
            progress(n + 1, steps)
    return stats


def _finite(t: torch.Tensor, which: str, n: int) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise CalibrationError(f"the {which} model returned NaN/inf at step {n}; check the model (and its "
                               "quantization) before calibrating")
    return t
