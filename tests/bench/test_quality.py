import pytest

from qcorrect.bench import quality
from qcorrect.bench.common import quant_plan
from qcorrect.bench.correct import calibrate_method, corrected_sampler
from qcorrect.bench.pipeline import RunConfig, labels_for, quantized_denoiser, sample_latents
from qcorrect.evaluation import latent_mse
from qcorrect.reference.model import load_reference

SEEDS, CLASSES = [1000, 1001, 1002, 1003], [3, 7]
SMALL = dict(steps=3, batch_size=4, log=lambda *_: None, measure_calib_cost=False)


def test_evaluation_seeds_are_refused_for_calibration_without_oracle():
    with pytest.raises(SystemExit, match="overlap"):
        quality.run(["W8A8"], ["euler"], SEEDS, CLASSES, methods=["tcec"], calib_seeds=[999, 1000], **SMALL)
    with pytest.raises(SystemExit, match="--stats"):
        quality.run(["W8A8"], ["euler"], SEEDS, CLASSES, methods=["tcec"], stats_path="x.safetensors", oracle=True,
                    **SMALL)
    with pytest.raises(SystemExit, match="--calib-classes"):
        quality.run(["W8A8"], ["euler"], SEEDS, CLASSES, methods=["tcec"], calib_classes=[0], oracle=True, **SMALL)


def test_oracle_calibrates_on_exactly_the_evaluated_samples_and_says_so():
    res = quality.run(["W8A8"], ["euler"], SEEDS, CLASSES, methods=["none", "tcec"], calib_seeds=[0, 1],
                      oracle=True, **SMALL)
    assert res["oracle"] is True
    assert res["calibration"]["seeds"] == "1000-1003" and res["calibration"]["classes"] == CLASSES
    row = next(r for r in res["rows"] if r["method"] == "tcec")
    assert row["calibrated_on"] == "evaluation seeds (oracle)" and row["calib_n"] == len(SEEDS)

    # the same numbers by hand: TCEC calibrated on the evaluation seeds and classes, then sampled on them
    ref = load_reference()
    rc = RunConfig("euler", "normal", 3, ref.default_cfg, 4).validate()
    qden = quantized_denoiser(ref.denoiser, quant_plan("W8A8", None))
    stats, _ = calibrate_method(ref, qden, "tcec", rc, SEEDS, CLASSES, "W8A8")
    labels = labels_for(SEEDS, CLASSES)
    lat_fp = sample_latents(ref.denoiser, rc, SEEDS, labels, ref.denoiser.sigmas)
    lat = sample_latents(qden, rc, SEEDS, labels, ref.denoiser.sigmas,
                         sampler_fn=corrected_sampler(stats, "tcec", "euler"))
    mine = latent_mse(lat, lat_fp)
    assert row["latent_mse"] == pytest.approx(float(mine.mean()), rel=1e-5)
    base = latent_mse(sample_latents(qden, rc, SEEDS, labels, ref.denoiser.sigmas), lat_fp)
    assert row["samples_improved"] == pytest.approx(float((mine < base).double().mean()))
    assert row["median_gap_closed"] == pytest.approx(float((1 - mine / base).median()), rel=1e-5)

    # and a normal run calibrated elsewhere gives other statistics, hence another row
    held_out = quality.run(["W8A8"], ["euler"], SEEDS, CLASSES, methods=["none", "tcec"], calib_seeds=[0, 1, 2, 3],
                           **SMALL)
    other = next(r for r in held_out["rows"] if r["method"] == "tcec")
    assert held_out["oracle"] is False and other["calibrated_on"] == "calibration seeds"
    assert other["latent_mse"] != pytest.approx(row["latent_mse"], rel=1e-6)
