"""PCR's activation relaxing as a σ-range bit-width schedule (ALGORITHMS.md §6).

A share of the sampling steps — those nearest x0 (smallest σ) or nearest x_T (largest σ) — runs
its activations at a higher bit-width. The schedule is stored as σ ranges, not step indices, so
it applies to any step count or scheduler that visits those noise levels (Heun's extra
evaluations included): each range edge lies halfway in log σ between the last relaxed step and the
first plain one.

Choices the sources leave open (documented here): the number of relaxed steps is
``round(fraction · steps)`` over the model-call σ's of the schedule (the final σ = 0 is not a
model call); the average activation bit-width is counted per model call of that schedule.
"""

from __future__ import annotations

import math

import torch

from .errors import QuantizationError
from .qtypes import ACT_MAX_BITS, ACT_MIN_BITS

WHERE = ("x0", "xT")


def relaxed_schedule(sigmas, fraction: float, where: str, bits: int, base_bits: int):
    """``(schedule, relaxed_steps, average_bits)`` for the schedule ``sigmas`` (descending, last may be 0)."""
    if not isinstance(fraction, (int, float)) or not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
        raise QuantizationError(f"the fraction of relaxed steps must lie in [0, 1], got {fraction!r}")
    if where not in WHERE:
        raise QuantizationError(f"relax near one of {WHERE}, got {where!r}")
    if not isinstance(bits, int) or not ACT_MIN_BITS <= bits <= ACT_MAX_BITS:
        raise QuantizationError(f"relaxed bit-width must be an integer in {ACT_MIN_BITS}..{ACT_MAX_BITS}, got {bits!r}")
    s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    calls = s[s > 0]
    n = calls.numel()
    if n == 0:
        raise QuantizationError("the schedule has no step with σ > 0")
    if bool((calls[1:] >= calls[:-1]).any()):
        raise QuantizationError("the schedule's σ's must be strictly decreasing")
    k = int(round(fraction * n))
    if k == 0:
        return [], 0, float(base_bits)
    if where == "x0":
        edge = math.inf if k == n else math.sqrt(float(calls[n - k]) * float(calls[n - k - 1]))
        schedule = [(0.0, edge, bits)] if k < n else [(0.0, 1e30, bits)]
    else:
        edge = 0.0 if k == n else math.sqrt(float(calls[k - 1]) * float(calls[k]))
        schedule = [(edge, 1e30, bits)]
    avg = (k * bits + (n - k) * base_bits) / n
    return schedule, k, avg
