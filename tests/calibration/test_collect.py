"""The lock-step collector: modes, ordering, shared noise, cost, progress and bad input."""

import pytest
import torch

from qcorrect.calibration import CalibrationConfig, CalibrationError, EngineConfig, calibrate
from qcorrect.calibration.moments import latent_moments
from qcorrect.calibration.stepbaq import stepback_decisions
from qcorrect.calibration.tac import input_bias


class Counting:
    def __init__(self, model):
        self.model, self.calls, self.samples = model, 0, 0

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        self.samples += x.shape[0]
        return self.model(x, sigma, **extra)


def test_empty_calibration_set_is_a_clear_error(synth):
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(synth.fp, synth.q, torch.zeros(0, 4, 8, 8), synth.sigmas(5))
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(synth.fp, synth.q, None, synth.sigmas(5))
    with pytest.raises(CalibrationError, match="two σ"):
        calibrate(synth.fp, synth.q, synth.noise(2, 0), torch.tensor([1.0]))


def test_conditioning_batch_mismatch_is_a_clear_error(synth):
    with pytest.raises(CalibrationError, match="batch 3"):
        calibrate(synth.fp, synth.q, synth.noise(4, 0), synth.sigmas(5), {"cond": torch.arange(3)})


def test_conditioning_is_split_per_sample(synth):
    seen = []

    def fp(x, sigma, cond=None, cfg_scale=None):
        seen.append((x.shape[0], cond.tolist(), cfg_scale))
        return synth.fp(x, sigma)

    stats = calibrate(fp, synth.q, synth.noise(5, 0), synth.sigmas(3), {"cond": torch.arange(5), "cfg_scale": 3.0},
                      engine=EngineConfig(), config=CalibrationConfig(batch_size=2))
    assert seen[:3] == [(2, [0, 1], 3.0), (2, [2, 3], 3.0), (1, [4], 3.0)]
    assert stats.meta.cfg == 3.0 and stats.meta.n_samples == 5


def test_non_finite_model_output_is_a_clear_error(synth):
    def broken(x, sigma, **extra):
        return x * float("nan")

    with pytest.raises(CalibrationError, match="NaN"):
        calibrate(synth.fp, broken, synth.noise(2, 0), synth.sigmas(3))


def test_progress_hook_is_called_every_step(synth):
    calls = []
    calibrate(synth.fp, synth.q, synth.noise(4, 0), synth.sigmas(7), progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 7) for i in range(1, 8)]


def test_cost_is_at_most_three_evaluations_per_sample_and_step(synth):
    fp, q = Counting(synth.fp), Counting(synth.q)
    calibrate(fp, q, synth.noise(8, 0), synth.sigmas(6), engine=EngineConfig.preset("ptqd_stepbaq"),
              config=CalibrationConfig(batch_size=4), grid_sigmas=synth.grid)
    assert q.samples == 8 * 6 and fp.samples <= 2 * 8 * 6
    assert fp.samples < 2 * 8 * 6  # the FP evaluation is shared while both trajectories coincide
    fp, q = Counting(synth.fp), Counting(synth.q)
    calibrate(fp, q, synth.noise(8, 0), synth.sigmas(6), engine=EngineConfig.preset("ptqd"),
              config=CalibrationConfig(mode="teacher_forced"))
    assert q.samples == fp.samples == 8 * 6  # teacher-forced, no latent method: two evaluations


def test_modes_measure_different_trajectories(synth):
    noise, sig = synth.noise(16, 0), synth.sigmas(6)
    tf = calibrate(synth.fp, synth.q, noise, sig, engine=EngineConfig.preset("ptqd"),
                   config=CalibrationConfig(mode="teacher_forced"))
    pr = calibrate(synth.fp, synth.q, noise, sig, engine=EngineConfig(), config=CalibrationConfig(mode="progressive"))
    # step 0 is evaluated on the same latent in both modes; later rows differ (drifted trajectory)
    torch.testing.assert_close(tf.sums["eps_sum_q"][0], pr.sums["eps_sum_q"][0])
    assert not torch.allclose(tf.sums["eps_sum_fp"][3], pr.sums["eps_sum_fp"][3])
    assert tf.meta.mode == "teacher_forced" and pr.meta.mode == "progressive"


