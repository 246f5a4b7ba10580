"""Per-layer input statistics streamed from full-precision sampling (for ``quant/`` calibrated rounding).

:func:`collect_inputs` samples the FP denoiser on the calibration set, with any k-diffusion sampler,
the way the correction collector and ComfyUI run it (conditioning, a starting latent, a schedule),
and feeds every forward call of the chosen Linear/Conv2d layers into
:class:`~qcorrect.quant.layerinputs.LayerInputs`: ``Σ w·x xᵀ`` over the layer's rows (a conv's
inputs unfolded to ``in·kh·kw`` columns, as GPTQ treats convs), plus per-channel ranges.

* **Held out**: every ``holdout_every``-th calibration sample goes to the held-out sums, the others
  to the fit sums, by micro-batch, so the quantizers can check each choice on samples it was not
  made on.
* **Per-step weight**: ``step_weight(σ) -> float`` multiplies the rows of the calls at σ (keyed by σ,
  not step index, so it means the same for any schedule); e.g. :func:`early_weight` weights the
  noisy first steps, where most of the final error is made (docs/BENCHMARKS.md, "The ceiling").
* **Memory**: the sums take ``2·K²`` float32 per layer. With ``max_bytes`` the layers are split, in
  registration order, into groups whose sums fit, and the calibration set is sampled once per group
  (sampling is deterministic, so every group sees the same trajectories). With ``consume`` each
  group's statistics are handed over as soon as its pass ends and are not kept (e.g.
  ``quant.calibrated.CalibratedSolver.add``, which solves those layers and keeps only their
  solutions): the peak is then one group's sums plus one unfold chunk. Without it every group's
  statistics are returned together, and the peak is all of them. Unfolded rows are processed in
  chunks of at most ``chunk_elems`` values.
* **Cost**: accumulating ``x xᵀ`` costs ``rows·K²`` per call, far more than the forward pass for the
  wide convolutions at high resolution. ``rows_per_k`` caps each layer's rows at about
  ``rows_per_k·K`` in total (spread evenly over the calls: a random share of every call's rows,
  deterministic generator, at least 64 per call), which bounds the cost by ``rows_per_k·K³`` per
  layer whatever the calibration set's size; ``max_rows`` caps every call at that many rows. A
  capped conv gathers only the patches it keeps instead of unfolding the whole call (the same rows,
  bit for bit): on the reference model that took the statistics from 57.5 s to 40.2 s. The sums are
  symmetric, so a layer with ``K ≥ 2·TRI_BLOCK`` only accumulates the blocks on and above the diagonal
  (:func:`add_gram`, about ``rows·K²/2`` multiply-adds instead of ``rows·K²``) and the lower blocks are
  mirrored once at the end (:func:`mirror_upper`); each stored value is the same dot product as the full
  ``addmm``'s.
* **Where the products are made**: the sums live in host RAM, but when the model samples on a GPU
  each call's ``x xᵀ`` is multiplied there, block row by block row, and only the products are added
  into the sums (:func:`add_gram_from`; ``products="inputs"``, the default). The CPU's share is then
  about ``K²/2`` additions per call and layer instead of ``rows·K²/2`` multiply-adds, and the GPU needs
  one ``TRI_BLOCK × K`` block beyond the model, so a small GPU can do it too.

Hooks are installed on the given layers only, inside a scope, and removed on exit (also on error).
A non-finite input raises :class:`CalibrationError` naming the layer and σ: a model that produces
NaN/inf while sampling cannot be calibrated.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.gptq import reduced_float32
from ..quant.layerinputs import LayerInputs
from ..quant.plan import is_float_layer
from .errors import CalibrationError


#: input rows kept per layer, × its input size K, by default (``rows_per_k``; "Cost" above)
DEFAULT_ROWS_PER_K = 32
#: columns per block row of the triangular ``x xᵀ`` update; layers with ``K ≥ 2·TRI_BLOCK`` use it
TRI_BLOCK = 512
#: where ``collect_inputs`` multiplies each call's ``x xᵀ`` (``products``)
PRODUCTS = ("inputs", "host")


def _tri_blocks(k: int) -> list[int] | None:
    """Block starts of the triangular update for input size ``k`` (None: a plain full update)."""
    return list(range(0, k, TRI_BLOCK)) if k >= 2 * TRI_BLOCK else None


def add_gram(h: torch.Tensor, rows: torch.Tensor, alpha: float = 1.0) -> None:
    """``h += alpha·rowsᵀ rows`` — for ``K ≥ 2·TRI_BLOCK`` only on the block rows' diagonal block and the
    blocks right of it, about half the multiply-adds; :func:`mirror_upper` then fills the rest.
    ``rows`` on another device than ``h`` (a GPU's inputs, the sums in host RAM): :func:`add_gram_from`."""
    if rows.device != h.device:
        add_gram_from(h, rows, alpha)
        return
    starts = _tri_blocks(h.shape[0])
    if starts is None:
        h.addmm_(rows.T, rows, alpha=alpha)
        return
    for i in starts:
        h[i : i + TRI_BLOCK, i:].addmm_(rows[:, i : i + TRI_BLOCK].T, rows[:, i:], alpha=alpha)


def add_gram_from(h: torch.Tensor, rows: torch.Tensor, alpha: float = 1.0) -> None:
    """``h += alpha·rowsᵀ rows`` with the products made on ``rows``' device and only the results moved to
    ``h``'s: the same block rows as :func:`add_gram` (one ``TRI_BLOCK × K`` block, or the whole ``K × K``
    for a narrow layer, on that device at a time), each added into ``h``.

    This is how a GPU that samples the model computes the statistics: the sums stay in host RAM (their
    size is the memory bound of ``collect_inputs``, and a small GPU never holds them), while the
    ``rows·K²`` multiply-adds, which on the CPU are most of the statistics' time, run on the GPU; the
    CPU only adds about ``K²/2`` values per call and layer. The products are float32, as on the CPU;
    where the device would make float32 products in TF32 (``quant.gptq.reduced_float32``) they are made
    in float64 instead, rather than changing that process-wide setting."""
    k = h.shape[0]
    r = rows.double() if reduced_float32(rows.device) else rows
    starts = _tri_blocks(k)
    width = k if starts is None else TRI_BLOCK
    for i in starts or [0]:
        block = r[:, i : i + width].T @ r[:, i:]
        if alpha != 1.0:
            block.mul_(alpha)
        h[i : i + width, i:] += block.to(device=h.device, dtype=h.dtype)


def mirror_upper(h: torch.Tensor) -> torch.Tensor:
    """Complete a sum made by :func:`add_gram`: every block below the diagonal blocks becomes the
    transpose of its mirror above (in place; returns ``h``)."""
    starts = _tri_blocks(h.shape[0])
    for i in starts or []:
        h[i + TRI_BLOCK :, i : i + TRI_BLOCK] = h[i : i + TRI_BLOCK, i + TRI_BLOCK :].T
    return h


def gram_macs(k: int, rows: int) -> int:
    """Multiply-adds :func:`add_gram` spends on ``rows`` rows of input size ``k``."""
    starts = _tri_blocks(k)
    if starts is None:
        return rows * k * k
    return sum(rows * min(TRI_BLOCK, k - i) * (k - i) for i in starts)


def early_weight(factor: float, sigma_min: float = 3.0) -> Callable[[float], float]:
    """A per-step weight: ``factor`` for calls with σ ≥ ``sigma_min``, else 1."""
    if not factor > 0:
        raise CalibrationError(f"the early-step weight must be positive, got {factor!r}")
    return lambda sigma: float(factor) if sigma >= sigma_min else 1.0


class _Accumulator:
    """Forward pre-hooks that stream the inputs of ``layers`` into :class:`LayerInputs`."""

    def __init__(self, layers: dict[str, nn.Module], max_rows: dict[str, int | None], chunk_elems: int, seed: int) -> None:
        self.layers = layers
        self.stats = {n: LayerInputs.empty(_kind(m), _k(m), _channels(m)) for n, m in layers.items()}
        self.weight = 1.0
        self.sigma = float("nan")
        self.split = "fit"
        self.max_rows = max_rows
        self.chunk_elems = chunk_elems
        self.gen = torch.Generator().manual_seed(seed)
        self.handles: list = []
        self.wcalls = {n: 0.0 for n in layers}
        self.guidance: float | None = None
        self.batch = 0  # the micro-batch of the current model call (its samples)
        self.products = "inputs"  # where the x xᵀ products are made: the inputs' device, or "host"

    def finish(self) -> dict[str, LayerInputs]:
        """Complete the triangular sums and turn the channel sums into means (over samples and calls,
        step-weighted)."""
        for n, s in self.stats.items():
            mirror_upper(s.h_fit)
            mirror_upper(s.h_hold)
            w = self.wcalls[n]
            if w > 0:
                s.hi /= w
                s.lo /= w
                s.absmean /= w
        return self.stats

    @contextlib.contextmanager
    def hooked(self):
        try:
            for name, m in self.layers.items():
                self.handles.append(m.register_forward_pre_hook(self._hook(name)))
            yield self
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()

    def _hook(self, name: str):
        def record(module, args):
            self.observe(name, module, args[0])
        return record

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        s = self.stats[name]
        x = x.detach().float()
        if self.products == "host":
            x = x.cpu()
        per_sample = x.reshape(x.shape[0], -1, x.shape[-1]) if s.kind == "linear" else x.flatten(2).transpose(1, 2)
        # per-channel ranges per sample (dim 0 = sample, as the dynamic activation quantizer sees it); they
        # are also the finiteness check: amax/amin propagate NaN and reach ±inf, so a non-finite input
        # shows in them without a pass over the whole input
        mag = per_sample.abs()
        # the call's channel statistics reach the host in one copy (one sync per layer and call on a GPU):
        # per-sample max and min, then the call's max |x| and per-sample mean |x|
        ns = x.shape[0]
        host = torch.cat([per_sample.amax(dim=1), per_sample.amin(dim=1), mag.amax(dim=(0, 1))[None],
                          mag.mean(dim=1)]).cpu()
        hi, lo, absmax, absmean = host[:ns], host[ns : 2 * ns], host[2 * ns], host[2 * ns + 1 :]
        if not bool(torch.isfinite(hi).all() and torch.isfinite(lo).all()):
            raise CalibrationError(f"layer {name!r}: its input has NaN/inf at σ={self.sigma:.4g}; the full-precision "
                                   "model cannot be calibrated on these inputs")
        s.hi += self.weight * hi.sum(0)
        s.lo += self.weight * lo.sum(0)
        s.absmax = torch.maximum(s.absmax, absmax)
        s.absmean += self.weight * absmean.sum(0)
        s.calls += x.shape[0]
        self.wcalls[name] += self.weight * x.shape[0]
        h = s.h_fit if self.split == "fit" else s.h_hold
        rows_total = 0
        b = self.batch
        if self.guidance is not None and b and x.shape[0] == 2 * b:
            # a CFG call, [uncond; cond]: the output error that reaches the sample is the guided
            # combination's, (1 − s)·ΔW·x_u + s·ΔW·x_c = ΔW·x_g, so the rows are x_g (the ranges above
            # stay those of the raw inputs, which the activation quantizer sees)
            g = self.guidance
            x = (1.0 - g) * x[:b] + g * x[b:]
        cap = self.max_rows.get(name)
        n_rows = input_rows(module, x)
        for rows in self._rows(module, x, s, cap if cap and n_rows > cap else None, n_rows):
            add_gram(h, rows, self.weight)
            rows_total += rows.shape[0]
        if self.split == "fit":
            s.rows_fit += rows_total
            s.wsum_fit += self.weight * rows_total
        else:
            s.rows_hold += rows_total
            s.wsum_hold += self.weight * rows_total

    def _rows(self, module: nn.Module, x: torch.Tensor, s: LayerInputs, cap: int | None, n_rows: int):
        """The call's rows in chunks of about ``chunk_elems`` values; with ``cap``, a random share of
        every chunk (``round(len·cap/n_rows)`` rows, at least one, drawn from ``self.gen``).

        A capped conv never unfolds the whole call: the rows are drawn by index first (the same draw
        as from the unfolded chunk, so the same rows in the same order) and only their patches are
        gathered — at ``rows_per_k`` = 32 a call keeps a few percent of its positions, and unfolding
        all of them cost most of the collection's time (and ``kh·kw``× the input's memory)."""
        if s.kind == "linear":
            flat = x.reshape(-1, x.shape[-1])
            step = max(1, self.chunk_elems // max(1, s.k))
            for i in range(0, flat.shape[0], step):
                rows = flat[i : i + step]
                yield rows if cap is None else rows[self._draw(rows.shape[0], cap, n_rows).to(rows.device)]
            return
        per = s.k * (x.shape[-1] * x.shape[-2])  # an upper bound on one sample's unfolded size
        step = max(1, self.chunk_elems // max(1, per))
        positions = n_rows // x.shape[0]
        for i in range(0, x.shape[0], step):
            chunk = _padded(x[i : i + step], module)
            if cap is None:
                cols = F.unfold(chunk, module.kernel_size, module.dilation, 0, module.stride)
                yield cols.transpose(1, 2).reshape(-1, s.k)
            else:
                yield _patches(chunk, module, self._draw(chunk.shape[0] * positions, cap, n_rows))

    def _draw(self, rows: int, cap: int, n_rows: int) -> torch.Tensor:
        keep = max(1, round(rows * cap / n_rows))
        return torch.randperm(rows, generator=self.gen)[:keep]


def _pads(module: nn.Module) -> tuple[int, int, int, int]:
    """A conv's zero padding as ``(left, right, top, bottom)``; ``padding="same"`` puts the odd pixel of
    an even total on the right and bottom, as ``F.conv2d`` does, and ``"valid"`` is none."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        tot = [module.dilation[d] * (module.kernel_size[d] - 1) for d in (1, 0)]
        return (tot[0] // 2, tot[0] - tot[0] // 2, tot[1] // 2, tot[1] - tot[1] // 2)
    return (module.padding[1], module.padding[1], module.padding[0], module.padding[0])


def _padded(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    pads = _pads(module)
    return F.pad(x, pads) if any(pads) else x


def _out_hw(module: nn.Module, height: int, width: int) -> tuple[int, int]:
    """A conv's output height and width for an already padded input of ``height × width``."""
    return tuple((size - module.dilation[d] * (module.kernel_size[d] - 1) - 1) // module.stride[d] + 1
                 for d, size in enumerate((height, width)))


def input_rows(module: nn.Module, x: torch.Tensor) -> int:
    """Rows one call with input ``x`` adds to a layer's statistics before any cap: a Linear's tokens,
    a conv's output positions over the batch."""
    if not isinstance(module, nn.Conv2d):
        return x.numel() // x.shape[-1]
    left, right, top, bottom = _pads(module)
    return x.shape[0] * math.prod(_out_hw(module, x.shape[-2] + top + bottom, x.shape[-1] + left + right))


def row_cap(module: nn.Module, rows_per_k: float | None, calls: int, max_rows: int | None = None) -> int | None:
    """The rows a layer keeps per call (None: all): ``rows_per_k·K`` spread over ``calls`` calls, at least
    64, and at most ``max_rows``."""
    c = [v for v in (max_rows, None if not rows_per_k else max(64, int(rows_per_k * _k(module) / calls + 1))) if v]
    return min(c) if c else None


def _patches(xp: torch.Tensor, module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``F.unfold(xp, …, padding=0).transpose(1, 2).reshape(-1, K)`` for an already
    padded input ``xp`` (row = sample·positions + output position; columns channel-major, then kernel
    row, then kernel column), gathered without unfolding the rest: the same values, copied."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    oh, ow = _out_hw(module, xp.shape[-2], xp.shape[-1])
    idx = idx.to(xp.device)
    sample, pos = idx // (oh * ow), idx % (oh * ow)
    hi = (pos // ow * sh).unsqueeze(1) + dh * torch.arange(kh, device=xp.device)  # [n, kh]
    wi = (pos % ow * sw).unsqueeze(1) + dw * torch.arange(kw, device=xp.device)  # [n, kw]
    g = xp[sample.view(-1, 1, 1), :, hi.unsqueeze(2), wi.unsqueeze(1)]  # [n, kh, kw, C]
    return g.permute(0, 3, 1, 2).reshape(idx.numel(), -1)


def _kind(m: nn.Module) -> str:
    return "linear" if isinstance(m, nn.Linear) else "conv2d"


def _k(m: nn.Module) -> int:
    return m.weight[0].numel()


def _channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups


def stats_bytes(layers: dict[str, nn.Module]) -> dict[str, int]:
    """Bytes each layer's statistics take (two float32 ``[K, K]`` sums plus four channel vectors)."""
    return {n: 4 * (2 * _k(m) ** 2 + 4 * _channels(m)) for n, m in layers.items()}


def layer_groups(layers: dict[str, nn.Module], max_bytes: int | None) -> list[list[str]]:
    """Registration-order groups of layers whose statistics fit ``max_bytes`` together (a layer that
    alone exceeds it gets a group of its own)."""
    sizes = stats_bytes(layers)
    if not max_bytes:
        return [list(layers)]
    groups, cur, used = [], [], 0
    for n in layers:
        if cur and used + sizes[n] > max_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += sizes[n]
    return groups + [cur] if cur else groups


def calibration_layers(module: nn.Module, names=None) -> dict[str, nn.Module]:
    """The float Linear/Conv2d layers of ``module`` to collect (``names``: a subset, in model order).
    Grouped convolutions are skipped: their weight is not one matrix over one input."""
    layers = {n: m for n, m in module.named_modules() if is_float_layer(m)}
    if names is not None:
        wanted = set(names)
        missing = wanted - set(layers)
        if missing:
            raise CalibrationError(f"no float Linear/Conv2d layer named {sorted(missing)[:5]} in the model")
        layers = {n: m for n, m in layers.items() if n in wanted}
    return {n: m for n, m in layers.items() if not (isinstance(m, nn.Conv2d) and m.groups != 1)}


@torch.no_grad()
def collect_inputs(denoiser, module: nn.Module, sample_fn, x_init: torch.Tensor, sigmas: torch.Tensor,
                   extra: dict | None = None, *, layers=None, noise_sampler_factory=None, holdout_every: int = 4,
                   batch_size: int = 16, step_weight: Callable[[float], float] | None = None,
                   max_bytes: int | None = None, max_rows: int | None = None, rows_per_k: float | None = None,
                   chunk_elems: int = 1 << 24, guidance: float | None = None, record_calls: bool = False,
                   adjoints: int = 0, seed: int = 0, progress: Callable[[int, int], None] | None = None,
                   consume: Callable[[dict[str, LayerInputs]], None] | None = None, products: str = "inputs") -> dict:
    """Sample ``denoiser`` (FP, the denoiser protocol) from ``x_init`` ``[N, C, H, W]`` over ``sigmas``
    with ``sample_fn`` and return ``{"layers": {name: LayerInputs}, "seconds", "passes", "peak_stats_bytes",
    "n_fit", "n_hold"}``.

    ``module`` is the network inside ``denoiser`` whose layers are collected (``layers``: names, default
    every float Linear/Conv2d). ``extra`` tensors with first dimension N are split per sample.
    ``noise_sampler_factory(indices)`` gives ancestral samplers the noise of those samples.
    ``progress(done, total)`` is called after each micro-batch of each pass.
    ``consume(group)``: called with each group's statistics (``{name: LayerInputs}``) when its pass ends,
    which are then dropped (``"layers"`` is empty): what bounds the memory by ``max_bytes`` ("Memory").
    ``products``: where each call's ``x xᵀ`` is multiplied — ``"inputs"`` (default) on the device the
    layer's inputs arrive on, a GPU's when the model samples there (:func:`add_gram_from`; the sums stay
    in host RAM either way), or ``"host"``: every input copied to the CPU first, as before session 20.
    On a CPU-only run the two are the same computation.

    ``record_calls``: also return ``"calls": {"fit": [...], "hold": [...]}``, every model call of the first
    pass as ``(x, sigma, extra, D_fp)`` (what ``quant.tune.tune_grid`` fits the grid to; the states
    and outputs of the FP trajectories, ``N·steps·latent`` values each).

    ``adjoints`` (with ``record_calls``): that many sketches of each call's flow Jacobian, appended to
    every recorded call as a fifth element (:func:`flow_adjoints`; each batch is sampled once more,
    with autograd, for the sketches' backward passes; ``"adjoint_seconds"`` in the result says how long).

    ``guidance``: the CFG scale ``s`` of the sampling, for *guided* second moments. A call whose
    batch is twice the model call's (the denoiser batching ``[uncond; cond]``, as the reference
    denoiser does) enters ``H`` as the guided rows ``x_g = (1 − s)·x_u + s·x_c`` instead of ``x_u`` and
    ``x_c`` separately: to first order (both passes' Jacobians alike) a weight error ``ΔW`` changes
    the guided prediction by ``J·ΔW·x_g``, so ``tr(ΔW H_g ΔWᵀ)`` is the layer-local error that reaches
    the sample, while ``H_u + H_c`` weighs the two passes' errors as if they added and ignores that
    guidance amplifies the part in which cond and uncond inputs differ by ``s``. Calls of any other
    batch (CFG 1, a denoiser that splits the passes) enter as they are. Per-channel ranges always
    come from the raw inputs.
    """
    n = 0 if x_init is None else int(x_init.shape[0])
    if n == 0:
        raise CalibrationError("the calibration set is empty: give at least two starting latents")
    if holdout_every and n < 2:
        raise CalibrationError(f"{n} calibration sample: the held-out check needs at least 2 "
                               "(or holdout_every=0 to skip it)")
    if holdout_every and holdout_every < 2:
        raise CalibrationError("holdout_every must be 0 (no held-out set) or at least 2")
    if not bool(torch.isfinite(x_init).all()):
        raise CalibrationError("the calibration latents contain NaN/inf")
    if products not in PRODUCTS:
        raise CalibrationError(f"products must be one of {PRODUCTS}, got {products!r}")
    chosen = calibration_layers(module, layers)
    if not chosen:
        raise CalibrationError("no Linear/Conv2d layer to collect inputs for")
    extra = dict(extra or {})
    hold = [i for i in range(n) if holdout_every and i % holdout_every == holdout_every - 1]
    fit = [i for i in range(n) if i not in set(hold)]
    batches = [("fit", fit[i : i + batch_size]) for i in range(0, len(fit), batch_size)]
    batches += [("hold", hold[i : i + batch_size]) for i in range(0, len(hold), batch_size)]
    groups = layer_groups(chosen, max_bytes)
    sizes = stats_bytes(chosen)
    t0 = time.perf_counter()
    result: dict[str, LayerInputs] = {}
    total = len(groups) * len(batches)
    done = 0
    calls = len(batches) * (int(sigmas.numel()) - 1)  # one model call per step (euler, ancestral, dpmpp_2m)
    caps = {name: row_cap(m, rows_per_k, calls, max_rows) for name, m in chosen.items()}
    calls: dict[str, list] = {"fit": [], "hold": []}
    adjoint_seconds = 0.0
    for gi, group in enumerate(groups):
        recording = record_calls and gi == 0
        spans: list = []  # (split, sample indices, extra, index of its first recorded call) per batch
        acc = _Accumulator({g: chosen[g] for g in group}, caps, chunk_elems, seed)
        acc.guidance = None if guidance is None or float(guidance) == 1.0 else float(guidance)
        acc.products = products

        def model(x, sigma, **ex):
            s = float(sigma.reshape(-1)[0])
            acc.sigma = s
            acc.weight = 1.0 if step_weight is None else float(step_weight(s))
            acc.batch = int(x.shape[0])
            out = denoiser(x, sigma, **ex)
            if recording:
                calls[acc.split].append((x.detach().clone(), sigma.detach().clone(), dict(ex), out.detach().clone()))
            return out

        with acc.hooked():
            for split, idx in batches:
                acc.split = split
                sel = torch.tensor(idx)
                ex = {k: (v[sel] if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n else v)
                      for k, v in extra.items()}
                opts = {} if noise_sampler_factory is None else {"noise_sampler": noise_sampler_factory(idx)}
                spans.append((split, idx, ex, len(calls[split])))
                sample_fn(model, x_init[sel], sigmas, ex, None, True, **opts)
                done += 1
                if progress is not None:
                    progress(done, total)
        finished = acc.finish()
        del acc  # before the next group's sums are allocated: one group's sums at a time
        if consume is None:
            result.update(finished)
        else:
            consume(finished)
        del finished
        if recording and adjoints:  # outside the hooks' scope: these passes must not enter the sums
            ta = time.perf_counter()
            for b, (split, idx, ex, first) in enumerate(spans):
                end = spans[b + 1][3] if b + 1 < len(spans) and spans[b + 1][0] == split else len(calls[split])
                opts = {} if noise_sampler_factory is None else {"noise_sampler": noise_sampler_factory(idx)}
                adj = flow_adjoints(denoiser, sample_fn, x_init[torch.tensor(idx)], sigmas, ex, adjoints,
                                    seed=seed * 1_000_003 + idx[0], **opts)
                if len(adj) != end - first:
                    raise CalibrationError(f"the differentiable pass made {len(adj)} model calls, the recorded "
                                           f"pass {end - first}: the sampler is not deterministic")
                calls[split][first:end] = [c + (a,) for c, a in zip(calls[split][first:end], adj)]
            adjoint_seconds = time.perf_counter() - ta
    return {"layers": result, "seconds": time.perf_counter() - t0, "passes": len(groups),
            **({"adjoint_seconds": adjoint_seconds} if record_calls and adjoints else {}),
            "peak_stats_bytes": (max(sum(sizes[g] for g in group) for group in groups) if consume is not None
                                 else sum(sizes.values())),
            "n_fit": len(fit), "n_hold": len(hold), **({"calls": calls} if record_calls else {})}


def flow_adjoints(denoiser, sample_fn, x_init: torch.Tensor, sigmas: torch.Tensor, extra: dict | None = None,
                  sketches: int = 4, *, seed: int = 0, **sampler_opts) -> list[torch.Tensor]:
    """Sketches of how each model call's output reaches the final latent, along the FP trajectory.

    Sampling ``x_init`` with ``sample_fn`` makes calls ``D_k = denoiser(x_k, σ_k)`` and ends at ``x_N``.
    For ``u_j ~ N(0, I)`` (``j < sketches``, seeded) this returns, per call ``k``, the tensor
    ``g_k[j] = ∂(u_j · x_N)/∂D_k`` (shape ``[sketches, *D_k.shape]``): the transposed Jacobian of the rest
    of the sampling — the sampler's own update and every later model call, differentiated through —
    applied to random directions. For a small error ``δ`` in ``D_k`` alone, ``x_N`` moves by ``J_k δ``
    and ``E_u[(g_k · δ)²] = ‖J_k δ‖²`` per sample: the error the final sample receives, where the
    one-step loss sees only ``‖δ‖²``. One backward pass per sketch gives every call's ``g`` at once.

    Choices: the Jacobian is the FP flow's, at the FP trajectory (first order: a quantized model's
    trajectory stays close to it except on the samples that tip); Gaussian sketches, so the estimate is
    unbiased and costs ``sketches`` backward passes whatever the latent size; ``sample_fn``'s
    ``no_grad`` decorator is looked through (``__wrapped__``) so the sampler's arithmetic is in the
    graph — the package's samplers, like k-diffusion's, update ``x`` out of place. Gradients of the
    model's own parameters are never computed (``torch.autograd.grad`` with the outputs as inputs).
    """
    inner = getattr(sample_fn, "__wrapped__", sample_fn)
    outs: list[torch.Tensor] = []

    def model(x, sigma, **ex):
        out = denoiser(x, sigma, **ex)
        outs.append(out)
        return out

    gen = torch.Generator().manual_seed(int(seed))
    with torch.enable_grad():
        x0 = x_init.detach().clone().requires_grad_(True)  # every call's output then lies in the graph
        x_n = inner(model, x0, sigmas, dict(extra or {}), None, True, **sampler_opts)
        if x_n.grad_fn is None:
            raise CalibrationError("the sampler is not differentiable (no autograd graph to the final latent)")
        result = [torch.empty((sketches, *o.shape), dtype=torch.float32) for o in outs]
        for j in range(sketches):
            u = torch.randn(x_n.shape, generator=gen).to(x_n)
            grads = torch.autograd.grad((x_n * u).sum(), outs, retain_graph=j < sketches - 1, allow_unused=True)
            for r, g in zip(result, grads):
                r[j] = 0.0 if g is None else g.float()
    return result


@torch.no_grad()
def probe_calls(sample_fn, x_init: torch.Tensor, sigmas: torch.Tensor, extra: dict | None = None, *,
                samples: int = 4, noise_sampler_factory=None, denoiser=None) -> list:
    """The model calls ``(x, σ, extra)`` that sampling the first ``samples`` calibration latents
    makes, for :func:`layer_probe` (recorded from the FP ``denoiser``; one entry per call)."""
    n = int(x_init.shape[0])
    idx = list(range(min(samples, n)))
    sel = torch.tensor(idx)
    ex = {k: (v[sel] if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n else v) for k, v in (extra or {}).items()}
    calls = []

    def model(x, sigma, **e):
        calls.append((x.clone(), sigma.clone(), dict(e)))
        return denoiser(x, sigma, **e)

    opts = {} if noise_sampler_factory is None else {"noise_sampler": noise_sampler_factory(idx)}
    sample_fn(model, x_init[sel], sigmas, ex, None, True, **opts)
    return calls


#: the output space the sensitivity probe measures its error in (see :func:`layer_probe`)
PROBE_SPACES = ("eps", "x0")


def layer_probe(denoiser, module: nn.Module, calls: list, step_weight: Callable[[float], float] | None = None,
                space: str = "eps"):
    """``probe(name, weight) -> float``: the step-weighted mean squared error of ``denoiser`` over
    ``calls`` when layer ``name`` of ``module`` computes with ``weight`` instead of its own: that
    layer's share of the (teacher-forced) error, the sensitivity the byte budget spends on.
    The calls run batched in one forward; the layer's weight is restored after each probe.

    ``space``: ``"eps"`` (the default) measures the error of the noise prediction, ``(D − D_ref)/σ``;
    ``"x0"`` that of the denoised output ``D`` itself, which is what a sampler step moves the latent
    by and what the grid tuning (``quant/tune.py``) minimises. The two rank layers differently: ε
    divides a call's error by σ², so the steps near x0 dominate it, while the samples that tip are
    tipped by the first steps (σ ≥ 6 of 20; docs/BENCHMARKS.md, session 11), where ``"x0"`` puts
    the weight."""
    if not calls:
        raise CalibrationError("the sensitivity probe needs at least one recorded model call")
    if space not in PROBE_SPACES:
        raise CalibrationError(f"unknown probe space {space!r}; known: {PROBE_SPACES}")
    x = torch.cat([c[0] for c in calls])
    sigma = torch.cat([c[1] for c in calls])
    keys = calls[0][2].keys()
    ex = {k: (torch.cat([c[2][k] for c in calls]) if torch.is_tensor(calls[0][2][k]) else calls[0][2][k]) for k in keys}
    w = torch.tensor([1.0 if step_weight is None else float(step_weight(float(c[1].reshape(-1)[0])))
                      for c in calls for _ in range(c[0].shape[0])])
    s4 = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    with torch.no_grad():
        ref = denoiser(x, sigma, **ex)

    @torch.no_grad()
    def probe(name: str, weight: torch.Tensor) -> float:
        layer = module.get_submodule(name)
        old = layer.weight.data
        layer.weight.data = weight.detach().to(device=old.device, dtype=old.dtype).reshape(old.shape)
        try:
            d = denoiser(x, sigma, **ex) - ref
            err = (d / s4 if space == "eps" else d).pow(2).flatten(1).mean(1)
        finally:
            layer.weight.data = old
        return float((err * w).sum() / w.sum())

    return probe


def calls_of_first_samples(calls: list, samples: int) -> list:
    """The recorded calls (``collect_inputs(record_calls=True)``: micro-batch after micro-batch, each
    over its whole trajectory) of the first micro-batches that hold at least ``samples`` samples; a
    new micro-batch starts where σ rises again."""
    out, count, prev = [], 0, None
    for c in calls:
        s = float(c[1].reshape(-1)[0])
        if prev is None or s > prev:
            if count >= samples:
                break
            count += int(c[0].shape[0])
        out.append(c)
        prev = s
    return out


def _layer_delta_output(m: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What a weight change ``delta`` adds to layer ``m``'s output on input ``x`` (no bias)."""
    delta = delta.to(device=x.device, dtype=x.dtype)
    if isinstance(m, nn.Conv2d):
        return m._conv_forward(x, delta, None)
    return F.linear(x, delta)


class SketchProbe:
    """Every layer's share of the end-to-end error at once, to first order: the sensitivity
    :func:`layer_probe` measures one layer at a time, from a few backward passes instead of one
    forward pass per layer (the probe's cost grows with the number of layers — 278 model calls per
    calibration call on SD1.5 — this one does not).

    The probe's per-layer error is ``Σ_b w_b·‖δε_b‖² / (Σ w·numel)`` with ``δε_b`` the change of sample
    ``b``'s output when layer ``l`` computes with ``W + ΔW``. To first order ``δε_b = J_{l,b}(ΔW)``, and
    for a Gaussian ``u_b``, ``E[(u_b·J_{l,b}(ΔW))²] = ‖J_{l,b}(ΔW)‖²``. One backward pass of
    ``Σ_b c_b·u_b·D_b`` (``c_b`` the sample's step weight and, in ε space, ``1/σ_b``) gives the
    gradient ``g_l`` at every layer's output; ``u_b·J_{l,b}(ΔW) = ⟨g_{l,b}, ΔW·x_{l,b}⟩`` needs only the
    layer's own input ``x_l`` and one extra layer operation with ``ΔW``. The inner products are taken
    per latent (a layer batch that is a multiple of the call's batch is read pass by pass, as CFG's
    cond and uncond passes are stacked), so each sketch averages over every sample of the calls:
    with ``B`` samples and ``K`` sketches the estimate's relative spread is about ``√(2/(B·K))``.

    It is the linearisation of the exact probe: the two agree where a layer's error is small
    against what it changes downstream (tested; on the reference model the per-layer values rank
    like the exact probe's with Spearman 0.98–0.99 at 2–4 sketches), and it cannot see the
    non-linear part. Memory: the activations of one backward pass over ``max_batch`` samples (the
    calls run in chunks of at most that many, all at once by default) and one layer's ``ΔW`` at a
    time. Use :meth:`batch` with every layer's candidate weight at once; ``probe(name, weight)``
    also works (one layer per set of backward passes). Hooks go on the given ``module``'s layers
    only, inside the call, and are removed on exit."""

    def __init__(self, denoiser, module: nn.Module, calls: list, step_weight: Callable[[float], float] | None = None,
                 space: str = "eps", sketches: int = 2, seed: int = 0, max_batch: int | None = None) -> None:
        if not calls:
            raise CalibrationError("the sensitivity probe needs at least one recorded model call")
        if space not in PROBE_SPACES:
            raise CalibrationError(f"unknown probe space {space!r}; known: {PROBE_SPACES}")
        if sketches < 1:
            raise CalibrationError(f"the sketched probe needs at least one sketch, got {sketches!r}")
        self.denoiser, self.module, self.sketches, self.seed = denoiser, module, int(sketches), int(seed)
        w = torch.tensor([1.0 if step_weight is None else float(step_weight(float(c[1].reshape(-1)[0])))
                          for c in calls for _ in range(c[0].shape[0])])
        numel = calls[0][0][0].numel()
        coef = (w / (w.sum() * numel)).sqrt()
        self.chunks, i, cur = [], 0, []
        for c in calls:
            n = int(c[0].shape[0])
            s4 = c[1].reshape(-1, *([1] * (c[0].ndim - 1))).float()
            cc = coef[i : i + n].reshape(s4.shape).to(s4)
            cur.append((c[0], c[1], c[2], cc / s4 if space == "eps" else cc))
            i += n
            if max_batch is None or sum(int(t[0].shape[0]) for t in cur) >= max_batch:
                self.chunks.append(cur)
                cur = []
        if cur:
            self.chunks.append(cur)

    def __call__(self, name: str, weight: torch.Tensor) -> float:
        return self.batch({name: weight})[name]

    @staticmethod
    def _merge(chunk):
        x = torch.cat([c[0] for c in chunk])
        sigma = torch.cat([c[1] for c in chunk])
        keys = chunk[0][2].keys()
        extra = {k: (torch.cat([c[2][k] for c in chunk]) if torch.is_tensor(chunk[0][2][k]) else chunk[0][2][k])
                 for k in keys}
        return x, sigma, extra, torch.cat([c[3] for c in chunk])

    def batch(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """``{name: estimated error}`` for each layer computing with ``weights[name]`` (the others
        unchanged, as in :func:`layer_probe`)."""
        layers = {n: self.module.get_submodule(n) for n in weights}
        acc = {n: 0.0 for n in layers}
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.sketches):
            for chunk in self.chunks:
                x, sigma, extra, coef = self._merge(chunk)
                n_lat = int(x.shape[0])
                seen: dict[str, list] = {n: [] for n in layers}

                def hook_for(name):
                    def hook(mod, args, out):
                        z = torch.zeros_like(out, requires_grad=True)
                        seen[name].append((args[0].detach(), z))
                        return out + z
                    return hook

                handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
                try:
                    with torch.enable_grad():
                        d = self.denoiser(x, sigma, **extra)
                        u = torch.randn(d.shape, generator=gen).to(d)
                        loss = (u * d * coef.to(d)).sum()
                        zs = [z for n in layers for _, z in seen[n]]
                        grads = torch.autograd.grad(loss, zs, allow_unused=True)
                finally:
                    for h in handles:
                        h.remove()
                del d, loss, zs
                grads = iter(grads)
                with torch.no_grad():
                    for n, m in layers.items():
                        per = torch.zeros(n_lat, dtype=torch.float64)
                        delta = None
                        for x_in, _ in seen[n]:
                            g = next(grads)
                            if g is None:
                                continue
                            if delta is None:
                                delta = (weights[n].detach().to(m.weight.device, torch.float32).reshape(m.weight.shape)
                                         - m.weight.detach().float())
                            prod = (g.double() * _layer_delta_output(m, x_in, delta).double()).flatten(1).sum(1)
                            if prod.shape[0] % n_lat == 0:
                                per += prod.reshape(-1, n_lat).sum(0).cpu()
                            else:  # a batch not made of the calls' samples: one projection for all of it
                                per[0] += prod.sum().cpu()
                        acc[n] += float(per.pow(2).sum())
                del seen
        return {n: v / self.sketches for n, v in acc.items()}
