"""End-to-end tuning of a quantized model's stored grid (fp16 scales and zero points) against the
full-precision model's outputs.

Rounding (``gptq.py``) and the budget (``budget.py``) each look at one layer at a time: a layer's
output error on its own inputs. What reaches the sample is the *model's* output error, after every
later layer, the 8- or 4-bit activations and classifier-free guidance have acted on it. This step
keeps every integer code as it is and adjusts only the per-group scale ``s`` and zero point ``z``
that the storage already holds in fp16 (so it costs zero bytes), by gradient descent on

    Σ_calls w(σ) · mean‖D_q(x, σ) − D_fp(x, σ)‖²

over calls recorded while the FP model sampled the calibration set (``calibration.inputs.collect_inputs``
with ``record_calls``): the states ``x`` the FP trajectory visited, its σ, its conditioning and its
output ``D_fp``. ``w(σ)`` weights the first steps (σ ≥ ``early_sigma``) ``early_weight``×, as the
input statistics do.

Choices (the sources — OmniQuant's learnable weight clipping, EfficientDM's scale tuning — tune
similar parameters block by block or with LoRA; here the whole denoiser is the block):

* **Parameters**: ``s = s₀·exp(a)`` (a log-multiplier, so one learning rate suits layers whose scales
  differ by orders of magnitude, and ``s`` stays positive) and ``z = z₀ + b`` in code units; both
  start at the quantizer's grid (``a = b = 0``). int8 layers (symmetric, no zero point) tune ``a`` only.
  Codes are never changed: the rounding GPTQ chose stays.
* **Loss in D-space** (the denoiser's x₀-prediction, what the sampler steps with): an error ``δD`` at
  step ``i`` moves the latent by ``(1 − σᵢ₊₁/σᵢ)·δD`` for euler, so D-space errors are the errors the
  trajectory receives; on the reference model this lowered the early one-step error more than an
  ε-space loss (``δD/σ``) did, which favours the late steps (development seeds only).
* **Optimiser**: Adam, learning rate ``lr`` decayed to zero on a cosine over ``iterations``; every
  iteration is one recorded call (one micro-batch at one σ), in a seeded random order (``draw``:
  ``uniform``, every call once per pass; ``weighted``, drawn ∝ ``w(σ)``, see :func:`_weighted_draws`);
  with ``batch`` > 0 only that many of the call's samples, drawn at random (seeded), which makes a
  step cheaper.
* **Activations**: the layers' fake quantizers pass gradients straight through (``activations.fake_quantize``
  does so only while autograd records, so sampling is unchanged bit for bit).
* **Memory**: no float copy of any weight outlives its layer's forward or backward step (:class:`_GridOp`
  rebuilds it from the blob's codes); what stays is the quantized model, the grid parameters with
  their gradients and Adam moments (16 bytes per group of 64 weights per tuned tensor, about 0.5 byte
  per weight with zero points), the activations one backward pass keeps, and a second blob per
  layer once the tuned grid is stored, until the check below has decided.
* **Held-out check**: the loss on the held-out calls before and after (with the fp16-rounded grid that
  is stored); the tuned grid is kept only if it is lower (``fallback``), else the model is restored
  exactly. A non-finite loss stops tuning and restores the model.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import QuantizationError
from .modules import QUANT_LAYERS
from .weights import _group, decode_blob, unpack_codes


#: how the iterations pick their recorded call (see :func:`_weighted_draws`)
DRAWS = ("uniform", "weighted")


@dataclass(frozen=True)
class TuneConfig:
    iterations: int = 200
    lr: float = 1e-3
    early_weight: float = 4.0
    early_sigma: float = 3.0
    fallback: bool = True
    seed: int = 0
    batch: int = 0
    draw: str = "uniform"
    lowpass_weight: float = 0.0
    lowpass: int = 2
    jacobian_weight: float = 0.0

    def validate(self) -> "TuneConfig":
        if self.iterations < 1:
            raise QuantizationError(f"tuning needs at least one iteration, got {self.iterations!r}")
        if not self.lr > 0:
            raise QuantizationError(f"the tuning learning rate must be positive, got {self.lr!r}")
        if not self.early_weight > 0:
            raise QuantizationError(f"the early-step weight must be positive, got {self.early_weight!r}")
        if self.draw not in DRAWS:
            raise QuantizationError(f"unknown tuning draw {self.draw!r}; known: {DRAWS}")
        if not self.lowpass_weight >= 0 or not math.isfinite(self.lowpass_weight):
            raise QuantizationError(f"the low-pass weight must be finite and ≥ 0, got {self.lowpass_weight!r}")
        if not self.jacobian_weight >= 0 or not math.isfinite(self.jacobian_weight):
            raise QuantizationError(f"the Jacobian weight must be finite and ≥ 0, got {self.jacobian_weight!r}")
        if self.lowpass < 1:
            raise QuantizationError(f"the low-pass pooling factor must be ≥ 1, got {self.lowpass!r}")
        if self.batch < 0:
            raise QuantizationError(f"the tuning batch must be 0 (whole recorded calls) or positive, got {self.batch!r}")
        return self


class _Grid:
    """One layer's tunable grid: codes fixed, ``a`` (log scale multiplier) and ``b`` (zero offset).

    Holds no copy of the weight: the integer codes stay in the layer's blob (``storage`` views it) and
    are unpacked one layer at a time, when that layer's forward or backward needs them (:class:`_GridOp`)."""

    def __init__(self, layer) -> None:
        self.layer = layer
        qt = layer.wqtype
        self.storage = decode_blob(layer.weight.detach(), qt, layer.weight_shape)
        self.s0 = self.storage["scale"].float()
        self.a = nn.Parameter(torch.zeros_like(self.s0))
        self.z0 = self.storage["zero"].float() if "zero" in self.storage else None
        self.b = None if self.z0 is None else nn.Parameter(torch.zeros_like(self.z0))

    def params(self) -> list:
        return [self.a] + ([] if self.b is None else [self.b])

    def _codes(self, device) -> torch.Tensor:
        """The integer codes as floats on ``device``, ``[out, groups, group size]`` (a transient, one layer
        at a time; an offloaded layer sends its packed bytes, not a float copy)."""
        qt, out = self.layer.wqtype, self.layer.weight_shape[0]
        q = self.storage["qweight"].to(device, non_blocking=True)
        if qt.packed:
            codes = unpack_codes(q, qt.bits).float()
            k = codes.shape[1]
            codes = codes.reshape(out, k // _group(qt, k), _group(qt, k))
            return codes + qt.qmin if self.z0 is None else codes  # symmetric int4: stored offset by qmin
        return q.float().reshape(out, 1, -1)

    def stored(self, a=None, b=None, device=None) -> torch.Tensor:
        """The weight the layer's main path multiplies (float32, on ``device``; default the blob's), from
        the codes and the grid ``(a, b)``."""
        a = self.a if a is None else a
        device = self.s0.device if device is None else device
        c = self._codes(device)
        if self.z0 is not None:
            c = c - (self.z0 + (self.b if b is None else b)).to(device).unsqueeze(2)
        return (c * (self.s0 * a.exp()).to(device).unsqueeze(2)).reshape(self.layer.weight_shape)

    def op(self, x: torch.Tensor) -> torch.Tensor:
        return _GridOp.apply(x, self, *self.params())

    def rounded_storage(self) -> dict:
        """The tuned grid as the storage holds it (fp16), codes unchanged."""
        st = dict(self.storage)
        st["scale"] = (self.s0 * self.a.detach().exp()).half()
        if self.b is not None:
            st["zero"] = (self.z0 + self.b.detach()).half()
        return st


class _GridOp(torch.autograd.Function):
    """``layer._op(x, W(a, b), bias)`` that saves only ``x`` and the grid parameters for the backward pass.

    Plain autograd would keep every layer's float weight (and its float codes) alive from the forward to
    the backward pass — about 8 bytes per weight over the whole model, 3.4 GB more per GB of fp16
    weights than the quantized model itself. Here the weight is rebuilt from the blob's codes in the
    backward pass, one layer at a time; the gradients are the layer's own (``dx = dy·W``, ``dW = dyᵀ·x``,
    as convolutions for Conv2d), and ``dW`` reaches ``a`` and ``b`` through the small elementwise graph
    of :meth:`_Grid.stored`."""

    @staticmethod
    def forward(ctx, x, grid, *params):
        with torch.no_grad():
            w = grid.stored(*params, device=x.device).to(x.dtype)
        ctx.grid = grid
        ctx.save_for_backward(x, *params)
        layer = grid.layer
        b = None if layer.bias is None else layer.bias.to(device=x.device, dtype=x.dtype)
        return layer._op(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, *params = ctx.saved_tensors
        grid = ctx.grid
        layer = grid.layer
        with torch.enable_grad():
            p = [t.detach().requires_grad_() for t in params]
            w32 = grid.stored(*p, device=x.device)
            w = w32.detach().to(x.dtype)
            if layer.layer_type == "linear":
                gx = gy @ w if ctx.needs_input_grad[0] else None
                gw = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            elif not isinstance(layer.padding, str):
                conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
                gx = torch.nn.grad.conv2d_input(x.shape, w, gy, *conv) if ctx.needs_input_grad[0] else None
                gw = torch.nn.grad.conv2d_weight(x, w.shape, gy, *conv)
            else:  # padding="same"/"valid": let autograd differentiate the convolution once more
                xd, wd = x.detach().requires_grad_(ctx.needs_input_grad[0]), w.requires_grad_()
                grads = torch.autograd.grad(layer._op(xd, wd, None), [wd, xd] if xd.requires_grad else [wd], gy)
                gw, gx = grads[0], (grads[1] if len(grads) > 1 else None)
            gp = torch.autograd.grad(w32, p, gw.float())
        return (gx, None, *gp)


@contextmanager
def _tuning_scope(module: nn.Module, grids: list[_Grid]):
    """Route the layers' main path through the grids and freeze every other parameter; undo on exit."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for g in grids:
            g.layer.grid_op = g.op
        yield
    finally:
        for g in grids:
            g.layer.grid_op = None
        for p, f in flags:
            p.requires_grad_(f)


def _subsample(call, batch: int, gen: torch.Generator):
    """``batch`` random samples of a recorded call (all of it when ``batch`` is 0 or not smaller): ``x``,
    the target, ``sigma`` if it is per sample and every tensor of ``extra`` whose first dimension is the
    call's batch are indexed alike; anything else (a scalar σ, the CFG scale, conditioning a guider
    broadcasts to the batch of ``x``) is passed as it is."""
    x, sigma, extra, target, *adj = call
    n = int(x.shape[0])
    if not batch or batch >= n:
        return call
    idx = torch.randperm(n, generator=gen)[:batch].sort().values

    def take(v):
        return v[idx.to(v.device)] if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n else v
    return (take(x), take(sigma), {k: take(v) for k, v in extra.items()}, take(target),
            *(a[:, idx.to(a.device)] for a in adj))


def _is_early(call, cfg: TuneConfig) -> bool:
    return float(call[1].reshape(-1)[0]) >= cfg.early_sigma


def _call_weight(call, cfg: TuneConfig) -> float:
    return cfg.early_weight if _is_early(call, cfg) else 1.0


def _call_loss(denoiser, call, cfg: TuneConfig, weight: float | None = None) -> torch.Tensor:
    """``w(σ)·mean‖D_q − D_fp‖²``; with ``lowpass_weight`` λ > 0, an early call (σ ≥ ``early_sigma``)
    adds ``λ·mean‖pool(D_q − D_fp)‖²``, the error averaged over ``lowpass``×``lowpass`` latent pixels.

    The guess behind it: what an early step's error does to the final sample passes through the rest
    of the trajectory, which keeps the coarse structure an early step sets and denoises its fine detail
    away, so the low frequencies of an early error might be what tips a sample; the pooled term weights
    them more without a Jacobian of the flow. Measured on the reference model (docs/BENCHMARKS.md,
    session 10) it was worse (−2.2 and −7.3 points of gap closed at CFG 3), so it is off by default.

    With ``jacobian_weight`` μ > 0 every call (each recorded with its flow adjoints ``g``, see
    ``calibration.inputs.flow_adjoints``) adds ``μ·mean_{j,n}(g_jn · δ_n)² / numel(δ_n)``: an unbiased
    estimate of the latent MSE that this call's error alone, carried to first order by the FP flow
    through the rest of the sampling, leaves in the final sample. It is the Jacobian the low-pass term
    guessed at, measured instead; not multiplied by ``w(σ)``, since the flow already says how much
    each step's error grows. Measured on the reference model (docs/BENCHMARKS.md, session 13) it was
    worse on euler CFG 3 (−3.8 points of gap closed) and did not carry to held-out samples on
    dpmpp_2m, so it is off by default."""
    x, sigma, extra, target, *adj = call
    out = denoiser(x, sigma, **extra)
    early = _is_early(call, cfg)  # one host read of σ per call, for the weight and the low-pass term
    w = (cfg.early_weight if early else 1.0) if weight is None else weight
    d = out.float() - target.float()
    loss = d.pow(2).mean()
    if cfg.lowpass_weight > 0 and d.ndim == 4 and early:
        loss = loss + cfg.lowpass_weight * torch.nn.functional.avg_pool2d(d, cfg.lowpass, ceil_mode=True).pow(2).mean()
    if cfg.jacobian_weight > 0:
        if not adj:
            raise QuantizationError("the Jacobian-weighted loss needs each recorded call's flow adjoints "
                                    "(calibration.inputs.collect_inputs with adjoints > 0)")
        g = adj[0].to(d.device)  # [sketches, batch, ...]: ∂(u_j·x_N)/∂D for this call's samples
        proj = (g.float() * d.unsqueeze(0)).flatten(2).sum(-1)  # u_j · J δ per sketch and sample
        return w * loss + cfg.jacobian_weight * proj.pow(2).mean() / d[0].numel()
    return w * loss


def _weighted_draws(calls: list, cfg: TuneConfig, gen: torch.Generator) -> tuple[list[int], float]:
    """``draw="weighted"``: the call of every iteration, drawn (seeded, with replacement) with
    probability ∝ ``w(σ)``, and the weight each drawn loss gets, the mean weight ``w̄`` — the same
    objective in expectation as ``uniform`` (``E[w̄·Lᵢ] = Σ wᵢ·Lᵢ / N``).

    Why it is not the same in effect: Adam divides each update by a running RMS of the gradient, so a
    loss weighted 4× moves the grid hardly more per step than one weighted 1×. ``uniform`` (every call
    once per pass, in a fresh seeded permutation) gives the early calls their share of the *steps* — 7
    of 20 on the default schedule — whatever their weight; ``weighted`` spends the steps themselves in
    proportion to ``w(σ)`` (28 of 41 there at ``early_weight`` 4). Measured on the reference model
    (docs/BENCHMARKS.md, session 8): no gain in the mean on development or evaluation seeds, so it
    is an option, not the default."""
    w = torch.tensor([_call_weight(c, cfg) for c in calls], dtype=torch.float64)
    return torch.multinomial(w, cfg.iterations, replacement=True, generator=gen).tolist(), float(w.mean())


@torch.no_grad()
def calls_loss(denoiser, calls: list, config: TuneConfig | None = None) -> float:
    """Mean weighted one-step loss of ``denoiser`` over ``calls`` (the tuning objective; ``config``'s
    step weights, default :class:`TuneConfig`'s)."""
    cfg = config or TuneConfig()
    return float(sum(float(_call_loss(denoiser, c, cfg)) for c in calls) / max(1, len(calls)))


def tune_grid(denoiser, module: nn.Module, fit_calls: list, hold_calls: list, config: TuneConfig | None = None,
              progress=None) -> dict:
    """Tune the scales and zero points of every quantized layer of ``module`` (the network inside
    ``denoiser``, a σ-scoped quantized denoiser ``denoiser(x, sigma, **extra) → D``) in place.

    ``fit_calls`` / ``hold_calls``: ``(x, sigma, extra, D_fp)`` from FP sampling of the calibration set
    (disjoint samples). Returns a report: the held-out loss before and after, the mean training loss
    of the first and the last tenth of the iterations, kept or not, iterations, seconds."""
    cfg = (config or TuneConfig()).validate()
    if not fit_calls:
        raise QuantizationError("tuning needs recorded calibration calls; none were given")
    layers = [m for m in module.modules() if isinstance(m, QUANT_LAYERS)]
    if not layers:
        raise QuantizationError("the module has no quantized layers to tune")
    for m in layers:
        if m.weight_function or m.__dict__.get("weight_lowvram_function") is not None:
            raise QuantizationError(f"layer {m.layer!r} has weight patches; tune before patching the model")
    t0 = time.perf_counter()
    hold = hold_calls or fit_calls
    # the fit calls are not evaluated as a whole (that would cost two more passes over them): the
    # report gives the mean training loss of the first and the last tenth of the iterations instead
    before_hold = calls_loss(denoiser, hold, cfg)
    if not math.isfinite(before_hold):
        raise QuantizationError("the loss on the calibration calls is not finite: the quantized model's output "
                                "or the FP targets have NaN/inf")
    grids = [_Grid(m) for m in layers]
    originals = [m.weight for m in layers]  # the blobs are never written in place: restoring = putting them back
    params = [p for g in grids for p in g.params()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    draws, mean_w = _weighted_draws(fit_calls, cfg, gen) if cfg.draw == "weighted" else (None, None)
    losses: list[float] = []
    note = None
    with _tuning_scope(module, grids), torch.enable_grad():
        for it in range(cfg.iterations):
            if draws is None and not order:
                order = torch.randperm(len(fit_calls), generator=gen).tolist()
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * it / cfg.iterations))
            call = fit_calls[order.pop() if draws is None else draws[it]]
            loss = _call_loss(denoiser, _subsample(call, cfg.batch, gen), cfg, mean_w)
            losses.append(float(loss.detach()))
            if not torch.isfinite(loss):
                note = f"non-finite loss at iteration {it + 1}; the grid was restored"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None:
                progress(it + 1, cfg.iterations)
    if note is None:
        for m, g in zip(layers, grids):
            m.set_storage(g.rounded_storage())
        after_hold = calls_loss(denoiser, hold, cfg)
    else:
        after_hold = float("nan")
    tenth = max(1, len(losses) // 10)
    kept = note is None and (not cfg.fallback or after_hold < before_hold)
    if not kept:
        for m, w in zip(layers, originals):
            m.weight = w
        if note is None:
            note = (f"held-out loss {after_hold:.4g} ≥ {before_hold:.4g} before tuning; the grid was restored")
    report = {"kept": kept, "iterations": cfg.iterations, "batch": cfg.batch, "draw": cfg.draw, "layers": len(layers), "lr": cfg.lr,
              **({"lowpass_weight": cfg.lowpass_weight, "lowpass": cfg.lowpass} if cfg.lowpass_weight else {}),
              **({"jacobian_weight": cfg.jacobian_weight} if cfg.jacobian_weight else {}),
              "train_loss_first": sum(losses[:tenth]) / tenth, "train_loss_last": sum(losses[-tenth:]) / tenth,
              "hold_loss_before": before_hold, "hold_loss_after": after_hold,
              "seconds": round(time.perf_counter() - t0, 2)}
    if note:
        report["note"] = note
    for m in layers:
        m.calib = {**(m.calib or {}), "grid_tuned": kept}
    return report
