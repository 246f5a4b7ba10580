"""Static per-σ activation ranges, calibrated on the FP trajectory or progressively (PCR, ALGORITHMS.md §6b).

:func:`calibrate_activation_ranges` samples the whole calibration set once with a k-diffusion
sampler (one batch of N latents; model calls are split into micro-batches), so only the current
latents are held, never trajectories, and the observers stream (``quant.observers``). Two ways:

* ``trajectory="fp"`` — the baseline, Q-Diffusion's timestep-aware calibration: the latents come
  from the full-precision model's trajectory; at every call the quantized model (weights
  quantized, activations observed unquantized) runs on the same latents and only its layer inputs
  are kept.
* ``trajectory="progressive"`` — PCR's progressive calibration: the latents come from the quantized
  model itself. At step t it first observes its layer inputs (step t's activations unquantized),
  sets step t's ranges, then runs the step with them; steps < t already use their final ranges.

A relax schedule already set on the model (``quant.set_activation_schedule``) is active during a
progressive calibration, so later steps are calibrated on the relaxed trajectory, and the ``mse``
estimator clips for the bit-width each step runs at.

Choices the sources leave open (documented here): a σ the sampler visits twice (Heun's second
evaluation lands on the next step's σ) is calibrated on its first visit; ranges are keyed by the
σ of the call, so they transfer to other step counts by nearest σ (``quant.activations``); layers
never observed either refuse (``missing="error"``, nothing changed) or keep dynamic per-sample
ranges (``missing="dynamic"``, listed in the report). A failure leaves the model as it was.

Cost in model calls per step: ``fp`` one FP call and one quantized call; ``progressive`` two
quantized calls (observe, then run).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..quant.activations import ActQuantizer
from ..quant.observers import METHODS, MISSING, ActivationObserver, sigma_key
from ..quant.plan import ACT_CALIBRATION_ATTR, quantized_layers
from .collect import slice_extra
from .errors import CalibrationError

TRAJECTORIES = ("fp", "progressive")


@dataclass
class RangeReport:
    """What a range calibration did; :meth:`info` is stored with the quantized model."""

    trajectory: str
    estimator: str
    n_samples: int
    sigmas: list[float]
    layers: int
    missing: list[str] = field(default_factory=list)
    #: ``auto`` estimator: per layer, how many σ's chose each candidate (``quant.observers.CANDIDATES``)
    choices: dict = field(default_factory=dict)
    model_calls: dict = field(default_factory=dict)
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def info(self) -> dict:
        d = asdict(self)
        d.pop("seconds")
        return d


class _Snapshot:
    """Each activation quantizer's mode and ranges, to restore the model on failure."""

    def __init__(self, acts: dict[str, ActQuantizer]) -> None:
        self.acts = acts
        self.state = {n: (a.mode, a.range_sigmas, a.range_lo, a.range_hi) for n, a in acts.items()}

    def restore(self) -> None:
        for n, (mode, s, lo, hi) in self.state.items():
            a = self.acts[n]
            a.mode, a.range_sigmas, a.range_lo, a.range_hi = mode, s, lo, hi


def _chunked(fn, x, sigma, extra, bs):
    n = x.shape[0]
    out = []
    for i in range(0, n, bs):
        sl = slice(i, min(i + bs, n))
        s = sigma[sl] if torch.is_tensor(sigma) and sigma.ndim >= 1 and sigma.shape[0] == n else sigma
        out.append(fn(x[sl], s, **slice_extra(extra, sl, n)))
    return torch.cat(out)


