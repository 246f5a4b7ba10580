"""An activation-weighted low-rank branch for what rounding leaves (closed form, LQER/QERA-style).

With the rounding residual ``E = W − W_q`` (``[out, K]``) and the calibration inputs' second
moment ``H = L Lᵀ``, the rank-``r`` product ``A·B`` minimising the output error
``tr((E − A B) H (E − A B)ᵀ)`` is ``A B = SVD_r(E L)·L⁻¹`` (Eckart–Young on ``E L``; the "exact"
solution of QERA, Zhang et al. 2025, with ``R^{1/2}`` taken as the Cholesky factor): ``A = U_r S_r``,
``B = V_rᵀ L⁻¹``. The error left at rank ``r`` is the tail ``Σ_{i>r} S_i²``, so one SVD gives the
benefit of every rank, which is what the byte-budget allocation (``budget.py``) needs.

The factors are stored in fp16 (``r·(out + K)`` values); the branch runs on the layer's unquantized
input. ``H`` is damped like GPTQ's (``gptq.dampened``) so the factor exists for rank-deficient
statistics.
"""

from __future__ import annotations

import torch

from .gptq import DEFAULT_DAMP, dampened


def weighted_svd(residual: torch.Tensor, h: torch.Tensor, damp: float = DEFAULT_DAMP, factors=None):
    """``(U, S, Vh, L)`` of ``E L`` with ``H + damping = L Lᵀ`` (float64); ``factors``: a
    ``gptq.HessianFactors`` of this ``h`` and ``damp`` to take ``L`` from (then in its ``dtype``)."""
    dtype = torch.float64 if factors is None else factors.dtype
    e = residual.detach().to(dtype).reshape(residual.shape[0], -1)
    if factors is not None:
        low = factors.lower()
    else:
        hd, _ = dampened(h, damp)
        low = torch.linalg.cholesky(hd)
        del hd
    u, s, vh = torch.linalg.svd(e @ low, full_matrices=False)
    return u, s, vh, low


def factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, low: torch.Tensor, rank: int):
    """``(A [out, r], B [r, K])`` float32 of the rank-``r`` weighted approximation."""
    a = u[:, :rank] * s[:rank]
    # B = V_rᵀ L⁻¹  ⇔  Lᵀ Bᵀ = V_r
    b = torch.linalg.solve_triangular(low.T, vh[:rank].T, upper=True).T
    return a.float(), b.float()


def lowrank_branch(residual: torch.Tensor, h: torch.Tensor, rank: int, damp: float = DEFAULT_DAMP):
    """The rank-``rank`` branch ``(A, B)`` for ``residual`` under inputs of second moment ``h``."""
    u, s, vh, low = weighted_svd(residual, h, damp)
    return factors(u, s, vh, low, min(rank, s.numel()))


def branch_bytes(out: int, k: int, rank: int) -> int:
    return 2 * rank * (out + k)
