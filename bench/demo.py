"""``qcorrect demo``: the main job on the embedded default (the shipped reference model).

Quantizes the reference UNet with naive PTQ (W8A8 and W4A8, the quantization core's defaults),
calibrates the default correction on a few held-out seeds, samples FP, naive and corrected from
fixed seeds (one per class), prints the metrics table and writes an image grid — rows FP | W8A8 |
W8A8 corrected | W4A8 | W4A8 corrected — to the path it prints.
"""

from __future__ import annotations

import os
import time

from .common import set_threads
from .correct import DEFAULT_METHOD
from .png import grid, write_png
from .quality import print_result, run

DEMO_SEEDS = list(range(2000, 2020))  # two per class; demo only, calibration below uses other seeds
DEMO_CALIB_SEEDS = list(range(3000, 3016))


def main(args) -> int:
    set_threads(args.threads)
    t0 = time.perf_counter()
    presets = ["W8A8", "W4A8"]
    methods = ["none"] if args.no_correction else ["none", DEFAULT_METHOD]
    res = run(presets, [args.sampler], DEMO_SEEDS, list(range(10)), "normal", args.steps, args.cfg,
              log=lambda *_: None, keep_images=True, methods=methods, calib_seeds=DEMO_CALIB_SEEDS,
              measure_calib_cost=False)
    images = res.pop("images")
    print_result(res)
    rows, names = [images[(args.sampler, "FP")][:10]], ["FP"]
    for p in presets:
        for m in methods:
            rows.append(images[(args.sampler, p, m)][:10])
            names.append(p if m == "none" else f"{p} {m}")
    path = os.path.abspath(args.out)
    write_png(path, grid(rows))
    print(f"image grid (rows: {' | '.join(names)}; columns: classes 0-9) written to {path}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="quantize the reference model, correct it, compare with full precision")
    p.add_argument("--out", default="qcorrect_demo.png", help="where to write the image grid")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the reference model's)")
    p.add_argument("--no-correction", action="store_true", help="naive rows only")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=main)
