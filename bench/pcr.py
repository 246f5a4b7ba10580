"""``qcorrect bench pcr``: PCR's static activation ranges and relaxing, QDiffBench-style (ALGORITHMS.md §6).

For every preset, the quantized reference model samples the evaluation seeds with its activations
quantized five ways, and the table reports against the FP samples of the same seeds, classes and
noise: FID-to-FP (QDiffBench's "FID to FP32", on the reference classifier's features), latent MSE,
PSNR, SSIM, class accuracy (the stand-in for CLIP score) and the average activation bit-width:

* ``dynamic`` — the presets' per-sample min/max ranges, taken at every call (no calibration);
* ``fp`` — static per-σ ranges calibrated on the FP trajectory (Q-Diffusion's timestep-aware
  calibration; the baseline);
* ``progressive`` — static per-σ ranges calibrated progressively (PCR);
* ``relax_x0`` / ``relax_xT`` — progressive, with ``--relax`` of the steps nearest x0 / x_T at
  ``--bits`` (calibrated with the relaxing active).

``--estimator E1,E2,…`` calibrates each static configuration with every listed range estimator
(``auto``: chosen per layer and σ on the layer's output error) and compares each with the first.
``--methods M,…`` adds the engine's corrections (``bench/correct.py``, calibrated on the same
calibration seeds after the ranges, §8.2) on top of the FP-trajectory ranges and of PCR
(progressive + relaxed near x0), for the "PCR alone / corrections alone / both" table.

Comparisons (second table) are paired over the evaluation samples with 95% bootstrap intervals:
latent MSE as the share by which A's mean is lower than B's (``1 − mean A / mean B``), and the
differences A − B of PSNR, class accuracy (per-sample correctness) and FID-to-FP (the two sets'
FID recomputed on each resample of sample indices; an interval for the difference, whose
resampled values carry FID's small-sample bias equally on both sides).

Calibration seeds and classes must be disjoint from the evaluation seeds (checked) and default to
disjoint classes too (0–4 vs 5–9: the evaluation samples are of classes never calibrated on, as
QDiffBench calibrates and evaluates on different prompt sets).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import numpy as np
import torch

from ..calibration.ranges import calibrate_activation_ranges, check_coverage
from ..evaluation import class_correct, paired_bootstrap_ci
from ..evaluation.fid import feature_stats, gaussian_frechet_distance
from ..quant import quantized_layers, set_activation_schedule
from ..quant.observers import METHODS
from ..quant.relax import relaxed_schedule
from ..reference.model import load_reference
from ..reference.samplers import SAMPLERS
from ..reference.schedules import get_sigmas
from .common import emit_json, parse_presets, print_table, quant_plan, set_threads
from .correct import calibrate_method, check_disjoint, corrected_sampler
from .pipeline import (
    PerSampleNoise, RunConfig, decode, initial_noise, labels_for, parse_int_list, per_sample_metrics,
    quantized_denoiser, sample_latents, start_latent,
)

CONFIGS = ("dynamic", "fp", "progressive", "relax_x0", "relax_xT")
DESCRIBE = {
    "dynamic": "dynamic per-sample ranges (the presets today)",
    "fp": "static, FP-trajectory calibration",
    "progressive": "static, progressive calibration",
    "relax_x0": "progressive + relaxed near x0",
    "relax_xT": "progressive + relaxed near x_T",
}
#: (A, B) pairs of the comparison table, when both rows exist
PAIRS = (("progressive", "fp"), ("relax_x0", "progressive"), ("relax_xT", "progressive"),
         ("relax_x0", "relax_xT"), ("progressive", "dynamic"), ("fp", "dynamic"), ("relax_x0", "dynamic"))
PCR = "relax_x0"  # PCR as the paper runs SD: progressive + relaxed near x0
LATENT = (4, 14, 14)
N_BOOT = 1000


def _ci(ci) -> dict:
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high}


def fid_diff_ci(feat_a: torch.Tensor, feat_b: torch.Tensor, feat_fp: torch.Tensor, n_boot: int = N_BOOT,
                seed: int = 0) -> dict:
    """Paired bootstrap CI of FID(A, FP) − FID(B, FP), resampling sample indices jointly."""
    def fid(f, idx):
        mu_a, cov_a = feature_stats(f[idx])
        mu_b, cov_b = feature_stats(feat_fp[idx])
        return gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b)

    n = len(feat_fp)
    everything = torch.arange(n)
    estimate = fid(feat_a, everything) - fid(feat_b, everything)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = torch.from_numpy(rng.integers(0, n, size=n))
        boots.append(fid(feat_a, idx) - fid(feat_b, idx))
    low, high = np.quantile(boots, [0.025, 0.975])
    return {"estimate": float(estimate), "low": float(low), "high": float(high)}


def _features(classifier, images, bs=256):
    with torch.no_grad():
        return torch.cat([classifier.features(images[i:i + bs]).double().reshape(len(images[i:i + bs]), -1)
                          for i in range(0, len(images), bs)])


def _evaluate(ref, lat, lat_fp, img_fp, feat_fp, labels) -> dict:
    img = decode(ref.autoencoder, lat)
    per = per_sample_metrics(lat, lat_fp, img, img_fp)
    feat = _features(ref.classifier, img)
    correct = class_correct(img, labels, ref.classifier.logits).double()
    mu, cov = feature_stats(feat)
    mu_fp, cov_fp = feature_stats(feat_fp)
    summary = {"psnr": float(per["psnr"].mean()), "ssim": float(per["ssim"].mean()),
               "latent_mse": float(per["latent_mse"].mean()),
               "fid_to_fp": gaussian_frechet_distance(mu, cov, mu_fp, cov_fp),
               "class_acc": float(correct.mean()), "n": int(len(lat))}
    return {"summary": summary, "per": {**per, "correct": correct}, "features": feat}


def compare(a: dict, b: dict, feat_fp) -> dict:
    """Paired intervals of A against B (see the module docstring)."""
    pa, pb = a["per"], b["per"]
    return {
        "latent_mse_lower": _ci(paired_bootstrap_ci(pa["latent_mse"].numpy(), pb["latent_mse"].numpy(), stat="ratio",
                                                    n_boot=N_BOOT)),
        "psnr_delta": _ci(paired_bootstrap_ci(pa["psnr"].numpy(), pb["psnr"].numpy(), n_boot=N_BOOT)),
        "class_acc_delta": _ci(paired_bootstrap_ci(pa["correct"].numpy(), pb["correct"].numpy(), n_boot=N_BOOT)),
        "fid_delta": fid_diff_ci(a["features"], b["features"], feat_fp),
    }


def average_bits(qden, sigmas) -> float:
    """Mean activation bit-width over the model calls (σ > 0) of the schedule ``sigmas``."""
    act = next(m.act for m in quantized_layers(qden.quantized).values() if m.act.qtype is not None)
    calls = [float(s) for s in sigmas if float(s) > 0]
    return sum(act.bits_at(s) for s in calls) / len(calls)


def range_width_ratio(a, b) -> dict | None:
    """How A's static ranges compare with B's: per layer and σ, width(A)/width(B); quantiles over
    all (layer, σ) pairs, and the largest relative shift of an end, |Δlo| or |Δhi| over B's width.
    ``None`` unless both have static ranges at the same σ's."""
    ra, rb = [{n: m.act for n, m in quantized_layers(d.quantized).items() if m.act.mode == "static"} for d in (a, b)]
    common = [n for n in ra if n in rb and torch.equal(ra[n].range_sigmas, rb[n].range_sigmas)]
    if not common:
        return None
    wa = torch.cat([ra[n].range_hi - ra[n].range_lo for n in common])
    wb = torch.cat([rb[n].range_hi - rb[n].range_lo for n in common]).clamp_min(1e-12)
    shift = torch.cat([torch.maximum((ra[n].range_lo - rb[n].range_lo).abs(), (ra[n].range_hi - rb[n].range_hi).abs())
                       for n in common]) / wb
    r = wa / wb
    q = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"p10": q[0], "median": q[1], "p90": q[2], "mean": float(r.mean()), "shift_median": float(shift.median()),
            "pairs": int(r.numel())}


