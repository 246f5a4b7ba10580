"""What calibration hands the quantizers: streamed statistics of one layer's inputs.

``calibration/inputs.py`` fills these from full-precision sampling; ``quant/`` only reads them, so
every quantizer here is a pure function of a weight and a :class:`LayerInputs` and can be tested
on random layers with synthetic inputs (:meth:`LayerInputs.from_rows`).

Rows are what the layer multiplies its weight with: a Linear's input vectors (every token of every
sample), a Conv2d's unfolded input patches (``in·kh·kw`` values per output position). Rows are
split into a *fit* set and a *held-out* set by calibration sample, never within one, so held-out
errors measure how a choice made on some samples transfers to others.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .errors import QuantizationError


@dataclass
class LayerInputs:
    """Second moments and per-channel ranges of one layer's calibration inputs.

    ``h_fit`` / ``h_hold``: ``Σ w·x xᵀ`` ``[K, K]`` over fit / held-out rows (``w`` the per-step
    weight of the call, 1 by default); ``rows_*`` how many rows went in, ``wsum_*`` their summed
    weight. Per input channel ``c`` (``C`` = Linear in-features, Conv2d in-channels):
    ``absmax[c]`` the largest ``|x|`` seen, ``absmean[c]`` the weighted mean ``|x|`` (AWQ's
    statistic), ``hi[c]`` / ``lo[c]`` the mean over samples and calls of the per-sample max / min
    (the dynamic per-sample activation range follows from them). ``calls`` counts forward calls.
    """

    kind: str
    h_fit: torch.Tensor
    h_hold: torch.Tensor
    absmax: torch.Tensor
    absmean: torch.Tensor
    hi: torch.Tensor
    lo: torch.Tensor
    rows_fit: int = 0
    rows_hold: int = 0
    wsum_fit: float = 0.0
    wsum_hold: float = 0.0
    calls: int = 0
    notes: list = field(default_factory=list)

    @property
    def k(self) -> int:
        return int(self.h_fit.shape[0])

    @property
    def channels(self) -> int:
        return int(self.absmax.shape[0])

    @property
    def h_all(self) -> torch.Tensor:
        return self.h_fit + self.h_hold

    def on(self, device: torch.device | str) -> bool:
        """Whether the statistics live on ``device`` (``"cuda"`` matches any CUDA device)."""
        device, here = torch.device(device), self.h_fit.device
        return here.type == device.type and (device.index is None or here.index == device.index)

    def to(self, device: torch.device | str) -> "LayerInputs":
        """A copy with every tensor on ``device`` (the counts and notes shared; the input itself if
        already there)."""
        if self.on(device):
            return self
        moved = {n: getattr(self, n).to(device) for n in ("h_fit", "h_hold", "absmax", "absmean", "hi", "lo")}
        return replace(self, **moved)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.h_fit, self.h_hold, self.absmax, self.absmean, self.hi, self.lo))

    def check(self, layer: str = "?", min_rows: int = 1) -> None:
        """Raise a :class:`QuantizationError` naming the layer for statistics no quantizer can use."""
        tensors = {"h_fit": self.h_fit, "h_hold": self.h_hold, "absmax": self.absmax, "absmean": self.absmean}
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise QuantizationError(f"layer {layer!r}: calibration statistic {name} has NaN or inf")
        if self.rows_fit < min_rows:
            raise QuantizationError(
                f"layer {layer!r}: {self.rows_fit} fit rows in the calibration statistics, need at least {min_rows}; "
                "calibrate on more samples")

    @classmethod
    def empty(cls, kind: str, k: int, channels: int) -> "LayerInputs":
        z = lambda *s: torch.zeros(*s, dtype=torch.float32)  # noqa: E731
        return cls(kind, z(k, k), z(k, k), z(channels), z(channels), z(channels), z(channels))

    @classmethod
    def from_rows(cls, fit: torch.Tensor, hold: torch.Tensor, channels: int | None = None,
                  kind: str = "linear") -> "LayerInputs":
        """Statistics of explicit rows ``[n, K]`` (tests and synthetic layers): every row its own
        sample; a conv's rows are unfolded patches with ``K = channels·taps``, channel-major."""
        k = fit.shape[1]
        c = channels or k
        s = cls.empty(kind, k, c)
        s.h_fit = (fit.T.double() @ fit.double()).float()
        s.h_hold = (hold.T.double() @ hold.double()).float()
        s.rows_fit, s.rows_hold = fit.shape[0], hold.shape[0]
        s.wsum_fit, s.wsum_hold = float(fit.shape[0]), float(hold.shape[0])
        rows = torch.cat([fit, hold]).float().reshape(-1, c, k // c)
        s.absmax = rows.abs().amax(dim=(0, 2))
        s.absmean = rows.abs().mean(dim=(0, 2))
        s.hi = rows.amax(dim=2).mean(dim=0)
        s.lo = rows.amin(dim=2).mean(dim=0)
        s.calls = 1
        return s
