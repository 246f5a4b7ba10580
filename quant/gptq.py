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

**Precision.** A layer narrower than ``FLOAT32_FROM`` inputs is solved in float64; a wider one in
float32 (what GPTQ's own implementation uses everywhere): the factorizations, the column sweep and
the held-out errors. Our choice, made for SD1.5's widths (``K`` up to 23 040), where each ``K×K``
float64 matrix is 4 GiB and the solve is hours of CPU time: float32 halves both the matrices and,
on the CPU, roughly the time, and the statistics themselves are float32 sums, so float64 adds no
information to them, only to the arithmetic. Below the threshold the cost is small and float64
keeps the results of the narrower models (the shipped reference model: ``K`` ≤ 2304) exactly
what they were. ``docs/BENCHMARKS.md`` ("Cost") has the measured difference.
"""

from __future__ import annotations

import torch

from .errors import QuantizationError
from .qtypes import PER_CHANNEL, QType, weight_qtype
from .weights import check_fits, round_to_grid, storage_from_codes, weight_grid

DEFAULT_DAMP = 0.01
#: layers with at least this many inputs (``K``) are solved in float32, narrower ones in float64
FLOAT32_FROM = 4096


def solve_dtype(k: int, float32_from: int | None = FLOAT32_FROM) -> torch.dtype:
    """The dtype a layer with ``k`` inputs is solved in (``float32_from`` None: always float64)."""
    return torch.float32 if float32_from is not None and k >= float32_from else torch.float64


def reduced_float32(device: torch.device | str) -> bool:
    """Whether float32 products on ``device`` would run at reduced precision: TF32 on a CUDA device, a
    process-wide setting of torch that another node pack may have turned on (10-bit mantissas, errors
    of about 1e-3 in a product, which GPTQ's authors also turn off). The statistics and the solves
    check it rather than change it."""
    if torch.device(device).type != "cuda":
        return False
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def dampened(h: torch.Tensor, damp: float = DEFAULT_DAMP,
             dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + λ·mean(diag H)·I, dead)`` in ``dtype``, with dead columns' diagonal set to 1.

    Raises :class:`QuantizationError` for a non-finite or all-zero ``H`` (nothing to weight with).
    """
    h = h.detach().to(dtype, copy=True)
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


def _upper_inverse_factor(h: torch.Tensor | None, damp: float, low: torch.Tensor | None = None,
                          rebuild=None) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), raising damping tenfold up to 3
    times if ``H`` is numerically singular. ``low``: ``H``'s Cholesky factor, if already known; then
    ``h`` may be None and ``rebuild()`` gives ``H`` only if a retry needs it (so the caller need not
    keep ``H`` alive through the factorization)."""
    for attempt in range(4):
        try:
            if low is None:
                low = torch.linalg.cholesky(h)
            inv = torch.cholesky_inverse(low)
            low = None  # the caller's reference, if any, keeps it; free ours before the next factor
            u = torch.linalg.cholesky(inv, upper=True)
            del inv
            return u
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            low = None
            if h is None:
                h = rebuild()
            extra = damp * 10 ** (attempt + 1) * float(torch.diagonal(h).mean())
            h = h + extra * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    raise QuantizationError("input second moments are singular even after damping; use round-to-nearest")


class HessianFactors:
    """One layer's dampened ``H`` and what is factorized from it, computed once and shared by every solve
    from the same ``H``: GPTQ at several bit-widths (the layer's own type and the budget's int8 and
    3-bit candidates: one upper factor of ``H⁻¹`` per column order) and the low-rank branch (the
    Cholesky factor of ``H``, which is also the first step of the natural order's factor).

    Every factor is computed on first use by exactly the operations a standalone call performs, so
    sharing changes no value; it saves three of the five ``K³`` factorizations of a layer under the
    mixed default, which is most of the solve time at SD1.5's widths. :meth:`drop` frees factors no
    longer needed (each is a ``K×K`` matrix of ``dtype``: 2 GiB in float32 at K = 23040).

    ``dtype``: what every factor, and every solve that uses them, computes in (:func:`solve_dtype`)."""

    def __init__(self, h: torch.Tensor, damp: float = DEFAULT_DAMP, dtype: torch.dtype = torch.float64) -> None:
        self.h, self.damp, self.dtype = h, damp, dtype
        self._hd: torch.Tensor | None = None
        self._upper: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self._low: torch.Tensor | None = None

    def dampened(self) -> torch.Tensor:
        if self._hd is None:
            self._hd, _ = dampened(self.h, self.damp, self.dtype)
        return self._hd

    def upper(self, act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perm, U)``: the column order (decreasing ``diag H`` with ``act_order``) and the upper factor
        of the permuted ``H⁻¹``."""
        if act_order not in self._upper:
            hd = self.dampened()
            k = hd.shape[0]
            perm = torch.argsort(torch.diagonal(hd), descending=True) if act_order else torch.arange(k, device=hd.device)
            if act_order:
                self._upper[True] = (perm, _upper_inverse_factor(hd[perm][:, perm], self.damp))
            else:  # natural order: the Cholesky factor of H itself is the first step, kept for lower()
                if self._low is None:
                    try:
                        self._low = torch.linalg.cholesky(hd)
                    except RuntimeError:
                        self._low = None
                if self._low is not None:  # H itself is no longer needed: one K×K matrix less at the peak
                    del hd
                    self._hd = None
                    u = _upper_inverse_factor(None, self.damp, self._low, rebuild=lambda: dampened(self.h, self.damp, self.dtype)[0])
                else:
                    u = _upper_inverse_factor(hd, self.damp)
                self._upper[False] = (perm, u)
        return self._upper[act_order]

    def lower(self) -> torch.Tensor:
        """The Cholesky factor ``L`` of the dampened ``H`` (``H + λ = L Lᵀ``)."""
        if self._low is None:
            self._low = torch.linalg.cholesky(self.dampened())
        return self._low

    def drop(self, *what: str) -> None:
        """Free ``"natural"`` / ``"act_order"`` (upper factors), ``"dampened"`` or ``"lower"``."""
        for w in what:
            if w in ("natural", "act_order"):
                self._upper.pop(w == "act_order", None)
            elif w == "dampened":
                self._hd = None
            elif w == "lower":
                self._low = None


def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, qt: QType | str, damp: float = DEFAULT_DAMP,
                  act_order: bool = True, block_size: int = 128, layer: str = "?",
                  factors: HessianFactors | None = None) -> dict[str, torch.Tensor]:
    """Quantize ``weight`` (Linear ``[out, K]`` or Conv2d ``[out, in, kh, kw]``) with GPTQ given its
    inputs' second moments ``h`` ``[K, K]``; returns the storage tensors of ``qt`` (what
    ``weights.quantize_weight`` returns, same shapes and dtypes). ``factors``: a
    :class:`HessianFactors` of this ``h`` and ``damp`` to take the factorization from (and leave it in);
    the sweep computes in its ``dtype`` (float64 without ``factors``)."""
    qt = weight_qtype(qt)
    if not torch.isfinite(weight).all():
        raise QuantizationError(f"layer {layer!r}: weight has NaN or inf values; refusing to quantize")
    check_fits(qt, weight.shape, layer)
    dtype = torch.float64 if factors is None else factors.dtype
    w = weight.detach().to(dtype, copy=True).reshape(weight.shape[0], -1)
    out, k = w.shape
    if tuple(h.shape) != (k, k):
        raise QuantizationError(f"layer {layer!r}: input second moments are {tuple(h.shape)}, the weight needs ({k}, {k})")
    if factors is None:
        factors = HessianFactors(h.to(w.device), damp, dtype)
    try:
        perm, u = factors.upper(act_order)
    except QuantizationError as exc:
        raise QuantizationError(f"layer {layer!r}: {exc}") from None
    group = k if qt.granularity == PER_CHANNEL else qt.group_size
    static = act_order or group == k
    scale, zero = weight_grid(w.float(), qt)
    scale, zero = scale.to(dtype), None if zero is None else zero.to(dtype)
    w = w[:, perm]
    codes = torch.zeros(out, k, dtype=dtype, device=w.device)  # integers ≤ 255: exact in either dtype
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
                scale[:, g] = s_new[:, 0].to(dtype)
                if zero is not None:
                    zero[:, g] = z_new[:, 0].to(dtype)
            c, d = round_to_grid(w1[:, j], scale[:, g], None if zero is None else zero[:, g], qt)
            codes[:, i1 + j] = c.to(dtype)
            e = (w1[:, j] - d) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err1[:, j] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return storage_from_codes(codes[:, inverse], scale.float(), None if zero is None else zero.float(), qt)


def output_error(w_ref: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
    """``tr(ΔW H ΔWᵀ)``: the summed squared output error of ``w_q`` against ``w_ref`` over the
    inputs whose second moment is ``h`` (weights flattened to ``[out, K]``). ``ΔW`` is formed in
    float64, the ``out·K²`` product computed in ``dtype`` and summed in float64."""
    d = (w_q.detach().double() - w_ref.detach().double()).reshape(w_ref.shape[0], -1).to(dtype)
    return float(((d @ h.to(dtype)) * d).double().sum())
