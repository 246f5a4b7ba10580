"""Static per-σ activation ranges: FP-trajectory and progressive calibration (calibration/ranges.py)."""

import math

import pytest
import torch
from torch import nn

from qcorrect.calibration.errors import CalibrationError
from qcorrect.calibration.ranges import calibrate_activation_ranges, check_coverage, uses_static_activations
from qcorrect.quant import (
    ActivationObserver, QuantFileError, QuantizationError, SigmaScopedDenoiser, load_quantized, preset,
    quantization_plan, quantize_model, quantized_layers, save_quantized, set_activation_schedule, sigma_scope,
)
from qcorrect.quant.relax import relaxed_schedule
from qcorrect.reference.samplers import SAMPLERS

from ..quant.toy import ToyUNet

SIGMAS = torch.tensor([14.6, 4.0, 1.0, 0.3, 0.0])


class ToyDenoiser(nn.Module):
    """``model(x, sigma)`` over the toy UNet: ε-prediction with a σ embedding."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, sigma, **extra):
        s = sigma.reshape(-1).float()
        freqs = torch.arange(16, dtype=torch.float32)
        emb = torch.cat([torch.sin(s[:, None].log() * (freqs + 1)), torch.cos(s[:, None].log() * (freqs + 1))], 1)
        c_in = (1 / (s**2 + 1).sqrt()).reshape(-1, 1, 1, 1)
        return x - s.reshape(-1, 1, 1, 1) * self.unet(x * c_in, emb)


def pair(name="W4A4"):
    torch.manual_seed(0)
    fp = ToyDenoiser(ToyUNet().eval())
    q = ToyDenoiser(ToyUNet().eval())
    q.load_state_dict(fp.state_dict())
    quantize_model(q.unet, preset(name, act_mode="static"))
    return fp, SigmaScopedDenoiser(q, q.unet)


def x_init(n=6, seed=1):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * float(SIGMAS[0])


def calibrate(q, trajectory, fp=None, **kw):
    kw.setdefault("batch_size", 4)
    return calibrate_activation_ranges(q, q.quantized, x_init(), SIGMAS, sample_fn=SAMPLERS["euler"], fp_model=fp,
                                       trajectory=trajectory, **kw)


def acts(q):
    return {n: m.act for n, m in quantized_layers(q.quantized).items()}


def observed_minmax(q, x, sigma):
    """min/max of every quantized layer's input when ``q`` runs at (x, σ) with activations unquantized."""
    with ActivationObserver(q.quantized) as obs:
        q(x, torch.full((len(x),), float(sigma)))
    return {n: (float(lo[0]), float(hi[0])) for n, (_, lo, hi) in obs.ranges().items()}


@pytest.mark.parametrize("trajectory", ["fp", "progressive"])
def test_every_layer_gets_one_range_per_step_and_runs_static(trajectory):
    fp, q = pair()
    report = calibrate(q, trajectory, fp)
    assert report.trajectory == trajectory and report.n_samples == 6 and report.missing == []
    assert report.sigmas == pytest.approx(SIGMAS[:-1].tolist(), rel=1e-5)
    for a in acts(q).values():
        assert a.mode == "static" and a.range_sigmas.tolist() == pytest.approx(sorted(SIGMAS[:-1].tolist()), rel=1e-5)
    calls = report.model_calls
    assert calls["sampler"] == 4
    assert (calls["fp"], calls["quantized"]) == ((4, 4) if trajectory == "fp" else (0, 8))
    assert quantization_plan(q.quantized)["act_calibration"]["trajectory"] == trajectory


def test_fp_trajectory_ranges_are_those_of_the_fp_latents():
    fp, q = pair()
    calibrate(q, "fp", fp)
    x = x_init()
    x1 = x + (SIGMAS[1] - SIGMAS[0]) * (x - fp(x, SIGMAS[0].expand(6))) / SIGMAS[0]  # one FP euler step
    fresh = pair()[1]
    want = observed_minmax(fresh, x1, SIGMAS[1])
    for name, a in acts(q).items():
        i = int(torch.argmin((a.range_sigmas - SIGMAS[1]).abs()))
        assert (float(a.range_lo[i]), float(a.range_hi[i])) == pytest.approx(want[name], rel=1e-5, abs=1e-6)


