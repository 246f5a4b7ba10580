"""An SD1.5-shaped UNet (≈860M parameters) for benchmarks that need SD's layer shapes, not its weights.

The layout follows SD1.x's published architecture (base 320 channels, multipliers 1-2-4-4, two
ResBlocks per level, spatial transformers with 8 heads and 768-d cross-attention at the first
three levels) and uses the same module names as common SD checkpoints (``input_blocks``,
``middle_block``, ``output_blocks``, ``out``, ``time_embed``), so quantization plans written for SD
select the same layers. Weights are random: it is for counting bytes and timing, never for images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-5)


class ResBlock(nn.Module):
    def __init__(self, ch: int, out: int, emb: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(norm(out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)

    def forward(self, x, emb, context=None):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        cdim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(cdim, dim, bias=False)
        self.to_v = nn.Linear(cdim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        c = x if context is None else context
        b, n, d = x.shape
        q, k, v = (t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(c), self.to_v(c)))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.to_out(h)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm = norm(ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, heads, context_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, emb=None, context=None):
        b, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Step(nn.ModuleList):
    """A sequence of layers that all receive (x, emb, context), like SD's TimestepEmbedSequential."""

    def forward(self, x, emb, context):
        for layer in self:
            x = layer(x) if isinstance(layer, nn.Conv2d) else layer(x, emb, context)
        return x


class SDUNet(nn.Module):
    def __init__(self, base: int = 320, mult=(1, 2, 4, 4), res_blocks: int = 2, attn_levels=(0, 1, 2),
                 heads: int = 8, context_dim: int = 768, in_ch: int = 4) -> None:
        super().__init__()
        emb = base * 4
        self.base = base
        self.time_embed = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(in_ch, base, 3, padding=1)])])
        chans, ch = [base], base
        for level, m in enumerate(mult):
            for _ in range(res_blocks):
                layers = [ResBlock(ch, base * m, emb)]
                ch = base * m
                if level in attn_levels:
                    layers.append(SpatialTransformer(ch, heads, context_dim))
                self.input_blocks.append(Step(layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(Step([Downsample(ch)]))
                chans.append(ch)
        self.middle_block = Step([ResBlock(ch, ch, emb), SpatialTransformer(ch, heads, context_dim),
                                  ResBlock(ch, ch, emb)])
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), base * m, emb)]
                ch = base * m
                if level in attn_levels:
                    layers.append(SpatialTransformer(ch, heads, context_dim))
                if level and i == res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Step(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, in_ch, 3, padding=1))

    def forward(self, x, timesteps, context):
        emb = self.time_embed(timestep_embedding(timesteps, self.base).to(x.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


def build_sd15_unet(dtype: torch.dtype = torch.float16, seed: int = 0, device: str = "cpu") -> SDUNet:
    """Allocate the UNet without running PyTorch's default init (slow at 860M), then fill it with
    small random values (a fixed seed), so quantization sees realistic, finite weights."""
    with torch.device("meta"):
        model = SDUNet()
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm scales
                p.fill_(1.0)
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    return model.to(dtype).eval()
