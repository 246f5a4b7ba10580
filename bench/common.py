"""Helpers shared by the benchmarks: table printing and the ``--json`` convention."""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn


def resident_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer the module keeps (shared storages counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.numel() else 0
    return total


def print_table(headers: list[str], rows: list[list], out=sys.stdout) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))), file=out)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=out)


def emit_json(obj: dict) -> None:
    """The last line of a ``--json`` run: one JSON object."""
    print(json.dumps(obj, sort_keys=True))


def default_threads() -> int:
    """A thread count that does not oversubscribe a shared machine: ``OMP_NUM_THREADS`` if set, else
    half the CPUs this process may run on (at least 1, at most 8).

    torch's default is every core; when other processes use some of them (a busy 2-core CI box),
    OpenMP threads wait on each other at every operator and a run can take several times longer
    than on one thread. Half the CPUs leaves room for the rest of the machine and hyper-threads;
    the reference model does not speed up beyond about 8 threads.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(1, min(8, cpus // 2))


def set_threads(n: int | None, default: bool = False) -> int:
    """Use ``n`` threads; ``None`` keeps torch's setting, or with ``default=True`` takes
    :func:`default_threads`. Returns the thread count in use."""
    if not n and default:
        n = default_threads()
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def parse_presets(text: str) -> list[str]:
    """``"all"`` or a comma-separated list of quantization presets, checked against the registry."""
    from ..quant import PRESETS

    presets = list(PRESETS) if text == "all" else [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        raise SystemExit(f"unknown preset(s) {unknown or text!r}; known: {', '.join(PRESETS)}")
    return presets


def parse_float32_from(text: str) -> int | None:
    """``--float32-from``: a layer width ``K`` (``CalibratedConfig.float32_from``) or ``none`` (all float64)."""
    return None if str(text).strip().lower() == "none" else int(text)


def quant_plan(name: str, weights: str | None = None, **overrides):
    """Preset ``name`` with its weight type replaced by ``weights`` (e.g. ``uint4``: per-channel int4)."""
    from ..quant import PRESETS, QuantizationError, preset

    if weights:
        overrides["weights"] = weights
    try:
        return preset(name, **overrides) if overrides else PRESETS[name]
    except QuantizationError as e:
        raise SystemExit(str(e)) from None


def quant_label(name: str, weights: str | None = None) -> str:
    """How results and statistics name a preset, with its weight override if any."""
    return f"{name}[{weights}]" if weights else name


def per_sample_spread(mine, base) -> dict:
    """How a mean change in per-sample error is spread over samples (errors are heavy-tailed, so the
    mean and the typical sample can disagree): the share of samples whose error went down and the
    median per-sample gap closed ``1 − mine/base``. ``mine``, ``base``: per-sample errors ``[N]``."""
    return {"samples_improved": float((mine < base).double().mean()),
            "median_gap_closed": float((1 - mine / base.clamp_min(1e-30)).median())}


def fmt_spread(row: dict) -> list[str]:
    """The two table cells of :func:`per_sample_spread` ("-" where the row has none)."""
    if "samples_improved" not in row:
        return ["-", "-"]
    return [f"{100 * row['samples_improved']:.0f}", f"{100 * row['median_gap_closed']:+.1f}"]

