"""``qcorrect bench quality``: quantized and corrected sampling vs FP on chosen seeds.

For every sampler the FP latents are sampled once; for every preset and correction method the
quantized model samples the same seeds, classes, noise draws, schedule and CFG, and the table
reports, against FP: PSNR and SSIM of the decoded images, latent MSE, FID-to-FP (the reference
classifier's features) and class accuracy (the classifier's, a stand-in for CLIP score). Corrected
rows also give the share of the naive latent-MSE gap they close, ``1 − MSE(method)/MSE(naive)``,
and the PSNR change, each with a 95% paired bootstrap interval over samples; and, because per-sample
errors are heavy-tailed (a few trajectories carry much of the mean), the share of samples whose
latent MSE went down ("improved %") and the median over samples of the per-sample gap closed.

Corrections are calibrated on ``--calib-seeds`` (disjoint from the evaluation seeds, checked), or
read from ``--stats``. Seeds, classes, sampler, scheduler, steps and cfg are arguments, so results
can be checked on seeds nobody tuned on.

``--oracle`` is the one deliberate exception, for analysis only: every correction is calibrated on
the evaluation seeds and classes themselves, so the per-σ statistics are those of exactly the
samples being scored. That is an upper bound on what a method's statistics can do for these
samples — not a result, and never a way to choose a method or a setting. Its output says so on
every line that matters (the banner, ``"oracle": true`` in the JSON, each corrected row's
``calibrated_on``).
"""

from __future__ import annotations

import time

from ..calibration import CorrectionStats
from ..evaluation import paired_bootstrap_ci
from ..reference.model import load_reference
from .common import (
    emit_json, fmt_spread, parse_presets, per_sample_spread, print_table, quant_label, quant_plan, set_threads,
)
from .correct import auto_reason, calibrate_method, check_disjoint, corrected_sampler, expand_methods, plain_cost
from .pipeline import (
    RunConfig, calibrate_static_ranges, decode, labels_for, parse_int_list, per_sample_metrics, quantized_denoiser,
    sample_latents, summary,
)


def _ci(ci) -> dict:
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high}


