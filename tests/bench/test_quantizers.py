"""qcorrect bench quantizers: calibrated quantizers against round-to-nearest (issue 11)."""

import json

import pytest
import torch

from qcorrect.bench import memory, quantizers
from qcorrect.bench.pipeline import RunConfig, labels_for, quantized_denoiser, sample_latents
from qcorrect.evaluation import latent_mse
from qcorrect.reference.model import load_reference

SEEDS, CALIB, CLASSES = [1000, 1001, 1002, 1003], [0, 1, 2, 3, 4, 5, 6, 7], [3, 7]
SMALL = dict(steps=3, batch_size=4, log=lambda *_: None)


@pytest.fixture(scope="module")
def result():
    return quantizers.run(["W4A16"], ["rtn", "gptq", "gptq_budget"], ["euler"], [3.0], SEEDS, CALIB, CLASSES,
                          budget=0.33, **SMALL)


def test_evaluation_seeds_are_never_calibration_seeds():
    with pytest.raises(SystemExit, match="overlap"):
        quantizers.run(["W4A16"], ["rtn", "gptq"], ["euler"], [3.0], SEEDS, [1, 1000], CLASSES, **SMALL)


def test_rows_compare_every_method_with_round_to_nearest_on_the_same_samples(result):
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["rtn", "gptq", "gptq_budget"]
    # the baseline row is plain round-to-nearest sampled like bench quality does
    ref = load_reference()
    rc = RunConfig("euler", "normal", 3, 3.0, 4).validate()
    labels = labels_for(SEEDS, CLASSES)
    fp = sample_latents(ref.denoiser, rc, SEEDS, labels, ref.denoiser.sigmas)
    q = sample_latents(quantized_denoiser(ref.denoiser, "W4A16"), rc, SEEDS, labels, ref.denoiser.sigmas)
    assert rows["rtn"]["latent_mse"] == pytest.approx(float(latent_mse(q, fp).mean()), rel=1e-5)
    g = rows["gptq"]
    assert g["gap_closed"]["low"] <= g["gap_closed"]["estimate"] <= g["gap_closed"]["high"]
    assert g["gap_closed"]["estimate"] == pytest.approx(1 - g["latent_mse"] / rows["rtn"]["latent_mse"], rel=1e-6)
    assert 0 <= g["worse_share"] <= 1 and g["worst_ratio"] > 0
    assert g["worst_seed"] == SEEDS[g["worst_index"]]
    for r in rows.values():  # the absolute tail is the per-sample latent MSE the mean is made of
        per = r["per_sample_latent_mse"]
        assert len(per) == len(SEEDS) and sum(per) / len(per) == pytest.approx(r["latent_mse"], rel=1e-4)
        assert r["max_mse"] == pytest.approx(max(per), rel=1e-4) and r["p95_mse"] <= r["max_mse"] + 1e-9
        assert r["tipped"] == sum(v > quantizers.TIPPED_MSE for v in per)
    assert g["worst_mse"] == pytest.approx(g["per_sample_latent_mse"][g["worst_index"]], rel=1e-4)
    assert g["worst_ratio"] == pytest.approx(g["worst_mse"] / g["worst_base_mse"], rel=1e-5)
    assert 0 < g["share_of_mse_in_worst"] <= 1 and g["over_2x"] <= round(g["worse_share"] * len(SEEDS))
    assert g["bytes_ratio"] == rows["rtn"]["bytes_ratio"]  # GPTQ costs no byte
    assert g["calib_seconds"] > 0 and "GPTQ" in g["summary"]
    b = rows["gptq_budget"]
    assert rows["rtn"]["bytes_ratio"] < b["bytes_ratio"] <= 0.33 and b["allocation"]["weighting"] == "measured sensitivity"
    assert result["collections"][0]["n_hold"] == 2 and result["collections"][0]["n_fit"] == 6


def test_sd15_bytes_match_bench_memory_and_the_budget_caps_them(result):
    rows = {r["method"]: r for r in result["rows"]}
    want = memory.run(["W4A16"])["presets"]["W4A16"]["ratio_to_fp16"]
    assert rows["rtn"]["sd15_bytes_ratio"] == pytest.approx(want, abs=1e-4) and rows["rtn"]["sd15_bound"] == "exact"
    assert rows["gptq"]["sd15_bytes_ratio"] == rows["rtn"]["sd15_bytes_ratio"]
    assert rows["gptq_budget"]["sd15_bytes_ratio"] <= 0.33


