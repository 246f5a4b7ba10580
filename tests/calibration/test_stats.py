"""Statistics: merging, safetensors round trip, fingerprints and every bad-file case."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcorrect.calibration import (CalibrationConfig, CorrectionEngine, CorrectionStats, EngineConfig,
                                  IncompatibleStatsError, StatsError, StatsFileError, calibrate, model_fingerprint)

TF = CalibrationConfig(mode="teacher_forced", batch_size=8)


@pytest.fixture(scope="module")
def stats(synth):
    cfg = EngineConfig.preset("ptqd_stepbaq")
    return calibrate(synth.fp, synth.q, synth.noise(16, 3), synth.sigmas(6), engine=cfg,
                     config=CalibrationConfig(batch_size=8), grid_sigmas=synth.grid,
                     meta={"model_fingerprint": "fp-abc", "quant_fingerprint": "q-def", "quantization": "W4A8"})


def test_merge_equals_concatenated_calibration(synth):
    noise = synth.noise(24, 4)
    sig = synth.sigmas(5)
    for engine, config in ((EngineConfig(), CalibrationConfig(batch_size=8)), (EngineConfig.preset("ptqd"), TF)):
        whole = calibrate(synth.fp, synth.q, noise, sig, engine=engine, config=config)
        a = calibrate(synth.fp, synth.q, noise[:16], sig, engine=engine, config=config)
        b = calibrate(synth.fp, synth.q, noise[16:], sig, engine=engine, config=config)
        merged = a.merge(b)
        assert merged.meta.n_samples == 24
        for k, v in whole.sums.items():
            torch.testing.assert_close(merged.sums[k], v, rtol=1e-10, atol=1e-9)


def test_merge_refuses_other_configuration(synth, stats):
    other = calibrate(synth.fp, synth.q, synth.noise(4, 5), synth.sigmas(6), engine=EngineConfig.preset("ptqd_stepbaq"),
                      config=CalibrationConfig(batch_size=8, sampler="euler_ancestral"), grid_sigmas=synth.grid,
                      meta={"model_fingerprint": "fp-abc", "quant_fingerprint": "q-def", "quantization": "W4A8"})
    with pytest.raises(IncompatibleStatsError, match="sampler"):
        stats.merge(other)


def test_save_load_round_trip_is_exact(stats, tmp_path):
    path = tmp_path / "s.safetensors"
    stats.save(path)
    back = CorrectionStats.load(path, expect_fingerprint="q-def", expect_prediction="eps", expect_channels=4)
    for k, v in stats.tensors().items():
        assert torch.equal(back.tensors()[k], v), k
    assert back.meta.merge_key() == stats.meta.merge_key() and back.meta.n_samples == 16
    assert back.meta.methods == ("ptqd_cnc", "ptqd_bc", "stepbaq_la", "stepbaq_tia", "stepbaq_ssa")
    assert [f for f in os.listdir(tmp_path) if f != "s.safetensors"] == []  # no temporary file left


def test_save_is_atomic_when_interrupted(stats, tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    stats.save(path)
    before = path.read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        stats.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.safetensors"]


def test_fingerprint_mismatch_is_refused(stats, tmp_path):
    path = tmp_path / "s.safetensors"
    stats.save(path)
    with pytest.raises(IncompatibleStatsError, match="run the calibration for this model"):
        CorrectionStats.load(path, expect_fingerprint="someone-else")
    with pytest.raises(IncompatibleStatsError, match="prediction"):
        CorrectionStats.load(path, expect_prediction="v")
    with pytest.raises(IncompatibleStatsError, match="channels"):
        CorrectionStats.load(path, expect_channels=16)
    with pytest.raises(IncompatibleStatsError):
        CorrectionEngine(stats, fingerprint="someone-else")


def test_model_fingerprint_tracks_weights():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Conv2d(2, 2, 3))
    b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Conv2d(2, 2, 3))
    assert model_fingerprint(a) == model_fingerprint(a)
    assert model_fingerprint(a) != model_fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)


def test_non_finite_file_is_refused(stats, tmp_path):
    path = tmp_path / "nan.safetensors"
    stats.save(path)
    tensors, md = load_file(path), None
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        md = f.metadata()
    tensors["sums.eps_sum_q"][2, 1] = float("nan")
    save_file(tensors, path, metadata=md)
    with pytest.raises(StatsFileError, match="NaN or inf"):
        CorrectionStats.load(path)
    with pytest.raises(StatsFileError):
        stats_inf = CorrectionStats(stats.sigma, stats.sigma_next, {**stats.sums, "lat_sq": stats.sums["lat_sq"] + float("inf")})
        stats_inf.save(tmp_path / "inf.safetensors")


def test_truncated_corrupt_and_foreign_files_are_refused(stats, tmp_path):
    path = tmp_path / "s.safetensors"
    stats.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StatsFileError, match="truncated or corrupt"):
        CorrectionStats.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(StatsFileError):
        CorrectionStats.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(StatsFileError, match="not a qcorrect statistics file"):
        CorrectionStats.load(tmp_path / "foreign.safetensors")
    with pytest.raises(StatsFileError, match="does not exist"):
        CorrectionStats.load(tmp_path / "missing.safetensors")
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        md = dict(f.metadata())
    md["qcorrect.version"] = "99"
    save_file(tensors, tmp_path / "future.safetensors", metadata=md)
    with pytest.raises(StatsFileError, match="version 99"):
        CorrectionStats.load(tmp_path / "future.safetensors")
    md["qcorrect.version"] = "1"
    tensors["sums.eps_cross"] = tensors["sums.eps_cross"][:, :2].contiguous()
    save_file(tensors, tmp_path / "shape.safetensors", metadata=md)
    with pytest.raises(StatsFileError, match="shape"):
        CorrectionStats.load(tmp_path / "shape.safetensors")
    tensors = load_file(path)
    tensors["sigma"] = tensors["sigma"].float()
    save_file(tensors, tmp_path / "dtype.safetensors", metadata=md)
    with pytest.raises(StatsFileError, match="float64"):
        CorrectionStats.load(tmp_path / "dtype.safetensors")


def test_metadata_is_namespaced_and_readable(stats, tmp_path):
    path = tmp_path / "s.safetensors"
    stats.save(path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        md = f.metadata()
    assert all(k.startswith("qcorrect.") for k in md)
    for key in ("version", "model_fingerprint", "quantization", "prediction", "sampler", "scheduler", "steps", "cfg",
                "denoise", "n_samples", "methods"):
        assert f"qcorrect.{key}" in md
    assert json.loads(md["qcorrect.steps"]) == 6 and json.loads(md["qcorrect.quantization"]) == "W4A8"


def test_merge_warns_when_stepback_path_changes(synth):
    cfg = EngineConfig.preset("stepbaq")
    sig = synth.sigmas(6)
    big = synth.InjectedError(synth.fp, bias=synth.bias, noise=0.05)
    a = calibrate(synth.fp, big, synth.noise(4, 6), sig, engine=cfg, grid_sigmas=synth.grid)
    b = CorrectionStats(a.sigma, a.sigma_next, {k: torch.zeros_like(v) if k.startswith("lat") else v
                                                for k, v in a.sums.items()}, a.meta, a.grid_sigmas)
    b.sums["lat_count"] += a.sums["lat_count"] * 1000  # a huge set with no latent error
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a.merge(b)
    assert any("stepbacks" in str(x.message) for x in w)


def test_invalid_rows_are_rejected():
    with pytest.raises(StatsError, match="descending"):
        CorrectionStats.empty(torch.tensor([1.0, 2.0, 0.0]), 4)
    with pytest.raises(StatsError):
        CorrectionStats.empty(torch.tensor([1.0]), 4)
