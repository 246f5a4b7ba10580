"""``qcorrect demo``: the main job on the embedded default (the shipped reference model).

Quantizes the reference UNet with naive PTQ (W8A8 and W4A8, the quantization core's defaults),
samples FP and quantized from fixed seeds (one per class), prints the metrics table and writes an
image grid — rows FP | W8A8 | W4A8 — to the path it prints.
"""

from __future__ import annotations

import os
import time

from .common import set_threads
from .png import grid, write_png
from .quality import print_result, run

DEMO_SEEDS = list(range(0, 40))  # demo only; benchmarks default to 1000+ and calibration uses others


def main(args) -> int:
    set_threads(args.threads)
    t0 = time.perf_counter()
    presets = ["W8A8", "W4A8"]
    res = run(presets, [args.sampler], DEMO_SEEDS, list(range(10)), "normal", args.steps, args.cfg,
              log=lambda *_: None, keep_images=True)
    images = res.pop("images")
    print_result(res)
    rows = [images[(args.sampler, "FP")][:10]] + [images[(args.sampler, c, "none")][:10] for c in presets]
    path = os.path.abspath(args.out)
    write_png(path, grid(rows))
    print(f"image grid (rows: FP | W8A8 | W4A8; columns: classes 0-9) written to {path}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="quantize the reference model and compare with full precision")
    p.add_argument("--out", default="qcorrect_demo.png", help="where to write the image grid")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the reference model's)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=main)
