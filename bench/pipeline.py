"""Sampling the reference model full-precision vs quantized, on chosen seeds, the way ComfyUI does.

Shared by ``qcorrect demo`` and ``qcorrect bench quality``. Every sample is reproducible from its
own seed, whatever the batch size: the initial noise of sample *i* comes from ``seed_i`` and its
ancestral noise from a private generator seeded with ``seed_i + 1`` (ComfyUI's convention), so the
FP and quantized runs of one seed see identical noise draws. Class labels cycle through the given
classes in seed order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..evaluation import class_correct, fid_to_fp, latent_mse, psnr, ssim
from ..quant import SigmaScopedDenoiser, quantize_model
from ..quant.observers import ActivationObserver
from ..reference.samplers import SAMPLERS
from ..reference.schedules import SCHEDULERS, get_sigmas


def parse_int_list(text: str) -> list[int]:
    """``"1000-1255"`` / ``"0,3,7-9"`` → list of ints (ranges inclusive)."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        if sep:
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"empty range {part!r}")
            out.extend(range(a, b + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError(f"no integers in {text!r}")
    return out


@dataclass
class RunConfig:
    sampler: str = "euler"
    scheduler: str = "normal"
    steps: int = 20
    cfg: float = 1.0
    batch_size: int = 64
    sampler_opts: dict = field(default_factory=dict)

    def validate(self) -> "RunConfig":
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; known: {', '.join(SCHEDULERS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be at least 1")
        return self


def labels_for(seeds: list[int], classes: list[int]) -> torch.Tensor:
    return torch.tensor([classes[i % len(classes)] for i in range(len(seeds))], dtype=torch.long)


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


class PerSampleNoise:
    """A ``noise_sampler(sigma, sigma_next)`` drawing each sample's noise from its own generator."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...]) -> None:
        self.gens = [torch.Generator().manual_seed(s + 1) for s in seeds]
        self.shape = shape

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens])


def start_latent(noise: torch.Tensor, sigmas: torch.Tensor, model_sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's EPS noise scaling: ``noise·√(1+σ²)`` for a full denoise, else ``noise·σ``."""
    s0 = sigmas[0]
    full = bool(s0 >= model_sigmas[-1] * (1 - 1e-4))
    return noise * ((1 + s0**2).sqrt() if full else s0)


@torch.no_grad()
def sample_latents(denoiser, cfg: RunConfig, seeds: list[int], labels: torch.Tensor, model_sigmas: torch.Tensor,
                   latent_shape=(4, 14, 14), sampler_fn=None, sigmas=None, progress=None) -> torch.Tensor:
    """Latents of ``denoiser`` for every seed (batched); ``sampler_fn`` overrides the named sampler."""
    cfg.validate()
    sigmas = get_sigmas(cfg.scheduler, model_sigmas, cfg.steps) if sigmas is None else sigmas
    fn = sampler_fn or SAMPLERS[cfg.sampler]
    out = []
    for i in range(0, len(seeds), cfg.batch_size):
        batch = seeds[i : i + cfg.batch_size]
        x = start_latent(initial_noise(batch, latent_shape), sigmas, model_sigmas)
        extra = {"cond": labels[i : i + len(batch)], "cfg_scale": cfg.cfg}
        out.append(fn(denoiser, x, sigmas, extra, None, True,
                      noise_sampler=PerSampleNoise(batch, latent_shape), **cfg.sampler_opts))
        if progress:
            progress(min(i + cfg.batch_size, len(seeds)), len(seeds))
    return torch.cat(out)


def quantized_denoiser(denoiser, plan):
    """A deep copy of the reference denoiser whose UNet is quantized with ``plan`` (σ published)."""
    qd = copy.deepcopy(denoiser)
    quantize_model(qd.unet, plan)
    return SigmaScopedDenoiser(qd, qd.unet)


@torch.no_grad()
def calibrate_static_ranges(qden: SigmaScopedDenoiser, cfg: RunConfig, seeds: list[int], labels: torch.Tensor,
                            model_sigmas: torch.Tensor, method: str = "mse") -> int:
    """Static per-σ activation ranges for a quantized denoiser made with ``act_mode="static"``.

    Samples ``seeds`` (calibration seeds, never evaluation seeds) with the layers' inputs observed
    unquantized — Q-Diffusion's protocol of collecting activations along the sampling trajectory
    (ALGORITHMS.md §1) with one range per σ of the schedule (PCR's per-step quantizers, §6b) — then
    stores the ranges (``method``: minmax, percentile or mse). Returns the number of layers set.
    """
    with ActivationObserver(qden.quantized, method=method) as obs:
        sample_latents(qden, cfg, seeds, labels, model_sigmas)
    return obs.apply()


@torch.no_grad()
def decode(autoencoder, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([autoencoder.decode(latents[i : i + batch_size]) for i in range(0, len(latents), batch_size)])


@torch.no_grad()
def per_sample_metrics(lat: torch.Tensor, lat_fp: torch.Tensor, img: torch.Tensor, img_fp: torch.Tensor) -> dict:
    return {
        "latent_mse": latent_mse(lat, lat_fp),
        "psnr": psnr(img, img_fp).clamp(max=100.0),  # identical images: cap +inf at 100 dB
        "ssim": ssim(img, img_fp),
    }


@torch.no_grad()
def summary(lat, lat_fp, img, img_fp, labels, classifier) -> dict:
    m = per_sample_metrics(lat, lat_fp, img, img_fp)
    return {
        "psnr": float(m["psnr"].mean()),
        "ssim": float(m["ssim"].mean()),
        "latent_mse": float(m["latent_mse"].mean()),
        "fid_to_fp": fid_to_fp(img, img_fp, classifier.features),
        "class_acc": float(class_correct(img, labels, classifier.logits).float().mean()),
        "n": int(len(lat)),
    }
