"""The trained reference model: integrity, denoiser protocol, CFG math and sample quality."""

import gzip
import pickle
import shutil

import pytest
import torch
from torch import nn

from qcorrect.reference import data as ref_data
from qcorrect.reference.model import (
    DEFAULT_CFG,
    WEIGHTS_DIR,
    ReferenceDenoiser,
    WeightsIntegrityError,
    load_reference,
    verify_weights,
)
from qcorrect.reference.samplers import sample_euler
from qcorrect.reference.schedules import get_sigmas
from qcorrect.reference.sigmas import sigma_to_t
from qcorrect.reference.unet import NULL_CLASS


@pytest.fixture(scope="module")
def ref():
    return load_reference()


@pytest.fixture(scope="module")
def test_images():
    images, labels = ref_data.load_mnist("test")
    return images[:1000], labels[:1000]


class _RecordingUNet(nn.Module):
    """Stands in for the UNet: records its inputs, returns a fixed function of them."""

    def forward(self, x, t, labels):
        self.calls = getattr(self, "calls", []) + [(x.clone(), t.clone(), labels.clone())]
        return 0.1 * x + 0.01 * labels.float().reshape(-1, 1, 1, 1) + 0.001 * t.reshape(-1, 1, 1, 1)


# ------------------------------------------------------------------ files and loading
def test_weights_load_and_hashes_verify(ref):
    verify_weights()
    assert isinstance(ref.denoiser, ReferenceDenoiser)
    assert ref.denoiser.sigmas.shape == (1000,)
    names = dict(ref.unet.named_modules())
    assert isinstance(names["conv_in"], nn.Conv2d) and isinstance(names["conv_out"], nn.Conv2d)
    assert any(isinstance(m, nn.Linear) for n, m in names.items() if n.startswith("time_embed"))
    assert all(p.dtype == torch.float32 for p in ref.unet.parameters())
    assert 2.0 <= DEFAULT_CFG <= 6.0 and ref.default_cfg == DEFAULT_CFG


def test_tampered_weights_fail_clearly(tmp_path):
    shutil.copytree(WEIGHTS_DIR, tmp_path / "w")
    path = tmp_path / "w" / "unet.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsIntegrityError, match="unet.safetensors.*SHA-256"):
        load_reference(weights_dir=tmp_path / "w")
    path.unlink()
    with pytest.raises(WeightsIntegrityError, match="missing"):
        verify_weights(tmp_path / "w")


def test_mnist_unpickler_refuses_non_numpy_globals(tmp_path, monkeypatch):
    bad = tmp_path / "mnist.pkl.gz"
    with gzip.open(bad, "wb") as f:
        pickle.dump(__import__("collections").OrderedDict(), f)
    with gzip.open(bad, "rb") as f, pytest.raises(pickle.UnpicklingError, match="not a numpy array"):
        ref_data._NumpyOnlyUnpickler(f, encoding="latin1").load()


def test_mnist_splits(test_images):
    images, labels = test_images
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))


# ------------------------------------------------------------------ autoencoder and classifier
def test_autoencoder_unit_variance_and_reconstruction(ref, test_images):
    images, _ = test_images
    with torch.no_grad():
        z = ref.autoencoder.encode(images[:500])
        recon = ref.autoencoder.decode(z)
    assert z.shape == (500, 4, 14, 14)
    assert 0.8 < z.std().item() < 1.25
    assert 0.0 <= recon.min() and recon.max() <= 1.0
    assert (recon - images[:500]).abs().mean() < 0.05


def test_classifier_accuracy_and_features(ref, test_images):
    images, labels = test_images
    with torch.no_grad():
        acc = (ref.classifier.logits(images).argmax(1) == labels).float().mean().item()
        feats = ref.classifier.features(images[:8])
    assert acc > 0.98
    assert feats.shape == (8, 128)


# ------------------------------------------------------------------ denoiser protocol
def test_denoiser_preconditioning_matches_comfyui_eps():
    den = ReferenceDenoiser(_RecordingUNet())
    x = torch.randn(3, 4, 14, 14)
    sigma = torch.tensor([14.6, 1.0, 0.03])
    cond = torch.tensor([1, 2, 3])
    out = den(x, sigma, cond=cond)
    (x_in, t, labels), = den.unet.calls
    c_in = (1 / (sigma**2 + 1).sqrt()).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_in, x * c_in)
    torch.testing.assert_close(t, sigma_to_t(sigma, den.sigmas))
    assert labels.tolist() == [1, 2, 3]
    eps = den.unet(x * c_in, t, cond)
    torch.testing.assert_close(out, x - sigma.reshape(-1, 1, 1, 1) * eps)


