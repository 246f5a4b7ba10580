"""Paired bootstrap confidence intervals for per-sample metrics (Efron & Tibshirani 1993, ch. 13).

Two runs with the same seeds and classes give paired per-sample values; resampling sample indices
(the same indices for both runs) and taking percentiles of the statistic gives its percentile CI.
Statistics: ``"mean"`` (mean of a, or of a − b when b is given), ``"median"`` (likewise), and
``"ratio"`` = ``1 − mean(a)/mean(b)``, the fraction of an error gap that a correction closes
(a = corrected-vs-FP error, b = uncorrected-vs-FP error). Deterministic given ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["BootstrapCI", "paired_bootstrap_ci"]

STATS = ("mean", "median", "ratio")


@dataclass(frozen=True)
class BootstrapCI:
    """Point estimate with a percentile interval ``[low, high]`` at confidence ``ci``."""

    estimate: float
    low: float
    high: float
    stat: str
    ci: float
    n: int
    n_boot: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _to_array(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, possibly on an accelerator
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values (e.g. PSNR of identical images); filter them first")
    return arr


def _statistic(stat: str, a: np.ndarray, b: Optional[np.ndarray], axis: int):
    """The statistic over ``axis`` (a, b may carry a leading bootstrap axis)."""
    if stat == "ratio":
        return 1.0 - a.mean(axis=axis) / b.mean(axis=axis)
    vals = a if b is None else a - b
    return vals.mean(axis=axis) if stat == "mean" else np.median(vals, axis=axis)


def paired_bootstrap_ci(
    values_a,
    values_b=None,
    n_boot: int = 1000,
    seed: int = 0,
    stat: str = "mean",
    ci: float = 0.95,
    chunk: int = 256,
) -> BootstrapCI:
    """Percentile bootstrap CI of ``stat`` over paired per-sample values (see module docstring)."""
    if stat not in STATS:
        raise ValueError(f"unknown stat {stat!r}; choose one of {STATS}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    a = _to_array(values_a, "values_a")
    b = None if values_b is None else _to_array(values_b, "values_b")
    if b is not None and b.shape != a.shape:
        raise ValueError(f"paired values differ in length: {a.size} vs {b.size}")
    if stat == "ratio" and b is None:
        raise ValueError("stat='ratio' needs values_b (the baseline)")
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, a.size, size=(min(chunk, n_boot - start), a.size))
        boots.append(_statistic(stat, a[idx], None if b is None else b[idx], axis=1))
    boots = np.concatenate(boots)
    alpha = (1 - ci) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    estimate = float(_statistic(stat, a, b, axis=0))
    return BootstrapCI(estimate, float(low), float(high), stat, ci, int(a.size), int(n_boot))
