"""qcorrect bench solve: one layer's calibrated solve timed by width, and the SD1.5 extrapolation."""

import json

import pytest
import torch

from qcorrect.bench.solve import fit_cost, fits_by_dtype, parse_shapes, sd15_estimate, solve_one, synthetic_stats


def test_the_bench_solves_a_layer_with_its_budget_candidates_and_reports_json(capsys):
    from qcorrect.cli import main

    assert main(["bench", "solve", "--shapes", "32x128,64x256", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert [(r["out"], r["k"]) for r in res["rows"]] == [(32, 128), (64, 256)]
    for r in res["rows"]:
        assert r["seconds"] > 0 and r["candidates"] and r["rounding"].startswith(("gptq", "rtn"))
    assert res["sd15"]["layers"] == 278 and res["sd15"]["widest"] == {"out": 1280, "k": 23040}
    assert any("an estimate from the rows above" in line for line in out)
    assert [r["dtype"] for r in res["rows"]] == ["float64", "float64"] and res["float32_from"] == 4096
    assert res["act_order"] == "both" and "both orders" in res["config"]  # the node's default
    assert main(["bench", "solve", "--shapes", "32x128", "--act-order", "off", "--threads", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["act_order"] == "off" and res["rows"][0]["rounding"] in ("gptq", "rtn") and "sd15" not in res


def test_the_bench_solves_in_float32_from_the_given_width_and_reports_the_error_it_costs(capsys):
    from qcorrect.cli import main

    assert main(["bench", "solve", "--shapes", "32x128,48x192", "--float32-from", "150", "--threads", "1", "--json"]) == 0
    f32 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["dtype"] for r in f32["rows"]] == ["float64", "float32"]
    assert main(["bench", "solve", "--shapes", "32x128,48x192", "--float32-from", "none", "--threads", "1", "--json"]) == 0
    f64 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["dtype"] for r in f64["rows"]] == ["float64", "float64"] and f64["float32_from"] is None
    # the float64 row is the same solve in both runs; the float32 one lands close to its float64 twin
    assert f32["rows"][0]["held_out_error_vs_rtn"] == f64["rows"][0]["held_out_error_vs_rtn"]
    assert f32["rows"][1]["held_out_error_vs_rtn"] == pytest.approx(f64["rows"][1]["held_out_error_vs_rtn"], rel=1e-3)


def test_the_cost_fit_recovers_a_known_model_and_needs_two_shapes():
    a, b = 2e-10, 3e-9
    rows = [{"out": o, "k": k, "seconds": a * k**3 + b * o * k * k} for o, k in ((100, 1000), (50, 3000), (400, 2000))]
    fa, fb = fit_cost(rows)
    assert fa == pytest.approx(a, rel=1e-6) and fb == pytest.approx(b, rel=1e-6)
    assert fit_cost(rows[:1]) is None
    # timings a free fit explains with a negative K³ term (a real run's rows): the one-term fit instead
    measured = [{"out": o, "k": k, "seconds": t} for o, k, t in
                ((320, 2304, 3.7), (2304, 2304, 21.34), (640, 4608, 22.8), (1280, 11520, 282.88))]
    na, nb = fit_cost(measured)
    assert na == 0.0 and nb > 0
    est = sd15_estimate((fa, fb))
    assert est["seconds"] > est["widest_seconds"] > 0


def test_each_layer_is_extrapolated_by_the_fit_of_the_dtype_it_is_solved_in():
    rows = [{"out": o, "k": k, "seconds": t, "dtype": d} for o, k, t, d in
            ((320, 2304, 3.86, "float64"), (2304, 2304, 25.87, "float64"),
             (640, 4608, 14.49, "float32"), (1280, 11520, 141.01, "float32"))]
    fits = fits_by_dtype(rows)
    assert fits["float32"] == fit_cost(rows[2:]) and fits["float64"] == fit_cost(rows[:2])
    est = sd15_estimate(fits)
    all64 = sd15_estimate(fits["float64"])
    assert 0 < est["float32_layers"] < est["layers"] == 278
    assert est["widest_seconds"] == pytest.approx(sd15_estimate(fits["float32"])["widest_seconds"])
    assert est["seconds"] < all64["seconds"] and sd15_estimate(fits, None)["seconds"] == pytest.approx(all64["seconds"])
    # a dtype with one row is fitted through it; one without rows takes the fit of all rows
    one = fits_by_dtype(rows[:3])
    assert one["float32"] == (0.0, pytest.approx(14.49 / (640 * 4608**2)))
    assert fits_by_dtype(rows[:2])["float32"] == fit_cost(rows[:2])


def test_synthetic_statistics_are_symmetric_positive_and_split_three_to_one():
    st = synthetic_stats(64)
    assert st.rows_fit == 96 and st.rows_hold == 32
    assert torch.equal(st.h_fit, st.h_fit.T) and bool(torch.linalg.eigvalsh(st.h_fit.double()).min() > 0)
    assert parse_shapes("8x64, 16X128") == [(8, 64), (16, 128)]
    with pytest.raises(SystemExit):
        parse_shapes(" , ")
    assert solve_one(16, 64)["candidates"]


def test_the_solve_runs_where_the_statistics_live_and_cuda_without_a_device_is_refused(capsys, monkeypatch):
    from qcorrect.cli import main

    st = synthetic_stats(64, 0, "cpu")
    assert st.h_fit.device.type == "cpu" and torch.equal(st.h_fit, synthetic_stats(64, 0).h_fit)
    row = solve_one(16, 64, device="cpu")
    assert row["device"] == "cpu" and row["candidates"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["bench", "solve", "--shapes", "16x64", "--device", "cuda", "--threads", "1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_solve_on_cuda_matches_the_cpu_solve():
    cpu, gpu = solve_one(32, 256, device="cpu"), solve_one(32, 256, device="cuda")
    assert gpu["device"].startswith("cuda") and gpu["rounding"] == cpu["rounding"]
    assert gpu["held_out_error_vs_rtn"] == pytest.approx(cpu["held_out_error_vs_rtn"], rel=1e-3)
