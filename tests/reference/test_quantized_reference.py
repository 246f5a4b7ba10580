"""The shipped reference model as the quantization testbed: every preset applies, W4 hurts more than W8."""

import pytest
import torch

from qcorrect.bench.pipeline import RunConfig, decode, labels_for, quantized_denoiser, sample_latents
from qcorrect.evaluation import psnr
from qcorrect.quant import PRESETS, quantized_layers
from qcorrect.reference.model import load_reference


@pytest.fixture(scope="module")
def ref():
    return load_reference()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_quantizes_the_reference_unet(ref, preset):
    qd = quantized_denoiser(ref.denoiser, PRESETS[preset])
    layers = quantized_layers(qd.unet)
    n_linear_conv = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in ref.unet.modules())
    assert len(layers) >= n_linear_conv - 6  # all but first/last conv and the time embedding
    x = torch.randn(2, 4, 14, 14)
    out = qd(x, torch.tensor([3.0, 3.0]), cond=torch.tensor([1, 2]), cfg_scale=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_w4a8_psnr_to_fp_measurably_below_w8a8(ref):
    seeds = list(range(5000, 5016))
    labels = labels_for(seeds, list(range(10)))
    rc = RunConfig("euler", steps=10, cfg=ref.default_cfg, batch_size=16)
    grid = ref.denoiser.sigmas
    img_fp = decode(ref.autoencoder, sample_latents(ref.denoiser, rc, seeds, labels, grid))
    scores = {}
    for p in ("W8A8", "W4A8"):
        lat = sample_latents(quantized_denoiser(ref.denoiser, PRESETS[p]), rc, seeds, labels, grid)
        scores[p] = psnr(decode(ref.autoencoder, lat), img_fp).clamp(max=100)
    assert scores["W4A8"].mean() < scores["W8A8"].mean() - 3.0  # dB
    assert (scores["W4A8"] < scores["W8A8"]).float().mean() > 0.8
