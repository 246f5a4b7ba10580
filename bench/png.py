"""A minimal grayscale PNG writer (zlib + struct), so the demo needs no imaging library."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import torch


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png(path: str, image: torch.Tensor) -> None:
    """Write a ``[H, W]`` image with values in [0, 1] as an 8-bit grayscale PNG (atomically)."""
    img = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    h, w = img.shape
    raw = b"".join(b"\x00" + bytes(img[r].tolist()) for r in range(h))
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def grid(rows: list[torch.Tensor], pad: int = 2, scale: int = 2) -> torch.Tensor:
    """Tile rows of ``[N, 1, H, W]`` images into one ``[H', W']`` image (white gutters)."""
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    out = torch.ones(len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = im.reshape(h, w)
    return out.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