def _act_bits(qden) -> int:
    return min(m.act.qtype.bits for m in quantized_layers(qden.quantized).values() if m.act.qtype is not None)


def calibrate_ranges(ref, qden, trajectory: str, rc: RunConfig, seeds, classes, estimator: str) -> dict:
    """Static ranges for ``qden`` on the calibration seeds; returns the report's info and seconds."""
    sigmas = get_sigmas(rc.scheduler, ref.denoiser.sigmas, rc.steps)
    x = start_latent(initial_noise(seeds, LATENT), sigmas, ref.denoiser.sigmas)
    extra = {"cond": labels_for(seeds, classes), "cfg_scale": rc.cfg}
    report = calibrate_activation_ranges(
        qden, qden.quantized, x, sigmas, extra, sample_fn=SAMPLERS[rc.sampler], fp_model=ref.denoiser,
        trajectory=trajectory, estimator=estimator, batch_size=rc.batch_size,
        sampler_opts={"noise_sampler": PerSampleNoise(seeds, LATENT), **rc.sampler_opts},
        meta={"sampler": rc.sampler, "scheduler": rc.scheduler, "steps": rc.steps, "cfg": rc.cfg})
    return {**report.info(), "seconds": round(report.seconds, 1)}


def choice_totals(choices: dict) -> dict:
    """auto's choices summed over layers and σ's: ``{candidate: count}``."""
    out: dict[str, int] = {}
    for per_layer in choices.values():
        for c, n in per_layer.items():
            out[c] = out.get(c, 0) + n
    return dict(sorted(out.items()))


