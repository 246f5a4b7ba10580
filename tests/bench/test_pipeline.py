import copy
import zlib

import pytest
import torch
from torch import nn

from qcorrect.bench.common import resident_bytes
from qcorrect.bench.pipeline import (
    PerSampleNoise, RunConfig, initial_noise, labels_for, parse_int_list, sample_latents, start_latent,
)
from qcorrect.bench.png import grid, write_png
from qcorrect.quant import quantize_model
from qcorrect.reference.sigmas import scaled_linear_sigmas


def test_parse_int_list():
    assert parse_int_list("1000-1003") == [1000, 1001, 1002, 1003]
    assert parse_int_list("0,3,7-9") == [0, 3, 7, 8, 9]
    with pytest.raises(ValueError):
        parse_int_list("5-2")
    with pytest.raises(ValueError):
        parse_int_list(",")


def test_labels_cycle_classes():
    assert labels_for(list(range(5)), [3, 7]).tolist() == [3, 7, 3, 7, 3]


class ScaledIdentity:
    """denoised = x·s/(1+σ²)+…: any deterministic denoiser works for these plumbing checks."""

    def __call__(self, x, sigma, cond=None, cfg_scale=1.0):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) + 0.01 * cond.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_samples_do_not_depend_on_batch_size(sampler):
    seeds = list(range(10, 17))
    labels = labels_for(seeds, list(range(10)))
    grid_sigmas = scaled_linear_sigmas()
    a = sample_latents(ScaledIdentity(), RunConfig(sampler, steps=5, batch_size=7), seeds, labels, grid_sigmas, (2, 3, 3))
    b = sample_latents(ScaledIdentity(), RunConfig(sampler, steps=5, batch_size=3), seeds, labels, grid_sigmas, (2, 3, 3))
    assert torch.equal(a, b)
    c = sample_latents(ScaledIdentity(), RunConfig(sampler, steps=5, batch_size=3), seeds[1:], labels[1:], grid_sigmas, (2, 3, 3))
    assert torch.equal(a[1:], c)


def test_per_sample_noise_is_seeded_and_distinct_from_initial_noise():
    n1, n2 = PerSampleNoise([5, 6], (4,)), PerSampleNoise([5, 6], (4,))
    assert torch.equal(n1(), n2())
    assert not torch.equal(PerSampleNoise([5], (4,))()[0], initial_noise([5], (4,))[0])


def test_start_latent_uses_comfy_noise_scaling():
    grid_sigmas = scaled_linear_sigmas()
    noise = torch.ones(1, 1)
    full = torch.tensor([float(grid_sigmas[-1]), 1.0, 0.0])
    assert float(start_latent(noise, full, grid_sigmas)) == pytest.approx(float((1 + full[0] ** 2).sqrt()))
    partial = torch.tensor([2.0, 1.0, 0.0])
    assert float(start_latent(noise, partial, grid_sigmas)) == pytest.approx(2.0)


def test_run_config_validation():
    with pytest.raises(ValueError, match="unknown sampler"):
        RunConfig("euler_magic").validate()
    with pytest.raises(ValueError, match="unknown scheduler"):
        RunConfig(scheduler="cosine").validate()


def test_png_is_valid_grayscale(tmp_path):
    img = grid([torch.rand(3, 1, 5, 4), torch.rand(2, 1, 5, 4)], pad=1, scale=1)
    assert img.shape == (2 * 6 + 1, 3 * 5 + 1)
    path = tmp_path / "g.png"
    write_png(str(path), img)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (height, width) == tuple(img.shape)
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == height * (width + 1)
    row0 = torch.tensor(list(raw[1 : width + 1]), dtype=torch.float32) / 255
    assert torch.allclose(row0, img[0], atol=1 / 255)


def test_resident_bytes_counts_codes_scales_and_kept_layers():
    model = nn.Sequential(nn.Conv2d(4, 64, 3), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 4, 3)).half()
    fp16 = resident_bytes(model)
    assert fp16 == 2 * sum(p.numel() for p in model.parameters())
    quantize_model(model, "W8A8")  # the middle conv only: first/last stay fp16
    mid = 64 * 64 * 9 * 1 + 64 * 2 + 64 * 2  # int8 codes + fp16 scales + fp16 bias
    edges = 2 * sum(p.numel() for i in (0, 2) for p in model[i].parameters())
    assert resident_bytes(model) == mid + edges


def test_static_activation_ranges_are_calibrated_per_sigma_on_the_given_seeds():
    from qcorrect.bench.pipeline import calibrate_static_ranges, quantized_denoiser
    from qcorrect.quant import preset
    from qcorrect.quant.plan import quantized_layers
    from qcorrect.reference.model import load_reference

    ref = load_reference()
    rc = RunConfig("euler", "normal", 3, 3.0, 2)
    seeds = [0, 1]
    labels = labels_for(seeds, list(range(10)))
    static = quantized_denoiser(ref.denoiser, preset("W4A8", act_mode="static"))
    n = calibrate_static_ranges(static, rc, seeds, labels, ref.denoiser.sigmas, "minmax")
    acts = [m.act for m in quantized_layers(static.quantized).values() if m.act.qtype is not None]
    assert n == len(acts) > 0
    assert all(a.mode == "static" and len(a.range_sigmas) == 3 for a in acts)  # one range per σ of the schedule
    out = sample_latents(static, rc, [1000], labels_for([1000], [3]), ref.denoiser.sigmas)
    dyn = quantized_denoiser(ref.denoiser, preset("W4A8"))
    out_dyn = sample_latents(dyn, rc, [1000], labels_for([1000], [3]), ref.denoiser.sigmas)
    assert torch.isfinite(out).all() and not torch.equal(out, out_dyn)


def test_weight_override_quantizes_per_channel_int4():
    from qcorrect.bench.common import quant_label, quant_plan

    plan = quant_plan("W4A8", "uint4")
    assert plan.weights == "uint4" and plan.activations == quant_plan("W4A8").activations
    assert quant_label("W4A8", "uint4") == "W4A8[uint4]" and quant_label("W4A8") == "W4A8"
    with pytest.raises(SystemExit, match="unknown quantized type"):
        quant_plan("W4A8", "int3")
    net = nn.Sequential(nn.Linear(128, 64), nn.SiLU(), nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 8))
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x)
    outs = {}
    for w in ("uint4_g64", "uint4"):
        q = quantize_model(copy.deepcopy(net), quant_plan("W4A16", w))
        assert any(getattr(m, "wqtype", None) is not None and m.wqtype.name == w for m in q.modules())
        with torch.no_grad():
            outs[w] = q(x)
        rel = float((outs[w] - ref).pow(2).mean() / ref.pow(2).mean())
        assert 0 < rel < 0.05  # a real 4-bit error, not a broken layer
    assert not torch.equal(outs["uint4_g64"], outs["uint4"])
