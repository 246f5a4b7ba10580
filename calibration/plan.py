"""A run plan: statistics turned into device tensors for one sampling run (ALGORITHMS.md §8.3–8.4).

Two kinds of tables:

* **ε-space tables**, one row per calibrated σ (ascending log σ keys): the output-affine map
  ``ε̃ = scale·ε̂ + shift`` (PTQD CNC+BC, TAC NER or TCEC), the TCEC gain for its window, and
  PTQD's residual std for VSC. They are schedule-independent (§0.3) and are interpolated linearly
  in log σ at every model call, so any σ a sampler evaluates (Heun's extra σ's, another step
  count, another scheduler) gets a value.
* **step tables**, one row per step of *this run's* schedule: StepbaQ's σ_τ and the latent shift
  (StepbaQ μ or TAC IBC b). They depend on step sizes and on the ACC path, so they are taken from
  the calibration as-is when the run repeats the calibrated schedule, sampler and methods, and
  otherwise re-derived analytically from the ε-space residuals (§8.4) with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .config import EngineConfig, canonical_sampler, sampler_kind
from .moments import residual_after_affine
from .ptqd import ptqd_affine, ptqd_params
from .stepbaq import analytic_input_bias, analytic_stepbacks, stepback_decisions
from .tac import input_bias, ner_gain
from .tcec import tcec_gain


@dataclass
class RunPlan:
    log_keys: torch.Tensor            # [R] ascending log σ of calibrated rows
    out_scale: torch.Tensor | None    # [R, C]
    out_shift: torch.Tensor | None    # [R, C]
    tcec_gain: torch.Tensor | None    # [R, C] (window only)
    resid_std: torch.Tensor | None    # [R] (VSC only)
    sched: torch.Tensor               # [N+1] this run's σ's
    sigma_tau: torch.Tensor | None    # [N]
    lat_shift: torch.Tensor | None    # [N, C]
    kind: str
    eta: float
    channels: int
    sigma_range: tuple
    transferred: bool
    identity: bool = False            # every correction of this run is exactly the identity


def output_affine(stats, cfg: EngineConfig):
    """Per-row ε̃ = scale·ε̂ + shift of the configured output correction (float64, [R, C] each)."""
    shape = (stats.rows, stats.channels)
    one, zero = torch.ones(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    if cfg.ptqd_cnc or cfg.ptqd_bc:
        return ptqd_affine(ptqd_params(stats, cnc=cfg.ptqd_cnc), bc=cfg.ptqd_bc)
    if cfg.tac_ner:
        return ner_gain(stats, cfg.tac_lambda1, cfg.tac_lambda2), zero
    if cfg.tcec:
        return one - tcec_gain(stats, cfg.tcec_ridge), zero
    return one, zero


def interp_host(sigma_rows: torch.Tensor, table: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Linear interpolation in log σ over descending ``sigma_rows``, clamped at the ends (§8.4)."""
    keys = sigma_rows.double().log().flip(0)
    tab = table.double().flip(0)
    q = query.double().clamp_min(1e-12).log()
    if keys.numel() == 1:
        return tab[:1].expand(q.numel(), *tab.shape[1:]).clone()
    idx = torch.searchsorted(keys, q).clamp(1, keys.numel() - 1)
    w = ((q - keys[idx - 1]) / (keys[idx] - keys[idx - 1])).clamp(0, 1)
    return torch.lerp(tab[idx - 1], tab[idx], w.reshape(-1, *([1] * (tab.ndim - 1))))


