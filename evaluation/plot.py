"""Small line plots as image tensors (error per sampling step), drawn with plain torch ops.

Why: the ComfyUI node pack shows per-step error curves as an IMAGE output, and the pack must not
depend on a plotting library. ``line_panels`` draws one panel per series, stacked vertically, each
on its own y scale from 0 (or the series minimum, if negative) to its maximum; x is the step index.
There are no text labels: whoever shows the plot reports the numbers next to it.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["PLOT_COLORS", "line_panels"]

#: RGB in [0, 1], one per panel (cycled): blue, orange, green, red
PLOT_COLORS = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16))
_FRAME = (0.75, 0.75, 0.75)
_GRID = (0.92, 0.92, 0.92)
_MARGIN = 6


def _as_values(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)


def _draw_segment(canvas: torch.Tensor, x0: float, y0: float, x1: float, y1: float, color: torch.Tensor) -> None:
    """Rasterise a 2-pixel-thick segment by sampling it at least once per pixel."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
    xs = torch.linspace(x0, x1, n).round().long()
    ys = torch.linspace(y0, y1, n).round().long()
    h, w = canvas.shape[:2]
    for dy in (0, 1):
        yy = (ys + dy).clamp(0, h - 1)
        canvas[yy, xs.clamp(0, w - 1)] = color


def _draw_panel(canvas: torch.Tensor, top: int, height: int, values: torch.Tensor, color: torch.Tensor) -> None:
    width = canvas.shape[1]
    left, right = _MARGIN, width - 1 - _MARGIN
    upper, lower = top + _MARGIN, top + height - 1 - _MARGIN
    canvas[(upper + lower) // 2, left:right + 1] = torch.tensor(_GRID)
    canvas[[upper, lower], left:right + 1] = torch.tensor(_FRAME)
    canvas[upper:lower + 1, [left, right]] = torch.tensor(_FRAME)
    ok = torch.isfinite(values)
    if not bool(ok.any()):
        return
    lo = min(0.0, float(values[ok].min()))
    hi = float(values[ok].max())
    span = hi - lo if hi > lo else 1.0
    n = values.numel()
    inner_l, inner_r = left + 5, right - 5
    xs = [(inner_l + inner_r) / 2] if n == 1 else [inner_l + i * (inner_r - inner_l) / (n - 1) for i in range(n)]
    inner_top, inner_bottom = upper + 5, lower - 5

    def y_of(v: float) -> float:
        return inner_bottom - (v - lo) / span * (inner_bottom - inner_top)

    pts = [(xs[i], y_of(float(values[i]))) if bool(ok[i]) else None for i in range(n)]
    for a, b in zip(pts, pts[1:]):
        if a is not None and b is not None:
            _draw_segment(canvas, a[0], a[1], b[0], b[1], color)
    for p in pts:
        if p is not None:
            cx, cy = int(round(p[0])), int(round(p[1]))
            canvas[max(cy - 2, 0):cy + 3, max(cx - 2, 0):cx + 3] = color


def line_panels(series: Sequence[Sequence[float]], width: int = 320, panel_height: int = 96,
                colors: Sequence[tuple] = PLOT_COLORS, panels: int | None = None) -> torch.Tensor:
    """An RGB image ``[H, W, 3]`` (float32 in [0, 1], white background) with one line panel per series.

    Each panel has a frame, a faint mid-height grid line, the series' points (step index on x,
    value on y, own scale per panel) joined by lines; non-finite values are left out (a gap).
    ``panels`` fixes the number of panels (empty frames for missing series), so a placeholder
    plot without data has the same size as a filled one.
    """
    count = len(series) if panels is None else int(panels)
    if count < 1:
        raise ValueError("line_panels needs at least one panel")
    if len(series) > count:
        raise ValueError(f"{len(series)} series do not fit in {count} panels")
    if width < 4 * _MARGIN or panel_height < 4 * _MARGIN:
        raise ValueError(f"plot too small: width {width}, panel height {panel_height} (minimum {4 * _MARGIN})")
    canvas = torch.ones(count * panel_height, width, 3)
    for p in range(count):
        values = _as_values(series[p]) if p < len(series) else torch.zeros(0, dtype=torch.float64)
        color = torch.tensor(colors[p % len(colors)], dtype=torch.float32)
        _draw_panel(canvas, p * panel_height, panel_height, values, color)
    return canvas