@torch.no_grad()
def calibrate_activation_ranges(
    q_model: Callable[..., torch.Tensor],
    quantized: nn.Module,
    x_init: torch.Tensor,
    sigmas,
    extra_args: dict | None = None,
    *,
    sample_fn: Callable,
    fp_model: Callable[..., torch.Tensor] | None = None,
    trajectory: str = "progressive",
    estimator: str = "minmax",
    percentile: float = 99.99,
    batch_size: int = 16,
    missing: str = "error",
    sampler_opts: dict | None = None,
    progress: Callable[[int], None] | None = None,
    meta: dict | None = None,
    seed: int = 0,
) -> RangeReport:
    """Calibrate static per-σ activation ranges of ``quantized`` and switch its layers to static mode.

    ``q_model`` / ``fp_model``: denoisers ``model(x, sigma, **extra)``; ``q_model``'s calls must
    publish σ to ``quantized`` (``quant.SigmaScopedDenoiser``, or ComfyUI's APPLY_MODEL wrapper).
    ``x_init`` [N, C, ...]: the starting latents of the N calibration samples; ``sigmas`` the
    schedule; ``extra_args`` the conditioning (tensors with first dimension N are split per
    sample). ``sample_fn(model, x, sigmas, extra_args, callback, disable, **sampler_opts)`` is a
    k-diffusion sampler (ancestral ones take their ``noise_sampler`` in ``sampler_opts``).
    ``progress(calls)`` is called after every sampler call. Returns a :class:`RangeReport`, also
    stored on ``quantized`` (saved with the model by ``quant.save_quantized``).
    """
    if trajectory not in TRAJECTORIES:
        raise CalibrationError(f"trajectory must be one of {TRAJECTORIES}, got {trajectory!r}")
    if trajectory == "fp" and fp_model is None:
        raise CalibrationError("trajectory='fp' needs the full-precision model (fp_model)")
    if estimator not in METHODS:
        raise CalibrationError(f"unknown range estimator {estimator!r}; known: {METHODS}")
    if missing not in MISSING:
        raise CalibrationError(f"missing must be one of {MISSING}, got {missing!r}")
    if x_init is None or x_init.ndim < 2 or x_init.shape[0] == 0:
        raise CalibrationError("the calibration set is empty: give at least one starting latent [N ≥ 1, C, ...]")
    layers = quantized_layers(quantized)
    acts = {n: m.act for n, m in layers.items() if m.act.qtype is not None}
    if not acts:
        raise CalibrationError("the model has no quantized activations (a W*A16 plan): nothing to calibrate")
    extra = dict(extra_args or {})
    bs = max(1, int(batch_size))
    obs = ActivationObserver(quantized, method=estimator, percentile=percentile, seed=seed)
    snapshot = _Snapshot(acts)
    calls = {"sampler": 0, "quantized": 0, "fp": 0}
    done: set[float] = set()
    t0 = time.perf_counter()

    def observe(x, sigma):
        with obs:
            _chunked(q_model, x, sigma, extra, bs)
        calls["quantized"] += 1

    def fp_wrapper(x, sigma, **_):
        key = sigma_key(sigma)
        if key not in done:
            observe(x, sigma)
            obs.finish()  # free this σ's samples now; applied at the end
            done.add(key)
        calls["fp"] += 1
        return _chunked(fp_model, x, sigma, extra, bs)

    def progressive_wrapper(x, sigma, **_):
        key = sigma_key(sigma)
        if key not in done:
            observe(x, sigma)
            for name, per_sigma in obs.finish().items():
                for s, (lo, hi) in per_sigma.items():
                    acts[name].add_static_range(s, lo, hi)
            done.add(key)
        calls["quantized"] += 1
        return _chunked(q_model, x, sigma, extra, bs)

    def counted(wrapper):
        def call(x, sigma, **kw):
            out = wrapper(x, sigma, **kw)
            calls["sampler"] += 1
            if progress is not None:
                progress(calls["sampler"])
            return out
        return call

    try:
        for a in acts.values():
            a.clear_static_ranges()
            a.mode = "static"
        wrapper = fp_wrapper if trajectory == "fp" else progressive_wrapper
        sample_fn(counted(wrapper), x_init.clone(), sigmas, {}, None, True, **(sampler_opts or {}))
        never = obs.unobserved()
        if never and missing == "error":
            raise CalibrationError(
                f"{len(never)} layer(s) never saw an input during calibration: {', '.join(never[:5])}"
                f"{' …' if len(never) > 5 else ''}; use missing='dynamic' to keep them on dynamic ranges"
            )
        if trajectory == "fp":
            obs.apply(missing="dynamic")
        else:
            for name in never:
                acts[name].mode = "dynamic"
    except BaseException:
        snapshot.restore()
        raise
    report = RangeReport(
        trajectory=trajectory, estimator=estimator if estimator != "percentile" else f"percentile({percentile})",
        n_samples=int(x_init.shape[0]), sigmas=sorted(done, reverse=True), layers=len(acts) - len(never),
        missing=never, choices=obs.choice_counts(), model_calls=dict(calls), seconds=time.perf_counter() - t0, meta=dict(meta or {}),
    )
    quantized.__dict__[ACT_CALIBRATION_ATTR] = report.info()
    return report


def uses_static_activations(quantized: nn.Module) -> bool:
    """Whether any quantized layer of ``quantized`` runs static activation ranges (so it needs
    :func:`calibrate_activation_ranges` before sampling, or has had it)."""
    return any(m.act.qtype is not None and m.act.mode == "static" for m in quantized_layers(quantized).values())


def check_coverage(quantized: nn.Module, sigmas, rtol: float = 0.05) -> str | None:
    """A warning text if the schedule ``sigmas`` leaves the calibrated σ range (else ``None``).

    Static ranges use the nearest calibrated σ there (the ends of the range); this says so before
    sampling, since the lookup itself never syncs with the host.
    """
    from ..quant.activations import uncovered_sigmas

    out = uncovered_sigmas(quantized, sigmas, rtol)
    if not out:
        return None
    shown = ", ".join(f"{s:.4g}" for s in out[:4]) + (" …" if len(out) > 4 else "")
    return (f"{len(out)} σ of this schedule lie outside the σ range the static activation ranges were "
            f"calibrated on ({shown}); they use the ranges of the nearest calibrated σ")


__all__ = ["RangeReport", "TRAJECTORIES", "calibrate_activation_ranges", "check_coverage", "uses_static_activations"]