def build_plan(stats, cfg: EngineConfig, sched, *, sampler: str = "euler", eta: float = 1.0,
               device=None, exact: bool | None = None, warn: bool = True) -> RunPlan:
    """Turn ``stats`` into the tables of one run over the schedule ``sched`` (N+1 σ's, last may be 0).

    ``exact=None`` decides automatically whether the calibrated step tables apply as-is;
    ``exact=True`` forces it (the collector, whose schedule is the calibration schedule).
    """
    sched_h = torch.as_tensor(sched).detach().double().cpu().reshape(-1)
    kind = sampler_kind(sampler)
    n_steps = sched_h.numel() - 1
    scale, shift = output_affine(stats, cfg)
    has_out = cfg.output_method != "none"
    to = dict(device=device, dtype=torch.float32)
    window = None
    if cfg.tcec_window:
        window = tcec_gain(stats, cfg.tcec_ridge)
    resid = None
    if cfg.ptqd_vsc:
        resid = ptqd_params(stats, cnc=cfg.ptqd_cnc).residual_std

    pos = sched_h[sched_h > 0]
    lo, hi = float(stats.sigma.min()), float(stats.sigma.max())
    if warn and pos.numel() and (float(pos.min()) < lo * (1 - 1e-3) or float(pos.max()) > hi * (1 + 1e-3)):
        what = "the nearest calibrated row is used (clamp)" if cfg.out_of_range == "clamp" else "no ε-space correction is applied there"
        warnings.warn(f"sampling σ range [{float(pos.min()):.4g}, {float(pos.max()):.4g}] leaves the calibrated range "
                      f"[{lo:.4g}, {hi:.4g}]; outside it {what}", stacklevel=3)

    sigma_tau = lat_shift = None
    transferred = False
    reasons = _transfer_reasons(stats, cfg, sched_h, sampler, eta)
    if cfg.latent_method == "none" and reasons and reasons[0].startswith("schedule") and exact is not True:
        transferred = True
        if warn:
            warnings.warn(f"correction statistics transferred to another setting ({reasons[0]}): ε-space "
                          "corrections are interpolated in log σ (ALGORITHMS.md §8.4)", stacklevel=3)
    if cfg.latent_method != "none" and n_steps > 0:
        if exact is None:
            exact = not reasons
        ancestral_eta = eta if kind == "ancestral" else None
        if exact:
            rows = min(n_steps, stats.rows)
            if cfg.latent_method == "stepbaq":
                tau, _, mu = stepback_decisions(stats)
                sigma_tau, lat_shift = sched_h[:-1].clone(), torch.zeros(n_steps, stats.channels, dtype=torch.float64)
                sigma_tau[:rows], lat_shift[:rows] = tau[:rows], mu[:rows]
            else:
                lat_shift = torch.zeros(n_steps, stats.channels, dtype=torch.float64)
                lat_shift[:rows] = input_bias(stats)[:rows]
        else:
            transferred = True
            if warn:
                warnings.warn("correction statistics transferred to another setting ("
                              + ("; ".join(reasons) or "re-derivation requested") + "): "
                              "ε-space corrections are interpolated in log σ and StepbaQ/IBC latent corrections "
                              "are re-derived analytically (ALGORITHMS.md §8.4) — recalibrating on this setting is "
                              "more accurate", stacklevel=3)
            res_mean, res_var = residual_after_affine(stats, scale, shift)
            q = sched_h[:-1]
            rm, rv = interp_host(stats.sigma, res_mean, q), interp_host(stats.sigma, res_var, q)
            if cfg.latent_method == "stepbaq":
                sigma_tau, lat_shift = analytic_stepbacks(sched_h, rm, rv, grid=stats.grid_sigmas,
                                                          rho_min=stats.meta.rho_min, ancestral_eta=ancestral_eta,
                                                          ssa=cfg.stepbaq_ssa)
            else:
                lat_shift = analytic_input_bias(sched_h, rm, ancestral_eta)
        if cfg.latent_method == "stepbaq" and not cfg.stepbaq_la:
            lat_shift = None

    identity = _is_identity(scale if has_out else None, shift if has_out else None, sigma_tau, lat_shift,
                            resid, sched_h, cfg)
    flip = lambda t: None if t is None else t.flip(0).to(**to).contiguous()  # noqa: E731
    return RunPlan(
        log_keys=stats.sigma.log().flip(0).to(**to).contiguous(),
        out_scale=flip(scale) if has_out else None,
        out_shift=flip(shift) if has_out else None,
        tcec_gain=flip(window), resid_std=flip(resid),
        sched=sched_h.to(**to),
        sigma_tau=None if sigma_tau is None else sigma_tau.to(**to),
        lat_shift=None if lat_shift is None else lat_shift.to(**to),
        kind=kind, eta=float(eta), channels=stats.channels, sigma_range=(lo, hi), transferred=transferred,
        identity=identity,
    )


def _is_identity(scale, shift, sigma_tau, lat_shift, resid, sched_h, cfg: EngineConfig) -> bool:
    """Whether every table of the run leaves the sampler's values unchanged (decided once, on the host).

    Statistics of a model without error (or a method whose fitted parameters are neutral) then give
    exactly the uncorrected sampler: the engine skips its wrapper instead of recomputing
    ``x − σ·((x − D)/σ)``, which differs from ``D`` by float rounding.
    """
    if scale is not None and not (bool((scale == 1).all()) and bool((shift == 0).all())):
        return False
    if lat_shift is not None and not bool((lat_shift == 0).all()):
        return False
    if sigma_tau is not None and not torch.equal(sigma_tau.double(), sched_h[:-1][: sigma_tau.numel()].double()):
        return False
    if cfg.ptqd_vsc and resid is not None and not bool((resid == 0).all()):
        return False
    return True


def _transfer_reasons(stats, cfg: EngineConfig, sched_h: torch.Tensor, sampler: str, eta: float) -> list:
    m = stats.meta
    reasons = []
    if sched_h.numel() - 1 != stats.rows or not torch.allclose(sched_h[:-1], stats.sigma, rtol=1e-4):
        n_run = sched_h.numel() - 1
        what = ("schedule has other σ's than" if n_run == stats.rows else f"schedule of {n_run} steps differs from")
        reasons.append(f"{what} the calibrated {m.scheduler or '?'} schedule of {stats.rows} steps")
    if canonical_sampler(sampler) != canonical_sampler(m.sampler):
        reasons.append(f"sampler {canonical_sampler(sampler)!r} instead of the calibrated {m.sampler!r}")
    elif sampler_kind(sampler) == "ancestral" and abs(float(m.eta) - float(eta)) > 1e-9:
        reasons.append(f"η = {eta} instead of the calibrated {m.eta}")
    if m.latent_method != cfg.latent_method:
        reasons.append(f"latent correction {cfg.latent_method!r} but the calibration ran with {m.latent_method!r}")
    if m.output_method != cfg.output_method:
        reasons.append(f"output correction {cfg.output_method!r} but the calibration ran with {m.output_method!r}")
    return reasons
