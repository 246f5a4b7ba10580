"""The engine: bit-identity when off, exact StepbaQ/VSC updates, error reduction, transfer, bad input."""

import warnings

import pytest
import torch

from qcorrect.calibration import (CalibrationConfig, CorrectionEngine, EngineConfig, IncompatibleStatsError,
                                  StepCorrector, build_plan, calibrate)
from qcorrect.calibration.ptqd import ptqd_params, vsc_ancestral_step
from qcorrect.reference.samplers import SAMPLERS

SEED_CAL, SEED_TEST = 11, 12


def _mse(a, b):
    return float((a - b).pow(2).mean())


def _cal(synth, preset, sampler="euler", steps=10, n=32, **kw):
    cfg = EngineConfig.preset(preset, **kw)
    stats = calibrate(synth.fp, synth.q, synth.noise(n, SEED_CAL), synth.sigmas(steps), engine=cfg,
                      config=CalibrationConfig(sampler=sampler, batch_size=16), grid_sigmas=synth.grid)
    return stats, cfg


def _quiet(fn, *a, **k):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(*a, **k)
    return out, [str(x.message) for x in w]


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "heun"])
def test_all_switches_off_is_bit_identical(synth, sampler):
    stats, _ = _cal(synth, "ptqd", steps=6, n=8)
    x = synth.noise(4, SEED_TEST) * synth.sigmas(6)[0]
    plain = SAMPLERS[sampler](synth.q, x, synth.sigmas(6), seed=3)
    engine = CorrectionEngine(stats, EngineConfig())
    assert torch.equal(engine.wrap(SAMPLERS[sampler])(synth.q, x, synth.sigmas(6), seed=3), plain)


def test_ssa_with_euler_is_stepbaqs_update(synth):
    """x_{n+1} = (x_n − μ_n) + (σ_{n+1} − σ_τ,n)·ε̃(x_n − μ_n, σ_τ,n), ε̃ = PTQD-corrected (§3c, §8.3)."""
    stats, cfg = _cal(synth, "ptqd_stepbaq")
    sig = synth.sigmas(10)
    plan = build_plan(stats, cfg, sig)
    assert bool((plan.sigma_tau > sig[:-1]).any()), "the synthetic error must trigger a stepback"
    p = ptqd_params(stats)
    x0 = synth.noise(8, SEED_TEST) * sig[0]
    x = x0.clone()
    for n in range(10):
        mu, tau = plan.lat_shift[n].view(1, -1, 1, 1), plan.sigma_tau[n]
        x_in = x - mu
        eps = (x_in - synth.q(x_in, tau.expand(8))) / tau
        eps = (eps - p.bias[n].float().view(1, -1, 1, 1)) / (1 + float(p.k[n]))
        x = x_in + (sig[n + 1] - tau) * eps
    out = CorrectionEngine(stats, cfg).sample(SAMPLERS["euler"], synth.q, x0, sig)
    torch.testing.assert_close(out, x, atol=2e-5, rtol=1e-5)


