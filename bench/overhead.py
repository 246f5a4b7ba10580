"""``qcorrect bench overhead``: wall time the correction engine adds to a sampling run.

An SD1.5-shaped UNet (random weights; ≈860M parameters) samples 64×64 latents with the plain
sampler and with the engine-wrapped one, interleaved in one process (plain, engine, plain, …), and
the table reports the median run times and the added share; because a shared CPU's run-to-run
spread is larger than the engine's cost, the engine is also timed around a model that costs
nothing, and that isolated cost over the plain run time is the number held to the target. The statistics are calibrated on a
cheap stand-in pair of denoisers with the same latent shape (the engine's cost depends on the
latent shape and the schedule, not on the model), so the benchmark needs no FP/quantized SD pair.
Target (issue 4): ≤ 0.5% added, as TCEC reports.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..calibration import CalibrationConfig, CorrectionEngine, EngineConfig, calibrate
from ..reference.samplers import SAMPLERS
from ..reference.schedules import get_sigmas
from ..reference.sigmas import scaled_linear_sigmas, sigma_to_t
from .common import emit_json, print_table, set_threads
from .sd_unet import build_sd15_unet

TARGET = 0.005


class SDDenoiser:
    """ε-prediction SD UNet in the denoiser protocol (ComfyUI's EPS: c_in, nearest timestep)."""

    def __init__(self, unet, context):
        self.unet, self.context = unet, context
        self.sigmas = scaled_linear_sigmas()

    @torch.no_grad()
    def __call__(self, x, sigma, **extra):
        c_in = (1.0 / (sigma**2 + 1).sqrt()).reshape(-1, 1, 1, 1)
        t = sigma_to_t(sigma, self.sigmas.to(sigma.device))
        eps = self.unet((x * c_in).to(self.context.dtype), t, self.context).to(x.dtype)
        return x - sigma.reshape(-1, 1, 1, 1) * eps


def _proxy_pair(channels: int):
    """An exact Gaussian-data denoiser and a 'quantized' copy with a per-channel ε bias and gain."""
    bias = torch.linspace(-0.05, 0.05, channels).reshape(1, -1, 1, 1)

    def fp(x, sigma, **extra):
        s = sigma.reshape(-1, 1, 1, 1)
        return x / (1 + s**2)

    def q(x, sigma, **extra):
        s = sigma.reshape(-1, 1, 1, 1)
        eps = (x - fp(x, sigma)) / s
        return x - s * (1.03 * eps + bias.to(x.device))

    return fp, q


def _stats(method: str, sampler: str, sigmas, latent):
    fp, q = _proxy_pair(4)
    cal_sampler = sampler if sampler in ("euler", "euler_ancestral", "dpmpp_2m") else "euler"
    return calibrate(fp, q, torch.randn(8, *latent[1:]), sigmas.cpu(), engine=EngineConfig.preset(method),
                     config=CalibrationConfig(sampler=cal_sampler), grid_sigmas=scaled_linear_sigmas())


def run_engine_only(method: str, sampler: str, steps: int, size: int, device: str) -> dict:
    """Only the engine's own cost per run (no UNet): cheap, precise, for comparing with a plain run."""
    latent = (1, 4, size, size)
    sigmas = get_sigmas("normal", scaled_linear_sigmas(), steps).to(device)
    stats = _stats(method, sampler, sigmas, latent)
    x = torch.randn(*latent, device=device) * sigmas[0]
    return {"method": method, "sampler": sampler, "steps": steps, "latent": list(latent), "device": device,
            "isolated_engine_s": isolated_cost(stats, method, sampler, sigmas, x, repeats=101)}


def run(method: str, sampler: str, steps: int, size: int, repeats: int, device: str, dtype: torch.dtype) -> dict:
    latent = (1, 4, size, size)
    sigmas = get_sigmas("normal", scaled_linear_sigmas(), steps).to(device)
    stats = _stats(method, sampler, sigmas, latent)
    unet = build_sd15_unet(dtype, device=device)
    model = SDDenoiser(unet, torch.randn(1, 77, 768, device=device, dtype=dtype))
    fn = SAMPLERS[sampler]
    wrapped = CorrectionEngine(stats, EngineConfig.preset(method)).wrap(fn, sampler_name=sampler)
    x = torch.randn(*latent, device=device) * sigmas[0]

    def timed(f):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        f(model, x.clone(), sigmas, {}, None, True, seed=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(fn), timed(wrapped)  # warm-up
    plain, engine = [], []
    for _ in range(repeats):
        plain.append(timed(fn))
        engine.append(timed(wrapped))
    p, e = statistics.median(plain), statistics.median(engine)
    iso = isolated_cost(stats, method, sampler, sigmas, x)
    return {"method": method, "sampler": sampler, "steps": steps, "latent": list(latent), "device": device,
            "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "plain_s": plain, "engine_s": engine,
            "plain_median_s": p, "engine_median_s": e, "overhead": (e - p) / p, "target": TARGET,
            "isolated_engine_s": iso, "isolated_overhead": iso / p,
            "meets_target": iso / p <= TARGET}


def isolated_cost(stats, method: str, sampler: str, sigmas, x, repeats: int = 21) -> float:
    """Seconds the engine adds to one run, measured with a free model (median of interleaved runs).

    On a shared CPU the UNet's run-to-run spread (several %) hides a sub-1% cost; timing the
    engine around a model that costs nothing isolates what it adds per run, which divided by the
    plain run time bounds the overhead precisely.
    """
    fn = SAMPLERS[sampler]
    wrapped = CorrectionEngine(stats, EngineConfig.preset(method)).wrap(fn, sampler_name=sampler)

    def free(x, sigma, **extra):
        return x * 0.5

    def timed(f):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        f(free, x.clone(), sigmas, {}, None, True, seed=0)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(fn), timed(wrapped)
    diffs = []
    for _ in range(repeats):
        a = timed(fn)
        diffs.append(timed(wrapped) - a)
    return max(statistics.median(diffs), 0.0)


def main(args) -> int:
    set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or
                                                                                   ("fp16" if device == "cuda" else "fp32")]
    if args.engine_only:
        results = [run_engine_only(m, s, args.steps, args.size, device)
                   for m in args.methods.split(",") for s in args.sampler.split(",")]
        print(f"engine alone (a model that costs nothing), {args.size}x{args.size} latents, {args.steps} steps, "
              f"{device}, median of 101 interleaved runs")
        print_table(["method", "sampler", "engine alone ms per run"],
                    [[r["method"], r["sampler"], f"{1000 * r['isolated_engine_s']:.2f}"] for r in results])
        if args.json:
            emit_json({"results": results})
        return 0
    results = [run(m, s, args.steps, args.size, args.repeats, device, dtype)
               for m in args.methods.split(",") for s in args.sampler.split(",")]
    print(f"engine overhead, SD1.5-shaped UNet, {args.size}x{args.size} latents, {args.steps} steps, "
          f"{device} {results[0]['dtype']}, median of {args.repeats} interleaved runs")
    print_table(["method", "sampler", "plain s", "engine s", "difference %", "engine alone s", "added %", "target"],
                [[r["method"], r["sampler"], f"{r['plain_median_s']:.3f}", f"{r['engine_median_s']:.3f}",
                  f"{100 * r['overhead']:+.2f}", f"{r['isolated_engine_s']:.4f}", f"{100 * r['isolated_overhead']:.3f}",
                  f"<= {100 * TARGET:.1f}"] for r in results])
    if args.json:
        emit_json({"results": results, "all_targets_met": all(r["meets_target"] for r in results)})
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("overhead", help="wall time the correction engine adds to sampling (SD1.5-shaped UNet)")
    p.add_argument("--methods", default="ptqd_stepbaq", help="comma-separated engine presets")
    p.add_argument("--sampler", default="euler", help="comma-separated samplers")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="latent height/width")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engine-only", action="store_true",
                   help="time only the engine's own work (no UNet): seconds added per run")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
