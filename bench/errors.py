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
"""

from __future__ import annotations

import torch

from ..calibration.collect import slice_extra
from ..calibration.ptqd import ptqd_params
from ..reference.model import load_reference
from ..reference.schedules import get_sigmas
from .common import emit_json, parse_presets, print_table, quant_label, quant_plan, set_threads
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
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)
