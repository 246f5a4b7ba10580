"""``qcorrect bench quality``: quantized (and later corrected) sampling vs FP on chosen seeds.

For every sampler the FP latents are sampled once; for every preset the quantized model samples
the same seeds, classes, noise draws, schedule and CFG, and the table reports, against FP: PSNR
and SSIM of the decoded images, latent MSE, FID-to-FP (the reference classifier's features) and
class accuracy (the classifier's, a stand-in for CLIP score). Seeds and classes are arguments so
results can be checked on seeds nobody tuned on.
"""

from __future__ import annotations

import time

import torch

from ..quant import PRESETS
from ..reference.model import load_reference
from .common import emit_json, print_table, set_threads
from .pipeline import RunConfig, decode, labels_for, parse_int_list, quantized_denoiser, sample_latents, summary


def run(presets, samplers, seeds, classes, scheduler="normal", steps=20, cfg=None, batch_size=64, log=print,
        keep_images=False):
    ref = load_reference()
    cfg_scale = ref.default_cfg if cfg is None else cfg
    labels = labels_for(seeds, classes)
    sigmas_grid = ref.denoiser.sigmas
    qmodels = {p: quantized_denoiser(ref.denoiser, PRESETS[p]) for p in presets}
    rows, images = [], {}
    for sampler in samplers:
        rc = RunConfig(sampler, scheduler, steps, cfg_scale, batch_size).validate()
        t0 = time.perf_counter()
        lat_fp = sample_latents(ref.denoiser, rc, seeds, labels, sigmas_grid)
        img_fp = decode(ref.autoencoder, lat_fp)
        images[(sampler, "FP")] = img_fp
        fp_row = summary(lat_fp, lat_fp, img_fp, img_fp, labels, ref.classifier)
        rows.append({"config": "FP", "sampler": sampler, **fp_row, "seconds": round(time.perf_counter() - t0, 1)})
        log(f"# {sampler}: FP sampled in {rows[-1]['seconds']} s")
        for p in presets:
            t0 = time.perf_counter()
            lat = sample_latents(qmodels[p], rc, seeds, labels, sigmas_grid)
            img = decode(ref.autoencoder, lat)
            images[(sampler, p)] = img
            rows.append({"config": p, "sampler": sampler, **summary(lat, lat_fp, img, img_fp, labels, ref.classifier),
                         "seconds": round(time.perf_counter() - t0, 1)})
            log(f"# {sampler}: {p} sampled in {rows[-1]['seconds']} s")
    res = {"scheduler": scheduler, "steps": steps, "cfg": cfg_scale, "n": len(seeds),
            "seeds": f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds,
            "classes": classes, "rows": rows}
    if keep_images:
        res["images"] = images
    return res


def print_result(res: dict) -> None:
    print(f"quality vs FP — reference model, {res['scheduler']} schedule, {res['steps']} steps, "
          f"cfg {res['cfg']}, N={res['n']}, seeds {res['seeds']}")
    table = []
    for r in res["rows"]:
        fp = r["config"] == "FP"
        table.append([r["config"], r["sampler"], "-" if fp else f"{r['psnr']:.2f}", "-" if fp else f"{r['ssim']:.4f}",
                      "-" if fp else f"{r['latent_mse']:.5f}", "-" if fp else f"{r['fid_to_fp']:.3f}",
                      f"{100 * r['class_acc']:.1f}", r["n"]])
    print_table(["config", "sampler", "PSNR dB", "SSIM", "latent MSE", "FID-to-FP", "class acc %", "N"], table)


def main(args) -> int:
    set_threads(args.threads)
    presets = list(PRESETS) if args.preset == "all" else args.preset.split(",")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    res = run(presets, args.sampler.split(","), parse_int_list(args.seeds), parse_int_list(args.classes),
              args.scheduler, args.steps, args.cfg, args.batch)
    print_result(res)
    if args.json:
        emit_json(res)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("quality", help="quality of quantized sampling against FP on chosen seeds")
    p.add_argument("--preset", default="W8A8,W4A8", help="comma-separated presets, or 'all'")
    p.add_argument("--sampler", default="euler", help="comma-separated samplers")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the reference model's)")
    p.add_argument("--seeds", default="1000-1255", help="e.g. 1000-1255 or 1,2,5-9")
    p.add_argument("--classes", default="0-9", help="class labels, cycled over the seeds")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