def build(ref, name: str, preset: str, weights, rc_cal: RunConfig, calib_seeds, calib_classes, estimator, relax,
          bits, log):
    """The quantized denoiser of one configuration, calibrated; returns (denoiser, info)."""
    if name == "dynamic":
        qden = quantized_denoiser(ref.denoiser, quant_plan(preset, weights))
        return qden, {"avg_bits": float(_act_bits(qden)), "relaxed_steps": 0}
    qden = quantized_denoiser(ref.denoiser, quant_plan(preset, weights, act_mode="static"))
    base = _act_bits(qden)
    info = {"avg_bits": float(base), "relaxed_steps": 0}
    if name.startswith("relax_"):
        sigmas = get_sigmas(rc_cal.scheduler, ref.denoiser.sigmas, rc_cal.steps)
        schedule, k, avg = relaxed_schedule(sigmas, relax, name[len("relax_"):], bits, base)
        if schedule:
            set_activation_schedule(qden.quantized, schedule)
        info.update(avg_bits=avg, relaxed_steps=k, schedule=[list(e) for e in schedule])
    trajectory = "fp" if name == "fp" else "progressive"
    info["calibration"] = calibrate_ranges(ref, qden, trajectory, rc_cal, calib_seeds, calib_classes, estimator)
    if info["calibration"]["choices"]:
        info["choice_totals"] = choice_totals(info["calibration"]["choices"])
    log(f"# {preset} {name}: {trajectory}-trajectory ranges ({estimator}) for {info['calibration']['layers']} layers, "
        f"{info['calibration']['seconds']} s")
    return qden, info


def shifted(calib_seeds: list[int], k: int) -> list[int]:
    """Calibration set ``k`` (1-based): the calibration seeds shifted by (k − 1) × their count."""
    return [s + (k - 1) * len(calib_seeds) for s in calib_seeds]


def _variants(configs, estimators, calib_sets):
    for name in configs:
        for est in (estimators[:1] if name == "dynamic" else estimators):
            for k in range(1, 1 + (1 if name == "dynamic" else calib_sets)):
                yield name, est, k