def test_ancestral_noise_draws_are_shared(synth):
    """With Q = FP the two trajectories stay identical under Euler-ancestral: same noise draws."""
    stats = calibrate(synth.fp, synth.fp, synth.noise(4, 0), synth.sigmas(6), engine=EngineConfig.preset("stepbaq"),
                      config=CalibrationConfig(sampler="euler_ancestral"), grid_sigmas=synth.grid)
    assert float(stats.sums["lat_sq"].abs().max()) == 0.0


def test_progressive_order_output_correction_before_stepbaq(synth):
    """§8.2: StepbaQ measures the latent error left *after* the output correction, so with PTQD
    active the measured latent error (and the stepbacks) shrink."""
    noise, sig = synth.noise(16, 0), synth.sigmas(8)
    alone = calibrate(synth.fp, synth.q, noise, sig, engine=EngineConfig.preset("stepbaq"), grid_sigmas=synth.grid)
    on_top = calibrate(synth.fp, synth.q, noise, sig, engine=EngineConfig.preset("ptqd_stepbaq"), grid_sigmas=synth.grid)
    m_alone, v_alone = latent_moments(alone)
    m_top, v_top = latent_moments(on_top)
    assert float(m_top.abs().sum()) < 0.3 * float(m_alone.abs().sum())
    assert int(stepback_decisions(on_top)[1].sum()) <= int(stepback_decisions(alone)[1].sum())


def test_acc_off_measures_one_step_errors(synth):
    noise, sig = synth.noise(8, 0), synth.sigmas(8)
    q = synth.InjectedError(synth.fp, bias=synth.bias)
    on = calibrate(synth.fp, q, noise, sig, engine=EngineConfig.preset("stepbaq"), grid_sigmas=synth.grid)
    off = calibrate(synth.fp, q, noise, sig, engine=EngineConfig.preset("stepbaq"),
                    config=CalibrationConfig(acc=False), grid_sigmas=synth.grid)
    m_on, m_off = latent_moments(on)[0], latent_moments(off)[0]
    s = sig.double()
    for n in range(1, 8):  # without ACC each row holds only the last step's error h·b
        torch.testing.assert_close(m_off[n], (s[n] - s[n - 1]) * synth.bias.double(), atol=1e-5, rtol=1e-4)
    assert float(m_on[3].abs().sum()) > float(m_off[3].abs().sum())  # ACC: errors add up


def test_ibc_is_fitted_progressively(synth):
    """TAC IBC: with b_n removed at every step, the next row only sees one new step of bias."""
    noise, sig = synth.noise(8, 0), synth.sigmas(8)
    q = synth.InjectedError(synth.fp, bias=synth.bias)
    stats = calibrate(synth.fp, q, noise, sig, engine=EngineConfig(tac_ibc=True), grid_sigmas=synth.grid)
    b = input_bias(stats)
    s = sig.double()
    torch.testing.assert_close(b[1], (s[1] - s[0]) * synth.bias.double(), atol=1e-5, rtol=1e-4)
    assert stats.meta.latent_method == "ibc"
    assert float(b[2:].abs().max()) < float(b[1].abs().max())


def test_unknown_sampler_and_mode_are_refused(synth):
    with pytest.raises(CalibrationError, match="collector steps"):
        calibrate(synth.fp, synth.q, synth.noise(2, 0), synth.sigmas(3), config=CalibrationConfig(sampler="heun"))
    with pytest.raises(CalibrationError, match="mode"):
        calibrate(synth.fp, synth.q, synth.noise(2, 0), synth.sigmas(3), config=CalibrationConfig(mode="fast"))
