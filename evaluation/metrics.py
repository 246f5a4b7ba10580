"""Per-sample image and latent metrics of a run against the full-precision run.

Every function compares two batches that share seeds and classes sample by sample (the quantized
run and the FP run), and returns one value per sample so the results can go straight into
``stats.paired_bootstrap_ci``. Images are ``[N, C, H, W]`` in ``[0, 1]`` (reference model:
``[N, 1, 28, 28]``), data range 1.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["class_accuracy", "class_correct", "latent_mse", "psnr", "ssim"]


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(a.shape)}")


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error ``mean_j (a_ij − b_ij)²`` over all non-batch dims → ``[N]`` (float64)."""
    _check_pair(a, b, "latent_mse")
    diff = a.detach().double() - b.detach().double()
    return diff.reshape(diff.shape[0], -1).square().mean(dim=1)


def psnr(img_a: torch.Tensor, img_b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-sample PSNR ``10·log10(L²/MSE)`` in dB via ``kornia.metrics.psnr`` → ``[N]``.

    kornia pools the MSE over the whole batch, so it is called one image at a time. Identical
    images give ``+inf`` (kornia's convention).
    """
    from kornia.metrics import psnr as _psnr

    _check_pair(img_a, img_b, "psnr")
    a, b = img_a.detach().double(), img_b.detach().double()
    return torch.stack([_psnr(a[i], b[i], float(data_range)) for i in range(a.shape[0])])


def ssim(
    img_a: torch.Tensor, img_b: torch.Tensor, data_range: float = 1.0, window_size: int = 11
) -> torch.Tensor:
    """Per-sample mean SSIM (Wang et al. 2004, Eq. 13) via ``kornia.metrics.ssim`` → ``[N]``.

    Gaussian window (σ = 1.5, ``window_size`` taps), ``c1 = (0.01 L)²``, ``c2 = (0.03 L)²``, the
    ``'valid'`` map (no padding, as the paper's MATLAB code) and ``eps = 0`` so identical images
    score exactly 1; the map is averaged over channels and pixels.
    """
    from kornia.metrics import ssim as _ssim

    _check_pair(img_a, img_b, "ssim")
    if img_a.ndim != 4:
        raise ValueError(f"ssim: expected [N, C, H, W] images, got shape {tuple(img_a.shape)}")
    a, b = img_a.detach().double(), img_b.detach().double()
    smap = _ssim(a, b, window_size, max_val=float(data_range), eps=0.0, padding="valid")
    return smap.reshape(smap.shape[0], -1).mean(dim=1)


@torch.no_grad()
def class_correct(
    images: torch.Tensor,
    labels: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample correctness ``argmax logits_fn(image) == label`` → bool ``[N]``, in batches."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"class_correct: {images.shape[0]} images but {labels.shape[0]} labels")
    preds = [logits_fn(images[i : i + batch_size]).argmax(dim=-1) for i in range(0, len(images), batch_size)]
    return torch.cat(preds).cpu() == labels.detach().cpu().long()


def class_accuracy(
    images: torch.Tensor,
    labels: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
) -> float:
    """Fraction of samples that ``logits_fn`` (e.g. the reference classifier's ``logits``) labels as asked."""
    return float(class_correct(images, labels, logits_fn, batch_size).double().mean())