def _key(name, est, k, first_est):
    return name + ("" if est == first_est else f"@{est}") + ("" if k == 1 else f"#{k}")


def run(presets, seeds, classes, calib_seeds, calib_classes, *, sampler="euler", scheduler="normal", steps=20,
        calib_steps=None, cfg=None, relax=0.2, bits=10, estimator="mse", configs=CONFIGS, methods=(),
        weights=None, batch_size=64, cost=True, calib_sets=1, log=print) -> dict:
    if not 0.0 <= relax <= 1.0:
        raise SystemExit(f"--relax is the fraction of relaxed steps, in [0, 1]; got {relax}")
    check_disjoint(calib_seeds, seeds)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    configs = [c for c in CONFIGS if c in configs]
    estimators = [estimator] if isinstance(estimator, str) else list(estimator)
    bad = [e for e in estimators if e not in METHODS]
    if bad or not estimators:
        raise SystemExit(f"unknown range estimator(s) {bad}; known: {', '.join(METHODS)}")
    if calib_sets < 1:
        raise SystemExit("--calib-sets must be at least 1")
    for k in range(2, calib_sets + 1):
        check_disjoint(shifted(calib_seeds, k), seeds)
    if methods and not {"fp", PCR} <= set(configs):
        raise SystemExit(f"--methods needs the 'fp' and '{PCR}' configurations (corrections on top of each)")
    ref = load_reference()
    cfg_scale = ref.default_cfg if cfg is None else cfg
    rc = RunConfig(sampler, scheduler, steps, cfg_scale, batch_size).validate()
    rc_cal = RunConfig(sampler, scheduler, calib_steps or steps, cfg_scale, batch_size).validate()
    labels = labels_for(seeds, classes)
    grid = ref.denoiser.sigmas
    t0 = time.perf_counter()
    lat_fp = sample_latents(ref.denoiser, rc, seeds, labels, grid)
    img_fp = decode(ref.autoencoder, lat_fp)
    feat_fp = _features(ref.classifier, img_fp)
    fp_acc = float(class_correct(img_fp, labels, ref.classifier.logits).double().mean())
    log(f"# FP sampled in {time.perf_counter() - t0:.1f} s (class accuracy {100 * fp_acc:.1f}%)")
    eval_sigmas = get_sigmas(scheduler, grid, steps)
    rows, comparisons = [], []
    for preset in presets:
        evals, dens = {}, {}
        for name, est, k in _variants(configs, estimators, calib_sets):
            key = _key(name, est, k, estimators[0])
            cal_seeds = shifted(calib_seeds, k)
            qden, info = build(ref, name, preset, weights, rc_cal, cal_seeds, calib_classes, est, relax,
                               bits, log)
            if k > 1:
                info["calib_seeds"] = _span(cal_seeds)
            warning = check_coverage(qden.quantized, eval_sigmas) if name != "dynamic" else None
            if warning:
                log(f"# {preset} {key}: {warning}")
            t1 = time.perf_counter()
            lat = sample_latents(qden, rc, seeds, labels, grid)
            evals[key] = _evaluate(ref, lat, lat_fp, img_fp, feat_fp, labels)
            dens[key] = qden
            info["avg_bits"] = average_bits(qden, eval_sigmas)  # on the evaluated schedule
            rows.append({"preset": preset, "config": key, "method": "none",
                         "estimator": None if name == "dynamic" else est, **info, **evals[key]["summary"],
                         "coverage_warning": warning, "seconds": round(time.perf_counter() - t1, 1)})
            log(f"# {preset} {key}: sampled in {rows[-1]['seconds']} s")
        for method in methods:
            for base in ("fp", PCR):
                stats, secs = calibrate_method(ref, dens[base], method, rc_cal, calib_seeds, calib_classes,
                                               f"{preset}-static", "progressive")
                fn = corrected_sampler(stats, method, sampler)
                lat = sample_latents(dens[base], rc, seeds, labels, grid, sampler_fn=fn)
                key = f"{base}+{method}"
                evals[key] = _evaluate(ref, lat, lat_fp, img_fp, feat_fp, labels)
                base_row = next(r for r in rows if r["preset"] == preset and r["config"] == base and r["method"] == "none")
                rows.append({**{k: v for k, v in base_row.items() if k not in evals[key]["summary"]},
                             "method": method, **evals[key]["summary"], "calib_seconds": round(secs, 1)})
                log(f"# {preset} {key}: corrections calibrated in {secs:.1f} s")
        pairs = list(PAIRS)
        pairs += [(f"{c}@{e}", c) for c in configs for e in estimators[1:] if c != "dynamic"]
        for k in range(2, calib_sets + 1):  # calibration-set variability, and the main comparison again
            pairs += [(f"{c}#{k}", c) for c in configs if c != "dynamic"]
            pairs += [(f"{a}#{k}", f"{b}#{k}") for a, b in PAIRS if a != "dynamic" and b != "dynamic"]
        for method in methods:
            pairs += [(f"fp+{method}", "fp"), (PCR, "fp"), (f"{PCR}+{method}", "fp"), (f"{PCR}+{method}", PCR)]
        seen = set()
        for a, b in pairs:
            if a in evals and b in evals and (a, b) not in seen:
                seen.add((a, b))
                comparisons.append({"preset": preset, "a": a, "b": b, **compare(evals[a], evals[b], feat_fp)})
                if a in dens and b in dens:
                    comparisons[-1]["range_width_ratio"] = range_width_ratio(dens[a], dens[b])
    res = {"sampler": sampler, "scheduler": scheduler, "steps": steps, "calib_steps": calib_steps or steps,
           "cfg": cfg_scale, "n": len(seeds), "seeds": _span(seeds), "classes": classes, "fp_class_acc": fp_acc,
           "calibration": {"seeds": _span(calib_seeds), "classes": calib_classes, "n": len(calib_seeds),
                           "estimator": estimators[0], "estimators": estimators, "sets": calib_sets},
           "relax": relax, "relax_bits": bits, "weights": weights, "rows": rows, "comparisons": comparisons}
    if cost and presets:
        res["cost"] = dynamic_cost(ref, presets[-1], weights, rc, log)
    return res


