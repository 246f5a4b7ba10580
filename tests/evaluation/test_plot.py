"""Line panels drawn as image tensors: size, colours, scale, gaps, placeholder."""

import pytest
import torch

from qcorrect.evaluation import line_panels
from qcorrect.evaluation.plot import PLOT_COLORS


def _colour_mask(img, colour):
    return (img - torch.tensor(colour)).abs().amax(-1) < 1e-6


def test_shape_range_and_white_background():
    img = line_panels([[1.0, 2.0, 0.5], [0.0, 0.1, 0.3, 0.2]], width=200, panel_height=80)
    assert img.shape == (160, 200, 3) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert float((img == 1.0).all(-1).float().mean()) > 0.8  # mostly white


def test_each_series_is_drawn_in_its_own_panel_and_colour():
    img = line_panels([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], width=120, panel_height=60)
    top, bottom = img[:60], img[60:]
    assert _colour_mask(top, PLOT_COLORS[0]).any() and not _colour_mask(top, PLOT_COLORS[1]).any()
    assert _colour_mask(bottom, PLOT_COLORS[1]).any() and not _colour_mask(bottom, PLOT_COLORS[0]).any()


def test_rising_series_ends_higher_than_it_starts():
    img = line_panels([[0.0, 1.0, 2.0, 3.0]], width=100, panel_height=60)
    rows, cols = torch.nonzero(_colour_mask(img, PLOT_COLORS[0]), as_tuple=True)
    first_rows = rows[cols == cols.min()].float().mean()
    last_rows = rows[cols == cols.max()].float().mean()
    assert last_rows < first_rows  # image rows grow downwards


def test_non_finite_values_leave_gaps_and_empty_series_give_a_frame():
    full = line_panels([[1.0, 2.0, 1.0, 2.0]], width=100, panel_height=60)
    gap = line_panels([[1.0, float("nan"), 1.0, 2.0]], width=100, panel_height=60)
    c = PLOT_COLORS[0]
    assert _colour_mask(gap, c).sum() < _colour_mask(full, c).sum()
    empty = line_panels([[]], width=100, panel_height=60)
    assert not _colour_mask(empty, c).any() and (empty < 1).any()  # only the frame


def test_placeholder_has_the_size_of_a_filled_plot():
    filled = line_panels([[1.0, 2.0], [0.5, 0.2]])
    placeholder = line_panels([], panels=2)
    assert placeholder.shape == filled.shape
    assert not any(_colour_mask(placeholder, c).any() for c in PLOT_COLORS)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="at least one panel"):
        line_panels([])
    with pytest.raises(ValueError, match="do not fit"):
        line_panels([[1.0], [2.0]], panels=1)
    with pytest.raises(ValueError, match="too small"):
        line_panels([[1.0]], width=10)
