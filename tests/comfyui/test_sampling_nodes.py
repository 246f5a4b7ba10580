"""Calibrate Errors, Load Correction Stats, Corrected KSampler and Correction Sampler in a real ComfyUI."""

from __future__ import annotations

import pytest
import torch

from nodekit import conditioning, node_output, sample, tiny_sd15

POS, NEG = conditioning(0), conditioning(1, 0.0)
STEPS, CFG = 4, 3.0


@pytest.fixture(scope="module")
def fp(comfy):
    return tiny_sd15()


@pytest.fixture(scope="module")
def q(fp):
    from qcorrect.nodes.quantize import QuantizeModel

    return node_output(QuantizeModel.execute(fp, "W4A8"))[0][0]


def _latent(batch=2, size=8):
    return {"samples": torch.zeros(batch, 4, size, size)}


def _calibrate(fp, q, methods="tcec", filename="tests/stats", sampler="euler", batches=2, **kw):
    from qcorrect.nodes.calibrate import CalibrateErrors

    args = dict(fp_model=fp, quantized_model=q, positive=POS, negative=NEG, latent_image=_latent(), seed=7,
                sampler=sampler, scheduler="normal", steps=STEPS, cfg=CFG, denoise=1.0, batches=batches,
                methods=methods, filename=filename)
    args.update(kw)
    return node_output(CalibrateErrors.execute(**args))


@pytest.fixture(scope="module")
def tcec_stats(comfy, fp, q):
    (stats, _), text = _calibrate(fp, q, "tcec", "tests/tcec")
    return stats, text


def test_calibrate_errors_writes_a_stats_file_for_the_pair(comfy, fp, q, tcec_stats):
    from qcorrect.calibration import CorrectionStats
    from qcorrect.nodes import patching

    stats, text = tcec_stats
    path = comfy.models / "qcorrect" / "tests" / "tcec.safetensors"
    assert path.is_file() and "saved models/qcorrect/tests/tcec.safetensors" in text
    loaded = CorrectionStats.load(str(path))
    m = loaded.meta
    assert (m.sampler, m.steps, m.cfg, m.n_samples, m.scheduler) == ("euler", STEPS, CFG, 4, "normal")
    assert m.model_fingerprint == patching.fingerprint(fp) and m.quant_fingerprint == patching.fingerprint(q)
    assert m.quantization == "W4A8" and loaded.rows == STEPS and loaded.channels == 4
    assert torch.equal(loaded.sums["eps_cross"], stats.sums["eps_cross"])


def test_calibrate_errors_first_row_matches_a_plain_ksampler_evaluation(comfy, fp, q, tcec_stats):
    """Row 0 of the node's statistics = ε of each model at ComfyUI's own starting latent, evaluated
    through a stock CFGGuider (same noise: batch i seeded with seed + i)."""
    from comfy import sample as csample, samplers

    stats, _ = tcec_stats
    lat = _latent()["samples"]
    noise = torch.cat([csample.prepare_noise(lat, 7 + i) for i in range(2)])
    sigmas = samplers.KSampler(q, steps=STEPS, device="cpu", sampler="euler", scheduler="normal").sigmas

    def eps_at_start(model):
        guider = samplers.CFGGuider(model)
        guider.set_conds(POS, NEG)
        guider.set_cfg(CFG)
        out = {}

        class FirstCall(samplers.Sampler):
            def sample(self, model_wrap, sigmas, extra_args, callback, noise_, latent_image=None, denoise_mask=None,
                       disable_pbar=False):
                ms = model_wrap.inner_model.model_sampling
                x0 = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), self.max_denoise(model_wrap, sigmas))
                d = model_wrap(x0, sigmas[:1].expand(x0.shape[0]), model_options=extra_args["model_options"], seed=7)
                out["eps"] = (x0 - d) / sigmas[0]
                return latent_image
        guider.sample(noise[:2], lat, FirstCall(), sigmas, seed=7)
        return out["eps"].double()

    e_fp, e_q = eps_at_start(fp), eps_at_start(q)
    sums = stats.sums
    assert torch.allclose(sums["eps_sum_fp"][0], e_fp.sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-2)
    assert torch.allclose(sums["eps_sum_q"][0], e_q.sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-2)
    assert torch.allclose(sums["eps_cross"][0], (e_fp * e_q).sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-1)
    assert float(sums["eps_count"][0].sum()) == e_fp.numel()


