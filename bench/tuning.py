"""``qcorrect bench tuning``: what one step of grid tuning (``quant/tune.py``) costs on an SD1.5-shaped UNet.

Builds the SD1.5-shaped UNet (random weights: memory and time do not depend on values), quantizes it
with a preset (round-to-nearest: the grid is tuned the same way whatever chose the codes), installs the
tunable grids and runs, per latent size: one no-grad forward (what sampling needs) and one tuning step
(forward, backward into every layer's scales and zero points, an Adam update), each with its time and
the peak memory it added above the quantized model. ``--plain`` also runs the step with plain autograd
(every layer's float weight kept for the backward pass), the memory the lean op avoids. ``--sketch``
first measures, on the float model, one sketch of ``calibration.inputs.SketchProbe`` over one call
(the mixed-precision budget's sensitivity probe, as Quantize Model (Calibrated) runs it on its
float copy): a forward and backward pass with every quantizable layer hooked, and one extra layer
operation per layer.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set
(``VmHWM``, reset before each measurement through ``/proc/self/clear_refs``; Linux only, else not
reported). The first tuning step also allocates the optimiser's state (two moments per grid
parameter), so the first latent size's step includes it.
"""

from __future__ import annotations

import time

import torch

from ..calibration.inputs import SketchProbe
from ..quant import quantize_model, resolve_plan
from ..quant.modules import QUANT_LAYERS
from ..quant.tune import _Grid, _tuning_scope
from .common import emit_json, print_table, resident_bytes, set_threads
from .sd_unet import build_sd15_unet


