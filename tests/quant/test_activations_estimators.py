"""Range estimators, auto's per-layer choice on the layer's output error, and the bit-width lookups."""

import pytest
import torch
from torch import nn

from qcorrect.quant import ActivationObserver, ActQuantizer, QuantContext, preset, quantize_model, sigma_scope
from qcorrect.quant.activations import uncovered_sigmas
from qcorrect.quant.observers import CANDIDATES


def one_layer(weight_col0: float):
    """A quantized Linear whose input channel 0 is read with weight ``weight_col0`` (others 0.01)."""
    m = nn.Sequential(nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        m[0].weight.fill_(0.01)
        m[0].weight[:, 0] = weight_col0
    return quantize_model(m, preset("W8A8", activations="a4_asym", act_mode="static"))


def inputs():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 20.0  # one outlier, in the first row (the row auto keeps for its score)
    return x


def observe(m, method):
    obs = ActivationObserver(m, method=method)
    with obs, sigma_scope(m, 1.0):
        m(inputs())
    return obs


@pytest.mark.parametrize("weight_col0,clips", [(0.0, True), (100.0, False)])
def test_auto_chooses_by_the_error_the_layer_output_sees(weight_col0, clips):
    m = one_layer(weight_col0)
    auto = observe(m, "auto")
    (_, lo, hi), = auto.ranges().values()
    choice = auto.choices[("0", 1.0)]
    assert choice in CANDIDATES
    # the input-MSE estimator clips the lone outlier whatever reads it ...
    (_, _, hi_mse), = observe(m, "mse").ranges().values()
    assert float(hi_mse) < 15.0
    # ... auto clips it only when the weights ignore it, and keeps it when they amplify it
    assert (float(hi) < 15.0) == clips
    assert (choice != "minmax") == clips
    assert auto.choice_counts() == {"0": {choice: 1}}


def test_auto_keeps_bounded_crops_of_large_inputs():
    m = quantize_model(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.Conv2d(8, 8, 3, padding=1)), preset("W8A8", act_mode="static"))
    obs = ActivationObserver(m, method="auto", score_elements=8 * 5 * 5)
    with obs, sigma_scope(m, 1.0):
        m(torch.randn(4, 8, 32, 32))
    rows = obs._rows[("1", 1.0)]
    assert len(rows) == 1 and rows[0].shape == (1, 8, 5, 5)
    obs.finish()
    assert not obs._rows and obs.choices[("1", 1.0)] in CANDIDATES


def test_bits_at_agrees_with_the_tensor_lookup():
    ctx = QuantContext()
    q = ActQuantizer("a8", "dynamic", ctx, "l")
    q.set_schedule([(0.0, 1.0, 16), (5.0, 1e30, 10), (0.5, 0.7, 4)])
    for sigma in (0.1, 0.6, 1.0, 2.0, 5.0, 80.0):
        assert q.bits_at(sigma) == int(q.current_bits(torch.tensor([sigma])))
    assert q.bits_at(None) == 8


def test_uncovered_sigmas_uses_the_range_every_static_layer_shares():
    m = quantize_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), preset("W8A8", act_mode="static"))
    m[0].act.set_static_ranges([0.1, 10.0], [-1, -1], [1, 1])
    m[1].act.set_static_ranges([0.2, 5.0], [-1, -1], [1, 1])
    assert uncovered_sigmas(m, [14.0, 5.1, 1.0, 0.2, 0.1, 0.0]) == [14.0, 0.1]
    m[1].act.mode = "dynamic"
    assert uncovered_sigmas(m, [14.0, 5.1, 1.0, 0.2, 0.1, 0.0]) == [14.0]
