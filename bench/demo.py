"""``qcorrect demo``: the main job on the embedded default (the shipped reference model).

Quantizes the reference UNet with naive PTQ (W8A8 and W4A8, the quantization core's defaults) and
with the pack's calibrated quantizer (W4A8, ``bench/quantizers.BEST``: error-compensated rounding from
FP calibration inputs, a 0.30× fp16 byte budget spent with mixed precision — 3 bits where a probe
measures that a layer's error barely reaches the output, int8 where it measures the most — then the
stored scales and zero points tuned end to end on the calibration sampling's FP outputs),
calibrates the default correction on a few held-out seeds, samples FP,
naive, corrected and calibrated-quantized from fixed seeds (two per class), prints the metrics
tables and writes an image grid — rows FP | W8A8 | W8A8 corrected | W4A8 | W4A8 corrected | W4A8
calibrated — to the path it prints. Every stage reports on stderr as it starts and finishes.

Threads: ``--threads`` if given, else ``bench.common.default_threads`` (OMP_NUM_THREADS, or half
the CPUs): torch's default of every core can make a run several times slower on a shared machine.
"""

from __future__ import annotations

import os
import sys
import time

from .common import set_threads
from .correct import DEFAULT_METHOD
from .png import grid, write_png
from .quality import print_result, run
from . import quantizers

DEMO_SEEDS = list(range(2000, 2020))  # two per class; demo only, calibration below uses other seeds
DEMO_CALIB_SEEDS = list(range(3000, 3016))
#: input-statistics rows per layer (× K) for the demo's calibrated quantizer: half the benchmark's, to stay fast
DEMO_ROWS_PER_K = 16


class Progress:
    """One line per stage on stderr, with the time since the demo started."""

    def __init__(self, out=None) -> None:
        self.out = out or sys.stderr
        self.t0 = time.perf_counter()

    def __call__(self, *parts) -> None:
        text = " ".join(str(p) for p in parts).lstrip("# ")
        print(f"[demo {time.perf_counter() - self.t0:5.0f} s] {text}", file=self.out, flush=True)


def main(args) -> int:
    threads = set_threads(args.threads, default=True)
    log = Progress()
    t0 = time.perf_counter()
    log(f"torch threads: {threads}")
    presets = ["W8A8", "W4A8"]
    methods = ["none"] if args.no_correction else ["none", DEFAULT_METHOD]
    log(f"naive{'' if args.no_correction else ' and corrected'} W8A8 / W4A8 on {len(DEMO_SEEDS)} seeds "
        f"(correction calibrated on {len(DEMO_CALIB_SEEDS)} other seeds)")
    res = run(presets, [args.sampler], DEMO_SEEDS, list(range(10)), "normal", args.steps, args.cfg,
              log=log, keep_images=True, methods=methods, calib_seeds=DEMO_CALIB_SEEDS,
              measure_calib_cost=False)
    images = res.pop("images")
    cal = None
    if not args.no_calibrated:
        log(f"calibrated W4A8 quantizer ({quantizers.BEST}): input statistics from FP sampling of the "
            f"{len(DEMO_CALIB_SEEDS)} calibration seeds")
        cal = quantizers.run(["W4A8"], ["rtn", "best"], [args.sampler], [res["cfg"]], DEMO_SEEDS, DEMO_CALIB_SEEDS,
                             list(range(10)), steps=args.steps, log=log, keep_images=True,
                             rows_per_k=DEMO_ROWS_PER_K)
    print_result(res)
    rows, names = [images[(args.sampler, "FP")][:10]], ["FP"]
    for p in presets:
        for m in methods:
            rows.append(images[(args.sampler, p, m)][:10])
            names.append(p if m == "none" else f"{p} {m}")
    if cal is not None:
        print()
        quantizers.print_result(cal)
        rows.append(cal["images"][(args.sampler, res["cfg"], "W4A8", "best")][:10])
        names.append(f"W4A8 calibrated ({quantizers.BEST})")
    path = os.path.abspath(args.out)
    write_png(path, grid(rows))
    print(f"image grid (rows: {' | '.join(names)}; columns: classes 0-9) written to {path}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s on {threads} thread{'s' if threads != 1 else ''}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="quantize the reference model, correct it, compare with full precision")
    p.add_argument("--out", default="qcorrect_demo.png", help="where to write the image grid")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the reference model's)")
    p.add_argument("--no-correction", action="store_true", help="naive rows only")
    p.add_argument("--no-calibrated", action="store_true", help="skip the calibrated quantizer's rows")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: OMP_NUM_THREADS, else half the CPUs, at most 8)")
    p.set_defaults(func=main)
