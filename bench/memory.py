"""``qcorrect bench memory``: resident weight bytes of an SD1.5-shaped UNet per preset.

Builds the UNet in fp16 (random weights: bytes do not depend on values), quantizes a copy with
each preset's default plan and counts every byte that stays resident — integer codes, fp16 scales
and zero points, biases, norms, and the layers the plan keeps in 16-bit. Targets (issue 2):
W8 ≤ 0.52× and W4 (group 64) ≤ 0.30× of fp16.
"""

from __future__ import annotations

import copy
import time

import torch

from ..quant import PRESETS, quantize_model, quantized_layers
from .common import emit_json, parse_presets, print_table, resident_bytes, set_threads
from .sd_unet import build_sd15_unet

TARGETS = {8: 0.52, 4: 0.30}


def run(presets: list[str], seed: int = 0) -> dict:
    base = build_sd15_unet(torch.float16, seed=seed)
    fp16 = resident_bytes(base)
    result = {"model": "SD1.5-shaped UNet (random weights)", "fp16_bytes": fp16, "presets": {}}
    for name in presets:
        plan = PRESETS[name]
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        quantize_model(model, plan)
        seconds = time.perf_counter() - t0
        nbytes = resident_bytes(model)
        bits = 8 if plan.weights == "int8" else 4
        ratio = nbytes / fp16
        result["presets"][name] = {
            "bytes": nbytes,
            "ratio_to_fp16": round(ratio, 4),
            "weight_type": plan.weights,
            "quantized_layers": len(quantized_layers(model)),
            "target_ratio": TARGETS[bits],
            "meets_target": ratio <= TARGETS[bits],
            "quantize_seconds": round(seconds, 1),
        }
        del model
    result["all_targets_met"] = all(p["meets_target"] for p in result["presets"].values())
    return result


def main(args) -> int:
    set_threads(args.threads)
    presets = parse_presets(args.presets)
    res = run(presets, seed=args.seed)
    mib = 2**20
    rows = [["fp16", "-", f"{res['fp16_bytes'] / mib:.1f}", "1.000", "-", "-"]]
    for name, p in res["presets"].items():
        rows.append([name, p["weight_type"], f"{p['bytes'] / mib:.1f}", f"{p['ratio_to_fp16']:.3f}",
                     f"<= {p['target_ratio']:.2f}", "yes" if p["meets_target"] else "NO"])
    print(f"resident weight memory, {res['model']}")
    print_table(["config", "weights", "MiB", "x fp16", "target", "met"], rows)
    if args.json:
        emit_json(res)
    return 0 if res["all_targets_met"] else 1


def add_parser(sub) -> None:
    p = sub.add_parser("memory", help="resident weight bytes of an SD1.5-shaped UNet per preset")
    p.add_argument("--presets", default="all", help="comma-separated presets, or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