def test_auto_calibration_stores_the_cross_fitted_check_and_the_sampler_says_why(comfy, fp, q):
    from qcorrect.nodes.sampling import CorrectedKSampler

    (stats, _), text = _calibrate(fp, q, "auto", "tests/auto", batches=2)
    check = stats.meta.validation
    assert check["folds"] == 4 and check["n"] == 4 and "gap_closed" in check
    assert "auto:" in text
    (out,), shown = node_output(CorrectedKSampler.execute(q, 1, STEPS, CFG, "euler", "normal", POS, NEG,
                                                          _latent(1), 1.0, stats, "auto"))
    assert shown.startswith("auto:") and ("correcting" in shown or "uncorrected" in shown)
    assert torch.isfinite(out["samples"]).all()


def test_calibration_refuses_bad_pairs_and_leaves_no_file(comfy, fp, q):
    from qcorrect.nodes.patching import ModelMismatchError

    with pytest.raises(ModelMismatchError, match="same model"):
        _calibrate(fp, fp, filename="tests/bad1")
    from qcorrect.nodes.quantize import QuantizeModel

    (q8,), _ = node_output(QuantizeModel.execute(fp, "W8A8"))
    with pytest.raises(ModelMismatchError, match="qcorrect-quantized"):
        _calibrate(q8, q, filename="tests/bad2")
    with pytest.raises(ModelMismatchError, match="identical weights"):
        _calibrate(fp, tiny_sd15(), filename="tests/bad3")
    assert not list((comfy.models / "qcorrect" / "tests").glob("bad*"))


def test_cancelling_a_calibration_stops_it_and_leaves_no_file(comfy, fp, q):
    from comfy import model_management, utils

    updates = []

    def hook(value, total, preview, node_id=None):
        updates.append((value, total))
        if len(updates) == 3:
            model_management.interrupt_current_processing(True)

    utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            _calibrate(fp, q, "tcec", "tests/cancelled")
    finally:
        utils.set_progress_bar_global_hook(None)
        model_management.interrupt_current_processing(False)
    assert len(updates) == 3  # stopped at the next model call after the interrupt
    assert not (comfy.models / "qcorrect" / "tests" / "cancelled.safetensors").exists()
    assert not list((comfy.models / "qcorrect" / "tests").glob(".tmp-*"))


def test_calibration_reports_progress_up_to_its_total(comfy, fp, q):
    from comfy import utils

    updates = []
    utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: updates.append((v, t)))
    try:
        _calibrate(fp, q, "tcec", "tests/progress")
    finally:
        utils.set_progress_bar_global_hook(None)
    totals = {t for _, t in updates}
    assert len(totals) == 1 and updates[-1][0] == updates[-1][1] and len(updates) >= STEPS


def test_calibration_accepts_a_model_quantized_by_comfyui_fp8(comfy, fp):
    fp8 = tiny_sd15(dtype=torch.float8_e4m3fn)
    (stats, _), _ = _calibrate(fp, fp8, "ptqd", "tests/fp8")
    assert "fp8" in stats.meta.quantization and stats.rows == STEPS


