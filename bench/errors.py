"""``qcorrect bench errors``: the quantized model's ε-error statistics per step (why a correction can help).

Teacher-forced calibration (both models evaluated on the FP trajectory, PTQD's protocol) on the
given seeds, then per step: PTQD's correlation k and its R², the mean |per-channel bias| μ and the
residual std σ_q (ALGORITHMS.md §2b). A bias that is large next to σ_q is what output corrections
can remove; an error with R² ≈ 0 and small μ is sample-specific noise no per-σ statistic removes.
"""

from __future__ import annotations

from ..calibration.ptqd import ptqd_params
from ..quant import PRESETS
from ..reference.model import load_reference
from .common import emit_json, parse_presets, print_table, set_threads
from .correct import calibrate_method
from .pipeline import RunConfig, parse_int_list, quantized_denoiser


def main(args) -> int:
    set_threads(args.threads)
    ref = load_reference()
    cfg = ref.default_cfg if args.cfg is None else args.cfg
    out = {"cfg": cfg, "seeds": args.seeds, "sampler": args.sampler, "steps": args.steps, "presets": {}}
    for preset in parse_presets(args.preset):
        qd = quantized_denoiser(ref.denoiser, PRESETS[preset])
        rc = RunConfig(args.sampler, args.scheduler, args.steps, cfg, args.batch).validate()
        stats, _ = calibrate_method(ref, qd, "ptqd", rc, parse_int_list(args.seeds), parse_int_list(args.classes),
                                    preset, mode="teacher_forced")
        p = ptqd_params(stats)
        sig = stats.sigma
        rows = []
        for n in range(p.bias.shape[0]):
            rows.append({"step": n, "sigma": float(sig[n]), "k": float(p.k.reshape(-1)[n]),
                         "r2": float(p.r2.reshape(-1)[n]), "bias_abs_mean": float(p.bias[n].abs().mean()),
                         "sigma_q": float(p.sigma_q.reshape(-1)[n])})
        out["presets"][preset] = rows
        print(f"{preset}: ε-error per step (teacher-forced, {args.sampler}, {args.steps} steps, cfg {cfg}, seeds {args.seeds})")
        print_table(["step", "sigma", "k", "R²", "mean |μ_c|", "σ_q"],
                    [[r["step"], f"{r['sigma']:.3f}", f"{r['k']:.4f}", f"{r['r2']:.4f}",
                      f"{r['bias_abs_mean']:.4f}", f"{r['sigma_q']:.4f}"] for r in rows])
    if args.json:
        emit_json(out)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("errors", help="per-step ε-error statistics of a quantized reference model")
    p.add_argument("--preset", default="W4A8")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--seeds", default="0-31")
    p.add_argument("--classes", default="0-9")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)
