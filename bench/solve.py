"""``qcorrect bench solve``: what solving one layer costs in Quantize Model (Calibrated), by width.

Once a layer's input statistics are collected, ``quant.calibrated.CalibratedSolver`` solves it: GPTQ in
both column orders at the layer's own type, then everything the byte budget may give it (int8 and 3-bit
GPTQ solutions, the low-rank branch's SVD and its held-out errors), all from one set of factorizations
of ``H`` (``gptq.HessianFactors``). The cost grows as ``K³`` (the factorizations) plus ``out·K²``
(GPTQ's column sweep and the held-out errors), and the ``K×K`` matrices alive at once set the memory;
layers of at least ``--float32-from`` inputs are solved in float32, narrower ones in float64
(``gptq.FLOAT32_FROM`` by default, ``none``: all float64, to measure what float32 saves). Each row
also reports the solution's held-out output error relative to round-to-nearest's, so two runs that
differ only in precision show what it costs in quality on the same statistics. This benchmark
times the real solver on one Linear layer of each given shape (random weights, synthetic correlated statistics; neither time nor memory depends on the values),
reports the peak memory the solve added (``VmHWM`` on Linux, as ``bench tuning``) next to what
``CalibratedSolver(solve_device=…)`` expects it to take (``calibrated.solve_bytes`` less the statistics,
which are already on the device here; the node uses that estimate to decide whether a layer is solved
on the GPU that samples), and fits
``t = a·K³ + b·out·K²`` to the rows of each dtype to estimate the SD1.5-shaped UNet's W4 layers'
total (each layer by the fit of the dtype it is solved in), a rough extrapolation that says so.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from ..quant import PRESETS, resolve_plan
from ..quant.calibrated import ACT_ORDERS, CalibratedConfig, CalibratedSolver, solve_bytes
from ..quant.gptq import FLOAT32_FROM, solve_dtype
from ..quant.layerinputs import LayerInputs
from ..quant.weights import input_size
from .common import emit_json, parse_float32_from, print_table, set_threads
from .sd_unet import SDUNet
from .tuning import PeakMemory

#: the node's mixed default: GPTQ in both orders, budget with int8, ranks, the plan's 16-bit layers, 3 bits
MIXED = CalibratedConfig(budget=0.30, budget_options=("int8", "rank", "kept", "uint3"))


def synthetic_stats(k: int, seed: int = 0, device: str | torch.device = "cpu") -> LayerInputs:
    """Statistics of ``2·K`` correlated rows (three quarters fit, a quarter held out), summed in float32
    on the CPU (the same values whatever ``device``) and then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * k, k, generator=g) * torch.linspace(0.1, 3.0, k)
    x[:, 1:] += 0.5 * x[:, :-1]  # neighbouring channels correlate
    fit, hold = x[: 3 * k // 2], x[3 * k // 2:]
    st = LayerInputs.empty("linear", k, k)
    st.h_fit.addmm_(fit.T, fit)
    st.h_hold.addmm_(hold.T, hold)
    st.rows_fit, st.rows_hold = fit.shape[0], hold.shape[0]
    st.wsum_fit, st.wsum_hold = float(fit.shape[0]), float(hold.shape[0])
    st.absmax = x.abs().amax(0)
    st.absmean = x.abs().mean(0)
    st.hi, st.lo = x.amax(0), x.amin(0)
    st.calls = 1
    if torch.device(device).type != "cpu":
        for name in ("h_fit", "h_hold", "absmax", "absmean", "hi", "lo"):
            setattr(st, name, getattr(st, name).to(device))
    return st


def solve_one(out: int, k: int, config: CalibratedConfig = MIXED, seed: int = 0,
              device: str | torch.device = "cpu") -> dict:
    """Time and peak memory of :class:`CalibratedSolver` solving one ``out×K`` Linear under W4A8, with the
    statistics on ``device`` (the solver solves where the statistics live; the peak is that device's)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(k, out))
    st = synthetic_stats(k, seed, device)
    solver = CalibratedSolver(module, PRESETS["W4A8"], config)
    mem = PeakMemory(device)
    mem.reset()
    t = time.perf_counter()
    solver.add({"0": st})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    sol = solver.solutions["0"]
    return {"out": out, "k": k, "device": str(device), "seconds": round(seconds, 2), "peak_bytes": mem.peak(),
            "k2_float64_bytes": 8 * k * k, "rounding": sol.calib.get("rounding"),
            # what CalibratedSolver(solve_device=…) expects the solve to take beyond the statistics
            "estimate_bytes": solve_bytes(k, out, solve_dtype(k, config.float32_from)) - 8 * k * k,
            "dtype": _dtype_name(k, config.float32_from),
            "held_out_error_vs_rtn": sol.err_hold / sol.err_rtn_hold if sol.err_rtn_hold > 0 else None,
            "candidates": sol.candidates is not None}


def _dtype_name(k: int, float32_from: int | None) -> str:
    """``"float32"`` or ``"float64"``: what a layer with ``k`` inputs is solved in (``gptq.solve_dtype``)."""
    return str(solve_dtype(k, float32_from)).removeprefix("torch.")


def fit_cost(rows: list[dict]) -> tuple[float, float] | None:
    """``(a, b) ≥ 0`` of ``t = a·K³ + b·out·K²`` by least squares (None with fewer than two shapes): the
    unconstrained fit if both are non-negative, else the better of the two one-term fits (when the
    shapes cannot tell the terms apart, a free fit can make one negative)."""
    if len({(r["out"], r["k"]) for r in rows}) < 2:
        return None
    x = torch.tensor([[float(r["k"]) ** 3, float(r["out"]) * float(r["k"]) ** 2] for r in rows], dtype=torch.float64)
    y = torch.tensor([float(r["seconds"]) for r in rows], dtype=torch.float64).unsqueeze(1)
    coef = torch.linalg.lstsq(x, y).solution.squeeze(1)
    if bool((coef >= 0).all()):
        return float(coef[0]), float(coef[1])
    fits = []
    for j in (0, 1):
        c = float(torch.linalg.lstsq(x[:, j : j + 1], y).solution)
        resid = float((x[:, j] * c - y.squeeze(1)).pow(2).sum())
        fits.append((resid, (c, 0.0) if j == 0 else (0.0, c)))
    return min(fits)[1]


def _through(row: dict) -> tuple[float, float]:
    """The one-term fit ``(0, b)`` through one row."""
    return 0.0, float(row["seconds"]) / (float(row["out"]) * float(row["k"]) ** 2)


def fits_by_dtype(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """``{dtype: (a, b)}``: :func:`fit_cost` of the rows solved in that dtype, the one-term fit through a
    dtype's single row, and for a dtype without rows the fit of all rows (or through the first row)."""
    overall = fit_cost(rows) or _through(rows[0])
    fits = {}
    for dt in ("float64", "float32"):
        mine = [r for r in rows if r.get("dtype", "float64") == dt]
        fits[dt] = fit_cost(mine) or (_through(mine[0]) if mine else overall)
    return fits


def sd15_estimate(fits, float32_from: int | None = FLOAT32_FROM) -> dict:
    """The fitted model applied to the SD1.5-shaped UNet's W4A8 layers (shapes from the meta device):
    ``fits`` one ``(a, b)`` for every layer or ``{dtype: (a, b)}``, each layer taking the fit of the dtype
    ``float32_from`` solves it in."""
    if isinstance(fits, tuple):
        fits = {"float64": fits, "float32": fits}
    with torch.device("meta"):
        model = SDUNet()
    decisions = resolve_plan(model, PRESETS["W4A8"])
    shapes = [(m.weight.shape[0], input_size(tuple(m.weight.shape))) for n, m in model.named_modules()
              if decisions.get(n, {}).get("weight")]

    def cost(o, k):
        a, b = fits[_dtype_name(k, float32_from)]
        return a * k**3 + b * o * k * k

    widest = max(shapes, key=lambda s: s[1])
    return {"layers": len(shapes), "seconds": sum(cost(o, k) for o, k in shapes),
            "float32_layers": sum(1 for _, k in shapes if _dtype_name(k, float32_from) == "float32"),
            "widest": {"out": widest[0], "k": widest[1]}, "widest_seconds": cost(*widest)}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"320x2304,640x4608"`` → ``[(320, 2304), (640, 4608)]`` (out × K)."""
    shapes = []
    for part in text.split(","):
        if part.strip():
            o, k = part.lower().split("x")
            shapes.append((int(o), int(k)))
    if not shapes:
        raise SystemExit("--shapes: give at least one OUTxK")
    return shapes


def main(args) -> int:
    threads = set_threads(args.threads, default=True)
    f32 = args.float32_from
    config = replace(MIXED, float32_from=f32, act_order=args.act_order)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device")
    rows = [solve_one(o, k, config, seed=args.seed, device=device) for o, k in parse_shapes(args.shapes)]
    orders = {"on": "activation order", "off": "natural order", "both": "both orders"}[args.act_order]
    res = {"rows": rows, "threads": threads, "device": str(device), "float32_from": f32, "act_order": args.act_order,
           "config": f"W4A8, mixed default (GPTQ {orders}; int8, rank, kept, uint3)"}
    gib = 2**30
    print(f"one layer's calibrated solve ({res['config']}) on {device}, {threads} CPU thread(s):")
    print_table(["out x K", "dtype", "seconds", "peak +GiB", "solver's estimate +GiB", "peak / (K x K float64)",
                 "held-out err / RTN"],
                [[f"{r['out']}x{r['k']}", r["dtype"], r["seconds"],
                  "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / gib:.2f}", f"{r['estimate_bytes'] / gib:.2f}",
                  "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / r['k2_float64_bytes']:.1f}",
                  "-" if r["held_out_error_vs_rtn"] is None else f"{r['held_out_error_vs_rtn']:.6f}"] for r in rows])
    fits = fits_by_dtype(rows) if len(rows) > 1 else None
    if fits is not None:
        est = sd15_estimate(fits, f32)
        where = f"{threads} thread(s)" if device.type == "cpu" else str(device)
        res["fit"] = {dt: {"a": a, "b": b} for dt, (a, b) in fits.items()}
        res["sd15"] = est
        w = est["widest"]
        for dt, (a, b) in fits.items():
            print(f"fitted ({dt}) t = {a:.3g}·K³ + {b:.3g}·out·K² s")
        print(f"extrapolated to the SD1.5-shaped UNet's {est['layers']} W4 layers ({est['float32_layers']} of them in float32): "
              f"about {est['seconds'] / 3600:.1f} h on {where} (widest, {w['out']}x{w['k']}: about "
              f"{est['widest_seconds'] / 60:.0f} min) — an estimate from the rows above, not a measurement")
    if args.json:
        emit_json(res)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("solve", help="time and peak memory of solving one layer in calibrated quantization, by width")
    p.add_argument("--shapes", default="320x2304,640x4608", help="comma-separated OUTxK Linear shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where the statistics live and so where the solver solves: cpu or cuda (where the node solves a "
                        "layer when it fits the GPU that samples)")
    p.add_argument("--act-order", default=MIXED.act_order, choices=ACT_ORDERS,
                   help=f"GPTQ column order(s) solved at the layer's own type (default {MIXED.act_order}, the node's)")
    p.add_argument("--float32-from", type=parse_float32_from, default=FLOAT32_FROM,
                   help=f"solve layers with at least this many inputs in float32 (default {FLOAT32_FROM}; none: all float64)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
