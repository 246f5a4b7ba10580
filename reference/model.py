"""The trained reference model: a denoiser in k-diffusion σ space plus its autoencoder and judge.

Why: every quality number of the pack is measured on this small SD-shaped latent diffusion model
(ARCHITECTURE.md, "The reference model"). ``ReferenceDenoiser`` follows the denoiser protocol of
docs/INTERFACES.md exactly the way ComfyUI wraps an SD1.x ε-model (``ModelSamplingDiscrete`` +
``EPS``): ``c_in = 1/√(σ²+1)``, the timestep is the nearest training step in log σ, and
``denoised = x − σ·ε`` (ALGORITHMS.md §0.1). Classifier-free guidance combines the two ε's as
``ε_u + s·(ε_c − ε_u)`` in one batched call, as ComfyUI's CFG does; nothing is ever clamped, so
quantization error shows up in the numbers instead of being hidden.

Weights ship as fp16 safetensors in ``reference/weights/`` (never pickle), each verified against
``hashes.json`` before use; ``python -m qcorrect.reference.train all`` reproduces them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file

from .autoencoder import Autoencoder
from .classifier import Classifier
from .sigmas import scaled_linear_sigmas, sigma_to_t
from .unet import NULL_CLASS, UNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_FILES = ("autoencoder.safetensors", "unet.safetensors", "classifier.safetensors")

# Chosen from sample grids and classifier accuracy (euler / euler_ancestral, 20 normal steps):
# scales 2–5 all give ≈99–100% class accuracy; at 3 the sampled latents keep the data's unit
# variance (std ≈ 1.00 vs 0.98 at 2 and 1.04 at 5) and strokes stay varied, while 5 already
# thickens and homogenises the digits. Unguided (cfg 1) samples are recognisable but weaker.
DEFAULT_CFG = 3.0


class ReferenceDenoiser(nn.Module):
    """``denoised = model(x, sigma, cond=None, cfg_scale=1.0)`` for the reference ε-UNet.

    ``cond``: ``LongTensor[B]`` of class labels 0..9, or None for unconditional (the null class).
    With ``cfg_scale == 1`` only the conditional pass runs (ComfyUI skips the uncond pass too).
    """

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet
        self.register_buffer("sigmas", scaled_linear_sigmas(), persistent=False)

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε-prediction at noise level σ (x in k-diffusion scale, ``x = x0 + σ·ε``)."""
        c_in = 1.0 / (sigma**2 + 1.0).sqrt()
        t = sigma_to_t(sigma, self.sigmas)
        return self.unet(x * c_in.reshape(-1, 1, 1, 1).to(x.dtype), t, labels)

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None, cfg_scale: float = 1.0):
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch).float()
        null = torch.full((batch,), NULL_CLASS, dtype=torch.long, device=x.device)
        labels = null if cond is None else cond.to(device=x.device, dtype=torch.long).reshape(batch)
        if cfg_scale == 1.0 or cond is None:
            eps = self.eps(x, sigma, labels)
        else:
            eps_u, eps_c = self.eps(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([null, labels])).chunk(2)
            eps = eps_u + cfg_scale * (eps_c - eps_u)
        return x - sigma.reshape(-1, 1, 1, 1).to(x.dtype) * eps


@dataclass
class ReferenceModel:
    denoiser: ReferenceDenoiser
    autoencoder: Autoencoder
    classifier: Classifier
    default_cfg: float = DEFAULT_CFG

    @property
    def unet(self) -> UNet:
        return self.denoiser.unet


class WeightsIntegrityError(RuntimeError):
    """A shipped weights file is missing or does not match ``hashes.json``."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_weights(weights_dir: Path = WEIGHTS_DIR) -> None:
    """Check every reference weights file against ``hashes.json``; raise with a fix on mismatch."""
    weights_dir = Path(weights_dir)
    hashes_path = weights_dir / "hashes.json"
    if not hashes_path.is_file():
        raise WeightsIntegrityError(f"{hashes_path} is missing; cannot verify the reference weights")
    expected = json.loads(hashes_path.read_text())
    for name in WEIGHT_FILES:
        path = weights_dir / name
        if not path.is_file() or name not in expected:
            raise WeightsIntegrityError(
                f"reference weights file {path} is missing or not listed in {hashes_path}; "
                "reinstall the pack or run `python -m qcorrect.reference.train all`"
            )
        actual = sha256_file(path)
        if actual != expected[name]:
            raise WeightsIntegrityError(
                f"reference weights file {path} has SHA-256 {actual} but hashes.json expects "
                f"{expected[name]}: the file is corrupt or was modified. Restore it from the pack "
                "or regenerate it with `python -m qcorrect.reference.train all`"
            )


def _load_module(module_cls, path: Path, device, dtype, **extra):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta.get("qcorrect.reference.config", "{}"))
    module = module_cls(**config, **extra)
    state = load_file(str(path))
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False), meta


def load_reference(device="cpu", dtype: torch.dtype = torch.float32, weights_dir: Path | str = WEIGHTS_DIR) -> ReferenceModel:
    """Load the shipped fp16 weights (hash-verified) as a ``ReferenceModel`` in eval mode."""
    weights_dir = Path(weights_dir)
    verify_weights(weights_dir)
    unet, _ = _load_module(UNet, weights_dir / "unet.safetensors", device, dtype)
    with safe_open(str(weights_dir / "autoencoder.safetensors"), framework="pt") as f:
        scale = float(f.metadata()["qcorrect.reference.scale_factor"])
    autoencoder, _ = _load_module(Autoencoder, weights_dir / "autoencoder.safetensors", device, dtype,
                                  scale_factor=scale)
    classifier, _ = _load_module(Classifier, weights_dir / "classifier.safetensors", device, dtype)
    denoiser = ReferenceDenoiser(unet).to(device)
    return ReferenceModel(denoiser=denoiser, autoencoder=autoencoder, classifier=classifier)