def test_cond_none_uses_null_class_and_scalar_sigma():
    den = ReferenceDenoiser(_RecordingUNet())
    den(torch.randn(2, 4, 14, 14), torch.tensor(2.0), cond=None, cfg_scale=4.0)
    (_, t, labels), = den.unet.calls  # unconditional: one pass even with cfg != 1
    assert labels.tolist() == [NULL_CLASS, NULL_CLASS] and t.shape == (2,)


def test_cfg_combination_math():
    den = ReferenceDenoiser(_RecordingUNet())
    x, sigma, cond, s = torch.randn(2, 4, 14, 14), torch.tensor([3.0, 0.5]), torch.tensor([4, 7]), 3.5
    out = den(x, sigma, cond=cond, cfg_scale=s)
    assert len(den.unet.calls) == 1 and den.unet.calls[0][0].shape[0] == 4  # one batched call
    c_in = (1 / (sigma**2 + 1).sqrt()).reshape(-1, 1, 1, 1)
    t = sigma_to_t(sigma, den.sigmas)
    eps_u = den.unet(x * c_in, t, torch.full((2,), NULL_CLASS))
    eps_c = den.unet(x * c_in, t, cond)
    torch.testing.assert_close(out, x - sigma.reshape(-1, 1, 1, 1) * (eps_u + s * (eps_c - eps_u)))


def test_cfg1_equals_single_cond_pass(ref):
    den = ref.denoiser
    x, sigma, cond = torch.randn(4, 4, 14, 14) * 3, torch.full((4,), 3.0), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        out = den(x, sigma, cond=cond, cfg_scale=1.0)
        eps = den.unet(x / (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1), sigma_to_t(sigma, den.sigmas), cond)
        guided = den(x, sigma, cond=cond, cfg_scale=DEFAULT_CFG)
    torch.testing.assert_close(out, x - 3.0 * eps)
    assert not torch.allclose(out, guided)


def test_unet_takes_class_tokens_as_context(ref):
    # ComfyUI passes conditioning tokens, not labels: both paths must give the same ε.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 14, 14, generator=g)
    t = torch.tensor([999.0, 500.0, 3.0])
    labels = torch.tensor([2, 7, NULL_CLASS])
    tokens = ref.unet.context(labels)
    assert tokens.shape == (3, ref.unet.context_tokens, ref.unet.context_dim)
    with torch.no_grad():
        assert torch.equal(ref.unet(x, t, context=tokens), ref.unet(x, t, labels))
    with pytest.raises(ValueError, match="exactly one"):
        ref.unet(x, t)
    with pytest.raises(ValueError, match="exactly one"):
        ref.unet(x, t, labels, context=tokens)


# ------------------------------------------------------------------ samples
def _sample(ref, labels, cfg, steps, seed=0):
    sigmas = get_sigmas("normal", ref.denoiser.sigmas, steps)
    x = torch.randn(len(labels), 4, 14, 14, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    latents = sample_euler(ref.denoiser, x, sigmas, extra_args={"cond": labels, "cfg_scale": cfg})
    with torch.no_grad():
        return latents, ref.autoencoder.decode(latents)


def test_short_sample_is_finite_and_decodes_in_unit_range(ref):
    latents, images = _sample(ref, torch.tensor([0, 1, 2, 3]), DEFAULT_CFG, steps=4)
    assert torch.isfinite(latents).all()
    assert images.shape == (4, 1, 28, 28) and 0.0 <= images.min() and images.max() <= 1.0


@pytest.fixture(scope="module")
def fp_sample_accuracy(ref):
    """Class accuracy of 64 FP samples (20 euler steps, normal schedule), per CFG scale, cached."""
    cache = {}

    def accuracy(cfg):
        if cfg not in cache:
            labels = torch.arange(10).repeat(7)[:64]
            _, images = _sample(ref, labels, cfg, steps=20, seed=123)
            with torch.no_grad():
                cache[cfg] = (ref.classifier.logits(images).argmax(1) == labels).float().mean().item()
        return cache[cfg]

    return accuracy


def test_fp_samples_at_default_cfg_are_recognised(fp_sample_accuracy):
    acc = fp_sample_accuracy(DEFAULT_CFG)
    assert acc > 0.90, f"class accuracy {acc:.3f} at cfg {DEFAULT_CFG}"


def test_fp_samples_without_guidance_stay_above_regression_floor(fp_sample_accuracy):
    # Unguided (cfg 1) euler samples are the hardest case; this floor catches a broken model or
    # denoiser, the 90% target is tracked by the xfail test below.
    acc = fp_sample_accuracy(1.0)
    assert acc > 0.70, f"class accuracy {acc:.3f} at cfg 1"


@pytest.mark.xfail(reason="unguided euler samples are below the 90% target at the current training budget",
                   strict=False)
def test_fp_samples_without_guidance_reach_target(fp_sample_accuracy):
    assert fp_sample_accuracy(1.0) > 0.90
