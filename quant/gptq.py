"""Error-compensated rounding (GPTQ, Frantar et al. 2023; OBQ, Frantar & Alistarh 2022) into the
pack's existing weight storage.

A layer ``y = W x`` with calibration inputs of second moment ``H = Σ x xᵀ`` (``[K, K]``, a conv's
inputs unfolded to ``K = in·kh·kw`` columns) has output error ``tr(ΔW H ΔWᵀ)`` for a weight error
``ΔW``. GPTQ rounds the columns one at a time and pushes each column's rounding error onto the
columns not yet rounded, through the Cholesky factor of ``H⁻¹`` (the optimal update of OBS for a
quadratic loss); blocks of columns are updated lazily. The result is an ordinary quantized weight:
codes on exactly the grid and storage of round-to-nearest (``weights.weight_grid``), so it costs
zero extra bytes and loads with ``load_quantized`` like any other.

Choices (each a parameter):

* **damping** ``λ·mean(diag H)`` added to the diagonal (GPTQ's ``percdamp``, default 0.01) keeps
  ``H`` positive definite when the calibration set is small or channels are dead; columns with
  ``H_ii = 0`` (inputs never non-zero in calibration) keep their weights and are rounded to
  nearest, never zeroed, since an input that was zero in calibration need not be zero later.
* **activation ordering** (columns in decreasing ``H_ii``, GPTQ's ``act_order``) with **static
  groups**: the group-64 scales and zero points are those of round-to-nearest, fixed before any
  column moves, so the groups stay contiguous in the original input order that the storage packs;
  reordering columns with groups chosen on the fly would create groups the storage cannot hold.
* **natural order** (``act_order=False``) chooses each group's grid from the already-updated
  weights when its first column is reached (GPTQ's ``groupsize`` without reordering); the grid then
  follows the compensated weights but is still contiguous, so both variants fit the storage.

Per-channel types (int8, int4/uint4 without groups) have one grid per row, fixed up front.
"""

from __future__ import annotations

import torch

from .errors import QuantizationError
from .qtypes import PER_CHANNEL, QType, weight_qtype
from .weights import check_fits, round_to_grid, storage_from_codes, weight_grid

DEFAULT_DAMP = 0.01


def dampened(h: torch.Tensor, damp: float = DEFAULT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + λ·mean(diag H)·I, dead)`` in float64, with dead columns' diagonal set to 1.

    Raises :class:`QuantizationError` for a non-finite or all-zero ``H`` (nothing to weight with).
    """
    h = h.detach().double().clone()
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise QuantizationError(f"input second moments must be a square matrix, got shape {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise QuantizationError("input second moments contain NaN or inf; recollect the calibration inputs")
    diag = torch.diagonal(h)
    dead = diag <= 0
    if bool(dead.all()):
        raise QuantizationError("input second moments are all zero: the layer saw no non-zero input")
    h[dead, :] = 0
    h[:, dead] = 0
    diag = torch.diagonal(h)
    diag[dead] = 1.0
    diag += damp * float(diag[~dead].mean())
    return h, dead


def _upper_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), raising damping tenfold up to 3
    times if ``H`` is numerically singular."""
    for attempt in range(4):
        try:
            low = torch.linalg.cholesky(h)
            return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            extra = damp * 10 ** (attempt + 1) * float(torch.diagonal(h).mean())
            h = h + extra * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    raise QuantizationError("input second moments are singular even after damping; use round-to-nearest")


def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, qt: QType | str, damp: float = DEFAULT_DAMP,
                  act_order: bool = True, block_size: int = 128, layer: str = "?") -> dict[str, torch.Tensor]:
    """Quantize ``weight`` (Linear ``[out, K]`` or Conv2d ``[out, in, kh, kw]``) with GPTQ given its
    inputs' second moments ``h`` ``[K, K]``; returns the storage tensors of ``qt`` (what
    ``weights.quantize_weight`` returns, same shapes and dtypes)."""
    qt = weight_qtype(qt)
    if not torch.isfinite(weight).all():
        raise QuantizationError(f"layer {layer!r}: weight has NaN or inf values; refusing to quantize")
    check_fits(qt, weight.shape, layer)
    w = weight.detach().double().reshape(weight.shape[0], -1).clone()
    out, k = w.shape
    if tuple(h.shape) != (k, k):
        raise QuantizationError(f"layer {layer!r}: input second moments are {tuple(h.shape)}, the weight needs ({k}, {k})")
    try:
        hd, _ = dampened(h.to(w.device), damp)
    except QuantizationError as exc:
        raise QuantizationError(f"layer {layer!r}: {exc}") from None
    group = k if qt.granularity == PER_CHANNEL else qt.group_size
    static = act_order or group == k
    scale, zero = weight_grid(w.float(), qt)
    scale, zero = scale.double(), None if zero is None else zero.double()
    perm = torch.argsort(torch.diagonal(hd), descending=True) if act_order else torch.arange(k, device=w.device)
    w, hd = w[:, perm], hd[perm][:, perm]
    u = _upper_inverse_factor(hd, damp)
    codes = torch.zeros(out, k, dtype=torch.float64, device=w.device)
    # blocks of whole groups in natural order, so a group's grid is chosen from its updated columns
    bs = block_size if static else max(group, block_size // group * group)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = int(perm[i1 + j])
            g = col // group
            if not static and col % group == 0:
                s_new, z_new = weight_grid(w1[:, j : j + group].float(), qt)
                scale[:, g] = s_new[:, 0].double()
                if zero is not None:
                    zero[:, g] = z_new[:, 0].double()
            c, d = round_to_grid(w1[:, j], scale[:, g], None if zero is None else zero[:, g], qt)
            codes[:, i1 + j] = c.double()
            e = (w1[:, j] - d) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err1[:, j] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return storage_from_codes(codes[:, inverse], scale.float(), None if zero is None else zero.float(), qt)


def output_error(w_ref: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``: the summed squared output error of ``w_q`` against ``w_ref`` over the
    inputs whose second moment is ``h`` (weights flattened to ``[out, K]``)."""
    d = (w_q.detach().double() - w_ref.detach().double()).reshape(w_ref.shape[0], -1)
    return float(((d @ h.double()) * d).sum())