def test_progressive_step_is_calibrated_on_the_quantized_trajectory_with_earlier_steps_final():
    fp, q = pair()
    calibrate(q, "progressive", estimator="minmax")
    x = x_init()
    fresh = pair()[1]
    # step 0 sees x_T: the same in both ways
    first = observed_minmax(fresh, x, SIGMAS[0])
    assert all((float(a.range_lo[-1]), float(a.range_hi[-1])) == pytest.approx(first[n], rel=1e-5)
               for n, a in acts(q).items())
    # step 1: the quantized model's own euler step with its final step-0 ranges, then observed unquantized
    with torch.no_grad():
        d = q(x, SIGMAS[0].expand(6))
    x1 = x + (SIGMAS[1] - SIGMAS[0]) * (x - d) / SIGMAS[0]
    want = observed_minmax(q, x1, SIGMAS[1])
    fp_x1 = x + (SIGMAS[1] - SIGMAS[0]) * (x - fp(x, SIGMAS[0].expand(6))) / SIGMAS[0]
    fp_want = observed_minmax(q, fp_x1, SIGMAS[1])
    differs = False
    for name, a in acts(q).items():
        i = int(torch.argmin((a.range_sigmas - SIGMAS[1]).abs()))
        got = (float(a.range_lo[i]), float(a.range_hi[i]))
        assert got == pytest.approx(want[name], rel=1e-5, abs=1e-6)
        differs |= got != pytest.approx(fp_want[name], rel=1e-4)
    assert differs  # not the FP trajectory's ranges


def test_ranges_transfer_to_another_step_count_by_nearest_sigma():
    fp, q = pair()
    calibrate(q, "progressive")
    a = acts(q)["block.2"]
    for sigma in (10.0, 2.2, 0.5, 0.31):
        lo, hi = a.static_range(torch.tensor([sigma]))
        i = int(torch.argmin((a.range_sigmas.log() - math.log(sigma)).abs()))
        assert (float(lo), float(hi)) == (float(a.range_lo[i]), float(a.range_hi[i]))
    other = torch.tensor([14.6, 7.0, 2.0, 0.6, 0.0])  # a 4-step schedule inside the calibrated σ range
    assert check_coverage(q.quantized, other) is None
    with torch.no_grad():
        out = SAMPLERS["euler"](q, x_init(), other, {}, None, True)
    assert torch.isfinite(out).all()


def test_sigma_outside_the_calibrated_range_warns_and_uses_the_nearest_end():
    fp, q = pair()
    calibrate(q, "progressive")
    text = check_coverage(q.quantized, torch.tensor([80.0, 14.6, 1.0, 0.01, 0.0]))
    assert text.startswith("2 σ") and "80" in text and "0.01" in text
    a = acts(q)["attn_q"]
    for far, end in ((80.0, 14.6), (0.01, 0.3)):
        assert [float(t) for t in a.static_range(torch.tensor([far]))] == \
               [float(t) for t in a.static_range(torch.tensor([end]))]


def test_saved_with_the_model_and_loaded_back(tmp_path):
    fp, q = pair("W8A8")
    schedule, _, _ = relaxed_schedule(SIGMAS, 0.25, "x0", 10, 8)
    set_activation_schedule(q.quantized, schedule)
    calibrate(q, "progressive", estimator="mse", meta={"sampler": "euler"})
    path = str(tmp_path / "pcr.safetensors")
    save_quantized(q.quantized, path)
    skeleton = ToyDenoiser(ToyUNet())
    load_quantized(skeleton.unet, path)
    loaded = SigmaScopedDenoiser(skeleton, skeleton.unet)
    x = x_init(3, seed=5)
    for s in (14.6, 1.0, 0.3, 0.05):
        sig = torch.full((3,), s)
        assert torch.equal(q(x, sig), loaded(x, sig))
    info = quantization_plan(skeleton.unet)["act_calibration"]
    assert info["trajectory"] == "progressive" and info["estimator"] == "mse" and info["meta"] == {"sampler": "euler"}
    assert acts(loaded)["block.2"].schedule == [tuple(e) for e in schedule]


def test_nan_ranges_in_a_file_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    fp, q = pair("W8A8")
    calibrate(q, "fp", fp)
    path = str(tmp_path / "r.safetensors")
    save_quantized(q.quantized, path)
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors["block.2.act.range_hi"][1] = float("inf")
    save_file(tensors, path, meta)
    with pytest.raises(QuantFileError, match="range_hi.*NaN or inf"):
        load_quantized(ToyUNet(), path)


def test_nan_activations_are_refused_naming_layer_and_sigma_and_nothing_changes():
    fp, q = pair()
    q.quantized.conv_in.weight.data[0, 0, 0, 0] = float("nan")  # conv_in stays 16-bit: NaN reaches the next layers
    before = {n: (a.mode, a.range_sigmas.clone()) for n, a in acts(q).items()}
    with pytest.raises(QuantizationError, match=r"layer '.*': NaN or inf in its input at σ=14.6"):
        calibrate(q, "progressive")
    assert all(a.mode == before[n][0] and torch.equal(a.range_sigmas, before[n][1]) for n, a in acts(q).items())
    with pytest.raises(QuantizationError, match="finite"):
        acts(q)["attn_q"].set_static_ranges([1.0], [float("nan")], [1.0])