def test_ancestral_ssa_and_vsc_follow_their_equations(synth):
    """Euler-a: x ← x_in + (σ_down' − σ_start)·ε̃ + σ_up'·z with (σ_down', σ_up') from VSC (§2c.2)
    and σ_start = σ_τ under SSA (StepbaQ Appendix C)."""
    sig = synth.sigmas(8)
    zs = [torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(100 + i)) for i in range(8)]
    for preset in ("ptqd_vsc", "ptqd_stepbaq"):
        stats, cfg = _cal(synth, preset, sampler="euler_ancestral", steps=8)
        plan = build_plan(stats, cfg, sig, sampler="euler_ancestral")
        p = ptqd_params(stats)
        x0 = synth.noise(4, SEED_TEST) * sig[0]
        x = x0.clone()
        for n in range(8):
            mu = torch.zeros(1, 4, 1, 1) if plan.lat_shift is None else plan.lat_shift[n].view(1, -1, 1, 1)
            tau = sig[n] if plan.sigma_tau is None else plan.sigma_tau[n]
            x_in = x - mu
            eps = (x_in - synth.q(x_in, tau.expand(4))) / tau
            eps = (eps - p.bias[n].float().view(1, -1, 1, 1)) / (1 + float(p.k[n]))
            resid = p.residual_std[n].float() if cfg.ptqd_vsc else torch.tensor(0.0)
            down, up, down_v, up_v = vsc_ancestral_step(sig[n], sig[n + 1], 1.0, resid)
            x = x_in + (down_v - tau) * eps + (up_v * zs[n] if float(down) > 0 else 0)
        it = iter(zs)
        out = CorrectionEngine(stats, cfg).sample(SAMPLERS["euler_ancestral"], synth.q, x0, sig,
                                                  noise_sampler=lambda s, sn: next(it))
        torch.testing.assert_close(out, x, atol=5e-5, rtol=1e-5)
        if cfg.ptqd_vsc:
            assert float(p.residual_std.max()) > 0


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m"])
@pytest.mark.parametrize("preset", ["ptqd", "tac", "tcec", "stepbaq", "ptqd_stepbaq"])
def test_corrections_reduce_error_to_fp_on_held_out_seeds(synth, sampler, preset):
    stats, cfg = _cal(synth, preset, sampler=sampler)
    sig = synth.sigmas(10)
    x0 = synth.noise(32, SEED_TEST) * sig[0]
    fn = SAMPLERS[sampler]
    ref, naive = fn(synth.fp, x0, sig, seed=5), fn(synth.q, x0, sig, seed=5)
    out, msgs = _quiet(CorrectionEngine(stats, cfg).sample, fn, synth.q, x0, sig, seed=5)
    assert not msgs, msgs
    # gain-only TCEC cannot model the dominant constant ε-bias of this error (§5f), so it helps
    # less; StepbaQ alone removes the bias only as accumulated latent mean, and on multistep
    # samplers its Euler-equivalent adjustment is extrapolated (an approximation, engine.py).
    limit = {"tcec": 0.95, "stepbaq": 0.8}.get(preset, 0.5)
    assert _mse(out, ref) < limit * _mse(naive, ref), (preset, sampler, _mse(out, ref), _mse(naive, ref))


def test_dpmpp_2m_first_step_equals_corrected_euler(synth):
    """Multistep samplers get the Euler-equivalent denoised at schedule points: their first
    (first-order) step is exactly the corrected Euler step; later steps extrapolate it (documented)."""
    stats, cfg = _cal(synth, "ptqd_stepbaq")
    sig = synth.sigmas(10)
    x0 = synth.noise(4, SEED_TEST) * sig[0]
    seen = {}
    for name in ("euler", "dpmpp_2m"):
        def cb(d, name=name):
            if d["i"] == 1:
                seen[name] = d["x"].clone()
        _quiet(CorrectionEngine(stats, cfg).sample, SAMPLERS[name], synth.q, x0, sig, callback=cb)
    torch.testing.assert_close(seen["dpmpp_2m"], seen["euler"], atol=1e-5, rtol=1e-5)


def test_other_samplers_get_output_correction_only(synth):
    stats, cfg = _cal(synth, "ptqd_stepbaq")
    sig = synth.sigmas(10)
    x0 = synth.noise(16, SEED_TEST) * sig[0]
    ref, naive = SAMPLERS["heun"](synth.fp, x0, sig), SAMPLERS["heun"](synth.q, x0, sig)
    out, msgs = _quiet(CorrectionEngine(stats, cfg).sample, SAMPLERS["heun"], synth.q, x0, sig)
    assert any("intermediate" in m for m in msgs)
    assert _mse(out, ref) < 0.5 * _mse(naive, ref)