def _zero_stats(comfy, q, sampler="euler"):
    """Statistics of a model without error (the FP callable on both sides), saved and reloaded."""
    from comfy import samplers
    from qcorrect.calibration import CalibrationConfig, EngineConfig, calibrate
    from qcorrect.nodes import patching
    from qcorrect.nodes.sampling import LoadCorrectionStats

    sigmas = samplers.KSampler(q, steps=STEPS, device="cpu", sampler="euler", scheduler="normal").sigmas
    den = lambda x, s, **_: x / (1 + s.reshape(-1, 1, 1, 1) ** 2)  # noqa: E731  (any deterministic denoiser)
    engine = EngineConfig.preset("ptqd_stepbaq")
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    stats = calibrate(den, den, noise, sigmas, {}, engine=engine, config=CalibrationConfig(sampler="euler"),
                      grid_sigmas=q.get_model_object("model_sampling").sigmas,
                      meta={"model_fingerprint": "fp-unknown", "quant_fingerprint": patching.fingerprint(q),
                            "cfg": CFG, "scheduler": "normal"})
    stats.save(str(comfy.models / "qcorrect" / "tests" / "zero.safetensors"))
    return node_output(LoadCorrectionStats.execute("tests/zero.safetensors"))[0][0]


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "heun", "uni_pc"])
@pytest.mark.parametrize("method", ["ptqd", "tcec", "stepbaq", "ptqd_stepbaq", "tac"])
def test_neutral_statistics_reproduce_the_stock_ksampler_exactly(comfy, q, sampler, method):
    from qcorrect.nodes.sampling import CorrectedKSampler

    stats = _zero_stats(comfy, q)
    want = sample(q, seed=3, steps=STEPS, cfg=CFG, sampler=sampler, pos=POS, neg=NEG)
    (got,), text = node_output(CorrectedKSampler.execute(q, 3, STEPS, CFG, sampler, "normal", POS, NEG,
                                                         _latent(1), 1.0, stats, method))
    assert torch.equal(got["samples"], want)
    assert "neutral" in text


def test_every_builtin_sampler_and_scheduler_runs_corrected(comfy, q, tcec_stats):
    import comfy.samplers
    from qcorrect.nodes.sampling import CorrectedKSampler

    stats, _ = tcec_stats
    plain = sample(q, seed=2, steps=STEPS, cfg=CFG, pos=POS, neg=NEG)
    for name in comfy.samplers.KSampler.SAMPLERS:
        (out,), _ = node_output(CorrectedKSampler.execute(q, 2, STEPS, CFG, name, "normal", POS, NEG, _latent(1),
                                                          1.0, stats, "tcec"))
        assert out["samples"].shape == plain.shape and torch.isfinite(out["samples"]).all(), name
    for sched in comfy.samplers.KSampler.SCHEDULERS:
        (out,), _ = node_output(CorrectedKSampler.execute(q, 2, STEPS, CFG, "euler", sched, POS, NEG, _latent(1),
                                                          1.0, stats, "tcec"))
        assert torch.isfinite(out["samples"]).all(), sched
    (corr,), _ = node_output(CorrectedKSampler.execute(q, 2, STEPS, CFG, "euler", "normal", POS, NEG, _latent(1),
                                                       1.0, stats, "tcec"))
    assert not torch.equal(corr["samples"], plain)  # TCEC fitted on a real error changes the result


def test_correction_sampler_in_a_custom_sampling_graph_matches_the_corrected_ksampler(comfy, q, tcec_stats):
    import comfy.sample
    import comfy.samplers
    from qcorrect.nodes.sampling import CorrectedKSampler, CorrectionSampler

    stats, _ = tcec_stats
    (sampler,), text = node_output(CorrectionSampler.execute(comfy.samplers.sampler_object("dpmpp_2m"), stats,
                                                            "tcec", q))
    sigmas = comfy.samplers.KSampler(q, steps=STEPS, device="cpu", sampler="dpmpp_2m", scheduler="karras").sigmas
    lat = _latent(1)["samples"]
    got = comfy.sample.sample_custom(q, comfy.sample.prepare_noise(lat, 4), CFG, sampler, sigmas, POS, NEG, lat,
                                     seed=4)
    (want,), _ = node_output(CorrectedKSampler.execute(q, 4, STEPS, CFG, "dpmpp_2m", "karras", POS, NEG,
                                                       _latent(1), 1.0, stats, "tcec"))
    assert torch.equal(got, want["samples"])


