"""``qcorrect bench errors``: the quantized model's ε-error statistics per step (why a correction can help).

Teacher-forced calibration (both models evaluated on the FP trajectory, PTQD's protocol) on the
given seeds, then per step: PTQD's correlation k and its R², the mean |per-channel bias| μ and the
residual std σ_q (ALGORITHMS.md §2b). A bias that is large next to σ_q is what output corrections
can remove; an error with R² ≈ 0 and small μ is sample-specific noise no per-σ statistic removes.

``--drift`` adds the end-to-end view (:func:`drift_decomposition`): the naive quantized and the FP
trajectories run side by side (euler) on the calibration seeds and on held-out seeds; for every
step it reports the latent drift δ_n = x̂_n − x_n on the held-out seeds and the share of its
energy left after subtracting the calibration set's mean drift per channel (what StepbaQ LA and
TAC IBC can remove) and per position. It also compares the final error with the teacher-forced
sum Σ h_n·e_n that TCEC's closed form (J ≈ 0, ALGORITHMS.md §5b) predicts: a ratio far above 1
means the sampler damps early errors and J ≈ 0 does not hold.

``--ceiling`` bounds what any per-σ statistic could do (:func:`correction_ceiling`): it samples
the given seeds with the quantized model (euler) and, at every step, corrects ε̂ with statistics
of the error at the same input *measured live on these very samples*: the exact per-channel mean
(the ideal PTQD bias / TAC IBC / StepbaQ LA input), the exact per-position mean, and the exact
per-channel least-squares gain and offset (the ideal NER / TCEC K). These are the statistics the
methods' fits aim at, exact for each step on these samples: a method whose ideal statistic does not
help here has no reason to help with estimated ones (``bench quality --oracle`` checks the methods'
own fits the same way). Two "perfect" variants (ε̂ replaced by the FP model's ε at the same input on one σ
range only) show where along the trajectory the final error comes from.
"""

from __future__ import annotations

import torch

from ..calibration.collect import slice_extra
from ..calibration.ptqd import ptqd_params
from ..reference.model import load_reference
from ..reference.schedules import get_sigmas
from .common import (
    emit_json, fmt_spread, parse_presets, per_sample_spread, print_table, quant_label, quant_plan, set_threads,
)
from .correct import calibrate_method
from .pipeline import RunConfig, initial_noise, labels_for, parse_int_list, quantized_denoiser, start_latent


@torch.no_grad()
def _drift_run(fp, q, x, sigmas, extra):
    """Yield, per euler step n, the drift x̂_{n+1} − x_{n+1} and h_n·e_n (e_n teacher-forced on x_n)."""
    xq = x.clone()
    for n in range(sigmas.numel() - 1):
        s, s_next = sigmas[n], sigmas[n + 1]
        sv = s.expand(x.shape[0])
        eps = (x - fp(x, sv, **extra)) / s
        h_e = (s_next - s) * ((x - q(x, sv, **extra)) / s - eps)
        x = x + (s_next - s) * eps
        xq = xq + (s_next - s) * (xq - q(xq, sv, **extra)) / s
        yield n, xq - x, h_e


