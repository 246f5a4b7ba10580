"""qcorrect bench tuning: one grid-tuning step on an SD1.5-shaped UNet (issue 11)."""

import torch

from qcorrect import cli
from qcorrect.bench import tuning
from qcorrect.bench.sd_unet import SDUNet


def small_unet():
    torch.manual_seed(0)
    return SDUNet(base=64, mult=(1, 2), res_blocks=1, attn_levels=(1,), heads=2, context_dim=64)


def test_the_lean_and_the_plain_step_compute_the_same_loss_and_the_same_update():
    lean = tuning.run(latents=(8,), plain=False, unet=small_unet())
    both = tuning.run(latents=(8,), plain=True, unet=small_unet())
    r = both["rows"][0]
    assert lean["layers"] > 0 and lean["grid_params"] > 0 and lean["quantized_bytes"] < lean["fp_bytes"]
    assert lean["rows"][0]["lean_loss"] == r["lean_loss"]
    # the plain step starts from the grid the lean step updated on the same input: one step lower
    assert r["plain_loss"] < r["lean_loss"]
    assert r["lean_step_seconds"] > 0 and r["forward_seconds"] > 0


def test_a_lean_step_and_a_plain_step_move_the_grid_identically():
    results = []
    for plain in (False, True):
        unet = small_unet()
        res = tuning.run(latents=(8,), unet=unet)  # quantizes ``unet`` in place and takes one lean step
        grids = [tuning._Grid(m) for m in unet.modules() if isinstance(m, tuning.QUANT_LAYERS)]
        opt = torch.optim.SGD([p for g in grids for p in g.params()], lr=1.0)
        gen = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 64, generator=gen)
        tuning.tuning_step(unet, grids, opt, x, torch.full((1,), 300.0), ctx, plain=plain)
        results.append(torch.cat([p.detach().flatten() for g in grids for p in g.params()]))
        assert res["rows"][0]["lean_loss"] > 0
    assert results[0].abs().sum() > 0
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_the_command_prints_a_table_and_a_json_line(monkeypatch, capsys):
    monkeypatch.setattr(tuning, "build_sd15_unet", lambda dtype, seed=0, device="cpu": small_unet().to(dtype))
    assert cli.main(["bench", "tuning", "--latent", "8", "--plain", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("grid tuning on the SD1.5-shaped UNet") and "grid parameters" in out[0]
    import json
    res = json.loads(out[-1])
    assert res["rows"][0]["latent"] == 8 and "plain_peak_bytes" in res["rows"][0]


def test_the_sketch_option_times_the_sensitivity_probe_on_the_float_model(monkeypatch, capsys):
    monkeypatch.setattr(tuning, "build_sd15_unet", lambda dtype, seed=0, device="cpu": small_unet().to(dtype))
    assert cli.main(["bench", "tuning", "--latent", "8", "--sketch", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    import json
    row = json.loads(out[-1])["rows"][0]
    assert row["sketch_seconds"] > 0 and row["sketch_layers"] > 0
    # no hook is left on the model the probe ran through (it was then quantized and stepped as usual)
    assert row["lean_loss"] > 0
