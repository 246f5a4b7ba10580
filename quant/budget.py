"""Spending a byte budget where it removes the most error: int8 layers and low-rank branches.

The budget is a ratio of the model's own fp16 bytes (every parameter and buffer at 2 bytes, integer
tensors at their size). What the plan's quantized model takes is the base; the headroom
``budget·fp16 − base`` is spent greedily on the items with the largest benefit per byte:

* ``int8``: the layer at int8 per-channel (its error falls to about 1/16² of 4-bit's, taken as 0);
* ``rank``: the next 4 ranks of the layer's activation-weighted low-rank branch (:mod:`.lowrank`),
  whose benefit is the share of the weighted residual those singular values hold;
* ``kept``: the plan's 16-bit layers (time embedding, first/last conv) start at int8 weights (16-bit
  activations), which frees bytes; keeping one at 16-bit is an item like the others, whose cost is
  the bytes it takes back and whose benefit is its int8 error. (If even the plan's own layers do not
  fit the budget, they stay as the plan says and nothing is spent.)

The benefit of removing a share ``f`` of a layer's output error is ``f·sensitivity`` where the
sensitivity is the layer's measured share of the end-to-end error (a probe that quantizes that
layer alone, e.g. ``calibration.inputs.layer_sensitivity``), or, without a probe, the layer's
relative output error ``err/‖W x‖²`` (every layer's output counted alike). A layer raised to int8
gives back the ranks it had. Branches are kept only where they lower the held-out error.

* ``uint3`` (mixed precision in both directions, :func:`_allocate_mixed`): a 4-bit group layer may
  also go *down* to 3-bit codes with the same groups (``uint3_gG``: 3.5 instead of 4.5 bits per
  weight at G = 64), which frees bytes for the layers that matter. On the reference model the
  probe finds the layers' shares of the end-to-end error spread over five orders of magnitude (the
  14×14 convolutions and skips ~10⁻⁵, the time-embedding projections ~10⁻¹⁰), so a layer whose
  error barely reaches the sample can pay for another's int8. With downgrades a greedy pass over
  "benefit per byte" no longer fits (an item can free bytes at a cost), so every layer picks one
  of its precisions — 3-bit, its own 4-bit type, int8; for the plan's 16-bit layers int8 or
  16-bit — by a Lagrangian relaxation of the multiple-choice knapsack: each layer minimises
  ``sensitivity·error + λ·bytes`` and ``λ`` is bisected to the smallest value whose choices fit
  the budget; bytes the rounding of ``λ`` leaves are then spent greedily on single upgrades and
  on ranks, as above. The 3-bit error used to choose is the layer's own 4-bit error times the
  ratio of the two precisions' round-to-nearest errors on the held-out inputs (GPTQ gains about as
  much at both); the chosen layers are then solved at 3 bits for real (:func:`apply_allocation`).
  Layers with input scales (AWQ) keep their precision, since their scales were searched for it.
  Without ``uint3`` the greedy allocation above runs unchanged.

Everything an allocation may give a layer is solved by :func:`prepare` while the layer's calibration
statistics exist — its int8 and 3-bit solutions, the 3-bit error ratio, the weighted SVD's factors at
the largest rank and the held-out error at every rank the allocation can reach — so the allocation and
:func:`apply_allocation` never read the statistics. That is what lets calibration drop each group of
layers' ``K×K`` sums as soon as its layers are solved (``calibrated.CalibratedSolver``): the
SD1.5-shaped UNet's 52 GiB of sums are never held at once. The price is solving every layer's
candidates, not only the chosen ones' (on the reference model a few seconds).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .lowrank import branch_bytes, factors, weighted_svd
from .gptq import output_error, solve_dtype
from .qtypes import qtype
from .weights import blob_nbytes, dequantize_weight, input_size, misfit, quantize_weight

RANK_STEP = 4


def fp16_bytes(module: nn.Module) -> int:
    """Bytes of the module with every floating tensor in fp16 (shared storages counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return total


def layer_bytes(weight_type: str, shape, bias: bool, channels: int, scale: bool, rank: int) -> int:
    out, k = shape[0], input_size(shape)
    return (blob_nbytes(qtype(weight_type), shape) + (2 * out if bias else 0) + (2 * channels if scale else 0)
            + branch_bytes(out, k, rank))


def _channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups


@dataclass
class Candidates:
    """What the allocation may give one layer, solved from its statistics by :func:`prepare`.

    ``int8`` / ``low``: ``(storage, rounding, held-out error)`` of the layer at int8 / at ``low_type``
    (3-bit codes, same groups), ``low_ratio`` the ratio of the two precisions' round-to-nearest
    held-out errors (the allocation's estimate of the 3-bit error). ``s``: the weighted residual's
    singular values; ``a`` ``[out, R]`` / ``b`` ``[R, K]`` the branch factors at the largest reachable
    rank ``R``, already rounded to fp16 (the factors of rank ``r`` are their first ``r`` columns / rows);
    ``rank_errors[r]`` the held-out error with the rank-``r`` branch added."""

    int8: tuple | None = None
    low_type: str | None = None
    low: tuple | None = None
    low_ratio: float | None = None
    s: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    rank_errors: dict = field(default_factory=dict)


def reachable_ranks(max_rank: int, singular_values: int) -> list[int]:
    """The ranks the allocation can give a layer: steps of ``RANK_STEP`` up to ``min(max_rank, len(S))``."""
    top, ranks, r = min(max_rank, singular_values), [], 0
    while min(r + RANK_STEP, top) > r:
        r = min(r + RANK_STEP, top)
        ranks.append(r)
    return ranks


def _solve_at(w2: torch.Tensor, weight_type: str, st, cfg, name: str, hessian, h_hold: torch.Tensor,
              rtn_error: float | None = None) -> tuple:
    """``(storage, rounding, held-out error)``: round-to-nearest or GPTQ (activation order) at
    ``weight_type``, whichever has the lower held-out error (``h_hold``: the held-out sums, in the
    dtype the layer is solved in, ``hessian.dtype``; ``rtn_error``: round-to-nearest's, if known)."""
    from .gptq import gptq_quantize

    qt = qtype(weight_type)
    cands = {"rtn": quantize_weight(w2, qt, name)}
    if cfg.rounding == "gptq":
        cands["gptq_act_order"] = gptq_quantize(w2, st.h_fit, qt, cfg.damp, True, layer=name, factors=hessian)
    errs = {k: (rtn_error if k == "rtn" and rtn_error is not None else
                output_error(w2, dequantize_weight(v, qt, w2.shape, torch.float32), h_hold, hessian.dtype))
            for k, v in cands.items()}
    best = min(errs, key=errs.get)
    return cands[best], best, errs[best]


def prepare(name: str, weight: torch.Tensor, sol, st, cfg, hessian=None) -> None:
    """Solve what the budget may give layer ``name`` (``sol``: its solution, ``st``: its statistics) into
    ``sol.candidates`` — nothing for a layer the allocation never touches (no usable statistics, no
    error, or a plan's 16-bit layer, whose only item needs no statistics). ``hessian``: the layer's
    ``gptq.HessianFactors`` of ``st.h_fit`` (shared with its rounding; freed here as they stop
    being needed)."""
    from .gptq import HessianFactors

    if cfg.budget is None or st is None or sol.kept or sol.err_hold <= 0:
        return
    hessian = hessian or HessianFactors(st.h_fit, cfg.damp, solve_dtype(st.k, cfg.float32_from))
    shape = tuple(weight.shape)
    w2 = _flat(weight)
    h_hold = st.h_hold.to(hessian.dtype)
    cand = Candidates()
    if "int8" in cfg.budget_options and sol.weight_type != "int8":
        cand.int8 = _solve_at(w2, "int8", st, cfg, name, hessian, h_hold)
    low = None if sol.input_scale is not None else lower_type(sol.weight_type, shape)
    if "uint3" in cfg.budget_options and low is not None and sol.err_rtn_hold > 0:
        low_rtn = _rtn_error(w2, low, h_hold, hessian.dtype)
        cand.low_type, cand.low_ratio = low, low_rtn / sol.err_rtn_hold
        cand.low = _solve_at(w2, low, st, cfg, name, hessian, h_hold, low_rtn)
    hessian.drop("act_order", "natural", "dampened")  # only L is still needed
    if "rank" in cfg.budget_options and cfg.max_rank > 0:
        resid = w2.double() - _effective(sol, shape)
        u, s, vh, low_factor = weighted_svd(resid, st.h_fit, cfg.damp, hessian)
        hessian.drop("lower")
        ranks = reachable_ranks(cfg.max_rank, s.numel())
        cand.s = s
        if ranks:
            a, b = factors(u, s, vh, low_factor, ranks[-1])
            cand.a, cand.b = a.half().float(), b.half().float()
            cand.rank_errors = _rank_errors(resid, sol.err_hold, cand.a, cand.b, h_hold, ranks)
    sol.candidates = cand


def _rank_errors(resid: torch.Tensor, err: float, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
                 ranks: list[int]) -> dict[int, float]:
    """Held-out error ``tr((E − A_r B_r) H (E − A_r B_r)ᵀ)`` for every rank ``r`` in ``ranks``, with
    ``err = tr(E H Eᵀ)`` known: ``err − 2·tr(A_r B_r H Eᵀ) + tr(A_r (B_r H B_rᵀ) A_rᵀ)``, which costs
    ``R·K²`` for all ranks together instead of ``out·K²`` per rank. ``B H`` is computed in ``h``'s
    dtype (the layer's solve dtype), the rest in float64."""
    a, p = a.double(), (b.to(h.dtype) @ h).double()  # p: [R, K]
    cross = p @ resid.T  # [R, out]: row i is b_i H Eᵀ
    gram = p @ b.double().T  # [R, R]
    out = {}
    for r in ranks:
        ar = a[:, :r]
        out[r] = err - 2.0 * float((ar * cross[:r].T).sum()) + float(((ar @ gram[:r, :r]) * ar).sum())
    return out


def allocate(module, plan, floats: dict, solutions: dict, cfg, sensitivity=None) -> dict:
    """Choose int8 (and, with ``uint3``, 3-bit) layers and ranks under ``cfg.budget``; returns the
    allocation report."""
    total_fp16 = fp16_bytes(module)
    base = total_fp16
    savings = {}  # the plan's 16-bit layers: bytes freed by storing them at int8 (all start there)
    for name, sol in solutions.items():
        m = floats[name]
        bytes_q = layer_bytes(sol.weight_type, tuple(m.weight.shape), m.bias is not None, _channels(m),
                              sol.input_scale is not None, 0)
        bytes_f = 2 * (m.weight.numel() + (0 if m.bias is None else m.bias.numel()))
        base += bytes_q - bytes_f
        if sol.kept:
            savings[name] = bytes_f - bytes_q
    budget = int(cfg.budget * total_fp16)
    headroom = budget - base
    report = {"fp16_bytes": total_fp16, "base_bytes": base, "budget_bytes": budget, "int8": [], "ranks": {},
              "kept_16bit": sorted(savings), "kept_int8": [], "spent_bytes": 0,
              "weighting": "measured sensitivity" if sensitivity else "relative output error"}
    if headroom < 0 and savings and "uint3" not in cfg.budget_options:  # not even the plan's own layers fit: they stay
        report["base_bytes"] = base + sum(savings.values())
        savings = {}
    if headroom <= 0 and "uint3" not in cfg.budget_options:
        report["kept_16bit"] = sorted(n for n, sol in solutions.items() if sol.kept)
        report["note"] = (f"the plan's quantized model already takes {base / total_fp16:.4f}× fp16 ≥ the budget "
                          f"{cfg.budget:.4f}×: nothing to spend")
        return report
    weights = {}
    for name, sol in solutions.items():
        if sol.err_hold <= 0:
            continue
        if sensitivity is not None:
            weights[name] = float(sensitivity.get(name, 0.0)) / sol.err_hold
        else:
            weights[name] = 1.0 / max(sol.out_energy_hold, 1e-30)
    if "uint3" in cfg.budget_options:
        return _allocate_mixed(report, floats, solutions, cfg, weights, savings, headroom, total_fp16, base)
    heap = []  # (−benefit per byte, tiebreak, kind, name, payload)
    for name, cost in savings.items():  # keeping a plan layer at 16-bit removes its int8 error
        sol = solutions[name]
        if name in weights and cost > 0:
            heapq.heappush(heap, (-weights[name] * sol.err_hold / cost, len(heap), "keep16", name, cost))
    for name, sol in solutions.items():
        m, cand = floats[name], sol.candidates
        if name not in weights or cand is None or sol.kept:
            continue
        shape, w8 = tuple(m.weight.shape), "int8"
        if "int8" in cfg.budget_options and sol.weight_type != w8:
            extra = (layer_bytes(w8, shape, False, 0, False, 0) - layer_bytes(sol.weight_type, shape, False, 0, False, 0)
                     - (2 * _channels(m) if sol.input_scale is not None else 0))
            heapq.heappush(heap, (-weights[name] * sol.err_hold / max(extra, 1), len(heap), "int8", name, extra))
        if "rank" in cfg.budget_options and cfg.max_rank > 0:
            _push_rank(heap, name, sol, 0, cfg, weights, shape)
    ranks: dict[str, int] = {}
    int8: set[str] = set()
    keep16: set[str] = {n for n in savings if n not in weights}  # nothing measured: leave as planned
    spent = sum(savings[n] for n in keep16)
    while heap:
        neg, _, kind, name, payload = heapq.heappop(heap)
        if neg >= 0 or name in int8:
            continue
        m = floats[name]
        shape = tuple(m.weight.shape)
        if kind == "keep16":
            if spent + payload <= headroom:
                spent += payload
                keep16.add(name)
            continue
        if kind == "int8":
            refund = branch_bytes(shape[0], input_size(shape), ranks.get(name, 0))
            if spent - refund + payload > headroom:
                continue
            spent += payload - refund
            ranks.pop(name, None)
            int8.add(name)
        else:
            r0, r1 = payload
            cost = branch_bytes(shape[0], input_size(shape), r1 - r0)
            if ranks.get(name, 0) != r0 or spent + cost > headroom:
                continue
            spent += cost
            ranks[name] = r1
            _push_rank(heap, name, solutions[name], r1, cfg, weights, shape)
    report.update(int8=sorted(int8), ranks=dict(sorted(ranks.items())), spent_bytes=spent,
                  kept_16bit=sorted(keep16), kept_int8=sorted(set(savings) - keep16),
                  ratio=round((base + spent) / total_fp16, 4))
    return report


def lower_type(weight_type: str, shape) -> str | None:
    """The 3-bit type a 4-bit group layer may go down to (same groups), or ``None``."""
    qt = qtype(weight_type)
    if qt.bits != 4 or qt.symmetric or not qt.group_size:
        return None
    low = f"uint3_g{qt.group_size}"
    return low if misfit(qtype(low), input_size(shape)) is None else None


def _rtn_error(w2: torch.Tensor, weight_type: str, h: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
    qt = qtype(weight_type)
    return output_error(w2, dequantize_weight(quantize_weight(w2, qt), qt, w2.shape, torch.float32), h, dtype)


def _allocate_mixed(report, floats, solutions, cfg, weights, savings, headroom, total_fp16, base) -> dict:
    """The ``uint3`` allocation (module docstring): every layer picks 3-bit, its own type or int8 (the
    plan's 16-bit layers int8 or 16-bit) by a Lagrangian relaxation under the headroom, then single
    upgrades and ranks spend what is left."""
    # per layer: [(option, extra bytes over its starting point, weighted error)], starting point first
    options: dict[str, list[tuple[str, int, float]]] = {}
    fixed = 0  # bytes of the plan's 16-bit layers nothing was measured for: they stay 16-bit
    for name, sol in solutions.items():
        m = floats[name]
        shape = tuple(m.weight.shape)
        if sol.kept:
            if name not in weights:
                fixed += savings[name]
                continue
            options[name] = [("base", 0, weights[name] * sol.err_hold)]
            if "kept" in cfg.budget_options:
                options[name].append(("keep16", savings[name], 0.0))
            continue
        cand = sol.candidates
        if name not in weights or cand is None:
            continue
        w = weights[name]
        opts = [("base", 0, w * sol.err_hold)]
        scaled = sol.input_scale is not None
        here = layer_bytes(sol.weight_type, shape, False, 0, False, 0)
        if "int8" in cfg.budget_options and sol.weight_type != "int8":
            extra = layer_bytes("int8", shape, False, 0, False, 0) - here - (2 * _channels(m) if scaled else 0)
            opts.append(("int8", extra, 0.0))
        if cand.low is not None:
            ratio = cand.low_ratio
            sol.calib["uint3_error_ratio"] = round(ratio, 3)
            opts.append(("uint3", layer_bytes(cand.low_type, shape, False, 0, False, 0) - here, w * sol.err_hold * ratio))
        options[name] = opts
    room = headroom - fixed
    names = sorted(options)

    def choose(lam: float) -> tuple[dict, int]:
        picks, total = {}, 0
        for n in names:
            o = min(options[n], key=lambda t: (t[2] + lam * t[1], t[1]))
            picks[n] = o
            total += o[1]
        return picks, total

    cheapest = sum(min(o[1] for o in options[n]) for n in names)
    if cheapest > room:  # the plan as it is: its 16-bit layers stay 16-bit, nothing else moves
        report["kept_16bit"] = sorted(n for n, sol in solutions.items() if sol.kept)
        report["kept_int8"] = []
        report["base_bytes"] = base + sum(savings.values())
        report["note"] = (f"even the cheapest precision of every layer takes {(base + fixed + cheapest) / total_fp16:.4f}× "
                          f"fp16 > the budget {cfg.budget:.4f}×: nothing changed")
        return report
    picks, total = choose(0.0)
    if total > room:
        lo, hi = 0.0, 1e-30
        while choose(hi)[1] > room:
            lo, hi = hi, hi * 10.0
        for _ in range(200):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 2.0
            if choose(mid)[1] > room:
                lo = mid
            else:
                hi = mid
            if lo > 0 and hi / lo < 1 + 1e-9:
                break
        picks, total = choose(hi)
    # single upgrades with what the rounding of λ left, best error removed per byte first
    while True:
        best = None
        for n in names:
            cur = picks[n]
            for o in options[n]:
                d_bytes, d_err = o[1] - cur[1], cur[2] - o[2]
                if d_bytes > 0 and d_err > 0 and total + d_bytes <= room:
                    key = d_err / d_bytes
                    if best is None or key > best[0]:
                        best = (key, n, o)
        if best is None:
            break
        _, n, o = best
        total += o[1] - picks[n][1]
        picks[n] = o
    kind = {n: o[0] for n, o in picks.items()}
    # ranks for the layers left at their own 4-bit type, with the bytes still free
    ranks: dict[str, int] = {}
    if "rank" in cfg.budget_options and cfg.max_rank > 0:
        heap = []
        for n, k in kind.items():
            sol = solutions[n]
            if k != "base" or sol.kept or sol.candidates is None:
                continue
            _push_rank(heap, n, sol, 0, cfg, weights, tuple(floats[n].weight.shape))
        while heap:
            neg, _, _, n, (r0, r1) = heapq.heappop(heap)
            shape = tuple(floats[n].weight.shape)
            cost = branch_bytes(shape[0], input_size(shape), r1 - r0)
            if neg >= 0 or ranks.get(n, 0) != r0 or total + cost > room:
                continue
            total += cost
            ranks[n] = r1
            _push_rank(heap, n, solutions[n], r1, cfg, weights, shape)
    keep16 = {n for n, k in kind.items() if k == "keep16"} | {n for n, sol in solutions.items()
                                                                if sol.kept and n not in options}
    kept_all = {n for n, sol in solutions.items() if sol.kept}
    spent = total + fixed
    report.update(int8=sorted(n for n, k in kind.items() if k == "int8"),
                  uint3=sorted(n for n, k in kind.items() if k == "uint3"),
                  ranks=dict(sorted(ranks.items())), spent_bytes=spent, kept_16bit=sorted(keep16),
                  kept_int8=sorted(kept_all - keep16), ratio=round((base + spent) / total_fp16, 4),
                  allocator="lagrangian (int8, uint3, kept)")
    return report


def _push_rank(heap, name, sol, r0, cfg, weights, shape):
    s = sol.candidates.s
    r1 = min(r0 + RANK_STEP, cfg.max_rank, s.numel())
    if r1 <= r0:
        return
    gain = float(s[r0:r1].pow(2).sum()) / max(float(s.pow(2).sum()), 1e-30) * sol.err_hold
    cost = branch_bytes(shape[0], input_size(shape), r1 - r0)
    heapq.heappush(heap, (-weights[name] * gain / cost, len(heap), "rank", name, (r0, r1)))


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().reshape(w.shape[0], -1)


def _effective(sol, shape) -> torch.Tensor:
    qt = qtype(sol.weight_type)
    k = input_size(shape)
    q = dequantize_weight(sol.storage, qt, (shape[0], k), torch.float32).double()
    if sol.input_scale is not None:
        q = q / sol.input_scale.double().repeat_interleave(k // sol.input_scale.numel())
    return q


def apply_allocation(floats: dict, solutions: dict, allocation: dict, cfg) -> None:
    """Put the allocation into the solutions from what :func:`prepare` solved: int8 or 3-bit storage
    (round-to-nearest or GPTQ, whichever has the lower held-out error) and the low-rank factors, each
    branch kept only where it lowers the held-out error (fp16-rounded factors)."""
    for name in allocation.get("int8", []):
        sol = solutions[name]
        storage, rounding, err = sol.candidates.int8
        sol.weight_type, sol.storage, sol.input_scale = "int8", storage, None
        sol.calib.update(budget="int8", rounding=rounding, held_out_error_vs_rtn=round(err / sol.err_rtn_hold, 4)
                         if sol.err_rtn_hold > 0 else 1.0)
        sol.calib.pop("awq_alpha", None)
        sol.err_hold = err
    for name in allocation.get("uint3", []):
        sol = solutions[name]
        storage, rounding, err = sol.candidates.low
        sol.weight_type, sol.storage = sol.candidates.low_type, storage
        sol.calib.update(budget=sol.weight_type, rounding=rounding,
                         held_out_error_vs_rtn=round(err / sol.err_rtn_hold, 4) if sol.err_rtn_hold > 0 else 1.0)
        sol.err_hold = err
    for name, rank in allocation.get("ranks", {}).items():
        sol = solutions[name]
        cand = sol.candidates
        err = cand.rank_errors[rank]
        if err < sol.err_hold:
            sol.lowrank = (cand.a[:, :rank].contiguous(), cand.b[:rank].contiguous())
            sol.calib.update(rank=rank, held_out_error_vs_rtn=round(err / sol.err_rtn_hold, 4)
                             if sol.err_rtn_hold > 0 else 1.0)
            sol.err_hold = err
        else:
            sol.calib["rank_note"] = f"rank {rank} did not lower the held-out error → no branch"
    for sol in solutions.values():
        sol.candidates = None
