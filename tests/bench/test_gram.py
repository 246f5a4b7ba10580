"""qcorrect bench gram: one model call's statistics update per SD1.5 layer shape, summed over the calls."""

import json

import pytest
import torch

from qcorrect.bench.gram import time_update


def test_the_bench_times_every_layer_shape_it_keeps_and_sums_its_calls(capsys):
    from qcorrect.bench.quantizers import sd15_stats_calls, sd15_w4_layers
    from qcorrect.cli import main

    argv = ["bench", "gram", "--latents", "1", "--latent", "8", "--steps", "2", "--max-k", "700", "--repeats", "1",
            "--threads", "1", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    model, layers = sd15_w4_layers()
    want = [(k, r, c) for _, k, r, c in sd15_stats_calls(model, layers, 1, 8, 2) if k <= 700]
    assert res["layers"] == len(layers) == 278 and res["layers_timed"] == len(want) < 278
    assert sorted((r["k"], r["rows_per_call"]) for r in res["rows"]) == sorted({(k, r) for k, r, _ in want})
    assert sum(r["calls"] for r in res["rows"]) == sum(c for *_, c in want)
    assert sum(r["layers"] for r in res["rows"]) == len(want)
    for r in res["rows"]:
        assert r["k"] <= 700 and r["seconds_per_call"] > 0 and r["seconds"] == pytest.approx(r["calls"] * r["seconds_per_call"])
    assert res["seconds"] == pytest.approx(sum(r["seconds"] for r in res["rows"]))
    assert any("the wider ones left out" in line for line in out)


def test_the_bench_refuses_cuda_without_a_device_and_times_a_real_update(monkeypatch):
    from qcorrect.cli import main

    assert time_update(64, 16, torch.device("cpu"), repeats=1) > 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["bench", "gram", "--device", "cuda", "--max-k", "400", "--threads", "1"])
