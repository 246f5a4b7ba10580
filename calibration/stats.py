"""Per-σ error statistics: mergeable sufficient statistics, safetensors files, model fingerprints.

One :class:`CorrectionStats` holds, for each step of the calibration schedule (a *row*, keyed by
the sampler's σ_n, descending), per latent channel c, float64 sums from which every method's
parameters are derived (ALGORITHMS.md §8.4, stored as sums rather than derived values so that two
calibrations of one configuration merge exactly: :meth:`CorrectionStats.merge`).

ε-space sums, measured with the FP and the quantized model evaluated on the *same* input
(ε = FP ε-prediction, ε̂ = quantized one; §0.3):

=================  ===========================  =========================================
``eps_count``      n                            elements (samples × spatial positions)
``eps_sum_fp``     Σε                           ``eps_sum_q``   Σε̂
``eps_sq_fp``      Σε²                          ``eps_sq_q``    Σε̂²
``eps_cross``      Σε̂·ε
``tac_mask_count`` M = #{|ε| > κ·mean|ε|}       TAC's masked relative term (§4b)
``tac_ratio_sum``  Σ_mask ε̂/ε                   ``tac_ratio_sq``  Σ_mask (ε̂/ε)²
=================  ===========================  =========================================

Latent-space sums (K-space, §0.3), δ = x̂ − x, the quantized minus the FP trajectory's latent as
it arrives at σ_n (before the step's latent correction): ``lat_count``, ``lat_sum`` Σδ,
``lat_sq`` Σδ². Everything a method needs (PTQD μ, k, R², σ_q; TAC K and b; TCEC K; StepbaQ μ,
s², σ_τ) is a closed-form function of these sums: see ``ptqd.py``, ``tac.py``, ``tcec.py``,
``stepbaq.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from .errors import IncompatibleStatsError, StatsError, StatsFileError

FORMAT_VERSION = "1"
EPS_FIELDS = (
    "eps_count", "eps_sum_fp", "eps_sum_q", "eps_sq_fp", "eps_sq_q", "eps_cross",
    "tac_mask_count", "tac_ratio_sum", "tac_ratio_sq",
)
LAT_FIELDS = ("lat_count", "lat_sum", "lat_sq")
SUM_FIELDS = EPS_FIELDS + LAT_FIELDS
PREDICTIONS = ("eps", "v")  # K-space denoisers; flow ("const") is not supported yet


@dataclass
class StatsMeta:
    """What a calibration was made with; stored as ``qcorrect.*`` safetensors metadata.

    ``methods`` are the corrections that were active on the quantized trajectory while calibrating
    (progressive mode, ALGORITHMS.md §8.2), e.g. ``("ptqd", "stepbaq")``; ``output_method`` and
    ``latent_method`` name the output-affine and the latent-mean correction among them ("none" if
    absent). ``tac_mask_kappa`` is κ of the TAC relative-error mask (§4b), fixed at collection.
    ``validation`` is the end-to-end check of ``validate.py`` (methods, sampler, n, naive and
    corrected latent MSE, gap closed) when one was run on calibration samples, else empty.
    """

    model_fingerprint: str = ""
    quant_fingerprint: str = ""
    quantization: str = ""
    prediction: str = "eps"
    sampler: str = "euler"
    scheduler: str = ""
    steps: int = 0
    cfg: float = 1.0
    denoise: float = 1.0
    n_samples: int = 0
    methods: tuple = ()
    mode: str = "progressive"
    output_method: str = "none"
    latent_method: str = "none"
    eta: float = 1.0
    acc: bool = True
    tac_mask_kappa: float = 0.5
    rho_min: float = 0.0
    validation: dict = field(default_factory=dict)
    pack_version: str = field(default="")

    def to_metadata(self) -> dict:
        out = {"qcorrect.version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f"qcorrect.{f.name}"] = json.dumps(list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_metadata(cls, md: dict) -> "StatsMeta":
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f"qcorrect.{f.name}"
            if key in md:
                value = json.loads(md[key])
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        check = kwargs.get("validation", {})
        if not isinstance(check, dict) or not isinstance(check.get("gap_closed", 0.0), (int, float)):
            raise ValueError("qcorrect.validation must be an object with a numeric gap_closed")
        return cls(**kwargs)

    def merge_key(self) -> dict:
        """Everything that must agree for two calibrations to be merged (all but n_samples)."""
        d = dataclasses.asdict(self)
        d.pop("n_samples")
        d.pop("pack_version")
        d.pop("validation")  # a check of one calibration set, not a property of the configuration
        return d


def _pack_version() -> str:
    try:
        from .. import __version__
    except ImportError:  # pragma: no cover - imported outside the package
        return ""
    return __version__


class CorrectionStats:
    """Rows of sufficient statistics keyed by σ (descending), one per calibrated step.

    ``sigma[r]`` is the sampler's σ_n of row r and ``sigma_next[r]`` = σ_{n+1};
    ``grid_sigmas`` (optional, ascending) is the model's training σ grid used by StepbaQ's
    "τ > t" test (§3b); without it StepbaQ uses a relative threshold ``meta.rho_min``.
    """

    def __init__(self, sigma, sigma_next, sums: dict, meta: StatsMeta | None = None, grid_sigmas=None):
        self.sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        self.sigma_next = torch.as_tensor(sigma_next, dtype=torch.float64).cpu()
        self.sums = {k: torch.as_tensor(sums[k], dtype=torch.float64).cpu() for k in SUM_FIELDS}
        self.meta = meta if meta is not None else StatsMeta()
        self.grid_sigmas = None if grid_sigmas is None else torch.as_tensor(grid_sigmas, dtype=torch.float64).cpu()
        self._check_shapes()

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def empty(cls, sigmas, channels: int, meta: StatsMeta | None = None, grid_sigmas=None):
        """Zero statistics for a schedule ``sigmas`` (``steps + 1`` values, descending, last 0)."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
        if s.numel() < 2:
            raise StatsError("a schedule needs at least two σ values (one step)")
        rows = s.numel() - 1
        sums = {k: torch.zeros(rows, channels, dtype=torch.float64) for k in SUM_FIELDS}
        return cls(s[:-1], s[1:], sums, meta, grid_sigmas)

    def _check_shapes(self):
        r = self.sigma.shape[0] if self.sigma.ndim == 1 else -1
        if r < 1 or self.sigma_next.shape != (r,):
            raise StatsError(f"σ rows have shapes {tuple(self.sigma.shape)} / {tuple(self.sigma_next.shape)}; expected [R], [R] with R ≥ 1")
        c = self.sums["eps_count"].shape[-1] if self.sums["eps_count"].ndim == 2 else -1
        for k, v in self.sums.items():
            if v.shape != (r, c):
                raise StatsError(f"statistic {k!r} has shape {tuple(v.shape)}, expected [{r}, {c}] (rows × channels)")
        if r > 1 and not bool((self.sigma[1:] < self.sigma[:-1]).all()):
            raise StatsError("σ rows must be strictly descending")
        if not bool((self.sigma > 0).all()):
            raise StatsError("σ rows must be positive (the final σ = 0 step has no row)")

    @property
    def channels(self) -> int:
        return self.sums["eps_count"].shape[1]

    @property
    def rows(self) -> int:
        return self.sigma.shape[0]

    def schedule(self) -> torch.Tensor:
        """The calibration schedule, ``rows + 1`` σ's ending in ``sigma_next[-1]``."""
        return torch.cat([self.sigma, self.sigma_next[-1:]])

    def head(self, n: int) -> "CorrectionStats":
        """The first ``n`` rows (used by the progressive collector while rows are being filled)."""
        return CorrectionStats(self.sigma[:n], self.sigma_next[:n], {k: v[:n] for k, v in self.sums.items()},
                               self.meta, self.grid_sigmas)

    # ----------------------------------------------------------------------------- accumulation
    def add_eps(self, row: int, eps_fp: torch.Tensor, eps_q: torch.Tensor) -> None:
        """Accumulate ε-space sums for ``row`` from ``[B, C, ...]`` FP and quantized ε-predictions."""
        if eps_fp.shape != eps_q.shape or eps_fp.ndim < 2 or eps_fp.shape[1] != self.channels:
            raise StatsError(f"ε tensors of shapes {tuple(eps_fp.shape)} / {tuple(eps_q.shape)} do not fit "
                             f"statistics with {self.channels} channels ([B, C, ...] expected)")
        f = eps_fp.detach().double().transpose(0, 1).reshape(self.channels, -1)
        q = eps_q.detach().double().transpose(0, 1).reshape(self.channels, -1)
        s = self.sums
        s["eps_count"][row] += f.shape[1]
        s["eps_sum_fp"][row] += f.sum(1).cpu()
        s["eps_sum_q"][row] += q.sum(1).cpu()
        s["eps_sq_fp"][row] += (f * f).sum(1).cpu()
        s["eps_sq_q"][row] += (q * q).sum(1).cpu()
        s["eps_cross"][row] += (f * q).sum(1).cpu()
        # TAC mask (§4b, "safe recommendation"): |ε| > κ·mean|ε| per (sample, channel), so the
        # relative term never divides by a near-zero target.
        fd = eps_fp.detach().double().flatten(2)  # [B, C, P]
        qd = eps_q.detach().double().flatten(2)
        af = fd.abs()
        mask = (af > self.meta.tac_mask_kappa * af.mean(-1, keepdim=True)) & (af > 1e-12)
        ratio = torch.where(mask, qd / torch.where(mask, fd, torch.ones_like(fd)), torch.zeros_like(fd))
        s["tac_mask_count"][row] += mask.sum((0, 2)).double().cpu()
        s["tac_ratio_sum"][row] += ratio.sum((0, 2)).cpu()
        s["tac_ratio_sq"][row] += (ratio * ratio).sum((0, 2)).cpu()

    def add_latent(self, row: int, delta: torch.Tensor) -> None:
        """Accumulate latent-error sums for ``row`` from δ = x̂ − x, ``[B, C, ...]`` (K-space)."""
        if delta.ndim < 2 or delta.shape[1] != self.channels:
            raise StatsError(f"latent error of shape {tuple(delta.shape)} does not fit {self.channels} channels")
        d = delta.detach().double().transpose(0, 1).reshape(self.channels, -1)
        self.sums["lat_count"][row] += d.shape[1]
        self.sums["lat_sum"][row] += d.sum(1).cpu()
        self.sums["lat_sq"][row] += (d * d).sum(1).cpu()

    # ----------------------------------------------------------------------------- merging
    def merge(self, other: "CorrectionStats") -> "CorrectionStats":
        """Statistics of the union of both calibration sets (same configuration required).

        Sums add, so the merged object equals the statistics of the concatenated calibration
        sets. StepbaQ's stepback decisions are re-derived from the pooled sums; when they differ
        from either input's a warning says so, since the ACC path (§3b) of the merged statistics
        then differs from the paths the two calibrations actually followed.
        """
        if not isinstance(other, CorrectionStats):
            raise StatsError("can only merge CorrectionStats with CorrectionStats")
        a, b = self.meta.merge_key(), other.meta.merge_key()
        diff = sorted(k for k in a if a[k] != b[k])
        if diff:
            details = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in diff)
            raise IncompatibleStatsError(f"cannot merge calibrations of different configurations ({details}); "
                                         "calibrate both with the same model, sampler, schedule, cfg and methods")
        if self.channels != other.channels or self.rows != other.rows or not torch.allclose(self.sigma, other.sigma, rtol=1e-6):
            raise IncompatibleStatsError("cannot merge statistics over different σ schedules or channel counts")
        meta = dataclasses.replace(self.meta, n_samples=self.meta.n_samples + other.meta.n_samples,
                                   validation={})  # neither input's end-to-end check describes the union
        merged = CorrectionStats(self.sigma, self.sigma_next, {k: self.sums[k] + other.sums[k] for k in SUM_FIELDS},
                                 meta, self.grid_sigmas)
        from .stepbaq import stepback_decisions  # local import: stepbaq derives from these sums
        flags = [stepback_decisions(s)[1] for s in (self, other, merged)]
        if not (torch.equal(flags[0], flags[2]) and torch.equal(flags[1], flags[2])):
            import warnings

            warnings.warn("merged statistics take StepbaQ stepbacks at other steps than the calibrations being "
                          "merged; the accumulated-error path (ACC) differs, so re-calibrating on the union is preferable",
                          stacklevel=2)
        return merged

    # ----------------------------------------------------------------------------- files
    def tensors(self) -> dict:
        out = {"sigma": self.sigma, "sigma_next": self.sigma_next}
        out.update({f"sums.{k}": v for k, v in self.sums.items()})
        if self.grid_sigmas is not None:
            out["grid_sigmas"] = self.grid_sigmas
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    def save(self, path) -> None:
        """Write a safetensors file atomically (temporary file in the same folder, then rename)."""
        from ..quant.io import atomic_save_safetensors

        self.validate()
        meta = dataclasses.replace(self.meta, pack_version=self.meta.pack_version or _pack_version())
        atomic_save_safetensors(self.tensors(), os.fspath(path), meta.to_metadata())

    def validate(self) -> None:
        """Raise :class:`StatsFileError` on non-finite or negative-count statistics."""
        for name, t in self.tensors().items():
            if not bool(torch.isfinite(t).all()):
                raise StatsFileError(f"statistic {name!r} contains NaN or inf; the calibration that produced it "
                                     "diverged (check the quantized model's outputs) — re-run the calibration")
        for k in ("eps_count", "lat_count", "tac_mask_count"):
            if bool((self.sums[k] < 0).any()):
                raise StatsFileError(f"statistic {k!r} has negative counts; the file is corrupt")

    @classmethod
    def load(cls, path, *, expect_fingerprint: str | None = None, expect_prediction: str | None = None,
             expect_channels: int | None = None) -> "CorrectionStats":
        """Read and validate a statistics file; raise with an actionable message if unusable.

        ``expect_fingerprint`` is compared with both the FP and the quantized model fingerprint
        stored in the file (either may be what the caller has at hand).
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise StatsFileError(f"statistics file {path!r} does not exist")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                md = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for truncated/garbled files
            raise StatsFileError(f"{path!r} is not a readable safetensors file (truncated or corrupt: {exc}); "
                                 "re-run the calibration or copy the file again") from None
        version = md.get("qcorrect.version")
        if version is None:
            raise StatsFileError(f"{path!r} has no qcorrect metadata; it is not a qcorrect statistics file")
        if version != FORMAT_VERSION:
            raise StatsFileError(f"{path!r} uses statistics format version {version}, this qcorrect reads version "
                                 f"{FORMAT_VERSION}; re-run the calibration with this version")
        try:
            meta = StatsMeta.from_metadata(md)
        except (ValueError, TypeError) as exc:
            raise StatsFileError(f"{path!r} has unreadable qcorrect metadata ({exc})") from None
        need = ["sigma", "sigma_next"] + [f"sums.{k}" for k in SUM_FIELDS]
        missing = [k for k in need if k not in tensors]
        if missing:
            raise StatsFileError(f"{path!r} lacks tensors {missing}; the file is incomplete or from another tool")
        bad = [k for k, v in tensors.items() if v.dtype != torch.float64]
        if bad:
            raise StatsFileError(f"{path!r}: tensors {bad} are not float64; the file was not written by qcorrect")
        try:
            stats = cls(tensors["sigma"], tensors["sigma_next"], {k: tensors[f"sums.{k}"] for k in SUM_FIELDS},
                        meta, tensors.get("grid_sigmas"))
        except StatsError as exc:
            raise StatsFileError(f"{path!r}: {exc}") from None
        stats.validate()
        stats.check_compatible(fingerprint=expect_fingerprint, prediction=expect_prediction, channels=expect_channels)
        return stats

    def check_compatible(self, *, fingerprint=None, prediction=None, channels=None) -> None:
        """Refuse what cannot transfer: another model, prediction type or channel count."""
        m = self.meta
        if fingerprint and fingerprint not in (m.model_fingerprint, m.quant_fingerprint):
            raise IncompatibleStatsError(
                f"these statistics were calibrated for model {m.model_fingerprint or '?'} (quantized "
                f"{m.quant_fingerprint or '?'}, {m.quantization or 'unknown quantization'}), not for model "
                f"{fingerprint}; run the calibration for this model or load the statistics made for it")
        if prediction and prediction != m.prediction:
            raise IncompatibleStatsError(f"statistics are for a {m.prediction!r}-prediction model but the model "
                                         f"predicts {prediction!r}; they cannot be transferred — recalibrate")
        if channels is not None and channels != self.channels:
            raise IncompatibleStatsError(f"statistics have {self.channels} latent channels but the latent has "
                                         f"{channels}; they belong to another model family — recalibrate")


def model_fingerprint(module: torch.nn.Module, samples_per_tensor: int = 8) -> str:
    """A short hex digest of a module's state: names, shapes, dtypes and a deterministic sample.

    For every entry of ``state_dict()`` (sorted by name) it hashes the name, dtype, shape and
    ``samples_per_tensor`` values at evenly spaced flat indices (as float32 bytes), so two models
    with the same architecture but other weights differ, while hashing stays O(#tensors).
    """
    return state_fingerprint(module.state_dict(), samples_per_tensor)


def state_fingerprint(state: dict, samples_per_tensor: int = 8) -> str:
    """:func:`model_fingerprint` of a state dict (e.g. one with some tensors replaced by originals)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel() and t.device.type != "meta":
            flat = t.detach().reshape(-1)
            k = min(samples_per_tensor, flat.numel())
            idx = torch.linspace(0, flat.numel() - 1, k, dtype=torch.float64).round().long().to(flat.device)
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
