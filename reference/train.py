"""Reproduce the reference model's weights: ``python -m qcorrect.reference.train {autoencoder,unet,classifier,all}``.

Everything is seeded and the number of optimisation steps is fixed, so a run on the same torch
build and thread count reproduces the shipped fp16 files (``--minutes`` caps wall time per model
for quick experiments; a capped run is no longer the reference recipe). Measured on the shared
2-core build machine with one thread each: autoencoder ≈ 10 min, classifier ≈ 9 min, a 2400-step
UNet run 40–55 min depending on width and load. ``check`` prints sample accuracies for a weights
folder and can write the README grid (``--png docs/images/reference_samples.png``). Weights are written as fp16 safetensors (no pickle) atomically (temporary
file, then ``os.replace``) and ``hashes.json`` is updated so ``load_reference`` can verify them.

Order matters: the UNet is trained on latents of the *trained* autoencoder (the whole training set
is encoded once and cached in memory), so ``unet`` needs ``autoencoder.safetensors`` first.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .autoencoder import Autoencoder
from .data import load_mnist

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FORMAT_VERSION = "1"


# ---------------------------------------------------------------- file handling
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(module: torch.nn.Module, out_dir: Path, name: str, config: dict, metadata: dict | None = None) -> Path:
    """fp16 safetensors written atomically, then its SHA-256 recorded in ``hashes.json``.

    ``config`` (the constructor arguments) is stored as JSON under ``qcorrect.reference.config``
    so ``load_reference`` can rebuild the module; ``metadata`` adds further namespaced keys.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    meta = {"qcorrect.version": FORMAT_VERSION, "qcorrect.reference.model": name,
            "qcorrect.reference.config": json.dumps(config, sort_keys=True)}
    meta.update({f"qcorrect.reference.{k}": str(v) for k, v in (metadata or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    hashes_path = out_dir / "hashes.json"
    hashes = json.loads(hashes_path.read_text()) if hashes_path.exists() else {}
    from .model import sha256_file  # local: model imports this package's modules too

    hashes[path.name] = sha256_file(path)
    _atomic_write_text(hashes_path, json.dumps(dict(sorted(hashes.items())), indent=2) + "\n")
    return path


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cosine_lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class _Batches:
    """Seeded epoch-wise shuffling over an in-memory tensor dataset."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


# ---------------------------------------------------------------- autoencoder
AE_CONFIG = {"ch": 16}
AE_KL_WEIGHT = 1e-3


def train_autoencoder(out_dir: Path, steps: int = 1200, batch: int = 128, minutes: float | None = None):
    """BCE reconstruction of a posterior sample + light KL (SD's AutoencoderKL recipe, small)."""
    torch.manual_seed(0)
    images, _ = load_mnist("train")
    ae = Autoencoder(**AE_CONFIG)
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3, weight_decay=0.0)
    batches, t0 = _Batches(len(images), batch, seed=1), time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, 2e-3, warmup=50)
        x = images[batches.next()]
        mean, logvar = ae.encode_distribution(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        logits_out = ae.decoder(z)
        recon = F.binary_cross_entropy(logits_out.clamp(1e-6, 1 - 1e-6), x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = recon + AE_KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"ae step {step}/{steps} bce {recon.item():.4f} kl {kl.item():.3f} "
                 f"post_std {(0.5 * logvar).exp().mean().item():.3f}")
        if minutes is not None and time.time() - t0 > 60 * minutes:
            _log(f"ae: time cap reached at step {step}")
            break
    ae.eval()
    with torch.no_grad():
        # SD's scale factor: 1 / std of the (unscaled) latents over the training data.
        means = torch.cat([ae.encode_distribution(images[i : i + 1000])[0] for i in range(0, 10000, 1000)])
        ae.scale_factor = float(1.0 / means.float().std())
        recon_err = (ae(images[:2000]) - images[:2000]).abs().mean().item()
    _log(f"ae done: scale_factor {ae.scale_factor:.5f}, mean |recon err| {recon_err:.4f}, "
         f"{time.time() - t0:.0f}s")
    path = save_weights(ae, out_dir, "autoencoder", AE_CONFIG, {"scale_factor": repr(ae.scale_factor)})
    _log(f"wrote {path}")
    return ae


# ---------------------------------------------------------------- UNet
# ch and ch_low are multiples of 64 so that every quantized layer's input size (in·kh·kw) is divisible
# by the int4 group size 64 of the W4 presets (quant/weights.py); 48 would make them refuse.
# 64/128 wide: every layer but conv_in has an input size divisible by 64 (int4 group-64 presets).
UNET_CONFIG = {"ch": 64, "ch_low": 128, "context_tokens": 4, "context_dim": 64, "heads": 4}
UNET_STEPS = 2400
UNET_BATCH = 64
UNET_LR = 1.5e-3
UNET_EMA = 0.998
LABEL_DROPOUT = 0.1


def _load_trained_autoencoder(out_dir: Path) -> Autoencoder:
    from .model import _load_module  # local: model imports this package's modules too

    path = out_dir / "autoencoder.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: train the autoencoder first")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        scale = float(f.metadata()["qcorrect.reference.scale_factor"])
    ae, _ = _load_module(Autoencoder, path, "cpu", torch.float32, scale_factor=scale)
    return ae


@torch.no_grad()
def encode_dataset(ae: Autoencoder, images: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """Scaled posterior-mean latents of all images, computed once and kept in memory."""
    return torch.cat([ae.encode(images[i : i + chunk]) for i in range(0, len(images), chunk)])


def train_unet(out_dir: Path, steps: int = UNET_STEPS, batch: int = UNET_BATCH, minutes: float | None = None,
               save_every: int = 500):
    """ε-prediction MSE on SD's 1000-step scaled-linear schedule (ALGORITHMS.md §0.1).

    t ~ U{0..999}, x = x0 + σ_t·ε fed to the UNet as x·c_in (≡ √ᾱ·x0 + √(1−ᾱ)·ε, DDPM's x_t), 10%
    of labels replaced by the null class so one network serves both halves of CFG (Ho & Salimans
    2022), AdamW with warmup + cosine decay, and an EMA of the weights, which is what ships.
    The EMA is also saved every ``save_every`` steps so an interrupted run leaves usable weights.
    """
    from .unet import UNet

    torch.manual_seed(0)
    images, labels = load_mnist("train")
    latents = encode_dataset(_load_trained_autoencoder(out_dir), images)
    del images
    _log(f"unet: encoded {tuple(latents.shape)} latents, std {latents.std().item():.3f}, "
         f"mean {latents.mean().item():.3f}")
    unet = UNet(**UNET_CONFIG)
    ema = copy.deepcopy(unet).requires_grad_(False)
    _log(f"unet: {sum(p.numel() for p in unet.parameters()):,} parameters")
    return _unet_steps(unet, ema, latents, labels, out_dir, steps=steps, batch=batch, peak_lr=UNET_LR, warmup=200,
                       seeds=(2, 3), ema_warmup=True, step_offset=0, name="unet", minutes=minutes,
                       save_every=save_every)


def _unet_steps(unet, ema, latents, labels, out_dir: Path, *, steps: int, batch: int, peak_lr: float, warmup: int,
                seeds: tuple[int, int], ema_warmup: bool, step_offset: int, name: str, minutes: float | None,
                save_every: int):
    """The shared ε-MSE training loop of both UNet stages (cosine LR, label dropout, EMA, periodic saves).

    ``seeds`` seed the noise/timestep generator and the batch order; ``ema_warmup`` ramps the EMA
    decay in from 0 (stage 1 starts from random weights); ``step_offset`` is the steps already
    recorded in the weights being continued.
    """
    from .sigmas import scaled_linear_sigmas
    from .unet import NULL_CLASS

    sigmas = scaled_linear_sigmas()
    opt = torch.optim.AdamW(unet.parameters(), lr=peak_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seeds[0])
    batches, t0, running = _Batches(len(latents), batch, seed=seeds[1]), time.time(), 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, peak_lr, warmup=warmup)
        idx = batches.next()
        x0, y = latents[idx], labels[idx].clone()
        y[torch.rand(batch, generator=gen) < LABEL_DROPOUT] = NULL_CLASS
        t = torch.randint(0, len(sigmas), (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        sigma = sigmas[t].reshape(-1, 1, 1, 1)
        x_in = (x0 + sigma * eps) / (sigma**2 + 1.0).sqrt()
        loss = F.mse_loss(unet(x_in, t.float(), y), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(UNET_EMA, (1.0 + step) / (10.0 + step)) if ema_warmup else UNET_EMA
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1.0 - decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            _log(f"{name} step {step}/{steps} loss {running:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                 f"{time.time() - t0:.0f}s")
        if (step + 1) % save_every == 0:
            save_weights(ema, out_dir, "unet", UNET_CONFIG, {"steps": step_offset + step + 1})
        if minutes is not None and time.time() - t0 > 60 * minutes:
            _log(f"{name}: time cap reached at step {step}")
            break
    path = save_weights(ema, out_dir, "unet", UNET_CONFIG, {"steps": step_offset + step + 1})
    _log(f"{name} done in {time.time() - t0:.0f}s; wrote {path}")
    return ema


UNET_FINETUNE_STEPS = 1500
UNET_FINETUNE_LR = 5e-4


def finetune_unet(out_dir: Path, steps: int = UNET_FINETUNE_STEPS, batch: int = UNET_BATCH,
                  minutes: float | None = None, save_every: int = 500):
    """Optional second cosine cycle at a lower peak LR, starting from the saved (fp16) EMA weights.

    Why: on two shared CPU cores one long run is fragile (an interrupted cosine schedule ends at a
    high LR), so more training is added as a separate deterministic stage that also ends
    annealed; it re-reads the stage-1 file, so it reproduces from that file alone. The shipped
    ``unet.safetensors`` records its total step count in ``qcorrect.reference.steps``.
    """
    from .model import _load_module
    from .unet import UNet

    torch.manual_seed(10)
    images, labels = load_mnist("train")
    latents = encode_dataset(_load_trained_autoencoder(out_dir), images)
    del images
    unet, meta = _load_module(UNet, out_dir / "unet.safetensors", "cpu", torch.float32)
    unet.train().requires_grad_(True)
    start_steps = int(meta.get("qcorrect.reference.steps", 0))
    ema = copy.deepcopy(unet).requires_grad_(False)
    _log(f"unet finetune: from {start_steps} steps, {steps} more")
    return _unet_steps(unet, ema, latents, labels, out_dir, steps=steps, batch=batch, peak_lr=UNET_FINETUNE_LR,
                       warmup=100, seeds=(12, 13), ema_warmup=False, step_offset=start_steps,
                       name="unet finetune", minutes=minutes, save_every=save_every)


# ---------------------------------------------------------------- classifier
def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each batch by up to ±2 px so the judge tolerates slightly off-centre samples."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    return torch.roll(F.pad(x, (2, 2, 2, 2)), shifts=(dy, dx), dims=(2, 3))[:, :, 2:-2, 2:-2]


def train_classifier(out_dir: Path, steps: int = 1000, batch: int = 128, minutes: float | None = None):
    """Cross-entropy on MNIST train with small shifts; reports test accuracy."""
    from .classifier import Classifier

    torch.manual_seed(0)
    images, labels = load_mnist("train")
    clf = Classifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(4)
    batches, t0 = _Batches(len(images), batch, seed=5), time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, 2e-3, warmup=50)
        idx = batches.next()
        loss = F.cross_entropy(clf(_random_shift(images[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"classifier step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
        if minutes is not None and time.time() - t0 > 60 * minutes:
            _log(f"classifier: time cap reached at step {step}")
            break
    clf.eval()
    test_x, test_y = load_mnist("test")
    with torch.no_grad():
        acc = torch.cat([clf.logits(test_x[i : i + 1000]).argmax(1) for i in range(0, len(test_x), 1000)])
        acc = (acc == test_y).float().mean().item()
    _log(f"classifier done: test accuracy {acc:.4f}, {time.time() - t0:.0f}s")
    path = save_weights(clf, out_dir, "classifier", {}, {"test_accuracy": f"{acc:.4f}"})
    _log(f"wrote {path}")
    return clf


# ---------------------------------------------------------------- checking the shipped model
@torch.no_grad()
def check_samples(weights_dir: Path, png: Path | None = None, per_class: int = 20, cfgs=(1.0, None)):
    """Print classifier accuracy of FP samples (20 ``normal`` steps, euler and euler-ancestral) per
    CFG scale (None = ``DEFAULT_CFG``), and optionally write the README grid (rows = classes 0–9,
    euler at ``DEFAULT_CFG``, white digits on black as in MNIST)."""
    from PIL import Image

    from .model import DEFAULT_CFG, load_reference
    from .samplers import sample_euler, sample_euler_ancestral
    from .schedules import get_sigmas

    ref = load_reference(weights_dir=weights_dir)
    sigmas = get_sigmas("normal", ref.denoiser.sigmas, 20)
    labels = torch.arange(10).repeat(per_class)
    for cfg in [DEFAULT_CFG if c is None else c for c in cfgs]:
        for name, sampler in (("euler", sample_euler), ("euler_ancestral", sample_euler_ancestral)):
            x = torch.randn(len(labels), 4, 14, 14, generator=torch.Generator().manual_seed(7)) * sigmas[0]
            out = sampler(ref.denoiser, x, sigmas, extra_args={"cond": labels, "cfg_scale": cfg},
                          generator=torch.Generator().manual_seed(8))
            pred = ref.classifier.logits(ref.autoencoder.decode(out)).argmax(1)
            _log(f"{name:16s} cfg {cfg:.1f}: class accuracy {(pred == labels).float().mean().item():.3f} "
                 f"(n={len(labels)}), latent std {out.std().item():.3f}")
    if png is not None:
        labels = torch.arange(10).repeat_interleave(10)
        x = torch.randn(100, 4, 14, 14, generator=torch.Generator().manual_seed(2026)) * sigmas[0]
        out = sample_euler(ref.denoiser, x, sigmas, extra_args={"cond": labels, "cfg_scale": DEFAULT_CFG})
        img = ref.autoencoder.decode(out)[:, 0]
        pad, cell = 2, 30
        canvas = torch.ones(10 * cell + pad, 10 * cell + pad)
        for i in range(100):
            r, c = divmod(i, 10)
            canvas[pad + r * cell : pad + r * cell + 28, pad + c * cell : pad + c * cell + 28] = img[i]
        pixels = (canvas.clamp(0, 1) * 255).round().byte().numpy()
        Image.fromarray(pixels, mode="L").resize((604, 604), Image.NEAREST).save(png, optimize=True)
        _log(f"wrote {png}")


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qcorrect.reference.train", description=__doc__)
    parser.add_argument("which", choices=["autoencoder", "unet", "unet-finetune", "classifier", "all", "check"],
                        help="unet-finetune: optional second stage on top of `unet` (not part of `all`); "
                             "check: sample accuracy table (and --png grid) for the weights in --out")
    parser.add_argument("--png", type=Path, default=None, help="check: also write the class grid PNG")
    parser.add_argument("--minutes", type=float, default=None, help="wall-time cap per model")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.which == "check":
        check_samples(args.out, args.png)
        return
    if args.which in ("autoencoder", "all"):
        train_autoencoder(args.out, minutes=args.minutes)
    if args.which in ("unet", "all"):
        train_unet(args.out, minutes=args.minutes)
    if args.which == "unet-finetune":
        finetune_unet(args.out, minutes=args.minutes)
    if args.which in ("classifier", "all"):
        train_classifier(args.out, minutes=args.minutes)


if __name__ == "__main__":
    main()
