"""Small KL autoencoder: MNIST 1×28×28 ↔ SD-like 4×14×14 latent.

Why: the reference model must be a *latent* diffusion model shaped like Stable Diffusion so that
the pack's quantization and correction are measured in the same setting as SD (the UNet works on a
4-channel latent, a VAE decodes it). Like SD's ``AutoencoderKL`` the encoder predicts a diagonal
Gaussian (mean, log-variance) and training adds a light KL term, which keeps the latent smooth so
that the slightly-off latents a sampler produces still decode to clean digits. Like SD, latents are
multiplied by a ``scale_factor`` (SD1.x: 0.18215) computed after training so that they have about
unit variance, which is what the σ schedule assumes (ALGORITHMS.md §0.1). The factor lives in the
weights file metadata. The decoder ends in a sigmoid, so decoded images are always in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

LATENT_CHANNELS = 4


class _ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, with a residual connection (SD's VAE block, small)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Encoder(nn.Module):
    def __init__(self, ch: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.block1 = _ResBlock(ch)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)  # 28 → 14
        self.block2 = _ResBlock(2 * ch)
        self.norm_out = nn.GroupNorm(8, 2 * ch)
        self.conv_out = nn.Conv2d(2 * ch, 2 * LATENT_CHANNELS, 3, padding=1)  # mean, logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.block2(self.down(self.block1(self.conv_in(x))))
        mean, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        return mean, logvar.clamp(-20.0, 5.0)


class Decoder(nn.Module):
    def __init__(self, ch: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(LATENT_CHANNELS, 2 * ch, 3, padding=1)
        self.block1 = _ResBlock(2 * ch)
        self.up = nn.Conv2d(2 * ch, ch, 3, padding=1)  # after nearest ×2: 14 → 28
        self.block2 = _ResBlock(ch)
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.block1(self.conv_in(z))
        h = self.block2(self.up(F.interpolate(h, scale_factor=2.0, mode="nearest")))
        return torch.sigmoid(self.conv_out(F.silu(self.norm_out(h))))


class Autoencoder(nn.Module):
    """``encode(images) -> scaled latents``, ``decode(scaled latents) -> images in [0, 1]``."""

    def __init__(self, ch: int = 16, scale_factor: float = 1.0):
        super().__init__()
        self.encoder = Encoder(ch)
        self.decoder = Decoder(ch)
        self.scale_factor = float(scale_factor)

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior (mean, logvar); images in [0, 1] are mapped to [−1, 1] as in SD."""
        return self.encoder(images * 2.0 - 1.0)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Latents ``[B,4,14,14]`` already multiplied by ``scale_factor`` (≈ unit variance).

        The posterior mean by default (deterministic); ``sample=True`` draws from the posterior.
        """
        mean, logvar = self.encode_distribution(images)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if sample else mean
        return z * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B,1,28,28]`` in [0, 1] from scaled latents (the scale is undone here)."""
        return self.decoder(latents / self.scale_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))
