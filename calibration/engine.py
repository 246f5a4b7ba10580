"""The correction engine: wraps any k-diffusion-style sampler by wrapping its model callable.

``CorrectionEngine(stats, EngineConfig(...)).sample(sample_fn, model, x, sigmas, ...)`` runs
``sample_fn(model', x, sigmas, extra_args, callback, disable, **opts)`` where ``model'`` applies,
at every call and in the order of ALGORITHMS.md §8.3:

1. latent-mean correction ``x_in = x − μ`` (StepbaQ LA, §3c.1) or ``x − b`` (TAC IBC, §4c.1);
2. the σ given to the model: σ_τ (StepbaQ TIA, §3c.2) or the sampler's σ;
3. the model, ``ε̂ = (x_in − D)/σ_call``;
4. the output correction ``ε̃ = scale·ε̂ + shift`` (PTQD CNC+BC §2c.1, TAC NER §4c.3, TCEC §5d;
   TCEC's optional window uses the cached previous ε̂), interpolated in log σ;
5. StepbaQ SSA and PTQD VSC by returning the *Euler-equivalent denoised* (stepbaq.py): the value
   that makes the sampler's own first-order update land on ``x_in + (σ_end − σ_start)·ε̃``;
   this also carries the latent shift of step 1 into the trajectory. VSC additionally scales the
   sampler's ancestral noise by σ_up'/σ_up through a wrapped ``noise_sampler`` (§2c.2: the
   reduced σ_up' for the noise and σ_down' for the drift; exact for Euler-ancestral).

What each sampler kind gets (config.SAMPLER_KINDS):

* ``first_order`` (euler, ddim) and ``ancestral`` (euler_ancestral): everything, exactly; the
  n-th model call is step n (counted on the host: no synchronisation).
* ``multistep`` (dpmpp_2m, lms, …): one call per step, so steps 1–2 apply as above and the
  Euler-equivalent denoised is returned at schedule points. It is exact for the first step
  (first-order) and for dpmpp_2m's last step; elsewhere the sampler's extrapolation
  ``(1 + 1/2r)·D_n − 1/(2r)·D_{n−1}`` also extrapolates the SSA/LA adjustments of two steps,
  which is a documented approximation (no published StepbaQ rule exists for multistep samplers).
* ``other`` (heun, dpm_2, ddpm, SDE samplers): extra evaluations at intermediate σ's cannot be
  told apart from step starts without host syncs, so only the σ-interpolated output correction
  runs, at every evaluation; latent corrections, TIA, SSA and VSC are switched off with a warning.

A step-indexed correction is applied only where the σ the sampler passes matches the schedule's
σ_n (a device-side mask), so a miscounted call degrades to "uncorrected", never to a wrong step.
"""

from __future__ import annotations

import warnings

import torch

from .config import EngineConfig, sampler_kind
from .errors import IncompatibleStatsError
from .plan import RunPlan, build_plan
from .ptqd import vsc_ancestral_step
from .stats import PREDICTIONS
from .stepbaq import euler_equivalent_denoised


