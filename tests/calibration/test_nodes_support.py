"""Library pieces the ComfyUI nodes rely on: neutral statistics are exact, the starting latent, the
method table, checks with deterministic samplers that take no noise sampler."""

import pytest
import torch

from qcorrect.calibration import CalibrationConfig, CalibrationError, CorrectionEngine, EngineConfig, calibrate
from qcorrect.calibration.methods import METHODS, USER_METHODS, calibration_engine, sampling_engine
from qcorrect.calibration.validate import calibrate_checked, end_to_end_check
from qcorrect.reference.samplers import SAMPLERS


@pytest.mark.parametrize("preset", ["ptqd", "tcec", "stepbaq", "ptqd_stepbaq", "tac"])
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "heun"])
def test_statistics_of_an_error_free_model_give_exactly_the_plain_sampler(synth, preset, sampler):
    sigmas = synth.sigmas(8)
    noise = synth.noise(4, 0)
    cfg = EngineConfig.preset(preset)
    stats = calibrate(synth.fp, synth.fp, noise, sigmas, {}, engine=cfg, config=CalibrationConfig(sampler="euler"),
                      grid_sigmas=synth.grid)
    x = synth.noise(2, 1) * sigmas[0]
    engine = CorrectionEngine(stats, cfg)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    got = engine.sample(SAMPLERS[sampler], synth.fp, x, sigmas, {}, None, True, sampler_name=sampler,
                        generator=gen()) if sampler == "euler_ancestral" else \
        engine.sample(SAMPLERS[sampler], synth.fp, x, sigmas, {}, None, True, sampler_name=sampler)
    want = SAMPLERS[sampler](synth.fp, x, sigmas, {}, None, True, **({"generator": gen()} if sampler ==
                                                                    "euler_ancestral" else {}))
    assert engine.last_plan.identity
    assert torch.equal(got, want)


def test_a_real_error_is_not_mistaken_for_neutral_statistics(synth):
    sigmas = synth.sigmas(8)
    stats = calibrate(synth.fp, synth.q, synth.noise(8, 0), sigmas, {}, engine=EngineConfig.preset("ptqd"),
                      config=CalibrationConfig(sampler="euler"), grid_sigmas=synth.grid)
    engine = CorrectionEngine(stats, EngineConfig.preset("ptqd"))
    x = synth.noise(2, 1) * sigmas[0]
    out = engine.sample(SAMPLERS["euler"], synth.q, x, sigmas, {}, None, True, sampler_name="euler")
    assert not engine.last_plan.identity
    assert not torch.equal(out, SAMPLERS["euler"](synth.q, x, sigmas, {}, None, True))


def test_calibration_starts_from_the_given_latent(synth):
    sigmas = synth.sigmas(6)
    noise = synth.noise(4, 0)
    cfg, conf = EngineConfig.preset("ptqd_stepbaq"), CalibrationConfig(sampler="euler")
    default = calibrate(synth.fp, synth.q, noise, sigmas, {}, engine=cfg, config=conf, grid_sigmas=synth.grid)
    same = calibrate(synth.fp, synth.q, noise, sigmas, {}, engine=cfg, config=conf, grid_sigmas=synth.grid,
                     x_init=noise * sigmas[0])
    shifted = calibrate(synth.fp, synth.q, noise, sigmas, {}, engine=cfg, config=conf, grid_sigmas=synth.grid,
                        x_init=noise * sigmas[0] + 0.7)
    assert all(torch.equal(default.sums[k], same.sums[k]) for k in default.sums)
    assert not torch.equal(default.sums["eps_sum_fp"], shifted.sums["eps_sum_fp"])
    with pytest.raises(CalibrationError, match="x_init has shape"):
        calibrate(synth.fp, synth.q, noise, sigmas, {}, engine=cfg, config=conf, x_init=noise[:2])


def test_checked_calibration_can_start_from_the_samplers_latent(synth):
    sigmas = synth.sigmas(6)
    noise = synth.noise(8, 0)
    cfg = EngineConfig.preset("tcec")
    start = noise * (1 + sigmas[0] ** 2).sqrt()
    kw = dict(engine=cfg, sample_fn=SAMPLERS["euler"], sampler_name="euler", x_init=start, folds=2,
              config=CalibrationConfig(sampler="euler", batch_size=4), grid_sigmas=synth.grid)
    a = calibrate_checked(synth.fp, synth.q, noise, sigmas, {}, **kw)
    b = calibrate_checked(synth.fp, synth.q, noise, sigmas, {}, calibrate_from_x_init=True, **kw)
    by_hand = calibrate(synth.fp, synth.q, noise[:4], sigmas, {}, engine=cfg, config=kw["config"],
                        grid_sigmas=synth.grid, x_init=start[:4])
    assert not torch.equal(a.sums["eps_sum_fp"], b.sums["eps_sum_fp"])
    assert torch.allclose(b.sums["eps_count"], 2 * by_hand.sums["eps_count"])
    assert a.meta.validation["folds"] == b.meta.validation["folds"] == 2


def test_end_to_end_check_runs_deterministic_samplers_that_take_no_noise_sampler(synth):
    def strict_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):  # ComfyUI's signature
        return SAMPLERS["euler"](model, x, sigmas, extra_args, callback, disable)
    sigmas = synth.sigmas(6)
    noise = synth.noise(4, 0)
    stats = calibrate(synth.fp, synth.q, noise, sigmas, {}, engine=EngineConfig.preset("tcec"),
                      config=CalibrationConfig(sampler="euler"))
    check = end_to_end_check(synth.fp, synth.q, stats, EngineConfig.preset("tcec"), strict_euler, noise * sigmas[0],
                             sigmas, {}, sampler_name="euler")
    assert check["n"] == 4 and check["naive_mse"] > 0


def test_method_table_serves_the_nodes_and_the_benchmarks():
    assert set(USER_METHODS) <= set(METHODS) and USER_METHODS[0] == "auto"
    engine, acc = calibration_engine("auto")
    assert engine == EngineConfig.preset("tcec") and acc
    assert calibration_engine("stepbaq_tia")[1] is False  # the ablation calibrates without ACC
    cfg, reason = sampling_engine("ptqd")
    assert cfg.output_method == "ptqd" and "as chosen" in reason
    assert not sampling_engine("none")[0].any_enabled
    with pytest.raises(ValueError, match="needs the statistics"):
        sampling_engine("auto")
    with pytest.raises(ValueError, match="unknown method"):
        calibration_engine("magic")