@pytest.mark.parametrize("steps", [15, 25])
def test_transfer_to_other_step_counts_warns_and_still_helps(synth, steps):
    stats, cfg = _cal(synth, "ptqd_stepbaq")
    sig = synth.sigmas(steps)
    x0 = synth.noise(32, SEED_TEST) * sig[0]
    ref, naive = SAMPLERS["euler"](synth.fp, x0, sig), SAMPLERS["euler"](synth.q, x0, sig)
    out, msgs = _quiet(CorrectionEngine(stats, cfg).sample, SAMPLERS["euler"], synth.q, x0, sig)
    assert any("transferred" in m for m in msgs)
    assert _mse(out, ref) < 0.5 * _mse(naive, ref)
    sig_n = synth.sigmas(12, scheduler="normal")  # another scheduler too
    out, msgs = _quiet(CorrectionEngine(stats, cfg).sample, SAMPLERS["euler"], synth.q, x0, sig_n)
    assert any("transferred" in m for m in msgs)
    assert _mse(out, SAMPLERS["euler"](synth.fp, x0, sig_n)) < 0.5 * _mse(SAMPLERS["euler"](synth.q, x0, sig_n),
                                                                          SAMPLERS["euler"](synth.fp, x0, sig_n))


def test_sigma_outside_calibrated_range_clamps_with_one_warning_or_is_identity(synth):
    stats, cfg = _cal(synth, "ptqd", steps=6, n=8)
    sig = torch.tensor([30.0, 20.0, 10.0, 3.0, 1.0, 0.0])
    x0 = synth.noise(4, SEED_TEST) * sig[0]
    out, msgs = _quiet(CorrectionEngine(stats, cfg).sample, SAMPLERS["euler"], synth.q, x0, sig)
    assert sum("leaves the calibrated range" in m for m in msgs) == 1 and bool(torch.isfinite(out).all())
    ident = EngineConfig.preset("ptqd", out_of_range="identity")
    plan = build_plan(stats, ident, sig, warn=False)
    corr = StepCorrector(plan, ident)
    x = x0[:2]
    s = torch.full((2,), 30.0)
    ctx = corr.prepare(x, s, 0)
    d = synth.q(x, s)
    torch.testing.assert_close(corr.finish(x, d, ctx), d, atol=1e-5, rtol=1e-5)  # no correction at σ = 30
    s = torch.full((2,), 3.0)
    ctx = corr.prepare(x, s, 3)
    assert not torch.allclose(corr.finish(x, synth.q(x, s), ctx), synth.q(x, s))  # corrected inside the range


def test_channel_and_batch_mismatch_are_clear_errors(synth):
    stats, cfg = _cal(synth, "ptqd", steps=6, n=8)
    sig = synth.sigmas(6)
    with pytest.raises(IncompatibleStatsError, match="channels"):
        CorrectionEngine(stats, cfg).sample(SAMPLERS["euler"], synth.q, torch.randn(2, 3, 8, 8) * sig[0], sig)
    corr = StepCorrector(build_plan(stats, cfg, sig), cfg)
    with pytest.raises(ValueError, match="batch"):
        corr.prepare(torch.randn(2, 4, 8, 8), torch.ones(3), 0)


def test_pick_one_rules_are_enforced():
    with pytest.raises(ValueError, match="pick one output"):
        EngineConfig(ptqd_bc=True, tac_ner=True)
    with pytest.raises(ValueError, match="latent-mean"):
        EngineConfig(stepbaq_la=True, tac_ibc=True)
    with pytest.raises(ValueError, match="variance handling"):
        EngineConfig(ptqd_bc=True, ptqd_vsc=True, stepbaq_tia=True)


def test_cfg_mismatch_warns(synth):
    stats, cfg = _cal(synth, "ptqd", steps=6, n=8)
    sig = synth.sigmas(6)
    _, msgs = _quiet(CorrectionEngine(stats, cfg).sample, SAMPLERS["euler"], synth.q,
                     synth.noise(2, SEED_TEST) * sig[0], sig, {"cfg_scale": 5.0})
    assert any("cfg 5.0" in m for m in msgs)