class Branchy(ToyUNet):
    """A layer that never runs (an unused branch), so it is never observed."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(64, 64)


def test_a_layer_never_observed_is_refused_or_kept_dynamic():
    torch.manual_seed(0)
    qd = ToyDenoiser(Branchy().eval())
    quantize_model(qd.unet, preset("W8A8", act_mode="static"))
    q = SigmaScopedDenoiser(qd, qd.unet)
    with pytest.raises(CalibrationError, match="never saw an input.*unused"):
        calibrate(q, "progressive")
    assert acts(q)["unused"].mode == "static" and len(acts(q)["attn_q"].range_sigmas) == 0  # restored
    report = calibrate(q, "progressive", missing="dynamic")
    assert report.missing == ["unused"] and acts(q)["unused"].mode == "dynamic"
    assert acts(q)["attn_q"].mode == "static"


def test_a_failure_midway_leaves_the_model_as_it_was():
    fp, q = pair()
    calibrate(q, "fp", fp)
    before = {n: (a.mode, a.range_lo.clone()) for n, a in acts(q).items()}

    def failing(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        model(x, sigmas[0] * x.new_ones(len(x)))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate_activation_ranges(q, q.quantized, x_init(), SIGMAS, sample_fn=failing)
    assert all(a.mode == before[n][0] and torch.equal(a.range_lo, before[n][1]) for n, a in acts(q).items())
    assert quantization_plan(q.quantized)["act_calibration"]["trajectory"] == "fp"


def test_relaxed_steps_are_calibrated_for_their_bit_width():
    fp, q = pair()
    schedule, _, _ = relaxed_schedule(SIGMAS, 0.25, "x0", 16, 4)  # the last step at 16 bits
    set_activation_schedule(q.quantized, schedule)
    calibrate(q, "progressive", estimator="mse")
    plain = pair()[1]
    calibrate(plain, "progressive", estimator="mse")
    a, b = acts(q)["block.2"], acts(plain)["block.2"]
    assert a.bits_at(0.3) == 16 and a.bits_at(4.0) == 4
    # at 16 bits the MSE-optimal clip is (nearly) no clip; at 4 bits it clips
    assert float(a.range_hi[0]) > float(b.range_hi[0])


def test_bad_arguments():
    fp, q = pair()
    with pytest.raises(CalibrationError, match="needs the full-precision"):
        calibrate(q, "fp")
    with pytest.raises(CalibrationError, match="trajectory"):
        calibrate(q, "teacher")
    with pytest.raises(CalibrationError, match="estimator"):
        calibrate(q, "progressive", estimator="histogram")
    with pytest.raises(CalibrationError, match="missing"):
        calibrate(q, "progressive", missing="skip")
    with pytest.raises(CalibrationError, match="empty"):
        calibrate_activation_ranges(q, q.quantized, torch.empty(0, 4, 8, 8), SIGMAS, sample_fn=SAMPLERS["euler"])
    torch.manual_seed(0)
    weight_only = ToyDenoiser(ToyUNet())
    quantize_model(weight_only.unet, "W8A16")
    with pytest.raises(CalibrationError, match="no quantized activations"):
        calibrate(SigmaScopedDenoiser(weight_only, weight_only.unet), "progressive")


def test_observer_frees_a_sigma_once_finished_and_refuses_it_again():
    fp, q = pair()
    obs = ActivationObserver(q.quantized, method="percentile", max_samples=100)
    x = x_init(2)
    with obs, sigma_scope(q.quantized, 2.0):
        q.inner(x, torch.full((2,), 2.0))
    assert obs.pending == [2.0] and obs._samples
    done = obs.finish()
    assert set(done["block.2"]) == {2.0} and not obs._samples and obs.pending == []
    with pytest.raises(QuantizationError, match="already finished"):
        with obs, sigma_scope(q.quantized, 2.0):
            q.inner(x, torch.full((2,), 2.0))


def test_add_static_range_replaces_the_same_sigma():
    fp, q = pair()
    a = acts(q)["attn_q"]
    a.add_static_range(1.0, -1.0, 1.0)
    a.add_static_range(2.0, -2.0, 2.0)
    a.add_static_range(1.0, -0.5, 0.5)
    assert a.range_sigmas.tolist() == [1.0, 2.0] and a.range_hi.tolist() == [0.5, 2.0]
    assert a.calibrated_sigma_range() == (1.0, 2.0)


def test_uses_static_activations():
    fp, q = pair()
    assert uses_static_activations(q.quantized)  # static, not calibrated yet
    torch.manual_seed(0)
    dyn = ToyUNet()
    quantize_model(dyn, "W4A4")
    assert not uses_static_activations(dyn)
    torch.manual_seed(0)
    weight_only = ToyUNet()
    quantize_model(weight_only, preset("W8A16"))
    assert not uses_static_activations(weight_only)