def drift_decomposition(fp, q, sigmas, noise_cal, extra_cal, noise_eval, extra_eval, batch_size=64) -> dict:
    """How much of the naive quantized drift a per-σ mean could remove, measured on held-out samples.

    ``noise_*`` are the initial latents (already scaled to σ_0) of the calibration and held-out sets;
    ``extra_*`` their conditioning. The calibration set gives the mean drift per step (per channel
    and per position); the held-out set is scored against it. Memory: one mean per step, sums
    streamed over batches.
    """
    steps = sigmas.numel() - 1

    def batches(noise, extra):
        n = noise.shape[0]
        for i in range(0, n, batch_size):
            sl = slice(i, min(i + batch_size, n))
            yield sl, noise[sl], slice_extra(extra, sl, n)

    mean_pos = torch.zeros(steps, *noise_cal.shape[1:], dtype=torch.float64)
    for _, x, ex in batches(noise_cal, extra_cal):
        for n, d, _ in _drift_run(fp, q, x, sigmas, ex):
            mean_pos[n] += d.double().sum(0)
    mean_pos /= noise_cal.shape[0]
    mean_ch = mean_pos.mean(dim=tuple(range(2, mean_pos.ndim)), keepdim=True)
    tot, left_ch, left_pos = (torch.zeros(steps, dtype=torch.float64) for _ in range(3))
    tf_sum = torch.zeros_like(noise_eval, dtype=torch.float64)  # Σ h·e per held-out sample
    final = torch.zeros_like(tf_sum)  # the drift after the last step
    for sl, x, ex in batches(noise_eval, extra_eval):
        for n, d, h_e in _drift_run(fp, q, x, sigmas, ex):
            d = d.double()
            tot[n] += d.pow(2).sum()
            left_ch[n] += (d - mean_ch[n]).pow(2).sum()
            left_pos[n] += (d - mean_pos[n]).pow(2).sum()
            tf_sum[sl] += h_e.double()
        final[sl] = d
    rows = [{"step": n, "sigma_next": float(sigmas[n + 1]), "drift_mse": float(tot[n]) / noise_eval.numel(),
             "left_after_channel_mean": float(left_ch[n] / tot[n]) if tot[n] > 0 else 0.0,
             "left_after_position_mean": float(left_pos[n] / tot[n]) if tot[n] > 0 else 0.0} for n in range(steps)]
    final_mse = float(final.pow(2).mean())
    tf_mse = float(tf_sum.pow(2).mean())
    cos = float((final * tf_sum).sum() / (final.norm() * tf_sum.norm()).clamp_min(1e-30))
    return {"rows": rows, "final_mse": final_mse, "teacher_forced_sum_mse": tf_mse,
            "sum_over_final": tf_mse / final_mse if final_mse > 0 else float("inf"), "cosine_final_vs_sum": cos}


CEILING_VARIANTS = ("channel_mean", "position_mean", "channel_gain", "perfect")


