"""Parameter derivations recover the injected truth (PTQD, TAC, TCEC, StepbaQ) and the step math."""

import torch

from qcorrect.calibration import CalibrationConfig, EngineConfig, calibrate
from qcorrect.calibration.moments import latent_moments
from qcorrect.calibration.ptqd import ptqd_params, vsc_ancestral_step
from qcorrect.calibration.stepbaq import analytic_stepbacks, euler_equivalent_denoised, stepback_rule
from qcorrect.calibration.tac import ner_gain
from qcorrect.calibration.tcec import tcec_gain
from qcorrect.reference.samplers import get_ancestral_step

TF = CalibrationConfig(mode="teacher_forced", batch_size=16)


def test_ptqd_recovers_bias_and_correlation(synth):
    q = synth.InjectedError(synth.fp, bias=synth.bias, k=0.05, noise=0.02)
    stats = calibrate(synth.fp, q, synth.noise(32, 0), synth.sigmas(6), engine=EngineConfig(), config=TF)
    p = ptqd_params(stats)
    # the last row (σ ≈ 0.03) is left out: there the pseudo-noise z(x) correlates with ε
    torch.testing.assert_close(p.k[:-1], torch.full_like(p.k[:-1], 0.05), atol=3e-3, rtol=0)
    torch.testing.assert_close(p.bias, synth.bias.double().expand_as(p.bias), atol=3e-3, rtol=0)
    torch.testing.assert_close(p.sigma_q, torch.full_like(p.sigma_q, 0.02), atol=3e-3, rtol=0)
    assert float(p.r2[0]) > 0.5 and bool(((p.r2 >= 0) & (p.r2 <= 1)).all())  # high σ: k·ε dominates the error
    no_cnc = ptqd_params(stats, cnc=False)  # BC alone: plain error mean, k = 0
    assert bool((no_cnc.k == 0).all())


def test_tac_and_tcec_gains_recover_injected_gain(synth):
    g = torch.tensor([1.1, 0.9, 1.05, 0.95], dtype=torch.float64)
    q = synth.InjectedError(synth.fp, gain=g.float())
    stats = calibrate(synth.fp, q, synth.noise(16, 1), synth.sigmas(5), engine=EngineConfig(), config=TF)
    k_tac = ner_gain(stats, lambda1=0.5, lambda2=0.0)
    torch.testing.assert_close(k_tac, (1 / g).expand_as(k_tac), atol=2e-4, rtol=0)
    k_pull = ner_gain(stats, lambda1=0.5, lambda2=0.1)  # pulled towards 1, same side
    assert bool((((k_pull - 1) * (k_tac - 1)) >= 0).all()) and bool(((k_pull - 1).abs() <= (k_tac - 1).abs() + 1e-9).all())
    k_tcec = tcec_gain(stats, ridge=0.0)
    torch.testing.assert_close(k_tcec, (1 - 1 / g).expand_as(k_tcec), atol=2e-4, rtol=0)


def test_stepbaq_latent_stats_follow_accumulation_rule(synth):
    """Constant ε-bias b, Euler: δ_1 = h_0·b; with no stepback (zero variance) the error accumulates
    (ACC) through the exact denoiser's Jacobian: δ_2 = δ_1·(1 + h_1·σ_1/(v+σ_1²)) + h_1·b."""
    q = synth.InjectedError(synth.fp, bias=synth.bias)
    sig = synth.sigmas(6)
    cfg = EngineConfig(stepbaq_la=True, stepbaq_tia=True, stepbaq_ssa=True)
    stats = calibrate(synth.fp, q, synth.noise(8, 2), sig, engine=cfg, config=CalibrationConfig(), grid_sigmas=synth.grid)
    mean, var = latent_moments(stats)
    s = sig.double()
    b = synth.bias.double()
    d1 = (s[1] - s[0]) * b
    torch.testing.assert_close(mean[1], d1, atol=1e-5, rtol=1e-4)
    v = synth.fp.var.double()
    h1 = s[2] - s[1]
    d2 = d1 * (1 + h1 * s[1] / (v + s[1] ** 2)) + h1 * b
    torch.testing.assert_close(mean[2], d2, atol=1e-5, rtol=1e-4)
    assert float(var[1:3].max()) < 1e-8  # deterministic channel-constant error: no spread


def test_stepback_rule_snaps_to_grid(synth):
    grid = synth.grid.double()
    sigma = grid[[500, 500]]
    tau, flag = stepback_rule(sigma, torch.tensor([1e-9, 0.5], dtype=torch.float64), grid)
    assert flag.tolist() == [False, True]
    assert float(tau[0]) == float(sigma[0])
    target = (sigma[1] ** 2 + 0.5).sqrt()
    assert float(tau[1]) in grid.tolist() and abs(float(tau[1]) - float(target)) < float(grid[501] - grid[499])


def test_analytic_stepbacks_accumulate_and_reset():
    sched = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    mu = torch.full((4, 2), 0.1, dtype=torch.float64)
    tau, shift = analytic_stepbacks(sched, mu, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(tau, sched[:-1]) and bool((shift == 0).all())  # no variance: never steps back
    tau, shift = analytic_stepbacks(sched, mu, torch.full((4,), 1.0, dtype=torch.float64))
    assert bool((tau[1:] > sched[1:-1]).all())
    torch.testing.assert_close(shift[1], torch.full((2,), -0.5, dtype=torch.float64))  # h_0·μ = (5−10)·0.1
    torch.testing.assert_close(float(tau[1]), (25.0 + 25.0) ** 0.5)  # σ² + h_0²·s²


def test_vsc_split_keeps_total_noise():
    s, sn = torch.tensor(3.0), torch.tensor(2.0)
    down, up = get_ancestral_step(s, sn, eta=1.0)
    d0, u0, dv, uv = vsc_ancestral_step(s, sn, 1.0, torch.tensor(0.0))
    torch.testing.assert_close((d0, u0), (down, up))
    torch.testing.assert_close((dv, uv), (down, up))
    d0, u0, dv, uv = vsc_ancestral_step(s, sn, 1.0, torch.tensor(0.3))
    torch.testing.assert_close(uv**2, up**2 - (down - s) ** 2 * 0.09)
    torch.testing.assert_close(dv**2 + uv**2, sn**2)
    _, _, _, u_big = vsc_ancestral_step(s, sn, 1.0, torch.tensor(100.0))
    assert float(u_big) == 0.0  # clamps at zero noise


def test_euler_equivalent_denoised_lands_on_target():
    torch.manual_seed(0)
    x, x_in, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    s, tau, s_next = torch.tensor(2.0), torch.tensor(2.3), torch.tensor(1.2)
    d = euler_equivalent_denoised(x, x_in, eps, s, tau, s_next, s_next)
    euler = x + (s_next - s) * (x - d) / s
    torch.testing.assert_close(euler, x_in + (s_next - tau) * eps, atol=1e-5, rtol=1e-5)
