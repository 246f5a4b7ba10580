"""End-to-end check of a calibration and the "auto" default (calibration/validate.py)."""

import dataclasses

import pytest
import torch

from qcorrect.calibration import CalibrationConfig, CalibrationError, CorrectionStats, EngineConfig, calibrate
from qcorrect.calibration.validate import auto_config, end_to_end_check, with_validation
from qcorrect.reference.samplers import sample_euler, sample_euler_ancestral


def _tcec_stats(synth, q, sampler="euler", n=24):
    sig = synth.sigmas(10)
    return calibrate(synth.fp, q, synth.noise(n, 0), sig, engine=EngineConfig(tcec=True),
                     config=CalibrationConfig(sampler=sampler, batch_size=8), grid_sigmas=synth.grid), sig


def test_check_measures_a_real_gain_and_auto_keeps_the_correction(synth):
    q = synth.InjectedError(synth.fp, gain=[1.2, 0.9, 1.1, 1.15])  # a pure per-channel gain: TCEC removes it
    stats, sig = _tcec_stats(synth, q)
    x = synth.noise(12, 1) * sig[0]
    check = end_to_end_check(synth.fp, q, stats, EngineConfig(tcec=True), sample_euler, x, sig,
                             sampler_name="euler", batch_size=5)
    assert check["n"] == 12 and check["methods"] == ["tcec"]
    assert check["naive_mse"] > 0 and check["corrected_mse"] < 0.05 * check["naive_mse"]
    assert check["gap_closed"] == pytest.approx(1 - check["corrected_mse"] / check["naive_mse"])
    assert check["gap_closed_low"] <= check["gap_closed"] <= check["gap_closed_high"]
    assert check["gap_closed_low"] > 0.5
    cfg, why = auto_config(with_validation(stats, check))
    assert cfg.tcec and "correcting" in why


def test_gap_bootstrap_bounds():
    from qcorrect.calibration.validate import gap_bootstrap
    naive = torch.rand(200, generator=torch.Generator().manual_seed(0)) + 0.5
    lo, hi = gap_bootstrap(naive * 0.7, naive)  # every sample 30% better: no spread at all
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    noise = torch.randn(200, generator=torch.Generator().manual_seed(1)) * 0.3
    lo, hi = gap_bootstrap(naive * (1 + noise), naive)  # zero-mean change: bounds straddle 0
    assert lo < 0 < hi


def test_auto_falls_back_to_no_correction_when_the_check_shows_harm(synth, tmp_path):
    q = synth.InjectedError(synth.fp, gain=[1.2, 0.9, 1.1, 1.15])
    stats, sig = _tcec_stats(synth, q)
    # the same statistics judged against a model they do not describe: the "correction" hurts
    other = synth.InjectedError(synth.fp)
    check = end_to_end_check(synth.fp, other, stats, EngineConfig(tcec=True), sample_euler, synth.noise(8, 2) * sig[0],
                             sig, sampler_name="euler")
    assert check["naive_mse"] == 0.0 or check["gap_closed"] < 0
    checked = with_validation(stats, check)
    cfg, why = auto_config(checked)
    assert not cfg.any_enabled and "uncorrected" in why
    # the check travels with the file
    path = tmp_path / "s.safetensors"
    checked.save(path)
    back = CorrectionStats.load(path)
    assert back.meta.validation["gap_closed"] == pytest.approx(check["gap_closed"])
    assert not auto_config(back)[0].any_enabled


def test_auto_without_a_check_or_with_another_methods_check_is_uncorrected(synth):
    stats, _ = _tcec_stats(synth, synth.q, n=8)
    assert not auto_config(stats)[0].any_enabled
    fake = {"methods": ["ptqd"], "sampler": "euler", "n": 8, "naive_mse": 1.0, "corrected_mse": 0.5, "gap_closed": 0.5,
            "gap_closed_low": 0.4}
    cfg, why = auto_config(with_validation(stats, fake))
    assert not cfg.any_enabled and "not tcec" in why


def test_ancestral_runs_share_noise_so_an_identity_correction_matches_naive(synth):
    stats, sig = _tcec_stats(synth, synth.q, sampler="euler_ancestral", n=8)
    # a zero gain table makes the engine an identity: corrected must equal naive exactly
    zero = CorrectionStats(stats.sigma, stats.sigma_next, {k: torch.zeros_like(v) for k, v in stats.sums.items()},
                           stats.meta, stats.grid_sigmas)
    check = end_to_end_check(synth.fp, synth.q, zero, EngineConfig(tcec=True), sample_euler_ancestral,
                             synth.noise(6, 3) * sig[0], sig, sampler_name="euler_ancestral", batch_size=4, seed=5)
    assert check["naive_mse"] > 0
    assert check["corrected_mse"] == pytest.approx(check["naive_mse"], rel=1e-6)


def test_merge_drops_the_check_and_bad_input_is_refused(synth):
    stats, sig = _tcec_stats(synth, synth.q, n=8)
    checked = with_validation(stats, {"methods": ["tcec"], "n": 8, "gap_closed": 0.1})
    assert checked.merge(checked).meta.validation == {}
    with pytest.raises(CalibrationError, match="at least one"):
        end_to_end_check(synth.fp, synth.q, stats, EngineConfig(tcec=True), sample_euler,
                         torch.zeros(0, 4, 8, 8), sig, sampler_name="euler")
    with pytest.raises(ValueError, match="validation"):
        type(stats.meta).from_metadata({**stats.meta.to_metadata(), "qcorrect.validation": "[1, 2]"})
    assert dataclasses.replace(stats.meta).validation == {}