class PeakMemory:
    """Peak bytes above the level at :meth:`reset`, on CUDA or (Linux) for this process on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.base = None
            return
        self.base = self._status("VmRSS")

    def peak(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        hwm = self._status("VmHWM")
        return None if self.base is None or hwm is None else max(0, hwm - self.base)


def _plain(grid: _Grid):
    """The main path through plain autograd: the float weight is saved for the backward pass."""
    layer = grid.layer

    def op(x):
        b = None if layer.bias is None else layer.bias.to(device=x.device, dtype=x.dtype)
        return layer._op(x, grid.stored(device=x.device).to(x.dtype), b)
    return op


def tuning_step(unet, grids, opt, x, t, ctx, plain: bool = False) -> float:
    """One tuning step on a stand-in loss (the output's mean square); returns the loss."""
    with _tuning_scope(unet, grids), torch.enable_grad():
        if plain:
            for g in grids:
                g.layer.grid_op = _plain(g)
        loss = unet(x, t, ctx).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def _call_inputs(batch: int, size: int, ctx_dim: int, gen, dev, dtype):
    """One random model call's inputs: latents, timesteps (500) and a 77-token context."""
    x = torch.randn(batch, 4, size, size, generator=gen, device=dev, dtype=dtype)
    ctx = torch.randn(batch, 77, ctx_dim, generator=gen, device=dev, dtype=dtype)
    return x, torch.full((batch,), 500.0, device=dev), ctx


def sketch_cost(model, preset: str, sizes, batch: int, dev, dtype, seed: int = 0) -> list[dict]:
    """Time and peak memory of one ``SketchProbe`` sketch over one call per latent size, on the float
    ``model`` (every layer the preset quantizes; the candidate weights are the layers' own, since the
    cost does not depend on their values)."""
    names = [n for n, d in resolve_plan(model, preset).items() if d["weight"]]
    weights = {n: model.get_submodule(n).weight for n in names}
    mem = PeakMemory(dev)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    ctx_dim = _context_dim(model)
    out = []
    for size in sizes:
        x, t, ctx = _call_inputs(batch, size, ctx_dim, gen, dev, dtype)
        probe = SketchProbe(lambda x_, s_, ctx: model(x_, s_, ctx), model, [(x, t, {"ctx": ctx})], sketches=1, seed=seed)
        mem.reset()
        t0 = time.perf_counter()
        probe.batch(weights)
        out.append({"sketch_seconds": round(time.perf_counter() - t0, 2), "sketch_peak_bytes": mem.peak(),
                    "sketch_layers": len(names)})
    return out


def run(latents=(64,), batch: int = 1, preset: str = "W4A8", plain: bool = False, device: str = "cpu",
        dtype: torch.dtype = torch.float32, unet=None, seed: int = 0, sketch: bool = False) -> dict:
    """``unet``: a float model to use instead of the SD1.5-shaped UNet (tests pass a small one)."""
    dev = torch.device(device)
    model = build_sd15_unet(dtype, seed=seed, device=device) if unet is None else unet.to(device=dev, dtype=dtype)
    fp_bytes = resident_bytes(model)
    sketches = sketch_cost(model, preset, latents, batch, dev, dtype, seed) if sketch else [{} for _ in latents]
    quantize_model(model, preset)
    grids = [_Grid(m) for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    params = [p for g in grids for p in g.params()]
    opt = torch.optim.Adam(params, lr=1e-3)
    mem = PeakMemory(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    ctx_dim = _context_dim(model)
    rows = []
    for size, sk in zip(latents, sketches):
        x, t, ctx = _call_inputs(batch, size, ctx_dim, gen, dev, dtype)
        row = {"latent": size, "batch": batch, **sk}
        mem.reset()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x, t, ctx)
        if dev.type == "cuda":  # the forward's kernels, not only their launches
            torch.cuda.synchronize(dev)
        row.update(forward_seconds=round(time.perf_counter() - t0, 2), forward_peak_bytes=mem.peak())
        for kind in (("lean", "plain") if plain else ("lean",)):
            mem.reset()
            t0 = time.perf_counter()
            row[f"{kind}_loss"] = tuning_step(model, grids, opt, x, t, ctx, plain=kind == "plain")
            row.update({f"{kind}_step_seconds": round(time.perf_counter() - t0, 2), f"{kind}_peak_bytes": mem.peak()})
        rows.append(row)
    return {"model": "SD1.5-shaped UNet (random weights)" if unet is None else type(unet).__name__,
            "preset": preset, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
            "fp_bytes": fp_bytes, "quantized_bytes": resident_bytes(model), "grid_params": sum(p.numel() for p in params),
            "layers": len(grids), "rows": rows}


def _context_dim(model) -> int:
    for name, m in model.named_modules():
        if name.endswith("attn2"):  # cross-attention: its keys come from the conditioning
            return m.to_k.in_features
    return 768


def main(args) -> int:
    threads = set_threads(args.threads, default=True)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    latents = [int(s) for s in args.latent.split(",") if s.strip()]
    res = run(latents, args.batch, args.preset, args.plain, args.device, dtype, sketch=args.sketch)
    res["threads"] = threads
    gib = 2**30

    def g(v):
        return "-" if v is None else f"{v / gib:.2f}"
    print(f"grid tuning on the {res['model']}, {res['preset']}, {res['dtype']} on {res['device']}: quantized model "
          f"{res['quantized_bytes'] / gib:.2f} GiB ({res['fp_bytes'] / gib:.2f} GiB before), {res['grid_params']:,} "
          f"grid parameters in {res['layers']} layers")
    headers = ["latent", "batch", "forward s", "forward +GiB", "step s", "step +GiB"] + (
        ["plain step s", "plain step +GiB"] if args.plain else []) + (
        ["sketch s (float model)", "sketch +GiB"] if args.sketch else [])
    rows = []
    for r in res["rows"]:
        row = [f"{r['latent']}x{r['latent']}", r["batch"], r["forward_seconds"], g(r["forward_peak_bytes"]),
               r["lean_step_seconds"], g(r["lean_peak_bytes"])]
        if args.plain:
            row += [r["plain_step_seconds"], g(r["plain_peak_bytes"])]
        if args.sketch:
            row += [r["sketch_seconds"], g(r["sketch_peak_bytes"])]
        rows.append(row)
    print_table(headers, rows)
    if args.json:
        emit_json(res)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tuning", help="time and peak memory of one grid-tuning step on an SD1.5-shaped UNet")
    p.add_argument("--latent", default="64", help="comma-separated latent sizes (64 = a 512x512 image)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--preset", default="W4A8")
    p.add_argument("--plain", action="store_true", help="also run the step with plain autograd, for comparison")
    p.add_argument("--sketch", action="store_true",
                   help="also time one sketch of the mixed-precision budget's sensitivity probe on the float model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=main)