def _ceiling_correct(variant: str, eq: torch.Tensor, ef_same: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """ε̂ corrected with exact statistics of ``eq − ef_same`` over the whole set (dims 0 and spatial);
    ``scale`` applies that fraction of the correction (a shrunken statistic)."""
    if scale != 1.0:
        return eq + scale * (_ceiling_correct(variant, eq, ef_same) - eq)
    err = eq - ef_same
    if variant == "perfect":
        return ef_same
    if variant == "channel_mean":
        return eq - err.mean(dim=(0, *range(2, eq.ndim)), keepdim=True)
    if variant == "position_mean":
        return eq - err.mean(dim=0, keepdim=True)
    if variant == "channel_gain":  # per channel: ef ≈ a·eq + b, least squares over samples and positions
        dims = (0, *range(2, eq.ndim))
        qm, fm = eq.mean(dim=dims, keepdim=True), ef_same.mean(dim=dims, keepdim=True)
        cov = ((eq - qm) * (ef_same - fm)).mean(dim=dims, keepdim=True)
        var = (eq - qm).square().mean(dim=dims, keepdim=True).clamp_min(1e-20)
        return fm + cov / var * (eq - qm)
    raise ValueError(f"unknown ceiling variant {variant!r}; known: {', '.join(CEILING_VARIANTS)}")


@torch.no_grad()
def correction_ceiling(fp, q, sigmas, x, extra, variants, batch_size=64) -> dict:
    """Final latent MSE to FP of naive euler sampling and of each ``(name, variant, lo, hi[, scale])``
    in ``variants``: the variant's in-sample correction (times ``scale``, default 1) applied at the
    steps with lo ≤ σ < hi.

    All samples advance in lock-step (the model is called in chunks of ``batch_size``) so every
    statistic is taken over the whole set: the result does not depend on the batch size (up to
    floating-point rounding, which a quantized model's rounding to codes can amplify).
    Returns per-sample final MSEs (``[N]`` float64) under "naive" and each name.
    """
    n = x.shape[0]

    def call(model, z, s):
        outs = []
        for i in range(0, n, batch_size):
            sl = slice(i, min(i + batch_size, n))
            outs.append(model(z[sl], s.expand(sl.stop - sl.start), **slice_extra(extra, sl, n)))
        return torch.cat(outs)

    def eps(model, z, s):
        return (z - call(model, z, s)) / s

    specs = {v[0]: v for v in variants}
    xs = {"FP": x.clone(), "naive": x.clone(), **{name: x.clone() for name in specs}}
    for k, sk in enumerate(sigmas[:-1].tolist()):  # the schedule's σ as floats, once (no per-call sync)
        s, s_next = sigmas[k], sigmas[k + 1]
        for name, z in xs.items():
            if name == "FP":
                e = eps(fp, z, s)
            else:
                e = eps(q, z, s)
                spec = specs.get(name)
                if spec is not None and spec[2] <= sk < spec[3]:
                    e = _ceiling_correct(spec[1], e, eps(fp, z, s), *spec[4:5])
            xs[name] = z + (s_next - s) * e
    fin = xs.pop("FP")
    return {name: (z - fin).double().flatten(1).pow(2).mean(1) for name, z in xs.items()}


def main(args) -> int:
    set_threads(args.threads)
    ref = load_reference()
    cfg = ref.default_cfg if args.cfg is None else args.cfg
    out = {"cfg": cfg, "seeds": args.seeds, "sampler": args.sampler, "steps": args.steps, "presets": {}}
    for preset in parse_presets(args.preset):
        qd = quantized_denoiser(ref.denoiser, quant_plan(preset, args.weights))
        label = quant_label(preset, args.weights)
        rc = RunConfig(args.sampler, args.scheduler, args.steps, cfg, args.batch).validate()
        stats, _ = calibrate_method(ref, qd, "ptqd", rc, parse_int_list(args.seeds), parse_int_list(args.classes),
                                    label, mode="teacher_forced")
        p = ptqd_params(stats)
        sig = stats.sigma
        rows = []
        for n in range(p.bias.shape[0]):
            rows.append({"step": n, "sigma": float(sig[n]), "k": float(p.k.reshape(-1)[n]),
                         "r2": float(p.r2.reshape(-1)[n]), "bias_abs_mean": float(p.bias[n].abs().mean()),
                         "sigma_q": float(p.sigma_q.reshape(-1)[n])})
        out["presets"][label] = rows
        print(f"{label}: ε-error per step (teacher-forced, {args.sampler}, {args.steps} steps, cfg {cfg}, seeds {args.seeds})")
        print_table(["step", "sigma", "k", "R²", "mean |μ_c|", "σ_q"],
                    [[r["step"], f"{r['sigma']:.3f}", f"{r['k']:.4f}", f"{r['r2']:.4f}",
                      f"{r['bias_abs_mean']:.4f}", f"{r['sigma_q']:.4f}"] for r in rows])
        if args.drift:
            out.setdefault("drift", {})[label] = _print_drift(ref, qd, rc, args)
        if args.ceiling:
            out.setdefault("ceiling", {})[label] = _print_ceiling(ref, qd, rc, args)
    if args.json:
        emit_json(out)
    return 0


def _print_drift(ref, qd, rc, args) -> dict:
    if args.sampler not in ("euler", "ddim"):
        raise SystemExit("--drift steps euler (= ddim) only")
    cal, held = parse_int_list(args.seeds), parse_int_list(args.holdout_seeds)
    if set(cal) & set(held):
        raise SystemExit("--holdout-seeds must not overlap --seeds")
    classes = parse_int_list(args.classes)
    grid = ref.denoiser.sigmas
    sigmas = get_sigmas(rc.scheduler, grid, rc.steps)
    shape = (4, 14, 14)
    res = drift_decomposition(
        ref.denoiser, qd, sigmas,
        start_latent(initial_noise(cal, shape), sigmas, grid), {"cond": labels_for(cal, classes), "cfg_scale": rc.cfg},
        start_latent(initial_noise(held, shape), sigmas, grid), {"cond": labels_for(held, classes), "cfg_scale": rc.cfg},
        batch_size=rc.batch_size)
    print(f"naive drift x̂−x on held-out seeds {args.holdout_seeds}; means from seeds {args.seeds}")
    print_table(["step", "σ_next", "drift MSE", "left after channel mean", "left after position mean"],
                [[r["step"], f"{r['sigma_next']:.3f}", f"{r['drift_mse']:.5f}", f"{r['left_after_channel_mean']:.3f}",
                  f"{r['left_after_position_mean']:.3f}"] for r in res["rows"]])
    print(f"final latent MSE {res['final_mse']:.5f}; teacher-forced Σ h·e predicts {res['teacher_forced_sum_mse']:.5f} "
          f"({res['sum_over_final']:.1f}×), cosine {res['cosine_final_vs_sum']:.2f}")
    return res


def _print_ceiling(ref, qd, rc, args) -> dict:
    if args.sampler not in ("euler", "ddim"):
        raise SystemExit("--ceiling steps euler (= ddim) only")
    seeds, classes = parse_int_list(args.ceiling_seeds), parse_int_list(args.classes)
    grid = ref.denoiser.sigmas
    sigmas = get_sigmas(rc.scheduler, grid, rc.steps)
    inf, split = float("inf"), args.split_sigma
    variants = [("channel mean", "channel_mean", 0.0, inf), ("position mean", "position_mean", 0.0, inf),
                ("channel gain+offset", "channel_gain", 0.0, inf),
                (f"channel mean, σ ≥ {split:g}", "channel_mean", split, inf),
                (f"channel mean, σ < {split:g}", "channel_mean", 0.0, split),
                (f"perfect, σ ≥ {split:g}", "perfect", split, inf), (f"perfect, σ < {split:g}", "perfect", 0.0, split)]
    if args.shrink:
        variants += [(f"channel mean × {a:g}", "channel_mean", 0.0, inf, a)
                     for a in (float(t) for t in args.shrink.split(","))]
    x = start_latent(initial_noise(seeds, (4, 14, 14)), sigmas, grid)
    res = correction_ceiling(ref.denoiser, qd, sigmas, x, {"cond": labels_for(seeds, classes), "cfg_scale": rc.cfg},
                             variants, batch_size=rc.batch_size)
    base = res["naive"]
    rows = [{"variant": "naive", "latent_mse": float(base.mean())}]
    for name, *_ in variants:
        m = res[name]
        rows.append({"variant": name, "latent_mse": float(m.mean()), "gap_closed": float(1 - m.mean() / base.mean()),
                     **per_sample_spread(m, base)})
    print(f"ceiling of per-σ corrections: statistics measured live on seeds {args.ceiling_seeds} themselves "
          f"({rc.sampler}, {rc.steps} steps, cfg {rc.cfg})")
    print_table(["in-sample correction", "latent MSE", "gap closed %", "improved %", "median gap %"],
                [[r["variant"], f"{r['latent_mse']:.5f}",
                  f"{100 * r['gap_closed']:+.1f}" if "gap_closed" in r else "-", *fmt_spread(r)] for r in rows])
    return {"seeds": args.ceiling_seeds, "split_sigma": split, "rows": rows}


def add_parser(sub) -> None:
    p = sub.add_parser("errors", help="per-step ε-error statistics of a quantized reference model")
    p.add_argument("--preset", default="W4A8")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--seeds", default="0-31")
    p.add_argument("--classes", default="0-9")
    p.add_argument("--weights", default=None, help="replace the presets' weight type (e.g. uint4 = per-channel int4)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--drift", action="store_true",
                   help="also decompose the naive end-to-end drift on --holdout-seeds (euler)")
    p.add_argument("--holdout-seeds", default="5000-5127", help="held-out seeds for --drift (disjoint from --seeds)")
    p.add_argument("--ceiling", action="store_true",
                   help="also bound what per-σ statistics can do: exact in-sample corrections on --ceiling-seeds (euler)")
    p.add_argument("--ceiling-seeds", default="1000-1127",
                   help="seeds --ceiling samples and measures its statistics on (an analysis of these very samples)")
    p.add_argument("--shrink", default=None,
                   help="--ceiling also applies these fractions of the exact channel mean, e.g. 0.25,0.5")
    p.add_argument("--split-sigma", type=float, default=3.0,
                   help="σ that splits the trajectory into early and late steps for --ceiling")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)