def test_mismatches_are_clear_errors(comfy, fp, q, tcec_stats):
    from qcorrect.calibration import IncompatibleStatsError, StatsFileError
    from qcorrect.nodes.quantize import QuantizeModel
    from qcorrect.nodes.sampling import CorrectedKSampler, LoadCorrectionStats

    stats, _ = tcec_stats
    run = lambda model, latent=None: CorrectedKSampler.execute(  # noqa: E731
        model, 1, STEPS, CFG, "euler", "normal", POS, NEG, latent or _latent(1), 1.0, stats, "tcec")
    with pytest.raises(IncompatibleStatsError, match="full-precision model"):
        run(fp)
    (other,), _ = node_output(QuantizeModel.execute(fp, "W8A8"))
    with pytest.raises(IncompatibleStatsError, match="calibrated for model"):
        run(other)
    with pytest.raises(IncompatibleStatsError, match="channels"):
        run(q, {"samples": torch.ones(1, 16, 8, 8)})  # an empty (all-zero) latent would be resized by ComfyUI
    bad = comfy.models / "qcorrect" / "tests" / "corrupt.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StatsFileError):
        LoadCorrectionStats.execute("tests/corrupt.safetensors")


def test_calibration_refuses_models_of_another_prediction_type(comfy, fp, q):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from qcorrect.nodes.patching import ModelMismatchError

    (v_model,) = ModelSamplingDiscrete().patch(q, "v_prediction", False)
    with pytest.raises(ModelMismatchError, match="prediction types"):
        _calibrate(fp, v_model, filename="tests/bad_v")
    (x0_model,) = ModelSamplingDiscrete().patch(q, "x0", False)
    with pytest.raises(ModelMismatchError, match="not supported"):
        _calibrate(ModelSamplingDiscrete().patch(fp, "x0", False)[0], x0_model, filename="tests/bad_x0")


def test_static_activations_are_calibrated_progressively_on_a_copy(comfy, fp):
    """Quantize Model (Advanced) with static activations → Calibrate Errors calibrates the per-σ
    ranges (PCR) on a copy, returns it with the statistics, and leaves its input uncalibrated."""
    from qcorrect.nodes.quantize import QuantizeModelAdvanced
    from qcorrect.nodes.sampling import CorrectedKSampler
    from qcorrect.quant.activations import ActQuantizer

    (static,), _ = node_output(QuantizeModelAdvanced.execute(fp, "8", "per-channel", True, "8", "static", True, ""))
    (stats, calibrated), text = _calibrate(fp, static, "tcec", "tests/static")
    assert "static activation ranges calibrated progressively" in text
    acts_in = [m for m in static.get_model_object("diffusion_model").modules() if isinstance(m, ActQuantizer)]
    acts_out = [m for m in calibrated.get_model_object("diffusion_model").modules() if isinstance(m, ActQuantizer)]
    assert all(len(a.range_sigmas) == 0 for a in acts_in if a.mode == "static")
    assert any(a.mode == "static" and len(a.range_sigmas) == STEPS for a in acts_out)
    (out,), shown = node_output(CorrectedKSampler.execute(calibrated, 1, STEPS, CFG, "euler", "normal", POS, NEG,
                                                          _latent(1), 1.0, stats, "tcec"))
    assert torch.isfinite(out["samples"]).all() and "tcec" in shown
    with pytest.raises(Exception, match="calibrated for model"):  # the uncalibrated input is another model
        CorrectedKSampler.execute(static, 1, STEPS, CFG, "euler", "normal", POS, NEG, _latent(1), 1.0, stats, "tcec")
