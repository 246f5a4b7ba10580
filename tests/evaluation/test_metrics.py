"""Per-sample metrics against hand-computed values."""

import math

import pytest
import torch

from qcorrect.evaluation import class_accuracy, class_correct, latent_mse, psnr, ssim


def test_latent_mse_per_sample():
    a = torch.zeros(3, 4, 2, 2)
    b = torch.stack([torch.full((4, 2, 2), v) for v in (0.0, 1.0, 2.0)])
    b[0, 0, 0, 0] = 4.0  # one element of 16 off by 4 → 16/16
    assert torch.allclose(latent_mse(a, b), torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64))
    assert torch.equal(latent_mse(b, b), torch.zeros(3, dtype=torch.float64))


def test_psnr_of_known_mse():
    a = torch.full((3, 1, 28, 28), 0.5)
    offsets = torch.tensor([0.1, 0.01, 0.3])
    b = a + offsets[:, None, None, None]
    expected = torch.tensor([10 * math.log10(1 / o**2) for o in offsets.tolist()], dtype=torch.float64)
    assert torch.allclose(psnr(a, b), expected, atol=1e-4)
    assert torch.allclose(psnr(b, a), expected, atol=1e-4)
    assert torch.allclose(psnr(a * 255, b * 255, data_range=255.0), expected, atol=1e-4)
    assert torch.isinf(psnr(a, a)).all()


def test_ssim_identical_is_one_and_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 1, 28, 28, generator=g)
    b = (a + 0.2 * torch.randn(4, 1, 28, 28, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(a, a), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ssim(torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 28, 28)), torch.ones(2, dtype=torch.float64))
    s = ssim(a, b)
    assert s.shape == (4,) and bool(((s > 0) & (s < 1)).all())
    assert torch.allclose(s, ssim(b, a))


def test_ssim_of_flat_images_matches_formula():
    # Flat images: σ_x = σ_y = σ_xy = 0, so SSIM = (2 μx μy + c1)/(μx² + μy² + c1), c1 = (0.01 L)².
    mx, my, c1 = 0.5, 0.25, 0.01**2
    expected = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    got = ssim(torch.full((1, 1, 28, 28), mx), torch.full((1, 1, 28, 28), my))
    assert float(got[0]) == pytest.approx(expected, rel=1e-9)


def test_metric_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(2, 1, 28, 28), torch.zeros(3, 1, 28, 28))
    with pytest.raises(ValueError):
        latent_mse(torch.zeros(2, 4), torch.zeros(2, 5))


def test_class_accuracy_with_known_classifier():
    # "Classifier": predicts the class from the mean brightness bucket.
    def logits_fn(images):
        bucket = (images.mean(dim=(1, 2, 3)) * 10).long().clamp(0, 9)
        return torch.nn.functional.one_hot(bucket, 10).float()

    images = torch.stack([torch.full((1, 28, 28), (k + 0.5) / 10) for k in range(10)])
    labels = torch.arange(10)
    labels[[2, 7]] = 0  # two wrong labels
    assert class_accuracy(images, labels, logits_fn) == pytest.approx(0.8)
    assert class_accuracy(images, labels, logits_fn, batch_size=3) == pytest.approx(0.8)
    correct = class_correct(images, labels, logits_fn)
    assert correct.dtype == torch.bool and correct.sum() == 8 and not correct[2] and not correct[7]
