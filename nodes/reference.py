"""The shipped reference model as ComfyUI objects, its class conditioning, and Compare To Reference.

Why: every quality claim of the pack is measured on the trained MNIST latent diffusion model of
``reference/`` (ARCHITECTURE.md, "The reference model"); these nodes let a real ComfyUI graph
sample, quantize, calibrate and correct that model end to end, and score the result against the
full-precision run with the same metrics the benchmarks use.

* **Load Reference Model** → MODEL, VAE. The MODEL is a ``ModelPatcher`` around a plain
  ``comfy.model_base.BaseModel`` (EPS prediction, ``ModelSamplingDiscrete`` on SD's scaled-linear
  1000-step schedule, the grid of ``reference.sigmas``) whose ``diffusion_model`` is the reference
  UNet behind ComfyUI's ``(x, timesteps, context)`` call; its layers stay plain ``nn.Linear`` /
  ``nn.Conv2d`` with the library UNet's names, so quantization plans and fingerprints transfer.
  The latent format's scale factor is the autoencoder's: LATENTs in the graph are raw autoencoder
  latents, as for SD, and the sampler works on the unit-variance latents the UNet was trained on.
* **Reference Class** → CONDITIONING: the class's learned tokens (the UNet's "text encoder");
  "empty" is the null class for the negative prompt, so KSampler's CFG is the library's CFG.
* The VAE is duck-typed for the stock VAE Decode / VAE Encode nodes (they call only ``decode`` /
  ``encode``): 28×28 grey digits as RGB IMAGEs ↔ raw latents ``[B, 4, 14, 14]``.
* **Compare To Reference**: PSNR, SSIM, latent MSE and FID-to-FP (``evaluation/``) of a test batch
  against the FP batch, plus a plot of the per-step error recorded in calibration statistics.
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import torch
from comfy_api.latest import io, ui

from ..calibration import CorrectionStats
from ..calibration.moments import safe_div
from ..evaluation import fid_to_fp, latent_mse, line_panels, psnr, ssim
from ..reference.classifier import FEATURE_DIM
from ..reference.model import load_reference
from ..reference.sigmas import SD_BETA_END, SD_BETA_START, SD_TRAIN_STEPS
from ..reference.unet import NULL_CLASS, NUM_CLASSES, UNet
from .types import Stats

CATEGORY = "qcorrect"
LABELS = [str(c) for c in range(NUM_CLASSES)] + ["empty"]
#: FID-to-FP needs about as many samples as feature dimensions (128) before its covariance
#: estimates mean anything; the benchmarks report it at N = 128 and 256.
FID_MIN_SAMPLES = FEATURE_DIM
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; capped as in bench/pipeline.py
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, for colour images given to the grey-digit models


# ------------------------------------------------------------------------------- model objects
class ReferenceLatentFormat(comfy.latent_formats.LatentFormat):
    """4 channels; raw autoencoder latents × ``scale_factor`` are the UNet's unit-variance latents.

    ``spacial_downscale_ratio`` stays 8 although the autoencoder halves 28 → 14: Empty Latent
    Image divides its pixel size by 8 and ComfyUI rescales empty latents whose ratio differs from
    the format's, so 112×112 there gives the 14×14 latent this model samples.
    """

    latent_channels = 4

    def __init__(self, scale_factor: float = 1.0):
        self.scale_factor = float(scale_factor)


class ReferenceModelConfig(comfy.supported_models_base.BASE):
    """Model config for ``BaseModel``: EPS on SD's schedule (ComfyUI's "linear" is SD's scaled linear)."""

    unet_config = {"in_channels": 4, "disable_unet_model_creation": True}
    unet_extra_config = {}
    sampling_settings = {"beta_schedule": "linear", "linear_start": SD_BETA_START, "linear_end": SD_BETA_END,
                         "timesteps": SD_TRAIN_STEPS}
    latent_format = ReferenceLatentFormat
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0


