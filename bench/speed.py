"""``qcorrect bench speed``: how fast the quantized SD1.5-shaped UNet runs against its float self.

Builds the SD1.5-shaped UNet (random weights: the time does not depend on values) in ``--dtype`` on
``--device`` and times one no-grad model call (a latent batch at σ's timestep 500, a 77-token context):
the float model first, then a copy quantized with each of ``--presets`` (round-to-nearest; a
calibrated model has the same storage and the same kernels, so the same speed). Each time is the
median of ``--repeats`` calls after one warm-up call, with the device synchronised, and every row says
its ratio to the float model measured in the same run — the quantized layers unpack their integer
codes into the compute dtype on every call, which is what this measures next to the bytes they save
(``bench memory``).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from ..quant import quantize_model
from .common import emit_json, parse_presets, print_table, resident_bytes, set_threads
from .sd_unet import build_sd15_unet
from .tuning import _call_inputs, _context_dim

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def time_calls(model, x, t, ctx, repeats: int) -> float:
    """Median seconds of ``repeats`` no-grad calls of ``model`` after one warm-up call."""
    dev = x.device
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            model(x, t, ctx)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(presets, latent: int = 64, batch: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float16,
        repeats: int = 5, unet=None, seed: int = 0) -> dict:
    """``unet``: a float model to use instead of the SD1.5-shaped UNet (tests pass a small one)."""
    dev = torch.device(device)
    base = build_sd15_unet(dtype, seed=seed, device=device) if unet is None else unet.to(device=dev, dtype=dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    x, t, ctx = _call_inputs(batch, latent, _context_dim(base), gen, dev, dtype)
    fp_seconds = time_calls(base, x, t, ctx, repeats)
    rows = [{"config": str(dtype).replace("torch.", ""), "seconds": fp_seconds, "ratio": 1.0,
             "bytes": resident_bytes(base)}]
    for name in presets:
        model = copy.deepcopy(base)
        quantize_model(model, name)
        sec = time_calls(model, x, t, ctx, repeats)
        rows.append({"config": name, "seconds": sec, "ratio": sec / fp_seconds, "bytes": resident_bytes(model)})
        del model
    return {"model": "SD1.5-shaped UNet (random weights)" if unet is None else type(unet).__name__,
            "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "dtype": rows[0]["config"], "latent": latent, "batch": batch, "repeats": repeats, "rows": rows}


def main(args) -> int:
    threads = set_threads(args.threads, default=True)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device")
    res = run(parse_presets(args.presets), args.latent, args.batch, args.device, DTYPES[args.dtype], args.repeats)
    res["threads"] = threads
    print(f"one model call, {res['model']}, latent {args.latent}x{args.latent} x {args.batch}, on {res['device_name']} "
          f"({res['device']}, {threads} CPU thread(s)), median of {args.repeats} after a warm-up:")
    print_table(["config", "ms per call", "x float time", "MiB resident"],
                [[r["config"], f"{1e3 * r['seconds']:.1f}", f"{r['ratio']:.2f}", f"{r['bytes'] / 2**20:.0f}"]
                 for r in res["rows"]])
    if args.json:
        emit_json(res)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("speed", help="time one call of the quantized SD1.5-shaped UNet against the float model")
    p.add_argument("--presets", default="W4A16,W4A8,W8A8", help="comma-separated presets, or 'all'")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 px)")
    p.add_argument("--batch", type=int, default=2, help="latents per call (2: a CFG pair)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
