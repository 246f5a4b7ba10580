"""Relax Timesteps' σ-range schedule, and which layer classes the quantizer replaces."""

import math

import pytest
import torch
from torch import nn

from qcorrect.quant import QuantizationError, QuantLinear, quantize_model
from qcorrect.quant.relax import relaxed_schedule

SIGMAS = torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.0])


def _relaxed(schedule, sigma):
    return any(lo <= sigma <= hi for lo, hi, _ in schedule)


@pytest.mark.parametrize("where,expect", [("x0", [0.2, 0.1]), ("xT", [14.6, 8.0])])
def test_the_chosen_share_of_steps_and_only_those_is_relaxed(where, expect):
    schedule, k, avg = relaxed_schedule(SIGMAS, 0.25, where, 10, 8)
    assert k == 2 and math.isclose(avg, (2 * 10 + 6 * 8) / 8)
    relaxed = [float(s) for s in SIGMAS[:-1] if _relaxed(schedule, float(s))]
    assert relaxed == pytest.approx(expect)
    assert all(b == 10 for *_, b in schedule)


def test_zero_and_full_fractions():
    assert relaxed_schedule(SIGMAS, 0.0, "x0", 16, 4) == ([], 0, 4.0)
    schedule, k, avg = relaxed_schedule(SIGMAS, 1.0, "xT", 16, 4)
    assert k == 8 and avg == 16.0 and all(_relaxed(schedule, float(s)) for s in SIGMAS[:-1])


@pytest.mark.parametrize("bad", [dict(fraction=1.5), dict(fraction=-0.1), dict(fraction=float("nan")),
                                 dict(where="middle"), dict(bits=3), dict(bits=17)])
def test_bad_arguments_are_refused(bad):
    args = dict(fraction=0.2, where="x0", bits=10)
    args.update(bad)
    with pytest.raises(QuantizationError):
        relaxed_schedule(SIGMAS, args["fraction"], args["where"], args["bits"], 8)


def test_schedules_must_decrease_and_have_a_step():
    with pytest.raises(QuantizationError, match="decreasing"):
        relaxed_schedule(torch.tensor([1.0, 2.0, 0.0]), 0.5, "x0", 10, 8)
    with pytest.raises(QuantizationError, match="no step"):
        relaxed_schedule(torch.tensor([0.0]), 0.5, "x0", 10, 8)


class MyLinear(nn.Linear):  # what ComfyUI's comfy.ops layers are: subclasses of the torch classes
    pass


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = MyLinear(64, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x):
        return self.attn(self.proj(x), x, x)[0]


def test_subclasses_are_quantized_but_multihead_attention_is_left_alone():
    torch.manual_seed(0)
    m = Block()
    x = torch.randn(2, 3, 64)
    want = m(x)
    quantize_model(m, "W8A16")
    assert isinstance(m.proj, QuantLinear)
    assert type(m.attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert torch.allclose(m(x), want, atol=0.05)