class ReferenceDiffusionModel(UNet):
    """The reference UNet with ComfyUI's ``diffusion_model(x, timesteps, context=None, **kwargs)`` call.

    ``context`` is the cross-attention conditioning (Reference Class tokens ``[B, T, 64]``); without
    it the null class is used. ComfyUI's other keywords (``control``, ``transformer_options``) have
    nothing to act on in this model and are ignored.
    """

    @classmethod
    def from_unet(cls, unet: UNet) -> "ReferenceDiffusionModel":
        model = cls(**unet.config)
        model.load_state_dict(unet.state_dict())
        return model.to(unet.conv_in.weight.device).eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:  # BaseModel.get_dtype reads it; the token table is never quantized
        return self.class_tokens.weight.dtype

    def forward(self, x, timesteps, context=None, **kwargs):
        if context is None:
            return super().forward(x, timesteps, torch.full((x.shape[0],), NULL_CLASS, device=x.device))
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"the reference model's conditioning is class tokens [B, T, {self.context_dim}] "
                             f"from the Reference Class node; got shape {tuple(context.shape)} (a CLIP text "
                             "encoding does not fit this model)")
        return super().forward(x, timesteps, context=context)


def _to_grey(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, 1, H, W]``: grey images replicated to RGB stay exact, colour → luma."""
    if images.shape[1] == 1:
        return images
    rgb = images[:, :3]
    if rgb.shape[1] < 3 or bool((rgb == rgb[:, :1]).all()):
        return rgb[:, :1]
    weights = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).reshape(1, 3, 1, 1)
    return (rgb * weights).sum(1, keepdim=True)


class ReferenceVAE:
    """What ComfyUI's VAE Decode / VAE Encode call on a VAE, for the reference autoencoder.

    ``decode(raw latents [B, 4, h, w]) → IMAGE [B, 2h, 2w, 3]`` in [0, 1] (grey replicated to RGB);
    ``encode(IMAGE [B, H, W, C]) → raw latents`` (the posterior mean, before the scale factor, which
    the MODEL's latent format applies, as ComfyUI does for SD).
    """

    latent_channels = 4
    latent_dim = 2
    output_channels = 3
    downscale_ratio = 2
    upscale_ratio = 2

    def __init__(self, autoencoder, device=None):
        self.device = device if device is not None else comfy.model_management.vae_device()
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        self.scale_factor = autoencoder.scale_factor

    def _check_latent(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim == 5 and latent.shape[2] == 1:
            latent = latent[:, :, 0]
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"the reference VAE decodes latents [B, 4, H, W] (Empty Latent Image 112×112 gives "
                             f"14×14); got shape {tuple(latent.shape)}")
        return latent

    @torch.no_grad()
    def decode(self, samples_in: torch.Tensor, **_options) -> torch.Tensor:
        latent = self._check_latent(samples_in).to(self.device, torch.float32)
        grey = self.autoencoder.decoder(latent)
        out = grey.expand(-1, 3, -1, -1).movedim(1, -1).contiguous()
        return out.to(comfy.model_management.intermediate_device(), torch.float32)

    @torch.no_grad()
    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        if pixel_samples.ndim != 4:
            raise ValueError(f"the reference VAE encodes IMAGE batches [B, H, W, C]; got shape {tuple(pixel_samples.shape)}")
        grey = _to_grey(pixel_samples.movedim(-1, 1).to(self.device, torch.float32))
        mean, _ = self.autoencoder.encode_distribution(grey)
        return mean.to(comfy.model_management.intermediate_device(), torch.float32)

    def decode_tiled(self, samples, *_args, **_kwargs):  # 28×28 images need no tiling
        return self.decode(samples)

    def encode_tiled(self, pixels, *_args, **_kwargs):
        return self.encode(pixels)

    def spacial_compression_decode(self) -> int:
        return self.upscale_ratio

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    def throw_exception_if_invalid(self) -> None:
        pass


def load_reference_model():
    """A fresh (MODEL, VAE) pair from the hash-verified shipped weights; nothing is shared between calls."""
    ref = load_reference()
    config = ReferenceModelConfig(ReferenceModelConfig.unet_config)
    config.latent_format = ReferenceLatentFormat(ref.autoencoder.scale_factor)
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    base.diffusion_model = ReferenceDiffusionModel.from_unet(ref.unet)
    comfy.model_management.archive_model_dtypes(base.diffusion_model)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, ReferenceVAE(ref.autoencoder)


@torch.no_grad()
def class_conditioning(label: str) -> list:
    """CONDITIONING ``[[tokens [1, T, D], {}]]`` for a label "0".."9" or "empty" (the null class)."""
    if label not in LABELS:
        raise ValueError(f"unknown reference class {label!r}; choose one of {LABELS}")
    index = NULL_CLASS if label == "empty" else int(label)
    tokens = load_reference().unet.context(torch.tensor([index]))
    return [[tokens.detach().clone(), {}]]


# ------------------------------------------------------------------------------- comparison
def _batch(value, name: str) -> tuple[str, torch.Tensor]:
    """("LATENT", [B, C, H, W]) or ("IMAGE", [B, C, H, W]) from a LATENT dict or an IMAGE tensor."""
    if isinstance(value, dict) and "samples" in value:
        latent = value["samples"]
        if getattr(latent, "is_nested", False):
            raise ValueError(f"{name}: nested (multi-shape) latents cannot be compared")
        return "LATENT", latent.detach().float().cpu()
    if torch.is_tensor(value) and value.ndim == 4:
        return "IMAGE", value.detach().float().cpu().movedim(-1, 1)
    raise ValueError(f"{name}: expected a LATENT or an IMAGE [B, H, W, C], got {type(value).__name__}")


@torch.no_grad()
def _decode_scaled(autoencoder, scaled: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([autoencoder.decode(scaled[i:i + batch_size]) for i in range(0, len(scaled), batch_size)])


#: the reference model's latent [C, H, W] (an Empty Latent Image of 112×112)
REFERENCE_LATENT_SHAPE = (4, 14, 14)


@torch.no_grad()
def compare_batches(reference, test, ref_model=None) -> dict:
    """Metrics of ``test`` against ``reference`` (both LATENT dicts or both IMAGE tensors).

    LATENTs are the reference model's raw latents: latent MSE is taken on the model's unit-variance
    latents (× scale factor, as in the benchmarks) and images are decoded with the reference
    autoencoder. Returns ``kind``, ``n``, mean ``psnr`` (capped at 100 dB), ``ssim``, ``latent_mse``
    (None for IMAGEs), ``fid_to_fp`` (None when not meaningful) and ``fid_note`` saying why.
    LATENTs of another shape than the reference model's 4×14×14 are another model's: only the MSE of
    the raw latents is reported (``raw_latents``; PSNR/SSIM None) — decode them with their own VAE
    and compare IMAGEs for the rest.
    """
    (kind_r, ref), (kind_t, tst) = _batch(reference, "reference"), _batch(test, "test")
    if kind_r != kind_t:
        raise ValueError(f"reference is {kind_r} but test is {kind_t}: compare two LATENTs or two IMAGEs "
                         "(VAE Decode the LATENT first)")
    if ref.shape[0] != tst.shape[0]:
        raise ValueError(f"reference has {ref.shape[0]} samples but test has {tst.shape[0]}: the comparison is "
                         "per sample, so both batches need the same seeds and classes")
    if ref.shape != tst.shape:
        raise ValueError(f"reference and test shapes differ: {tuple(ref.shape)} vs {tuple(tst.shape)}")
    ref_model = ref_model if ref_model is not None else load_reference()
    out = {"kind": kind_r, "n": int(ref.shape[0]), "latent_mse": None}
    if kind_r == "LATENT" and tuple(ref.shape[1:]) != REFERENCE_LATENT_SHAPE:
        # another model's latents: the reference autoencoder must not decode them, and their scale is unknown
        out.update(latent_mse=float(latent_mse(tst, ref).mean()), raw_latents=True, psnr=None, ssim=None,
                   fid_to_fp=None, fid_note="needs images (VAE Decode both batches and compare IMAGEs)")
        return out
    if kind_r == "LATENT":
        scale = ref_model.autoencoder.scale_factor
        ref, tst = ref * scale, tst * scale
        out["latent_mse"] = float(latent_mse(tst, ref).mean())
        ref, tst = _decode_scaled(ref_model.autoencoder, ref), _decode_scaled(ref_model.autoencoder, tst)
    out["psnr"] = float(psnr(tst, ref).clamp(max=PSNR_CAP_DB).mean())
    out["ssim"] = float(ssim(tst, ref).mean())
    out["fid_to_fp"], out["fid_note"] = None, ""
    if tuple(ref.shape[-2:]) != (28, 28):
        out["fid_note"] = "needs 28×28 images (the reference classifier's input)"
    elif out["n"] < FID_MIN_SAMPLES:
        out["fid_note"] = (f"N = {out['n']} < {FID_MIN_SAMPLES}: with fewer samples than the classifier's "
                           f"{FEATURE_DIM} feature dimensions the covariances are rank-deficient and the "
                           "distance is mostly sampling noise")
    else:
        out["fid_to_fp"] = fid_to_fp(_to_grey(tst), _to_grey(ref), ref_model.classifier.features)
    return out


def step_errors(stats: CorrectionStats) -> dict:
    """Per calibrated step: σ, the ε-error RMS ``√E[(ε̂ − ε)²]``, the FP ε RMS and the latent error
    RMS ``√E[δ²]`` (δ = x̂ − x on arrival), pooled over channels from the statistics' sums (NaN where
    a row has no data)."""
    s = stats.sums
    eps_sq_err = (s["eps_sq_q"] - 2 * s["eps_cross"] + s["eps_sq_fp"]).sum(-1)
    n_eps, n_lat = s["eps_count"].sum(-1), s["lat_count"].sum(-1)
    nan = torch.full_like(n_eps, float("nan"))

    def rms(total, count):
        return torch.where(count > 0, safe_div(total, count).clamp_min(0).sqrt(), nan)

    return {"sigma": stats.sigma.clone(), "eps_err_rms": rms(eps_sq_err, n_eps),
            "eps_fp_rms": rms(s["eps_sq_fp"].sum(-1), n_eps), "latent_err_rms": rms(s["lat_sq"].sum(-1), n_lat)}


def error_plot(stats: CorrectionStats | None) -> torch.Tensor:
    """IMAGE ``[1, H, W, 3]``: ε-error RMS per step (top, blue), latent error RMS (bottom, orange);
    empty frames without statistics."""
    if stats is None:
        return line_panels([], panels=2).unsqueeze(0)
    e = step_errors(stats)
    return line_panels([e["eps_err_rms"].tolist(), e["latent_err_rms"].tolist()], panels=2).unsqueeze(0)


def _number(value, spec: str) -> str:
    v = float(value)
    width = int(spec.split(".")[0])
    return format(v, spec) if v == v else "n/a".rjust(width)


def format_report(metrics: dict, stats: CorrectionStats | None) -> str:
    """The node's text: the metrics of :func:`compare_batches`, then the per-step table of the stats."""
    if metrics.get("raw_latents"):
        lines = [f"test vs reference: N = {metrics['n']} latents of another model than the reference model",
                 f"latent MSE {metrics['latent_mse']:.6g} (raw latents, as the sampler returns them)",
                 "PSNR, SSIM, FID-to-FP: VAE Decode both batches with the model's own VAE and compare the IMAGEs"]
    else:
        kind = "latents (decoded with the reference autoencoder)" if metrics["kind"] == "LATENT" else "images"
        lines = [f"test vs reference: N = {metrics['n']} {kind}",
                 f"PSNR       {metrics['psnr']:.4f} dB (mean; identical images count {PSNR_CAP_DB:.0f} dB)",
                 f"SSIM       {metrics['ssim']:.4f}"]
    if metrics.get("raw_latents"):
        pass
    elif metrics["latent_mse"] is not None:
        lines.append(f"latent MSE {metrics['latent_mse']:.6g} (unit-variance model latents)")
    else:
        lines.append("latent MSE n/a (IMAGE inputs)")
    fid = metrics["fid_to_fp"]
    if not metrics.get("raw_latents"):
        lines.append(f"FID-to-FP  {fid:.4f} (reference classifier features)" if fid is not None
                     else f"FID-to-FP  not computed: {metrics['fid_note']}")
    if stats is None:
        lines.append("no stats connected: the plot is empty")
        return "\n".join(lines)
    m, e = stats.meta, step_errors(stats)
    methods = "+".join(m.methods) if m.methods else "none"
    rel = e["eps_err_rms"] / e["eps_fp_rms"]  # NaN where a row has no data
    lines += ["", f"stats: {stats.rows} steps ({m.sampler}, {m.scheduler or '?'} schedule, cfg {m.cfg:g}, "
              f"{m.n_samples} samples, {m.quantization or 'unknown quantization'}, corrections active while "
              f"calibrating: {methods})",
              "plot: ε-error RMS per step (top), latent error RMS (bottom), σ_max on the left"]
    if not bool(torch.isfinite(e["latent_err_rms"]).any()):
        lines.append("latent error: not recorded in these statistics (the bottom panel is empty)")
    lines.append(f"{'step':>4} {'σ':>9} {'ε-err RMS':>10} {'rel. to ε':>9} {'latent err RMS':>14}")
    for i in range(stats.rows):
        lines.append(f"{i:>4} {float(e['sigma'][i]):>9.4f} {_number(e['eps_err_rms'][i], '10.4g')} "
                     f"{_number(rel[i], '9.3%')} {_number(e['latent_err_rms'][i], '14.4g')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- nodes
class QCorrectLoadReferenceModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QCorrectLoadReferenceModel",
            display_name="Load Reference Model",
            category=CATEGORY,
            description="The pack's trained MNIST latent diffusion model (SD-shaped ε-UNet, SD's schedule). "
                        "Latents are 4×14×14: use an Empty Latent Image of 112×112; condition with Reference Class.",
            inputs=[],
            outputs=[io.Model.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*load_reference_model())


class QCorrectReferenceClass(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QCorrectReferenceClass",
            display_name="Reference Class",
            category=CATEGORY,
            description="Conditioning for the reference model: a digit class, or 'empty' (the null class) "
                        "for the negative prompt of classifier-free guidance.",
            inputs=[io.Combo.Input("label", options=LABELS, default="0")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, label: str) -> io.NodeOutput:
        return io.NodeOutput(class_conditioning(label))


class QCorrectCompareToReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QCorrectCompareToReference",
            display_name="Compare To Reference",
            category=CATEGORY,
            description="PSNR, SSIM, latent MSE and FID-to-FP of a test batch against the full-precision "
                        "batch (same seeds and classes), and the per-step error recorded in calibration stats.",
            inputs=[
                io.MultiType.Input("reference", [io.Latent, io.Image],
                                   tooltip="The full-precision run (LATENT or IMAGE)."),
                io.MultiType.Input("test", [io.Latent, io.Image],
                                   tooltip="The run to score, same kind and batch as reference."),
                Stats.Input("stats", optional=True, tooltip="Calibration statistics to plot the per-step error of."),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="plot")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reference, test, stats=None) -> io.NodeOutput:
        if stats is not None and not isinstance(stats, CorrectionStats):
            raise ValueError(f"stats: expected qcorrect calibration statistics, got {type(stats).__name__}")
        report = format_report(compare_batches(reference, test), stats)
        return io.NodeOutput(report, error_plot(stats), ui=ui.PreviewText(report))


NODES = [QCorrectLoadReferenceModel, QCorrectReferenceClass, QCorrectCompareToReference]