def _interp(log_keys: torch.Tensor, table: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` at ``log_s`` [B], linear in log σ, clamped; exact at calibrated σ's."""
    r = log_keys.numel()
    if r == 1:
        return table[:1].expand(log_s.numel(), *table.shape[1:])
    idx = torch.searchsorted(log_keys, log_s.contiguous()).clamp(1, r - 1)
    w = ((log_s - log_keys[idx - 1]) / (log_keys[idx] - log_keys[idx - 1])).clamp(0, 1)
    return torch.lerp(table[idx - 1], table[idx], w.reshape(-1, *([1] * (table.ndim - 1))))


class StepCorrector:
    """The per-call correction math, shared by the engine and the calibration collector."""

    def __init__(self, plan: RunPlan, cfg: EngineConfig):
        self.plan, self.cfg = plan, cfg
        self.step_ok = cfg.uses_steps and plan.kind in ("first_order", "ancestral", "multistep")
        self.reset()

    def reset(self) -> None:
        self.prev_eps = None
        self.noise_scale = None

    def prepare(self, x: torch.Tensor, sigma, n: int | None):
        """Steps 1–2 of §8.3; returns a context for :meth:`finish`."""
        p = self.plan
        if x.ndim < 2 or x.shape[1] != p.channels:
            raise IncompatibleStatsError(f"latent of shape {tuple(x.shape)} has {x.shape[1] if x.ndim > 1 else '?'} "
                                         f"channels but the statistics have {p.channels}; use statistics calibrated "
                                         "for this model")
        s = torch.as_tensor(sigma, device=x.device)
        if s.numel() not in (1, x.shape[0]):
            raise ValueError(f"σ of shape {tuple(s.shape)} does not match a batch of {x.shape[0]} latents")
        s = s.reshape(-1).expand(x.shape[0]).float()
        ctx = {"x_in": x, "s": s, "call": s, "point": None, "n": n}
        if p.identity:  # neutral tables: leave the sampler's values exactly as they are
            return ctx
        if self.step_ok and n is not None and n < p.sched.numel() - 1:
            point = torch.isclose(s, p.sched[n].expand_as(s), rtol=1e-4, atol=0.0)
            ctx["point"] = point
            if p.lat_shift is not None:
                shift = torch.where(point.reshape(-1, 1), p.lat_shift[n].unsqueeze(0), torch.zeros_like(p.lat_shift[n]))
                ctx["x_in"] = x - shift.reshape(*shift.shape, *([1] * (x.ndim - 2))).to(x.dtype)
            if self.cfg.stepbaq_tia and p.sigma_tau is not None:
                ctx["call"] = torch.where(point, p.sigma_tau[n].expand_as(s), s)
        return ctx

    def model_sigma(self, ctx, sigma):
        """The σ to hand to the model, in the caller's dtype and shape."""
        if ctx["call"] is ctx["s"]:
            return sigma
        return ctx["call"].to(torch.as_tensor(sigma).dtype)

    def finish(self, x: torch.Tensor, denoised: torch.Tensor, ctx) -> torch.Tensor:
        """Steps 3–6 of §8.3: the denoised value to return to the sampler."""
        p, cfg = self.plan, self.cfg
        point = ctx["point"]
        if p.identity or (p.out_scale is None and point is None):
            return denoised
        x_in, s, call = ctx["x_in"], ctx["s"], ctx["call"]
        bc = lambda t: t.reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731
        per_c = lambda t: t.reshape(*t.shape, *([1] * (x.ndim - 2)))  # noqa: E731
        eps_hat = (x_in - denoised) / bc(call).to(x.dtype)
        eps = eps_hat
        log_s = s.clamp_min(1e-12).log()
        if p.out_scale is not None:
            scale = per_c(_interp(p.log_keys, p.out_scale, log_s)).to(x.dtype)
            shift = per_c(_interp(p.log_keys, p.out_shift, log_s)).to(x.dtype)
            if cfg.tcec_window and self.prev_eps is not None and self.prev_eps.shape == eps_hat.shape:
                gain = per_c(_interp(p.log_keys, p.tcec_gain, log_s)).to(x.dtype)
                eps = eps_hat - gain * ((1 - cfg.tcec_lambda1) * eps_hat + cfg.tcec_lambda1 * self.prev_eps)
            else:
                eps = scale * eps_hat + shift
            if cfg.out_of_range == "identity":
                inside = (log_s >= p.log_keys[0] - 1e-3) & (log_s <= p.log_keys[-1] + 1e-3)
                eps = torch.where(bc(inside), eps, eps_hat)
            if cfg.tcec_window:
                self.prev_eps = eps_hat
        plain = x - bc(s).to(x.dtype) * eps
        if point is None:
            return plain
        n = ctx["n"]
        sn, s_next = p.sched[n], p.sched[n + 1]
        end = end_sampler = s_next
        if p.kind == "ancestral":
            resid = torch.zeros_like(sn) if p.resid_std is None else _interp(p.log_keys, p.resid_std, sn.log().reshape(1))[0]
            down, up, down_v, up_v = vsc_ancestral_step(sn, s_next, p.eta, resid)
            end_sampler = down
            if cfg.ptqd_vsc:
                end = down_v
                scale = torch.where(up > 0, up_v / torch.where(up > 0, up, torch.ones_like(up)), torch.ones_like(up))
                self.noise_scale = bc(torch.where(point, scale, torch.ones_like(s))).to(x.dtype)
            else:
                end = down
        start = p.sigma_tau[n] if (cfg.stepbaq_ssa and p.sigma_tau is not None) else sn
        out = euler_equivalent_denoised(x, x_in, eps, sn, start, end, end_sampler)
        return torch.where(bc(point), out, plain)


class CorrectedDenoiser:
    """The wrapped model callable; transparent to attribute access (``.inner_model`` etc.)."""

    def __init__(self, model, corrector: StepCorrector, count_steps: bool):
        self.inner = model
        self.corrector = corrector
        self.count_steps = count_steps
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __call__(self, x, sigma, **extra):
        n = self.calls if self.count_steps else None
        self.calls += 1
        c = self.corrector
        ctx = c.prepare(x, sigma, n)
        denoised = self.inner(ctx["x_in"], c.model_sigma(ctx, sigma), **extra)
        return c.finish(x, denoised, ctx)


class CorrectionEngine:
    """Calibrated statistics + switches → corrected sampling with any k-diffusion sampler."""

    def __init__(self, stats, config: EngineConfig | None = None, *, fingerprint: str | None = None,
                 prediction: str | None = None):
        stats.validate()
        stats.check_compatible(fingerprint=fingerprint, prediction=prediction)
        if stats.meta.prediction not in PREDICTIONS:
            raise IncompatibleStatsError(f"prediction type {stats.meta.prediction!r} is not supported by the engine "
                                         f"yet (supported: {PREDICTIONS})")
        self.stats = stats
        self.config = config or EngineConfig()
        self.last_plan = None

    def wrap(self, sample_fn, sampler_name: str | None = None):
        """A sampler function with ``sample_fn``'s signature that samples with corrections."""
        def corrected(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
            return self.sample(sample_fn, model, x, sigmas, extra_args, callback, disable,
                               sampler_name=sampler_name, **opts)
        corrected.__name__ = getattr(sample_fn, "__name__", "sample")
        return corrected

    def sample(self, sample_fn, model, x, sigmas, extra_args=None, callback=None, disable=None, *,
               sampler_name: str | None = None, **opts):
        cfg = self.config
        if not cfg.any_enabled:  # bit-identical to the plain sampler
            return sample_fn(model, x, sigmas, extra_args, callback, disable, **opts)
        name = sampler_name or getattr(sample_fn, "__name__", "unknown")
        kind = sampler_kind(name)
        sigmas = torch.as_tensor(sigmas).clone()  # samplers may write into σ tensors (uni_pc)
        eta = float(opts.get("eta", 1.0))
        plan = build_plan(self.stats, cfg, sigmas, sampler=name, eta=eta, device=x.device)
        self.last_plan = plan
        if plan.identity:  # neutral statistics: exactly the plain sampler
            return sample_fn(model, x, sigmas, extra_args, callback, disable, **opts)
        if cfg.uses_steps and kind == "other":
            warnings.warn(f"sampler {name!r} evaluates intermediate σ's: StepbaQ, IBC and VSC are off for it; only "
                          "the output correction is applied", stacklevel=2)
        if cfg.ptqd_vsc and kind != "ancestral":
            warnings.warn(f"PTQD VSC needs an ancestral sampler; ignored for {name!r}", stacklevel=2)
        run_cfg = (extra_args or {}).get("cfg_scale")
        if isinstance(run_cfg, (int, float)) and abs(float(run_cfg) - float(self.stats.meta.cfg)) > 1e-6:
            warnings.warn(f"statistics were calibrated at cfg {self.stats.meta.cfg} but sampling uses cfg {run_cfg}; "
                          "the post-CFG error differs — calibrate at the cfg you sample with", stacklevel=2)
        corrector = StepCorrector(plan, cfg)
        denoiser = CorrectedDenoiser(model, corrector, count_steps=corrector.step_ok)
        if cfg.ptqd_vsc and kind == "ancestral":
            opts = dict(opts)
            base = opts.pop("noise_sampler", None) or _default_noise(x, opts, extra_args)

            def noise_sampler(sigma, sigma_next):
                z = base(sigma, sigma_next)
                return z if corrector.noise_scale is None else z * corrector.noise_scale
            opts["noise_sampler"] = noise_sampler
        return sample_fn(denoiser, x, sigmas, extra_args, callback, disable, **opts)


def _default_noise(x, opts, extra_args):
    """The sampler's default noise when VSC must wrap it: ComfyUI's convention (seed + 1 on CPU)."""
    generator = opts.pop("generator", None)
    seed = opts.pop("seed", None)
    if seed is None and extra_args:
        seed = extra_args.get("seed")
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed) + (1 if x.device.type == "cpu" else 0))
    return lambda sigma, sigma_next: torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
