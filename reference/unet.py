"""Class-conditional ε-prediction UNet on 4×14×14 latents, built from Stable Diffusion's blocks.

Why SD-shaped: the pack quantizes SD-family UNets, so the reference network has the same kinds of
layers the quantizer meets there (ALGORITHMS.md §0; Rombach et al. 2022, "LDM"):

* ``ResBlock``: GroupNorm → SiLU → 3×3 conv, plus the timestep embedding projected by a Linear and
  added between the two convs, with a residual (1×1 conv when the width changes);
* ``SpatialTransformer``: GroupNorm → ``proj_in`` → [LayerNorm → self-attention, LayerNorm →
  cross-attention to conditioning tokens, LayerNorm → GEGLU feed-forward] → ``proj_out`` → residual;
* sinusoidal timestep embedding followed by an MLP (``time_embed``);
* the conditioning is a short learned token sequence per class (SD's text tokens, in miniature),
  with class 10 the null/"empty prompt" class used by classifier-free guidance.

Every learned projection is a plain ``nn.Linear`` or ``nn.Conv2d`` (what the quantizer replaces);
the first conv is ``conv_in``, the last ``conv_out``; the class token table is an ``nn.Embedding``
and stays full precision, like SD's text encoder which lives outside the UNet.

Layout (one down/up level, 14 → 7): most parameters sit at 7×7 where they are cheap to run, which
keeps training feasible on two CPU cores. Widths 64/128 make every learned projection's input size
(in·kh·kw) a multiple of 64, so the int4 group-64 weight presets apply to every layer except
``conv_in`` (4·3·3 = 36 inputs), which quantization plans keep in higher precision anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

NUM_CLASSES = 10
NULL_CLASS = 10  # the "empty prompt" used for the unconditional half of CFG


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in SD's ``timestep_embedding``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out Linears (SD's ``CrossAttention``)."""

    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        split = lambda z: z.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int, ff_mult: int = 2):
        super().__init__()
        self.norm = _norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, None, heads)  # self-attention
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = Attention(channels, context_dim, heads)  # cross-attention to class tokens
        self.norm3 = nn.LayerNorm(channels)
        self.ff = GEGLU(channels, ff_mult)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, C]
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), context)
        h = h + self.ff(self.norm3(h))
        return x + self.proj_out(h.transpose(1, 2).reshape(b, c, hh, ww))


class UNet(nn.Module):
    """``unet(x, t, labels) -> ε``: x ``[B,4,14,14]`` (already multiplied by c_in), t ``[B]`` in
    0..999, labels ``LongTensor[B]`` in 0..10 (10 = null class).

    ``unet(x, t, context=tokens)`` takes the conditioning tokens ``[B, context_tokens,
    context_dim]`` directly instead (what a host such as ComfyUI passes as cross-attention
    conditioning); ``unet(x, t, context=unet.context(labels))`` equals ``unet(x, t, labels)``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        ch: int = 64,
        ch_low: int = 128,
        context_tokens: int = 4,
        context_dim: int = 64,
        heads: int = 4,
    ):
        super().__init__()
        self.config = dict(in_channels=in_channels, ch=ch, ch_low=ch_low, context_tokens=context_tokens,
                           context_dim=context_dim, heads=heads)
        temb = 4 * ch
        self.ch = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.class_tokens = nn.Embedding(NUM_CLASSES + 1, context_tokens * context_dim)
        self.context_tokens, self.context_dim = context_tokens, context_dim

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        # 14×14
        self.down0 = ResBlock(ch, ch, temb)
        self.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        # 7×7
        self.down1 = ResBlock(ch, ch_low, temb)
        self.down1_attn = SpatialTransformer(ch_low, context_dim, heads)
        self.mid1 = ResBlock(ch_low, ch_low, temb)
        self.mid_attn = SpatialTransformer(ch_low, context_dim, heads)
        self.mid2 = ResBlock(ch_low, ch_low, temb)
        self.up1a = ResBlock(ch_low + ch_low, ch_low, temb)
        self.up1a_attn = SpatialTransformer(ch_low, context_dim, heads)
        self.up1b = ResBlock(ch_low + ch, ch_low, temb)
        self.up1b_attn = SpatialTransformer(ch_low, context_dim, heads)
        self.upsample = nn.Conv2d(ch_low, ch, 3, padding=1)  # after nearest ×2
        # 14×14
        self.up0a = ResBlock(ch + ch, ch, temb)
        self.up0b = ResBlock(ch + ch, ch, temb)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        """Conditioning tokens ``[B, context_tokens, context_dim]`` for class labels (10 = null)."""
        return self.class_tokens(labels).reshape(-1, self.context_tokens, self.context_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        if (labels is None) == (context is None):
            raise ValueError("UNet.forward takes exactly one of labels (class ids) or context (tokens)")
        temb = self.time_embed(timestep_embedding(t, self.ch).to(x.dtype))
        ctx = (self.context(labels) if context is None else context).to(x.dtype)
        h0 = self.conv_in(x)
        h1 = self.down0(h0, temb)
        h2 = self.downsample(h1)
        h3 = self.down1_attn(self.down1(h2, temb), ctx)
        h = self.mid2(self.mid_attn(self.mid1(h3, temb), ctx), temb)
        h = self.up1a_attn(self.up1a(torch.cat([h, h3], 1), temb), ctx)
        h = self.up1b_attn(self.up1b(torch.cat([h, h2], 1), temb), ctx)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up0a(torch.cat([h, h1], 1), temb)
        h = self.up0b(torch.cat([h, h0], 1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))
