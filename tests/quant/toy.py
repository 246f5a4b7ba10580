"""A small UNet-like module for the quantization tests (named like the models the plan targets)."""

import torch
from torch import nn


class ToyUNet(nn.Module):
    def __init__(self, ch: int = 64) -> None:
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(32, 128), nn.SiLU(), nn.Linear(128, 128))
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.emb_proj = nn.Linear(128, ch)
        self.block = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
        self.attn_q = nn.Linear(ch, ch, bias=False)
        self.conv_out = nn.Conv2d(ch, 4, 3, padding=1)

    def forward(self, x, temb):
        h = self.conv_in(x) + self.emb_proj(self.time_embed(temb))[:, :, None, None]
        h = h + self.block(h)
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        h = h + self.attn_q(t).transpose(1, 2).reshape(b, c, hh, ww)
        return self.conv_out(h)


def toy_inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 32, generator=g)


def make_toy(seed: int = 0) -> ToyUNet:
    torch.manual_seed(seed)
    return ToyUNet().eval()