@pytest.mark.parametrize("preset,sampler,kw", [("ptqd_stepbaq", "euler", {}), ("ptqd_vsc", "euler_ancestral", {}),
                                                ("tcec", "dpmpp_2m", {"tcec_window": True}), ("tac", "euler", {})])
def test_per_step_work_has_no_host_sync(synth, monkeypatch, preset, sampler, kw):
    stats, cfg = _cal(synth, preset, sampler=sampler, steps=6, n=8, **kw)
    sig = synth.sigmas(6)
    corr = StepCorrector(build_plan(stats, cfg, sig, sampler=sampler), cfg)
    x = synth.noise(2, SEED_TEST) * sig[0]
    outs = []

    def sync(*a, **k):
        raise AssertionError("host synchronisation inside the per-step correction")

    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, sync)
        for n in range(6):
            s = sig[n].expand(2)
            ctx = corr.prepare(x, s, n)
            d = corr.finish(x, synth.q(ctx["x_in"], corr.model_sigma(ctx, s)), ctx)
            outs.append(d)
            x = x + (sig[n + 1] - sig[n]) * (x - d) / sig[n]
    assert len(outs) == 6


def test_tcec_window_cache_resets_between_runs(synth):
    stats, cfg = _cal(synth, "tcec", tcec_window=True, steps=8, n=16)
    sig = synth.sigmas(8)
    x0 = synth.noise(4, SEED_TEST) * sig[0]
    engine = CorrectionEngine(stats, cfg)
    first = engine.sample(SAMPLERS["euler"], synth.q, x0, sig)
    second = engine.sample(SAMPLERS["euler"], synth.q, x0, sig)
    assert torch.equal(first, second)


def test_wrapped_model_is_transparent_to_attributes(synth):
    stats, cfg = _cal(synth, "ptqd", steps=6, n=8)
    seen = {}

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
        seen["var"] = model.var  # samplers sometimes read model.inner_model...
        return SAMPLERS["euler"](model, x, sigmas, extra_args, callback, disable, **opts)

    CorrectionEngine(stats, cfg).sample(sampler, synth.q.fp, torch.randn(1, 4, 8, 8) * 14.6, synth.sigmas(6),
                                        sampler_name="euler")
    assert torch.equal(seen["var"], synth.fp.var)


def test_output_only_transfer_warns_too(synth):
    stats, cfg = _cal(synth, "ptqd", steps=6, n=8)
    sig = synth.sigmas(9)
    x0 = synth.noise(8, SEED_TEST) * sig[0]
    out, msgs = _quiet(CorrectionEngine(stats, cfg).sample, SAMPLERS["euler"], synth.q, x0, sig)
    assert any("interpolated in log σ" in m for m in msgs)
    ref, naive = SAMPLERS["euler"](synth.fp, x0, sig), SAMPLERS["euler"](synth.q, x0, sig)
    assert _mse(out, ref) < 0.5 * _mse(naive, ref)


def test_engine_refuses_non_finite_or_unsupported_stats(synth):
    from qcorrect.calibration import CorrectionStats, StatsFileError

    stats, cfg = _cal(synth, "ptqd", steps=6, n=8)
    bad = CorrectionStats(stats.sigma, stats.sigma_next, {**stats.sums, "eps_cross": stats.sums["eps_cross"] * float("nan")},
                          stats.meta)
    with pytest.raises(StatsFileError, match="NaN"):
        CorrectionEngine(bad, cfg)
    import dataclasses
    flow = CorrectionStats(stats.sigma, stats.sigma_next, stats.sums, dataclasses.replace(stats.meta, prediction="const"))
    with pytest.raises(IncompatibleStatsError, match="not supported"):
        CorrectionEngine(flow, cfg)
