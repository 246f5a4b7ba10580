"""End-to-end check of a calibration and the "auto" default (calibration/validate.py)."""

import dataclasses

import pytest
import torch

from qcorrect.calibration import CalibrationConfig, CalibrationError, CorrectionStats, EngineConfig, calibrate
from qcorrect.calibration.validate import (auto_config, calibrate_checked, end_to_end_check, fold_slices, leave_one_out,
                                          with_validation)
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
    assert check["gap_closed_low"] > 0.5 and check["folds"] == 1
    # an in-sample check is reported, not trusted
    cfg, why = auto_config(with_validation(stats, check))
    assert not cfg.any_enabled and "in-sample" in why


def test_calibrate_checked_cross_fits_and_auto_keeps_a_real_gain(synth):
    q = synth.InjectedError(synth.fp, gain=[1.2, 0.9, 1.1, 1.15])
    sig = synth.sigmas(10)
    ticks = []
    stats = calibrate_checked(synth.fp, q, synth.noise(24, 0), sig, engine=EngineConfig(tcec=True),
                              sample_fn=sample_euler, sampler_name="euler", folds=4,
                              config=CalibrationConfig(batch_size=8), grid_sigmas=synth.grid,
                              progress=lambda i, tot: ticks.append((i, tot)))
    check = stats.meta.validation
    assert check["folds"] == 4 and check["n"] == 24 and stats.meta.n_samples == 24 and check["level"] == 0.99
    assert len(check["fold_gaps"]) == 4 and min(check["fold_gaps"]) > 0.5
    assert ticks[-1] == (40, 40) and len(ticks) == 40
    assert check["corrected_mse"] < 0.05 * check["naive_mse"] and check["gap_closed_low"] > 0.5
    cfg, why = auto_config(stats)
    assert cfg.tcec and "correcting" in why and "4 folds" in why


def test_folds_merge_to_the_whole_set_statistics(synth):
    # teacher-forced euler, no latent correction: every sample's trajectory is independent of the
    # others, so the merged folds must equal one calibration of the whole set
    sig = synth.sigmas(8)
    noise = synth.noise(10, 4)
    cfg = CalibrationConfig(mode="teacher_forced", batch_size=4)
    whole = calibrate(synth.fp, synth.q, noise, sig, engine=EngineConfig(tcec=True), config=cfg, grid_sigmas=synth.grid)
    checked = calibrate_checked(synth.fp, synth.q, noise, sig, engine=EngineConfig(tcec=True), sample_fn=sample_euler,
                                sampler_name="euler", folds=3, config=cfg, grid_sigmas=synth.grid)
    for k, v in whole.sums.items():
        torch.testing.assert_close(checked.sums[k], v, rtol=1e-9, atol=1e-9, msg=k)
    assert checked.meta.n_samples == 10 and checked.meta.validation["folds"] == 3


def test_fold_slices_and_leave_one_out(synth):
    sl = fold_slices(10, 4)
    assert len(sl) == 4 and sl[0].start == 0 and sl[-1].stop == 10
    assert all(a.stop == b.start for a, b in zip(sl, sl[1:])) and {s.stop - s.start for s in sl} <= {2, 3}
    assert len(fold_slices(3, 8)) == 3 and all(s.stop - s.start == 1 for s in fold_slices(3, 8))
    a, _ = _tcec_stats(synth, synth.q, n=4)
    b, _ = _tcec_stats(synth, synth.InjectedError(synth.fp, bias=synth.bias), n=4)
    loo = leave_one_out([a, b, a])
    assert [s.meta.n_samples for s in loo] == [8, 8, 8]
    for k in ("eps_count", "eps_sum_q", "eps_cross"):
        torch.testing.assert_close(loo[0].sums[k], (b.merge(a)).sums[k])
        torch.testing.assert_close(loo[1].sums[k], 2 * a.sums[k])
    with pytest.raises(CalibrationError, match="two folds"):
        leave_one_out([a])


def test_each_fold_is_corrected_with_the_other_folds_statistics(synth):
    q = synth.InjectedError(synth.fp, gain=[1.2, 0.9, 1.1, 1.15])
    good, sig = _tcec_stats(synth, q, n=6)
    zero = CorrectionStats(good.sigma, good.sigma_next, {k: torch.zeros_like(v) for k, v in good.sums.items()},
                           good.meta, good.grid_sigmas)  # an identity correction
    x = synth.noise(12, 5) * sig[0]
    run = dict(sampler_name="euler", batch_size=4)
    check = end_to_end_check(synth.fp, q, [good, zero], EngineConfig(tcec=True), sample_euler, x, sig, **run)
    # fold 0 (samples 0-5) is corrected with fold 1's statistics (identity) and vice versa
    f0 = end_to_end_check(synth.fp, q, zero, EngineConfig(tcec=True), sample_euler, x[:6], sig, **run)
    f1 = end_to_end_check(synth.fp, q, good, EngineConfig(tcec=True), sample_euler, x[6:], sig, **run)
    assert f0["corrected_mse"] == pytest.approx(f0["naive_mse"], rel=1e-6) and f1["corrected_mse"] < f1["naive_mse"]
    assert check["folds"] == 2
    assert check["fold_gaps"][0] == pytest.approx(f0["gap_closed"], abs=1e-6)
    assert check["fold_gaps"][1] == pytest.approx(f1["gap_closed"], rel=1e-6)
    assert check["corrected_mse"] == pytest.approx((f0["corrected_mse"] + f1["corrected_mse"]) / 2, rel=1e-6)
    assert check["naive_mse"] == pytest.approx((f0["naive_mse"] + f1["naive_mse"]) / 2, rel=1e-6)
    with pytest.raises(CalibrationError, match="fold order"):
        end_to_end_check(synth.fp, q, [good, zero], EngineConfig(tcec=True), sample_euler, x[:10], sig, **run)


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