def test_the_table_and_the_json_line(result, capsys):
    quantizers.print_result(result)
    out = capsys.readouterr().out
    assert "calibrated quantizers vs round-to-nearest" in out and "W4A16 gptq_budget euler cfg 3: " in out
    table = quantizers.table_rows(result)
    assert [r[1] for r in table] == ["rtn", "gptq", "gptq_budget"] and table[2][14].startswith("≤")
    assert len(table[0]) == len(quantizers.HEADERS)
    assert json.loads(json.dumps(result))["rows"][1]["method"] == "gptq"


def test_budget_extra_gives_each_model_the_same_headroom_over_round_to_nearest():
    res = quantizers.run(["W4A16"], ["rtn", "gptq_int8"], ["euler"], [3.0], SEEDS, CALIB, CLASSES, budget_extra=0.02,
                         **SMALL)
    rtn, b = res["rows"]
    assert b["budget"] == pytest.approx(rtn["bytes_ratio"] + 0.02, abs=1e-4)
    assert rtn["bytes_ratio"] < b["bytes_ratio"] <= b["budget"]
    assert b["sd15_bytes_ratio"] <= rtn["sd15_bytes_ratio"] + 0.02 + 1e-4 and b["sd15_bound"].startswith("≤")


def test_corrections_run_on_top_of_a_calibrated_quantizer_and_are_scored_against_it():
    res = quantizers.run(["W4A16"], ["rtn", "gptq"], ["euler"], [3.0], SEEDS, CALIB, CLASSES, corrections=["none", "tcec"],
                         correct_on=("gptq",), **SMALL)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["rtn", "gptq", "gptq+tcec"]
    c = rows["gptq+tcec"]
    assert c["quantizer"] == "gptq" and c["correction"] == "tcec"
    want = 1 - c["latent_mse"] / rows["gptq"]["latent_mse"]
    assert c["vs_quantizer"]["gap_closed"]["estimate"] == pytest.approx(want, rel=1e-6)
    assert c["calib_seconds"] > rows["gptq"]["calib_seconds"]
    col = quantizers.HEADERS.index("correction: gap closed vs its quantizer % [95% CI]")
    assert quantizers.table_rows(res)[2][col] != "-"


