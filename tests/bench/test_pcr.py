import json

import pytest
import torch

from qcorrect.bench import pcr
from qcorrect.cli import main

SEEDS, CLASSES, CALIB = [1000, 1001, 1002, 1003], [5, 6], [0, 1, 2, 3]
SMALL = dict(steps=3, batch_size=4, log=lambda *_: None, cost=False)


def test_refuses_overlapping_seeds_and_fractions_outside_0_1():
    with pytest.raises(SystemExit, match="overlap"):
        pcr.run(["W8A8"], SEEDS, CLASSES, [999, 1000], [0], **SMALL)
    for bad in (1.5, -0.1):
        with pytest.raises(SystemExit, match=r"\[0, 1\]"):
            pcr.run(["W8A8"], SEEDS, CLASSES, CALIB, [0], relax=bad, **SMALL)
    with pytest.raises(SystemExit, match="unknown configuration"):
        pcr.run(["W8A8"], SEEDS, CLASSES, CALIB, [0], configs=["fp", "magic"], **SMALL)


def test_rows_and_comparisons_of_a_small_run():
    res = pcr.run(["W4A4"], SEEDS, CLASSES, CALIB, [0, 1], relax=0.34, **SMALL)
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == list(pcr.CONFIGS)
    assert rows["dynamic"]["avg_bits"] == 4.0 and "calibration" not in rows["dynamic"]
    assert rows["fp"]["calibration"]["trajectory"] == "fp"
    assert rows["progressive"]["calibration"]["trajectory"] == "progressive"
    # 34% of 3 steps = 1 step at 10 bits: (10 + 2·4)/3
    assert rows["relax_x0"]["avg_bits"] == pytest.approx(6.0) and rows["relax_x0"]["relaxed_steps"] == 1
    assert rows["relax_x0"]["schedule"][0][0] == 0.0 and rows["relax_xT"]["schedule"][0][1] == 1e30
    assert all(r["n"] == 4 and r["latent_mse"] > 0 for r in rows.values())
    pairs = {(c["a"], c["b"]) for c in res["comparisons"]}
    assert {("progressive", "fp"), ("relax_x0", "progressive"), ("relax_xT", "progressive"),
            ("relax_x0", "relax_xT"), ("progressive", "dynamic")} <= pairs
    for c in res["comparisons"]:
        for key in ("latent_mse_lower", "psnr_delta", "class_acc_delta", "fid_delta"):
            assert c[key]["low"] <= c[key]["high"]
    a = next(c for c in res["comparisons"] if (c["a"], c["b"]) == ("progressive", "fp"))
    mse_lower = 1 - rows["progressive"]["latent_mse"] / rows["fp"]["latent_mse"]
    assert a["latent_mse_lower"]["estimate"] == pytest.approx(mse_lower, rel=1e-6)
    assert a["fid_delta"]["estimate"] == pytest.approx(rows["progressive"]["fid_to_fp"] - rows["fp"]["fid_to_fp"],
                                                       rel=1e-6, abs=1e-9)
    assert res["calibration"]["classes"] == [0, 1] and res["classes"] == CLASSES
    ratio = a["range_width_ratio"]
    assert ratio["pairs"] == 79 * 3 and ratio["p10"] <= ratio["median"] <= ratio["p90"]
    assert a.get("range_width_ratio") and next(c for c in res["comparisons"] if c["b"] == "dynamic")[
        "range_width_ratio"] is None  # dynamic rows have no static ranges to compare


def test_fid_difference_of_a_set_with_itself_is_exactly_zero():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    same = pcr.fid_diff_ci(a, a, b, n_boot=50)
    assert same == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    worse = pcr.fid_diff_ci(a + 3.0, a, b, n_boot=50)
    assert worse["low"] > 0


def test_cli_prints_a_table_and_json_last(capsys):
    assert main(["bench", "pcr", "--preset", "W8A8", "--seeds", "1000-1003", "--classes", "5,6", "--calib-seeds",
                 "0-3", "--calib-classes", "0", "--steps", "2", "--configs", "dynamic,progressive", "--batch", "4",
                 "--no-cost", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("W8A8") and "progressive" in line for line in out)
    res = json.loads(out[-1])
    assert [r["config"] for r in res["rows"]] == ["dynamic", "progressive"]
    assert [(c["a"], c["b"]) for c in res["comparisons"]] == [("progressive", "dynamic")]


def test_activation_elements_of_the_sd15_unet_are_counted_on_meta():
    n = pcr.sd15_activation_elements("W8A8")
    # the first ResBlock conv alone reads 320·64·64 inputs: the total is far larger
    assert n > 50 * 320 * 64 * 64


def test_average_bits_are_counted_on_the_evaluated_schedule():
    from qcorrect.bench.common import quant_plan
    from qcorrect.bench.pipeline import quantized_denoiser
    from qcorrect.quant import set_activation_schedule
    from qcorrect.reference.model import load_reference
    from qcorrect.reference.schedules import get_sigmas

    ref = load_reference()
    qden = quantized_denoiser(ref.denoiser, quant_plan("W4A8", None))
    cal = get_sigmas("normal", ref.denoiser.sigmas, 10)
    schedule, k, avg = pcr.relaxed_schedule(cal, 0.2, "x0", 10, 8)
    set_activation_schedule(qden.quantized, schedule)
    assert pcr.average_bits(qden, cal) == pytest.approx(avg) == pytest.approx(8.4)
    # the same σ ranges on a 20-step schedule relax the 20-step calls that fall inside them
    other = get_sigmas("normal", ref.denoiser.sigmas, 20)
    inside = sum(1 for s in other[:-1] if float(s) <= schedule[0][1])
    assert pcr.average_bits(qden, other) == pytest.approx((inside * 10 + (20 - inside) * 8) / 20)


def test_more_calibration_sets_are_disjoint_and_compared():
    with pytest.raises(SystemExit, match="overlap"):
        pcr.run(["W8A8"], [4, 5, 6, 7], CLASSES, [0, 1, 2, 3], [0], calib_sets=2, **SMALL)
    res = pcr.run(["W8A8"], SEEDS, CLASSES, CALIB, [0], configs=["fp", "progressive"], calib_sets=2, **SMALL)
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["fp", "fp#2", "progressive", "progressive#2"]
    assert rows["fp#2"]["calib_seeds"] == "4-7" and "calib_seeds" not in rows["fp"]
    assert rows["fp#2"]["latent_mse"] != rows["fp"]["latent_mse"]
    pairs = [(c["a"], c["b"]) for c in res["comparisons"]]
    assert pairs == [("progressive", "fp"), ("fp#2", "fp"), ("progressive#2", "progressive"),
                     ("progressive#2", "fp#2")]
