"""``qcorrect bench gram``: what accumulating the calibration statistics of the SD1.5-shaped UNet costs
per model call, on the device that samples.

Quantize Model (Calibrated) keeps each layer's ``Σ x xᵀ`` in host RAM. Every model call adds its rows:
on a CPU as one triangular ``addmm`` (``calibration.inputs.add_gram``), on a GPU by multiplying there,
block row by block row, and adding the copied products into the host sums (``add_gram_from``). This
benchmark times one call's update for every distinct (``K``, rows per call) of the UNet's W4 layers
under the node's row cap (from ``bench quantizers``' ``sd15_stats_calls``: 512×512, 20 steps with CFG,
``--latents`` calibration latents), with the rows on ``--device`` and the sums on the CPU, best of
``--repeats``, and adds them up over every layer and call: the statistics' share of a calibration on
that device, beyond the sampling itself. ``--max-k`` leaves out the wider layers (a quick run; the
total then covers only the layers timed, and says so).
"""

from __future__ import annotations

import time

import torch

from ..calibration.inputs import add_gram, gram_macs
from .common import emit_json, print_table, set_threads
from .quantizers import sd15_stats_calls, sd15_w4_layers


def time_update(k: int, rows: int, device: torch.device, repeats: int = 3, seed: int = 0) -> float:
    """Seconds of one call's update of a host ``K×K`` sum with ``rows`` rows living on ``device`` (best of
    ``repeats``; on a CUDA device including the products, the copies and the host additions)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(device)
    h = torch.zeros(k, k)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        add_gram(h, x)  # add_gram_from when x is not on the CPU
        best = min(best, time.perf_counter() - t)
    return best


def run(device: torch.device, latents: int, latent: int, steps: int, max_k: int | None, repeats: int) -> dict:
    model, layers = sd15_w4_layers()
    per_layer = sd15_stats_calls(model, layers, latents, latent, steps)
    kept = [(n, k, r, c) for n, k, r, c in per_layer if max_k is None or k <= max_k]
    shapes = sorted({(k, r) for _, k, r, _ in kept})
    timed = {(k, r): time_update(k, r, device, repeats) for k, r in shapes}
    rows = []
    for k, r in shapes:
        users = [(n, c) for n, kk, rr, c in kept if (kk, rr) == (k, r)]
        calls = sum(c for _, c in users)
        rows.append({"k": k, "rows_per_call": r, "layers": len(users), "calls": calls, "seconds_per_call": timed[(k, r)],
                     "seconds": calls * timed[(k, r)], "macs_per_call": gram_macs(k, r)})
    return {"device": str(device), "latents": latents, "latent": latent, "steps": steps, "max_k": max_k,
            "layers_timed": len(kept), "layers": len(per_layer), "rows": rows,
            "seconds": sum(r["seconds"] for r in rows)}


def main(args) -> int:
    threads = set_threads(args.threads, default=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device")
    res = run(device, args.latents, args.latent, args.steps, args.max_k, args.repeats)
    res["threads"] = threads
    print(f"one model call's update of the host sums, rows on {device}, {threads} CPU thread(s); SD1.5-shaped UNet, "
          f"{args.latents} latent(s) of {args.latent * 8}x{args.latent * 8} px, {args.steps} steps with CFG:")
    print_table(["K", "rows per call", "layers", "calls", "ms per call", "GFLOP/s", "total s"],
                [[r["k"], r["rows_per_call"], r["layers"], r["calls"], f"{1e3 * r['seconds_per_call']:.2f}",
                  f"{2 * r['macs_per_call'] / r['seconds_per_call'] / 1e9:.0f}", f"{r['seconds']:.1f}"] for r in res["rows"]])
    scope = ("all" if res["layers_timed"] == res["layers"] else
             f"{res['layers_timed']} of the {res['layers']} (K ≤ {args.max_k}; the wider ones left out)")
    print(f"statistics of {scope} W4 layers: about {res['seconds'] / 60:.1f} min of updates on {device} "
          "(beyond the sampling itself)")
    if args.json:
        emit_json(res)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("gram", help="time the calibration statistics' per-call update for SD1.5's layers on a device")
    p.add_argument("--device", default="cpu", help="where the rows live and are multiplied: cpu or cuda")
    p.add_argument("--latents", type=int, default=4, help="calibration latents (the node's default: 4)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 px)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-k", type=int, default=None, help="time only layers with at most this many inputs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