@torch.no_grad()
def dynamic_cost(ref, preset: str, weights, rc: RunConfig, log, repeats: int = 15) -> dict:
    """What dynamic ranges cost per model call and static ones avoid: the activation elements a
    dynamic quantizer must reduce (min/max) before it can quantize, on the reference model and on an
    SD1.5-shaped UNet at 64×64 latents; and the activation quantizers' own time per call on the
    reference model (dynamic vs static, interleaved, median of ``repeats``)."""
    dyn = quantized_denoiser(ref.denoiser, quant_plan(preset, weights))
    sta = quantized_denoiser(ref.denoiser, quant_plan(preset, weights, act_mode="static"))
    for m in quantized_layers(sta.quantized).values():
        if m.act.qtype is not None:
            m.act.set_static_ranges([1.0], [-1.0], [1.0])
    x = torch.randn(rc.batch_size, *LATENT, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((rc.batch_size,), 1.0)
    inputs = {}
    for name, m in quantized_layers(dyn.quantized).items():
        if m.act.qtype is not None:
            m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach()))
    labels = torch.zeros(rc.batch_size, dtype=torch.long)
    dyn(x, sigma, cond=labels, cfg_scale=rc.cfg)
    elems = sum(t.numel() for t in inputs.values())
    acts_dyn = {n: m.act for n, m in quantized_layers(dyn.quantized).items() if n in inputs}
    acts_sta = {n: m.act for n, m in quantized_layers(sta.quantized).items() if n in inputs}
    times = {"dynamic": [], "static": []}
    with torch.no_grad():
        from ..quant import sigma_scope
        for _ in range(repeats):
            for kind, acts, mod in (("dynamic", acts_dyn, dyn.quantized), ("static", acts_sta, sta.quantized)):
                with sigma_scope(mod, sigma[:1]):
                    t = time.perf_counter()
                    for n, a in acts.items():
                        a(inputs[n])
                    times[kind].append(time.perf_counter() - t)
        t_call = []
        for _ in range(5):
            t = time.perf_counter()
            dyn(x, sigma, cond=labels, cfg_scale=rc.cfg)
            t_call.append(time.perf_counter() - t)
    out = {"preset": preset, "batch": rc.batch_size, "cfg": rc.cfg,
           "reference_elements_per_call": int(elems),
           "reference_elements_per_sample_call": int(elems // (rc.batch_size * (1 if rc.cfg == 1.0 else 2))),
           "act_quant_ms_dynamic": 1e3 * statistics.median(times["dynamic"]),
           "act_quant_ms_static": 1e3 * statistics.median(times["static"]),
           "model_call_ms_dynamic": 1e3 * statistics.median(t_call),
           "sd15_64x64_elements_per_call": sd15_activation_elements(preset)}
    log(f"# cost: {out}")
    return out


def sd15_activation_elements(preset: str) -> int:
    """Input elements of the quantized layers of an SD1.5-shaped UNet in one call (batch 1, 64×64),
    counted on the meta device (shapes only): what a dynamic quantizer reduces per call."""
    from ..quant import resolve_plan
    from .sd_unet import SDUNet

    with torch.device("meta"):
        unet = SDUNet()
        names = {n for n, d in resolve_plan(unet, quant_plan(preset)).items() if d["weight"] and d["act"]}
        total = [0]
        for n, m in unet.named_modules():
            if n in names:
                m.register_forward_pre_hook(lambda mod, args: total.__setitem__(0, total[0] + args[0].numel()))
        unet(torch.empty(1, 4, 64, 64), torch.empty(1), torch.empty(1, 77, 768))
    return total[0]


def _span(seeds):
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds


def _fmt(ci, k=1.0, digits=1):
    return f"{k * ci['estimate']:+.{digits}f} [{k * ci['low']:+.{digits}f}, {k * ci['high']:+.{digits}f}]"


def print_result(res: dict) -> None:
    c = res["calibration"]
    print(f"PCR / QDiffBench-style — reference model, {res['sampler']}, {res['scheduler']} {res['steps']} steps "
          f"(ranges calibrated at {res['calib_steps']}), cfg {res['cfg']}, N={res['n']} seeds {res['seeds']} "
          f"classes {res['classes']}; ranges ({', '.join(c['estimators'])}) calibrated on {c['n']} seeds {c['seeds']} classes "
          f"{c['classes']}" + (f" (and {c['sets'] - 1} more disjoint set(s) of as many seeds, rows '#k')" if c.get("sets", 1) > 1
                                 else "") + f"; relax {res['relax']:.0%} at A{res['relax_bits']}")
    table = []
    for r in res["rows"]:
        cal = r.get("calibration")
        table.append([r["preset"], r["config"] + ("" if r["method"] == "none" else f" + {r['method']}"),
                      f"{r['avg_bits']:.2f}", f"{r['fid_to_fp']:.3f}", f"{r['latent_mse']:.5f}", f"{r['psnr']:.2f}",
                      f"{r['ssim']:.4f}", f"{100 * r['class_acc']:.1f}", "-" if not cal else f"{cal['seconds']:.0f}"])
    print_table(["preset", "configuration", "avg A bits", "FID-to-FP", "latent MSE", "PSNR dB", "SSIM", "acc %",
                 "calib s"], table, out=sys.stdout)
    print()
    table = [[x["preset"], f"{x['a']} vs {x['b']}", _fmt(x["fid_delta"], digits=3),
              _fmt(x["latent_mse_lower"], 100), _fmt(x["psnr_delta"], digits=2), _fmt(x["class_acc_delta"], 100)]
             for x in res["comparisons"]]
    print_table(["preset", "A vs B", "ΔFID A−B [95% CI]", "MSE lower % [95% CI]", "ΔPSNR dB [95% CI]",
                 "Δacc pp [95% CI]"], table, out=sys.stdout)
    for r in res["rows"]:
        if r.get("choice_totals"):
            print(f"{r['preset']} {r['config']}: auto chose, over layers × σ's, "
                  + ", ".join(f"{c} {n}" for c, n in r["choice_totals"].items()))
    ratios = [x for x in res["comparisons"] if x.get("range_width_ratio")]
    if ratios:
        print()
        print_table(["preset", "A vs B", "range width A/B: p10", "median", "p90", "median end shift (× B width)"],
                    [[x["preset"], f"{x['a']} vs {x['b']}", *(f"{x['range_width_ratio'][k]:.3f}" for k in
                                                             ("p10", "median", "p90", "shift_median"))]
                     for x in ratios], out=sys.stdout)
    if res.get("cost"):
        k = res["cost"]
        print(f"\ncost of dynamic ranges ({k['preset']}): every call reduces {k['reference_elements_per_sample_call']:,} "
              f"activation elements per sample on the reference model, {k['sd15_64x64_elements_per_call']:,} on an "
              f"SD1.5-shaped UNet at 64×64; activation quantizers {k['act_quant_ms_dynamic']:.1f} ms dynamic vs "
              f"{k['act_quant_ms_static']:.1f} ms static per call (batch {k['batch']}, whole call "
              f"{k['model_call_ms_dynamic']:.0f} ms)")


def main(args) -> int:
    set_threads(args.threads)
    res = run(parse_presets(args.preset), parse_int_list(args.seeds), parse_int_list(args.classes),
              parse_int_list(args.calib_seeds), parse_int_list(args.calib_classes), sampler=args.sampler,
              scheduler=args.scheduler, steps=args.steps, calib_steps=args.calib_steps, cfg=args.cfg,
              relax=args.relax, bits=args.bits,
              estimator=[e.strip() for e in args.estimator.split(",") if e.strip()],
              configs=[c.strip() for c in args.configs.split(",") if c.strip()],
              methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else (),
              weights=args.weights, batch_size=args.batch, cost=not args.no_cost, calib_sets=args.calib_sets)
    print_result(res)
    if args.json:
        emit_json(res)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("pcr", help="PCR: static per-σ activation ranges (FP-trajectory vs progressive), relaxing, "
                                   "QDiffBench-style metrics")
    p.add_argument("--preset", default="W8A8,W4A8,W4A4", help="comma-separated presets with quantized activations")
    p.add_argument("--seeds", default="1000-1127", help="evaluation seeds")
    p.add_argument("--classes", default="5-9", help="evaluation classes, cycled over the seeds")
    p.add_argument("--calib-seeds", default="0-255", help="calibration seeds (disjoint from --seeds)")
    p.add_argument("--calib-classes", default="0-4", help="calibration classes")
    p.add_argument("--calib-sets", type=int, default=1,
                   help="calibrate every static configuration on this many disjoint calibration sets (set k = "
                        "--calib-seeds shifted by (k-1)×their count; rows 'name#k'), to measure calibration-set noise")
    p.add_argument("--relax", type=float, default=0.2, help="fraction of relaxed steps, in [0, 1]")
    p.add_argument("--bits", type=int, default=10, help="activation bit-width of the relaxed steps (10 or 16)")
    p.add_argument("--estimator", default="mse",
                   help="range estimator(s) of the static calibrations, comma-separated (minmax, percentile, mse, "
                        "auto = chosen per layer and σ on the layer's output error); rows for the later ones are "
                        "compared with the first")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {', '.join(CONFIGS)}")
    p.add_argument("--methods", default=None,
                   help="engine corrections to add on top of the FP-trajectory ranges and of PCR (e.g. tcec,ptqd)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-steps", type=int, default=None, help="steps of the calibration schedule (default --steps)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the reference model's)")
    p.add_argument("--weights", default=None, help="replace the presets' weight type (e.g. uint4)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-cost", action="store_true", help="skip the dynamic-range cost measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
