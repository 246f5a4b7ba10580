"""qcorrect bench speed: one call of the quantized UNet against the float model, in one run."""

import json

import pytest
import torch

from qcorrect.bench import speed
from qcorrect.quant import quantized_layers
from tests.bench.test_tuning import small_unet


def test_every_preset_is_timed_against_the_float_model_of_the_same_run(monkeypatch):
    made = []
    real = speed.quantize_model

    def quantize(model, preset):
        made.append(preset)
        out = real(model, preset)
        assert quantized_layers(model)  # the timed copy really holds packed layers
        return out

    monkeypatch.setattr(speed, "quantize_model", quantize)
    res = speed.run(["W4A8", "W8A8"], latent=8, batch=2, dtype=torch.float32, repeats=2, unet=small_unet())
    assert made == ["W4A8", "W8A8"]
    assert [r["config"] for r in res["rows"]] == ["float32", "W4A8", "W8A8"]
    fp = res["rows"][0]
    assert fp["ratio"] == 1.0 and all(r["seconds"] > 0 for r in res["rows"])
    for r in res["rows"][1:]:
        assert r["ratio"] == pytest.approx(r["seconds"] / fp["seconds"]) and r["bytes"] < fp["bytes"]


def test_the_command_prints_a_table_and_a_json_line(monkeypatch, capsys):
    from qcorrect import cli

    monkeypatch.setattr(speed, "build_sd15_unet", lambda dtype, seed=0, device="cpu": small_unet().to(dtype))
    assert cli.main(["bench", "speed", "--presets", "W4A16", "--latent", "8", "--dtype", "fp32", "--repeats", "1",
                     "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert [r["config"] for r in res["rows"]] == ["float32", "W4A16"] and any("median of 1 after a warm-up" in line for line in out)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        cli.main(["bench", "speed", "--device", "cuda"])
