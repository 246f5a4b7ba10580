"""Trajectory recording through the sampler callback and per-step divergence."""

import torch

from qcorrect.evaluation import TrajectoryRecorder, step_divergence
from qcorrect.reference.samplers import sample


def shrink(scale):
    return lambda x, sigma, **kw: x * scale


def test_recorder_records_each_step():
    x = torch.randn(3, 2, 4, 4)
    sig = torch.tensor([4.0, 2.0, 1.0, 0.0])
    rec = TrajectoryRecorder()
    out = sample("euler", shrink(0.5), x, sig, callback=rec)
    assert len(rec) == 3 and rec.steps == [0, 1, 2] and rec.sigmas == [4.0, 2.0, 1.0]
    assert torch.equal(rec.xs[0], x) and rec.stack().shape == (3, 3, 2, 4, 4)
    assert rec.stack("denoised").shape == (3, 3, 2, 4, 4)
    rec.finish(out)
    assert len(rec) == 4 and torch.equal(rec.xs[-1], out) and rec.sigmas[-1] == 0.0


def test_recorder_copies_and_chains():
    seen = []
    rec = TrajectoryRecorder(keep_denoised=False, chain=seen.append)
    x = torch.zeros(1, 2)
    rec({"x": x, "i": 0, "sigma": torch.tensor(1.0), "sigma_hat": torch.tensor(1.0), "denoised": x})
    x += 1  # in-place change after the callback must not alter the record
    assert torch.equal(rec.xs[0], torch.zeros(1, 2)) and rec.denoised == [] and len(seen) == 1


def test_step_divergence_hand_values():
    fp = torch.zeros(3, 2, 4)  # 3 steps, batch 2
    q = fp.clone()
    q[1, 0] = 1.0  # step 1, sample 0: MSE 1
    q[2] = 2.0  # step 2: MSE 4 for both samples
    assert torch.allclose(step_divergence(q, fp), torch.tensor([0.0, 0.5, 4.0], dtype=torch.float64))
    per = step_divergence(list(q), list(fp), per_sample=True)
    assert torch.allclose(per, torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 4.0]], dtype=torch.float64))


def test_divergence_grows_for_a_biased_model():
    x = torch.randn(4, 2, 3, 3)
    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    fp, q = TrajectoryRecorder(), TrajectoryRecorder()
    sample("euler", shrink(0.5), x, sig, callback=fp)
    sample("euler", lambda x, sigma, **kw: x * 0.5 + 0.05, x, sig, callback=q)
    div = step_divergence(q, fp)
    assert div[0] == 0 and bool((div[1:] > 0).all()) and bool((div[2:] >= div[1:-1]).all())
    assert torch.equal(step_divergence(fp, fp), torch.zeros(5, dtype=torch.float64))