def test_a_second_calibration_set_is_disjoint_and_compared_sample_by_sample_with_the_first():
    res = quantizers.run(["W4A16"], ["rtn", "gptq"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES, calib_sets=2,
                         damp=0.05, **SMALL)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["rtn", "gptq", "gptq#2"]  # round-to-nearest needs no calibration: sampled once
    assert rows["gptq"]["calib_seeds"] == "0-3" and rows["gptq#2"]["calib_seeds"] == "4-7"
    assert [c["calib_set"] for c in res["collections"]] == [1, 2]
    (cmp,) = res["set_comparisons"]
    assert (cmp["a"], cmp["b"]) == ("gptq#2", "gptq")
    # the per-sample comparison of set 2 with set 1 is the ratio of their latent MSEs
    ratio_mean = rows["gptq#2"]["latent_mse"] / rows["gptq"]["latent_mse"]
    assert 1 - cmp["gap_closed"]["estimate"] == pytest.approx(ratio_mean, rel=1e-5)
    assert rows["gptq#2"]["latent_mse"] != rows["gptq"]["latent_mse"]  # other statistics, other rounding
    assert res["damp"] == 0.05


def test_calibration_sets_that_would_reach_the_evaluation_seeds_are_refused():
    with pytest.raises(SystemExit, match="overlap"):
        quantizers.run(["W4A16"], ["rtn", "gptq"], ["euler"], [3.0], [8, 9], CALIB, CLASSES, calib_sets=2, **SMALL)


def test_damping_reaches_the_solver():
    runs = [quantizers.run(["W4A16"], ["rtn", "gptq"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES, damp=d, **SMALL)
            for d in (0.01, 100.0)]
    gptq = [next(r for r in res["rows"] if r["method"] == "gptq") for res in runs]
    assert gptq[0]["latent_mse"] != gptq[1]["latent_mse"]


def test_the_float32_width_reaches_the_solver(monkeypatch):
    seen = []
    real = quantizers.quantize_calibrated

    def spy(module, plan, inputs, config=None, *a, **k):
        seen.append(config.float32_from)
        return real(module, plan, inputs, config, *a, **k)

    monkeypatch.setattr(quantizers, "quantize_calibrated", spy)
    res = quantizers.run(["W4A16"], ["rtn", "gptq"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES, float32_from=0, **SMALL)
    assert seen == [0] and res["float32_from"] == 0
    parser = __import__("argparse").ArgumentParser()
    quantizers.add_parser(parser.add_subparsers())
    got = {}
    monkeypatch.setattr(quantizers, "run", lambda *a, **k: got.update(k) or {})
    monkeypatch.setattr(quantizers, "print_result", lambda res: None)
    for flag, want in ((["--float32-from", "0"], 0), (["--float32-from", "none"], None), ([], 4096)):
        quantizers.main(parser.parse_args(["quantizers", "--seeds", "1000-1003", "--calib-seeds", "0-3", *flag]))
        assert got["float32_from"] == want, flag


def test_amplitude_rows_scale_round_to_nearest_weight_error_and_early_error_measures_it():
    res = quantizers.run(["W4A16"], ["rtn", "gptq"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES,
                         amplitudes=[1.0, 0.5, 0.0], **SMALL)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["rtn", "rtn×1", "rtn×0.5", "rtn×0", "gptq"]
    rtn = rows["rtn"]
    assert rtn["early_error"] > 0 and rtn["early_error_ratio"] == pytest.approx(1.0)
    for r in rows.values():
        for window in ("early", "late"):
            per = r[f"per_sample_{window}_error"]
            assert len(per) == len(SEEDS) and sum(per) / len(per) == pytest.approx(r[f"{window}_error"], rel=1e-4)
    assert rtn["late_error"] > 0 and rtn["late_error_ratio"] == pytest.approx(1.0)
    assert 0.2 < rows["rtn×0.5"]["late_error_ratio"] < 0.3
    # amplitude 1 is round-to-nearest itself, amplitude 0 the FP weights (W4A16: nothing else is quantized)
    assert rows["rtn×1"]["latent_mse"] == pytest.approx(rtn["latent_mse"], rel=1e-3)
    assert rows["rtn×1"]["early_error_ratio"] == pytest.approx(1.0, rel=1e-3)
    assert rows["rtn×0"]["latent_mse"] < 1e-8 * rtn["latent_mse"] + 1e-10 and rows["rtn×0"]["early_error"] < 1e-9
    # the one-step output error is quadratic in the weight error's size, to first order
    assert 0.2 < rows["rtn×0.5"]["early_error_ratio"] < 0.3
    assert rows["rtn×0.5"]["latent_mse"] < rtn["latent_mse"]
    half = rows["rtn×0.5"]
    assert half["analysis"] and half["bytes_ratio"] is None
    assert half["gap_closed"]["estimate"] == pytest.approx(1 - half["latent_mse"] / rtn["latent_mse"], rel=1e-6)
    assert 0 < rows["gptq"]["early_error_ratio"] < 1  # GPTQ lowers the early one-step error
    table = {r[1]: r for r in quantizers.table_rows(res)}
    assert table["rtn×0.5"][13] == "-" and table["rtn×0.5"][-2] == f"{half['early_error_ratio']:.3f}"
    assert res["amplitudes"] == [1.0, 0.5, 0.0]


def test_the_error_scaling_patch_only_touches_the_copy_it_is_given():
    ref = load_reference()
    q = quantized_denoiser(ref.denoiser, "W4A16").quantized
    n = quantizers.scale_weight_error(q, ref.denoiser.unet, 0.0)
    layers = [m for m in q.modules() if isinstance(m, quantizers.QUANT_LAYERS)]
    assert n == len(layers) > 0
    name, layer = next((n_, m) for n_, m in q.named_modules() if isinstance(m, quantizers.QUANT_LAYERS))
    fp = ref.denoiser.unet.get_submodule(name).weight
    assert torch.equal(layer.weight_function[0](layer.dequantized_weight()), fp.float())
    assert not any(hasattr(m, "weight_function") for m in ref.denoiser.unet.modules())
    with pytest.raises(SystemExit, match="finite"):
        quantizers.scale_weight_error(q, ref.denoiser.unet, float("nan"))


def test_round_to_nearest_alone_collects_no_statistics_and_mirrored_errors_are_as_large():
    res = quantizers.run(["W4A16"], ["rtn"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES, amplitudes=[-1.0], **SMALL)
    assert res["collections"] == []
    rtn, mirror = res["rows"]
    assert mirror["method"] == "rtn×-1"
    # the same error, pointed the other way: the one-step error is the same to first order, the samples differ
    assert mirror["early_error_ratio"] == pytest.approx(1.0, rel=0.1)
    assert mirror["per_sample_latent_mse"] != rtn["per_sample_latent_mse"]


def rc_sigmas(rc, ref):
    from qcorrect.reference.schedules import get_sigmas
    return get_sigmas(rc.scheduler, ref.denoiser.sigmas, rc.steps)[:-1]


def test_per_sample_early_error_follows_seed_order_whatever_the_batching():
    ref = load_reference()
    q = quantized_denoiser(ref.denoiser, "W4A16")
    labels = labels_for(SEEDS, CLASSES)
    per = []
    for batch in (4, 1):
        states = []
        rc = RunConfig("euler", "normal", 3, 3.0, batch).validate()
        sample_latents(ref.denoiser, rc, SEEDS, labels, ref.denoiser.sigmas,
                       sampler_fn=quantizers._recording_sampler("euler", states))
        assert {s_[1] for s_ in states} == {float(v) for v in rc_sigmas(rc, ref)}
        per.append(quantizers.early_error(q, states))
    assert len(per[0]) == len(SEEDS) and torch.allclose(per[0], per[1], rtol=1e-4)
    assert len(set(per[0].tolist())) == len(SEEDS)  # one value per sample, not a broadcast mean


def test_early_and_late_windows_split_the_recorded_steps():
    ref = load_reference()
    q = quantized_denoiser(ref.denoiser, "W4A16")
    rc = RunConfig("euler", "normal", 6, 1.0, 4).validate()
    states = []
    sample_latents(ref.denoiser, rc, SEEDS, labels_for(SEEDS, CLASSES), ref.denoiser.sigmas,
                   sampler_fn=quantizers._recording_sampler("euler", states))
    sig = rc_sigmas(rc, ref)
    n_early = int((sig >= quantizers.EARLY_SIGMA).sum())
    assert 0 < n_early < len(sig)
    whole = quantizers.step_error(q, states, 0.0, float("inf"))
    early, late = quantizers.early_error(q, states), quantizers.late_error(q, states)
    # the per-sample mean over all steps is the step-weighted mean of the two windows
    assert torch.allclose(whole, (n_early * early + (len(sig) - n_early) * late) / len(sig), rtol=1e-6)
    assert torch.equal(quantizers.step_error(ref.denoiser, states, 0.0, float("inf")), torch.zeros(len(SEEDS), dtype=torch.float64))


def test_own_trajectory_error_runs_fp_alongside_each_model():
    res = quantizers.run(["W4A16"], ["rtn"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES, amplitudes=[0.0, 1.0],
                         own_error=True, **dict(SMALL, batch_size=2))
    rows = {r["method"]: r for r in res["rows"]}
    rtn, zero, one = rows["rtn"], rows["rtn×0"], rows["rtn×1"]
    for r in rows.values():
        assert len(r["per_sample_own_early_error"]) == len(SEEDS)  # two batches of two, in seed order
    assert rtn["own_early_error"] > 0 and rtn["own_early_error_ratio"] == pytest.approx(1.0)
    assert zero["own_early_error"] < 1e-12  # FP weights: its own trajectory is FP's, and so is its output
    assert one["per_sample_own_early_error"] == pytest.approx(rtn["per_sample_own_early_error"], rel=1e-3)
    default = quantizers.run(["W4A16"], ["rtn"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES, **SMALL)["rows"][0]
    assert "own_early_error" not in default


def test_own_trajectory_tracker_closes_batches_in_order():
    calls = []

    def fake(x, sigma, **extra):
        calls.append(float(sigma[0]))
        return x

    def fp(x, sigma, **extra):
        return torch.zeros_like(x)

    t = quantizers.OwnTrajectoryError(fake, fp, sigma_min=1.0)
    t(torch.ones(2, 1), torch.full((2,), 5.0))
    t(torch.full((2, 1), 3.0), torch.full((2,), 0.5))  # below sigma_min: not counted
    t.end_batch()
    t(torch.full((1, 1), 2.0), torch.full((1,), 2.0))
    t.end_batch(1, 3)
    assert t.per_sample().tolist() == [1.0, 1.0, 4.0] and calls == [5.0, 0.5, 2.0]


def test_tuned_methods_tune_the_grid_of_their_base_method_on_the_recorded_calibration_calls(tmp_path):
    from qcorrect.quant.tune import TuneConfig

    res = quantizers.run(["W4A16"], ["rtn", "rtn_tuned", "gptq", "gptq_tuned"], ["euler"], [3.0], SEEDS, CALIB, CLASSES,
                         tune=TuneConfig(iterations=30, lr=1e-3), **SMALL)
    rows = {r["method"]: r for r in res["rows"]}
    # tuning alone, on round-to-nearest's grid: its codes, its bytes, a calibration cost
    assert rows["rtn_tuned"]["bytes_ratio"] == rows["rtn"]["bytes_ratio"]
    assert rows["rtn_tuned"]["calib_seconds"] > 0 and "tuning" in rows["rtn_tuned"]
    t = rows["gptq_tuned"]["tuning"]
    assert t["iterations"] == 30 and t["layers"] > 0
    assert t["kept"] and t["hold_loss_after"] < t["hold_loss_before"]
    assert rows["gptq_tuned"]["bytes_ratio"] == rows["gptq"]["bytes_ratio"]  # no extra bytes
    assert rows["gptq_tuned"]["latent_mse"] != rows["gptq"]["latent_mse"]
    # a saved run compared method against method, sample by sample
    path = tmp_path / "run.json"
    path.write_text("table\n" + json.dumps(res, default=str) + "\n")
    comps = quantizers.compare_saved(json.loads(path.read_text().splitlines()[-1]), "gptq", "gptq_tuned")
    assert len(comps) == 1 and comps[0]["n"] == len(SEEDS)
    a = torch.tensor(rows["gptq"]["per_sample_latent_mse"], dtype=torch.float64)
    b = torch.tensor(rows["gptq_tuned"]["per_sample_latent_mse"], dtype=torch.float64)
    assert comps[0]["mse_removed"]["estimate"] == pytest.approx(float(1 - b.mean() / a.mean()), rel=1e-6)
    assert comps[0]["worse_share"] == pytest.approx(float((b > a).double().mean()))
    parser = __import__("argparse").ArgumentParser()
    quantizers.add_parser(parser.add_subparsers())
    args = parser.parse_args(["quantizers", "--compare", "gptq,gptq_tuned", "--compare-json", str(path)])
    assert quantizers.main(args) == 0
    with pytest.raises(SystemExit, match="no setting"):
        quantizers.main(parser.parse_args(["quantizers", "--compare", "gptq,awq", "--compare-json", str(path)]))


def test_a_tuned_method_after_its_base_tunes_a_copy_of_it_and_best_is_the_tuned_default():
    from qcorrect.quant.tune import TuneConfig

    tune = TuneConfig(iterations=10, lr=1e-3)
    alone = quantizers.run(["W4A16"], ["rtn", "gptq_tuned"], ["euler"], [3.0], SEEDS, CALIB, CLASSES, tune=tune, **SMALL)
    after = quantizers.run(["W4A16"], ["rtn", "gptq", "gptq_tuned"], ["euler"], [3.0], SEEDS, CALIB, CLASSES, tune=tune, **SMALL)
    a = alone["rows"][1]
    base, b = after["rows"][1:]
    # the same model whether its base is solved again or copied (the base row itself stays untuned)
    assert b["per_sample_latent_mse"] == a["per_sample_latent_mse"]
    assert b["tuning"]["hold_loss_after"] == a["tuning"]["hold_loss_after"]
    assert "tuning" not in base and base["latent_mse"] != b["latent_mse"]
    assert b["calib_seconds"] >= base["calib_seconds"]  # the copied base's solve is counted in
    # ``best`` is a tuned method: a tuning report, and exactly its untuned base's bytes (tuning moves
    # no storage; the budget decides the bytes)
    assert quantizers.BEST in quantizers.TUNED and quantizers.resolve_method("best") == quantizers.BEST
    base_name = quantizers.TUNED[quantizers.BEST]
    res = quantizers.run(["W4A16"], ["rtn", base_name, "best"], ["euler"], [3.0], SEEDS, CALIB, CLASSES, tune=tune,
                         budget=0.33, **SMALL)
    budget, best = res["rows"][1:]
    assert "tuning" in best and "tuning" not in budget and res["best"] == quantizers.BEST
    assert best["bytes_ratio"] == budget["bytes_ratio"] <= 0.33


def test_act_ranges_reach_the_models_and_only_change_guided_calls():
    """``--act-ranges``: per_latent (the presets' default) and per_sample give the same samples at
    CFG 1 (one pass per latent) and different ones at CFG 3, where a latent's two passes share ranges."""
    def rtn(cfg, ranges):
        res = quantizers.run(["W4A8"], ["rtn"], ["euler"], [cfg], SEEDS, CALIB[:4], CLASSES, act_ranges=ranges, **SMALL)
        assert res["act_ranges"] == {"W4A8": ranges or "per_latent"}
        return res["rows"][0]["per_sample_latent_mse"]

    assert rtn(1.0, None) == rtn(1.0, "per_sample")
    assert rtn(3.0, None) != rtn(3.0, "per_sample")


def test_relax_raises_the_activation_bits_of_the_first_steps_only():
    """``--relax F``: PCR's schedule on every row's quantized model — the relaxed step's activations
    are finer (the early one-step error falls), the other steps are untouched bit for bit; a preset
    without quantized activations is refused."""
    def rtn0(relax):
        res = quantizers.run(["W4A8"], ["rtn"], ["euler"], [1.0], SEEDS, CALIB[:4], CLASSES, amplitudes=(0.0,),
                             relax=relax, steps=4, batch_size=4, log=lambda *_: None)
        return res, {r["method"]: r for r in res["rows"]}["rtn×0"]

    plain, p = rtn0(None)
    relaxed, r = rtn0((0.25, "xT", 10))  # one of four steps, the noisiest (σ far above EARLY_SIGMA)
    assert plain["relax"] is None and relaxed["relax"] == {"fraction": 0.25, "where": "xT", "bits": 10}
    # activations only (rtn×0): that step at A10 instead of A8
    assert r["early_error"] < 0.5 * p["early_error"]
    assert r["per_sample_late_error"] == p["per_sample_late_error"]
    with pytest.raises(SystemExit, match="activations"):
        quantizers.run(["W4A16"], ["rtn"], ["euler"], [1.0], SEEDS, CALIB[:4], CLASSES, relax=(0.5, "xT", 10), **SMALL)


def test_the_tuning_and_relax_flags_reach_the_run(monkeypatch):
    seen = {}
    monkeypatch.setattr(quantizers, "run", lambda *a, **k: seen.update(k) or {})
    monkeypatch.setattr(quantizers, "print_result", lambda res: None)
    parser = __import__("argparse").ArgumentParser()
    quantizers.add_parser(parser.add_subparsers())
    args = parser.parse_args(["quantizers", "--seeds", "1000-1003", "--calib-seeds", "0-3", "--tune-seed", "3",
                              "--tune-lowpass", "2.5", "--tune-lowpass-k", "3", "--tune-iters", "7",
                              "--relax", "0.35", "--relax-bits", "9", "--windows", "0-3,4-19",
                              "--tune-early-sigma", "6", "--tune-jacobian", "30", "--adjoints", "2"])
    assert quantizers.main(args) == 0
    assert seen["jacobian"] == (30.0, 2)
    tune = seen["tune"]
    assert (tune.seed, tune.lowpass_weight, tune.lowpass, tune.iterations, tune.early_sigma) == (3, 2.5, 3, 7, 6.0)
    assert seen["relax"] == (0.35, "xT", 9)
    assert seen["windows"] == {"0-3": range(0, 4), "4-19": range(4, 20)}
    args = parser.parse_args(["quantizers", "--seeds", "1000-1003", "--calib-seeds", "0-3"])
    quantizers.main(args)
    assert seen["relax"] is None and seen["tune"].lowpass_weight == 0.0 and seen["tune"].seed == 0
    assert seen["windows"] == {} and seen["tune"].early_sigma == 3.0
    assert seen["jacobian"] == (quantizers.JACOBIAN_WEIGHT, quantizers.ADJOINTS) and seen["tune"].jacobian_weight == 0.0


def test_the_jacobian_tuned_method_tunes_a_copy_of_the_same_base_on_calls_with_adjoints(monkeypatch):
    asked = []
    real = quantizers.collect_inputs
    monkeypatch.setattr(quantizers, "collect_inputs", lambda *a, **k: asked.append(k["adjoints"]) or real(*a, **k))
    tune = quantizers.TuneConfig(iterations=4)
    res = quantizers.run(["W4A16"], ["rtn", "gptq_budget_tuned", "gptq_budget_jtuned"], ["euler"], [3.0], SEEDS,
                         CALIB[:4], CLASSES, budget=0.33, tune=tune, jacobian=(50.0, 2), **SMALL)
    rows = {r["method"]: r for r in res["rows"]}
    plain, jac = rows["gptq_budget_tuned"], rows["gptq_budget_jtuned"]
    assert asked == [2]
    assert jac["tuning"]["jacobian_weight"] == 50.0 and "jacobian_weight" not in plain["tuning"]
    assert jac["bytes_ratio"] == plain["bytes_ratio"] and jac["allocation"] == plain["allocation"]  # one base
    assert jac["tuning"]["hold_loss_before"] > plain["tuning"]["hold_loss_before"]  # the term is in the loss
    assert res["collections"][0]["adjoint_seconds"] > 0  # counted in the Jacobian-tuned row's calibration only
    with pytest.raises(SystemExit, match="adjoints"):
        quantizers.run(["W4A16"], ["rtn", "gptq_budget_jtuned"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES,
                       jacobian=(1.0, 0), **SMALL)


def test_step_windows_run_the_quantized_model_on_their_steps_only():
    """``--windows``: a window over every step is the quantized run itself, sample by sample; the
    windows that partition the steps (the first that do not overlap) report their sum against the full run; the other rows are compared with round-to-nearest's same window."""
    res = quantizers.run(["W4A16"], ["rtn", "gptq"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES,
                         windows=quantizers.parse_windows("0-2,0-0,1-2", 3), **SMALL)
    assert res["windows"] == {"0-2": [0, 2], "0-0": [0, 0], "1-2": [1, 2]}
    for r in res["rows"]:
        w = r["windows"]
        assert w["0-2"]["per_sample_latent_mse"] == pytest.approx(r["per_sample_latent_mse"], rel=1e-5)
        assert 0 < w["0-0"]["latent_mse"] < r["latent_mse"] and 0 < w["1-2"]["latent_mse"] < r["latent_mse"]
        # 0-2 alone partitions the steps; 0-0 and 1-2 overlap it and are left out of the sum
        assert r["windows_partition"] == ["0-2"] and r["windows_sum_over_full"] == pytest.approx(1.0, rel=1e-5)
        assert 0 <= r["tipped_in_no_window"] <= r["tipped"]
    rtn, gptq = (r["windows"] for r in res["rows"])
    assert all("x_rtn" not in w for w in rtn.values()) and all("x_rtn" in w for w in gptq.values())
    assert gptq["0-0"]["x_rtn"] == pytest.approx(gptq["0-0"]["latent_mse"] / rtn["0-0"]["latent_mse"])
    part = quantizers.run(["W4A16"], ["rtn"], ["euler"], [3.0], SEEDS, CALIB[:4], CLASSES,
                          windows=quantizers.parse_windows("0-0,1-2,0-1", 3), **SMALL)["rows"][0]
    assert part["windows_partition"] == ["0-0", "1-2"]
    assert part["windows_sum_over_full"] == pytest.approx(
        (part["windows"]["0-0"]["latent_mse"] + part["windows"]["1-2"]["latent_mse"]) / part["latent_mse"])


def test_a_step_window_assigns_every_call_to_its_step_and_passes_the_rest_to_fp():
    calls = []
    sigmas = torch.tensor([10.0, 4.0, 1.0, 0.0])
    q = lambda x, s, **k: calls.append(("q", float(s))) or x  # noqa: E731
    fp = lambda x, s, **k: calls.append(("fp", float(s))) or x  # noqa: E731
    win = quantizers.StepWindow(q, fp, sigmas, {1})
    # step 0: 10 and Heun's intermediate 4.5; step 1: 4 and 2; step 2: 1 and 0.5; σ above σ_0 counts with step 0
    assert [win.step_of(s) for s in (12.0, 10.0, 4.5, 4.0, 2.0, 1.0, 0.5)] == [0, 0, 0, 1, 1, 2, 2]
    for s in (10.0, 4.0, 2.0, 1.0):
        win(torch.zeros(1), torch.tensor([s]))
    assert calls == [("fp", 10.0), ("q", 4.0), ("q", 2.0), ("fp", 1.0)]


def test_window_parsing_refuses_steps_outside_the_schedule():
    assert quantizers.parse_windows("0-3, 5,7-7", 20) == {"0-3": range(0, 4), "5-5": range(5, 6), "7-7": range(7, 8)}
    assert quantizers.parse_windows(None, 20) == {}
    with pytest.raises(SystemExit, match="outside"):
        quantizers.parse_windows("15-20", 20)
    with pytest.raises(SystemExit, match="outside"):
        quantizers.parse_windows("4-2", 20)
    with pytest.raises(SystemExit, match="step range"):
        quantizers.parse_windows("early", 20)


def test_the_x0_probed_budget_asks_the_probe_for_the_denoised_outputs_error(monkeypatch):
    spaces = []
    real = quantizers.layer_probe

    def spy(*a, space="eps", **k):
        spaces.append(space)
        return real(*a, space=space, **k)

    monkeypatch.setattr(quantizers, "layer_probe", spy)
    res = quantizers.run(["W4A16"], ["rtn", "gptq_budget", "gptq_budget_x0", "gptq_budget_x0_tuned"], ["euler"], [3.0],
                         SEEDS, CALIB[:4], CLASSES, budget=0.33, tune=quantizers.TuneConfig(iterations=2), **SMALL)
    # gptq_budget: eps; gptq_budget_x0: x0; its tuned twin tunes a copy of it (no second probe)
    assert spaces == ["eps", "x0"]
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["gptq_budget_x0_tuned"]["tuning"]["iterations"] == 2 and "allocation" in rows["gptq_budget_x0"]


def test_sd15_statistics_cost_counts_each_layers_rows_times_k_squared_under_the_row_cap():
    """The x xᵀ multiply-adds the SD1.5-shaped UNet's statistics cost: per call and layer, the layer's
    rows (a conv's output positions, a Linear's tokens, for the cond and uncond pass) capped as
    collect_inputs caps them, times K² (about half that for K ≥ 1024, whose sums are triangular)."""
    from qcorrect.bench.quantizers import SDUNet, sd15_stats_macs
    with torch.device("meta"):
        model = SDUNet()
    conv, lin = "input_blocks.0.0", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    layers = {conv: model.get_submodule(conv), lin: model.get_submodule(lin)}
    rows = 2 * 8 * 8  # latent 8x8: 64 positions (conv, stride 1, padded) and 64 tokens, two passes
    uncapped = sd15_stats_macs(model, layers, samples=3, latent=8, steps=5, rows_per_k=1e9)
    assert uncapped["macs"] == 15 * (rows * 36**2 + rows * 320**2)
    # products made on a GPU: per call and layer the CPU adds one row's worth, K² (narrow), whatever the rows
    assert uncapped["host_adds"] == 15 * (36**2 + 320**2)
    capped = sd15_stats_macs(model, layers, samples=3, latent=8, steps=5, rows_per_k=1)
    # cap per call: max(64, int(K/15 + 1)) = 64 rows for the conv (K = 36), 64 for the Linear (K = 320)
    assert capped["macs"] == 15 * (64 * 36**2 + 64 * 320**2)
    # a wide layer (K = 2560·9 = 45 blocks of 512) sums only its upper block triangle: (K² + 512·K)/2 per row;
    # at an 8×8 latent output_blocks.0 runs at 1×1, one position per pass
    wide = "output_blocks.0.0.in_layers.2"
    tri = sd15_stats_macs(model, {wide: model.get_submodule(wide)}, samples=3, latent=8, steps=5, rows_per_k=1e9)
    assert tri["macs"] == 15 * 2 * (23040**2 + 512 * 23040) // 2
    assert tri["host_adds"] == 15 * (23040**2 + 512 * 23040) // 2


def test_the_solver_bytes_reported_for_sd15_are_what_the_solver_keeps():
    """bench's ``solver_bytes`` (from shapes alone) equals the bytes a CalibratedSolver keeps after its
    layers' statistics are dropped, under the mixed default, on a small net."""
    from qcorrect.bench.quantizers import solver_bytes
    from qcorrect.quant.calibrated import CalibratedConfig, CalibratedSolver
    from tests.quant.test_calibrated import Net, batches, stats_of

    def nbytes(obj):
        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (tuple, list)):
            return sum(nbytes(v) for v in obj)
        return 0

    net = Net().eval()
    stats = stats_of(net, batches(48, 1), batches(24, 2))
    solver = CalibratedSolver(Net(), "W4A8", CalibratedConfig(budget=0.45, budget_options=("int8", "rank", "kept", "uint3")))
    solver.add(stats)
    kept = 0
    for sol in solver.solutions.values():
        kept += nbytes(sol.storage)
        c = sol.candidates
        if c is not None:
            kept += nbytes(c.int8[0]) + nbytes(c.low[0]) + nbytes([c.a, c.b, c.s])
    assert kept == solver_bytes(Net(), "W4A8") > 0