def run(presets, samplers, seeds, classes, scheduler="normal", steps=20, cfg=None, batch_size=64, log=print,
        keep_images=False, methods=("none",), stats_path=None, calib_seeds=None, calib_classes=None,
        calib_steps=None, calib_mode="progressive", measure_calib_cost=True, act_static=None, weights=None,
        oracle=False):
    if oracle:
        if stats_path:
            raise SystemExit("--oracle calibrates on the evaluation seeds; it cannot be combined with --stats")
        if act_static:
            raise SystemExit("--oracle bounds the corrections only; calibrate --act-static ranges on other seeds")
        if calib_classes is not None and list(calib_classes) != list(classes):
            raise SystemExit("--oracle calibrates on the evaluation classes; drop --calib-classes")
        calib_seeds, calib_classes = list(seeds), list(classes)
    ref = load_reference()
    cfg_scale = ref.default_cfg if cfg is None else cfg
    labels = labels_for(seeds, classes)
    grid = ref.denoiser.sigmas
    methods = list(methods)
    if any(m != "none" for m in methods) and "none" not in methods:
        methods.insert(0, "none")  # the naive baseline every correction is compared with
    methods.sort(key=lambda m: m != "none")
    if calib_seeds is not None and not oracle:
        check_disjoint(calib_seeds, seeds)
    if act_static:
        if calib_seeds is None:
            raise SystemExit("--act-static needs --calib-seeds (the activation ranges are calibrated on them)")
        qmodels = {}
        for p in presets:
            qmodels[p] = quantized_denoiser(ref.denoiser, quant_plan(p, weights, act_mode="static"))
            rc_obs = RunConfig(samplers[0], scheduler, calib_steps or steps, cfg_scale, batch_size).validate()
            n = calibrate_static_ranges(qmodels[p], rc_obs, calib_seeds, labels_for(calib_seeds, calib_classes or classes),
                                        grid, act_static)
            log(f"# {p}: static activation ranges ({act_static}) for {n} layers from seeds {_span(calib_seeds)}")
    else:
        qmodels = {p: quantized_denoiser(ref.denoiser, quant_plan(p, weights)) for p in presets}
    loaded = CorrectionStats.load(stats_path) if stats_path else None
    rows, images = [], {}
    for sampler in samplers:
        rc = RunConfig(sampler, scheduler, steps, cfg_scale, batch_size).validate()
        rc_cal = RunConfig(sampler, scheduler, calib_steps or steps, cfg_scale, batch_size).validate()
        t0 = time.perf_counter()
        lat_fp = sample_latents(ref.denoiser, rc, seeds, labels, grid)
        img_fp = decode(ref.autoencoder, lat_fp)
        images[(sampler, "FP")] = img_fp
        rows.append({"config": "FP", "method": "-", "sampler": sampler,
                     **summary(lat_fp, lat_fp, img_fp, img_fp, labels, ref.classifier),
                     "seconds": round(time.perf_counter() - t0, 1)})
        log(f"# {sampler}: FP sampled in {rows[-1]['seconds']} s")
        for p in presets:
            label = quant_label(p, weights)
            naive, plain_cal = None, None
            for method in methods:
                row = {"config": label, "method": method, "sampler": sampler}
                fn = None
                if method != "none":
                    if loaded is not None:
                        stats = loaded
                    else:
                        stats, secs = calibrate_method(ref, qmodels[p], method, rc_cal, calib_seeds,
                                                       calib_classes or classes, label, calib_mode)
                        if measure_calib_cost and plain_cal is None:  # the yardstick: sampling the calibration set with both models
                            plain_cal = plain_cost(ref, qmodels[p], rc_cal, calib_seeds, calib_classes or classes,
                                                   sample_latents)
                        row.update(calib_seconds=round(secs, 1), calib_n=len(calib_seeds), calib_steps=rc_cal.steps,
                                   calibrated_on="evaluation seeds (oracle)" if oracle else "calibration seeds")
                        if plain_cal is not None:
                            row.update(plain_calib_seconds=round(plain_cal, 1), calib_cost_ratio=round(secs / plain_cal, 2))
                    if method == "auto":
                        row["auto"] = auto_reason(stats)
                        log(f"# {sampler}: {label} {row['auto']}")
                    fn = corrected_sampler(stats, method, sampler)
                t0 = time.perf_counter()
                lat = sample_latents(qmodels[p], rc, seeds, labels, grid, sampler_fn=fn)
                img = decode(ref.autoencoder, lat)
                images[(sampler, p, method)] = img
                row.update(summary(lat, lat_fp, img, img_fp, labels, ref.classifier))
                per = per_sample_metrics(lat, lat_fp, img, img_fp)
                if method == "none":
                    naive = per
                elif naive is not None:
                    row["gap_closed"] = _ci(paired_bootstrap_ci(per["latent_mse"].numpy(), naive["latent_mse"].numpy(),
                                                                stat="ratio"))
                    row["psnr_delta"] = _ci(paired_bootstrap_ci(per["psnr"].numpy(), naive["psnr"].numpy()))
                    row.update(per_sample_spread(per["latent_mse"], naive["latent_mse"]))
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                log(f"# {sampler}: {label} {method} sampled in {row['seconds']} s")
    res = {"scheduler": scheduler, "steps": steps, "cfg": cfg_scale, "n": len(seeds), "act_static": act_static,
           "weights": weights, "oracle": bool(oracle),
           "seeds": _span(seeds), "classes": classes, "rows": rows,
           "calibration": None if calib_seeds is None or stats_path or methods == ["none"] else
           {"seeds": _span(calib_seeds), "classes": calib_classes or classes, "steps": calib_steps or steps,
            "mode": calib_mode},
           "stats_file": stats_path}
    if keep_images:
        res["images"] = images
    return res


def _span(seeds):
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds


def _fmt_ci(ci, pct=False):
    if not ci:
        return "-"
    k = 100 if pct else 1
    return f"{k * ci['estimate']:+.1f} [{k * ci['low']:+.1f}, {k * ci['high']:+.1f}]"


