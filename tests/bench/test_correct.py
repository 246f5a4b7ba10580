import pytest

import torch

from qcorrect.bench.correct import ABLATION, ALONE, COMBOS, METHODS, check_disjoint, engine_config, expand_methods
from qcorrect.calibration import CorrectionStats
from qcorrect.calibration.validate import with_validation


def test_every_method_is_a_valid_engine_configuration():
    for name in METHODS:
        if name == "auto":
            continue
        cfg = engine_config(name)
        assert cfg.any_enabled == (name != "none")


def test_auto_follows_the_stored_end_to_end_check():
    stats = CorrectionStats.empty(torch.tensor([14.6, 1.0, 0.0]), 4)
    with pytest.raises(ValueError, match="statistics"):
        engine_config("auto")
    assert not engine_config("auto", stats).any_enabled  # no check stored: uncorrected
    ok = {"methods": ["tcec"], "n": 64, "folds": 4, "level": 0.99, "gap_closed": 0.05, "gap_closed_low": 0.01,
          "fold_gaps": [0.04, 0.06, 0.02, 0.08]}
    assert engine_config("auto", with_validation(stats, ok)).tcec
    # a gain carried by some folds only, or a bound at a laxer level than the default needs, is not enough
    assert not engine_config("auto", with_validation(stats, {**ok, "fold_gaps": [0.2, 0.1, -0.01, 0.1]})).any_enabled
    assert not engine_config("auto", with_validation(stats, {**ok, "fold_gaps": [0.2, 0.1, 0.1]})).any_enabled
    assert not engine_config("auto", with_validation(stats, {**ok, "level": 0.95})).any_enabled
    bad = with_validation(stats, {**ok, "gap_closed": -0.01, "gap_closed_low": -0.05, "fold_gaps": [-0.01] * 4})
    assert not engine_config("auto", bad).any_enabled
    # a positive point estimate whose lower bound is not above zero is not a shown gain
    noisy = with_validation(stats, {**ok, "gap_closed": 0.018, "gap_closed_low": -0.04})
    assert not engine_config("auto", noisy).any_enabled
    # the same good numbers from an in-sample check (statistics fitted on the checked samples) are not trusted
    in_sample = with_validation(stats, {**ok, "folds": 1, "fold_gaps": [0.05]})
    assert not engine_config("auto", in_sample).any_enabled


def test_all_and_ablation_expansions():
    assert expand_methods("all", ["euler"]) == ["none", *ALONE, *COMBOS, "auto"]
    assert "ptqd_vsc" in expand_methods("all", ["euler", "euler_ancestral"])
    assert expand_methods("ablation", ["euler"]) == ABLATION
    # the ablation is cumulative: each entry switches on a superset of the previous one's components
    comps = [set(engine_config(m).methods()) for m in ABLATION[:-1]]
    assert all(a < b for a, b in zip(comps, comps[1:]))
    assert METHODS["stepbaq_tia_la_ssa"][1] is False and METHODS["stepbaq"][1] is True  # +ACC last
    with pytest.raises(SystemExit, match="unknown method"):
        expand_methods("ptqd,magic", ["euler"])


def test_calibration_and_evaluation_seeds_must_be_disjoint():
    check_disjoint(list(range(10)), list(range(10, 20)))
    with pytest.raises(SystemExit, match="overlap"):
        check_disjoint(list(range(10)), list(range(5, 20)))