def print_result(res: dict) -> None:
    print(f"quality vs FP — reference model, {res['scheduler']} schedule, {res['steps']} steps, "
          f"cfg {res['cfg']}, N={res['n']}, seeds {res['seeds']}"
          + (f", static activation ranges ({res['act_static']})" if res.get("act_static") else ""))
    if res.get("oracle"):
        print("ORACLE: corrections calibrated on the evaluation seeds themselves -- an upper bound for these "
              "samples, not a result")
    if res.get("calibration"):
        c = res["calibration"]
        print(f"corrections calibrated ({c['mode']}) on seeds {c['seeds']}, {c['steps']} steps")
    table = []
    for r in res["rows"]:
        fp = r["config"] == "FP"
        table.append([r["config"], r["method"], r["sampler"], "-" if fp else f"{r['psnr']:.2f}",
                      "-" if fp else f"{r['ssim']:.4f}", "-" if fp else f"{r['latent_mse']:.5f}",
                      "-" if fp else f"{r['fid_to_fp']:.3f}", f"{100 * r['class_acc']:.1f}",
                      _fmt_ci(r.get("gap_closed"), pct=True), *fmt_spread(r), _fmt_ci(r.get("psnr_delta")),
                      f"{r['calib_cost_ratio']:.2f}" if "calib_cost_ratio" in r else "-", r["n"]])
    print_table(["config", "method", "sampler", "PSNR dB", "SSIM", "latent MSE", "FID-to-FP", "acc %",
                 "MSE gap closed % [95% CI]", "improved %", "median gap %", "ΔPSNR dB [95% CI]", "calib cost ×", "N"], table)
    for r in res["rows"]:
        if "auto" in r:
            print(f"{r['config']} {r['sampler']}: {r['auto']}")


def main(args) -> int:
    set_threads(args.threads)
    presets = parse_presets(args.preset)
    samplers = args.sampler.split(",")
    methods = expand_methods(args.methods, samplers)
    calib_seeds = parse_int_list(args.calib_seeds) if (not args.stats or args.act_static) else None
    res = run(presets, samplers, parse_int_list(args.seeds), parse_int_list(args.classes), args.scheduler,
              args.steps, args.cfg, args.batch, methods=methods, stats_path=args.stats, calib_seeds=calib_seeds,
              calib_classes=parse_int_list(args.calib_classes) if args.calib_classes else None,
              calib_steps=args.calib_steps, calib_mode=args.calib_mode, act_static=args.act_static,
              weights=args.weights, oracle=args.oracle)
    print_result(res)
    if args.json:
        emit_json(res)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("quality", help="quality of quantized (and corrected) sampling against FP on chosen seeds")
    p.add_argument("--preset", default="W8A8,W4A8", help="comma-separated presets, or 'all'")
    p.add_argument("--sampler", default="euler", help="comma-separated samplers")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the reference model's)")
    p.add_argument("--seeds", default="1000-1255", help="evaluation seeds, e.g. 1000-1255 or 1,2,5-9")
    p.add_argument("--classes", default="0-9", help="class labels, cycled over the seeds")
    p.add_argument("--methods", default="none",
                   help="comma-separated correction methods, 'all' (naive, each alone, combinations, the default 'auto') or 'ablation'")
    p.add_argument("--stats", default=None, help="a statistics file; without it, calibrate first on --calib-seeds")
    p.add_argument("--calib-seeds", default="0-127", help="calibration seeds (must not overlap --seeds)")
    p.add_argument("--calib-classes", default=None, help="calibration classes (default: --classes)")
    p.add_argument("--calib-steps", type=int, default=None, help="steps of the calibration schedule (default: --steps)")
    p.add_argument("--calib-mode", default="progressive", choices=["progressive", "teacher_forced"])
    p.add_argument("--act-static", default=None, choices=["minmax", "percentile", "mse"],
                   help="static per-σ activation ranges (Q-Diffusion/PCR style) calibrated on --calib-seeds with this "
                        "estimator, instead of the presets' dynamic per-sample ranges")
    p.add_argument("--weights", default=None,
                   help="replace the presets' weight type (e.g. uint4 = per-channel int4; default: the preset's)")
    p.add_argument("--oracle", action="store_true",
                   help="analysis only: calibrate every correction on the evaluation seeds themselves (an upper "
                        "bound on what per-σ statistics can do for these samples; never a result)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
