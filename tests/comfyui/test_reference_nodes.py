"""Load Reference Model, Reference Class, the reference VAE and Compare To Reference in a real ComfyUI.

ComfyUI's own sampling of the loaded MODEL must reproduce the library's reference sampler (same
initial noise, σ grid, preconditioning and CFG), the stock VAE nodes must decode and encode with
the reference autoencoder, and Compare To Reference must report exactly what ``evaluation/``
computes. No mocks: everything runs inside the ComfyUI checkout of ``COMFYUI_DIR``.
"""

import math

import pytest
import torch

STEPS = 20


@pytest.fixture(scope="module")
def R(comfy):
    from qcorrect.nodes import reference

    return reference


@pytest.fixture(scope="module")
def lib():
    from qcorrect.reference.model import load_reference

    return load_reference()


@pytest.fixture(scope="module")
def loaded(R):
    model, vae = R.QCorrectLoadReferenceModel.execute().args
    return model, vae


def _cond(R, label):
    return R.QCorrectReferenceClass.execute(label=label).args[0]


def _comfy_sample(model, positive, negative, batch, seed, cfg):
    import comfy.sample
    import nodes

    latent = {"samples": torch.zeros(batch, 4, 14, 14)}
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    out = nodes.common_ksampler(model, seed, STEPS, cfg, "euler", "normal", positive, negative, latent)[0]
    return out, noise


@pytest.fixture(scope="module")
def sampled(R, loaded):
    """A ComfyUI-sampled LATENT of class 3 at CFG 3 (4 samples) and its initial noise."""
    return _comfy_sample(loaded[0], _cond(R, "3"), _cond(R, "empty"), 4, 11, 3.0)


# ------------------------------------------------------------------ the MODEL
def test_model_is_an_eps_base_model_on_the_reference_grid(R, loaded, lib):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.samplers
    from qcorrect.reference.schedules import get_sigmas
    from qcorrect.reference.sigmas import scaled_linear_sigmas

    model, _ = loaded
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.model, comfy.model_base.BaseModel)
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    ms = model.get_model_object("model_sampling")
    assert torch.equal(ms.sigmas, scaled_linear_sigmas())
    fmt = model.get_model_object("latent_format")
    assert fmt.latent_channels == 4 and fmt.scale_factor == lib.autoencoder.scale_factor
    for scheduler in ("normal", "karras", "simple"):
        torch.testing.assert_close(comfy.samplers.calculate_sigmas(ms, scheduler, STEPS).float(),
                                   get_sigmas(scheduler, lib.denoiser.sigmas, STEPS), rtol=1e-6, atol=1e-6)


def test_empty_latent_image_of_112_pixels_samples_at_14x14(R, loaded):
    import nodes

    latent = nodes.EmptyLatentImage().generate(112, 112, 2)[0]
    out = nodes.common_ksampler(loaded[0], 0, 2, 3.0, "euler", "normal", _cond(R, "1"), _cond(R, "empty"), latent)[0]
    assert out["samples"].shape == (2, 4, 14, 14) and bool(torch.isfinite(out["samples"]).all())


def test_diffusion_model_keeps_plain_layers_with_the_library_names(loaded, lib):
    from torch import nn

    dm = loaded[0].model.diffusion_model
    assert [n for n, _ in dm.named_modules()] == [n for n, _ in lib.unet.named_modules()]
    convs = [n for n, m in dm.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs[0] == "conv_in" and convs[-1] == "conv_out"
    layers = [m for m in dm.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(type(m) in (nn.Linear, nn.Conv2d) for m in layers)
    for k, v in lib.unet.state_dict().items():
        assert torch.equal(dm.state_dict()[k], v), k


def test_diffusion_model_takes_comfyui_call_and_refuses_foreign_context(R, loaded, lib):
    dm = loaded[0].model.diffusion_model
    x, t = torch.randn(2, 4, 14, 14), torch.tensor([999.0, 10.0])
    tokens = torch.cat([_cond(R, "4")[0][0], _cond(R, "empty")[0][0]])
    with torch.no_grad():
        out = dm(x, t, context=tokens, control=None, transformer_options={})
        torch.testing.assert_close(out, lib.unet(x, t, torch.tensor([4, 10])), rtol=0, atol=1e-6)
        torch.testing.assert_close(dm(x, t), lib.unet(x, t, torch.tensor([10, 10])), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="Reference Class"):
            dm(x, t, context=torch.zeros(2, 77, 768))


def test_reference_class_gives_the_class_tokens(R, lib):
    from qcorrect.reference.unet import NULL_CLASS

    for label, index in (("0", 0), ("9", 9), ("empty", NULL_CLASS)):
        cond = _cond(R, label)
        assert len(cond) == 1 and cond[0][1] == {}
        tokens = cond[0][0]
        assert tokens.shape == (1, lib.unet.context_tokens, lib.unet.context_dim)
        assert torch.equal(tokens, lib.unet.context(torch.tensor([index])))
    with pytest.raises(ValueError, match="unknown reference class"):
        R.class_conditioning("11")


@pytest.mark.parametrize("cfg,label,seed", [(3.0, "3", 11), (1.0, "7", 5)])
def test_comfyui_ksampler_reproduces_the_library_sampler(R, loaded, lib, sampled, cfg, label, seed):
    from qcorrect.reference.samplers import sample_euler
    from qcorrect.reference.schedules import get_sigmas

    out, noise = sampled if (cfg, label, seed) == (3.0, "3", 11) else \
        _comfy_sample(loaded[0], _cond(R, label), _cond(R, "empty"), 4, seed, cfg)
    sigmas = get_sigmas("normal", lib.denoiser.sigmas, STEPS)
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # ComfyUI's EPS noise scaling for a full denoise
    labels = torch.full((noise.shape[0],), int(label))
    expected = sample_euler(lib.denoiser, x, sigmas, {"cond": labels, "cfg_scale": cfg}, disable=True)
    got = out["samples"] * lib.autoencoder.scale_factor  # LATENTs are raw autoencoder latents
    assert got.shape == expected.shape == (4, 4, 14, 14)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # measured: ≤ 1e-5 on |x| ≤ 5


# ------------------------------------------------------------------ the VAE
def test_stock_vae_decode_gives_the_autoencoders_images(loaded, lib, sampled):
    import nodes

    _, vae = loaded
    latent = sampled[0]
    image = nodes.VAEDecode().decode(vae, latent)[0]
    assert image.shape == (4, 28, 28, 3) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert torch.equal(image[..., 0], image[..., 1]) and torch.equal(image[..., 0], image[..., 2])
    with torch.no_grad():
        expected = lib.autoencoder.decode(latent["samples"] * lib.autoencoder.scale_factor)
    torch.testing.assert_close(image[..., 0], expected[:, 0], rtol=0, atol=1e-5)
    # and the classifier reads the requested digit off the decoded images
    with torch.no_grad():
        preds = lib.classifier.logits(image[..., :1].movedim(-1, 1)).argmax(-1)
    assert int((preds == 3).sum()) >= 3


def test_stock_vae_encode_decode_round_trip(loaded, lib, sampled):
    import nodes

    _, vae = loaded
    image = nodes.VAEDecode().decode(vae, sampled[0])[0]
    latent = nodes.VAEEncode().encode(vae, image)[0]
    assert latent["samples"].shape == (4, 4, 14, 14)
    with torch.no_grad():
        expected = lib.autoencoder.encode(image[..., :1].movedim(-1, 1)) / lib.autoencoder.scale_factor
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-5, atol=1e-5)
    again = nodes.VAEDecode().decode(vae, latent)[0]
    assert float((again - image).abs().mean()) < 0.05
    colour = image * torch.tensor([1.0, 0.5, 0.25])  # colour input is converted to luma, not rejected
    assert vae.encode(colour).shape == (4, 4, 14, 14)
    with pytest.raises(ValueError, match="4, H, W"):
        vae.decode(torch.zeros(1, 16, 14, 14))


# ------------------------------------------------------------------ Compare To Reference
def _noisy(latent: dict, scale: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"samples": latent["samples"] + scale * torch.randn(latent["samples"].shape, generator=g)}


def _expected(lib, ref_latent, test_latent):
    from qcorrect.evaluation import latent_mse, psnr, ssim

    s = lib.autoencoder.scale_factor
    a, b = test_latent["samples"] * s, ref_latent["samples"] * s
    with torch.no_grad():
        img_a, img_b = lib.autoencoder.decode(a), lib.autoencoder.decode(b)
    return {"latent_mse": float(latent_mse(a, b).mean()), "psnr": float(psnr(img_a, img_b).clamp(max=100.0).mean()),
            "ssim": float(ssim(img_a, img_b).mean()), "images": (img_a, img_b)}


def test_compare_latents_matches_the_evaluation_functions(R, lib, sampled):
    ref_latent = sampled[0]
    test_latent = _noisy(ref_latent, 0.05, 1)
    out = R.QCorrectCompareToReference.execute(reference=ref_latent, test=test_latent)
    report, plot = out.args
    exp = _expected(lib, ref_latent, test_latent)
    metrics = R.compare_batches(ref_latent, test_latent)
    assert metrics["kind"] == "LATENT" and metrics["n"] == 4
    for key in ("latent_mse", "psnr", "ssim"):
        assert metrics[key] == pytest.approx(exp[key], rel=1e-12), key
    assert f"{exp['psnr']:.4f} dB" in report and f"{exp['ssim']:.4f}" in report
    assert f"{exp['latent_mse']:.6g}" in report
    assert metrics["fid_to_fp"] is None and "not computed" in report and str(R.FID_MIN_SAMPLES) in report
    assert out.ui.as_dict() == {"text": (report,)}
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.ndim == 4
    assert "no stats connected" in report


def test_identical_inputs_give_zero_latent_error(R, sampled):
    metrics = R.compare_batches(sampled[0], {"samples": sampled[0]["samples"].clone()})
    assert metrics["latent_mse"] == 0.0
    assert metrics["psnr"] == R.PSNR_CAP_DB and metrics["ssim"] == pytest.approx(1.0)


def test_compare_images_matches_the_evaluation_functions(R, lib, loaded, sampled):
    import nodes
    from qcorrect.evaluation import psnr, ssim

    vae = loaded[1]
    ref_img = nodes.VAEDecode().decode(vae, sampled[0])[0]
    test_img = nodes.VAEDecode().decode(vae, _noisy(sampled[0], 0.1, 2))[0]
    metrics = R.compare_batches(ref_img, test_img)
    a, b = test_img.movedim(-1, 1), ref_img.movedim(-1, 1)
    assert metrics["kind"] == "IMAGE" and metrics["latent_mse"] is None
    assert metrics["psnr"] == pytest.approx(float(psnr(a, b).clamp(max=100.0).mean()), rel=1e-12)
    assert metrics["ssim"] == pytest.approx(float(ssim(a, b).mean()), rel=1e-12)
    # replicated-grey RGB scores like the grey images themselves
    assert metrics["psnr"] == pytest.approx(float(psnr(a[:, :1], b[:, :1]).mean()), rel=1e-9)


def test_fid_to_fp_is_reported_for_a_large_enough_batch(R, lib):
    from qcorrect.evaluation import fid_to_fp

    n = R.FID_MIN_SAMPLES
    g = torch.Generator().manual_seed(0)
    ref_latent = {"samples": torch.randn(n, 4, 14, 14, generator=g) / lib.autoencoder.scale_factor}
    test_latent = _noisy(ref_latent, 0.2, 3)
    metrics = R.compare_batches(ref_latent, test_latent)
    img_a, img_b = _expected(lib, ref_latent, test_latent)["images"]
    expected = fid_to_fp(img_a, img_b, lib.classifier.features)
    assert metrics["fid_to_fp"] == pytest.approx(expected, rel=1e-9) and expected > 0
    report = R.format_report(metrics, None)
    assert f"FID-to-FP  {expected:.4f}" in report


def test_compare_refuses_mismatched_inputs(R, loaded, sampled):
    import nodes

    latent = sampled[0]
    image = nodes.VAEDecode().decode(loaded[1], latent)[0]
    with pytest.raises(ValueError, match="reference is LATENT but test is IMAGE"):
        R.QCorrectCompareToReference.execute(reference=latent, test=image)
    with pytest.raises(ValueError, match="4 samples but test has 2"):
        R.QCorrectCompareToReference.execute(reference=latent, test={"samples": latent["samples"][:2]})
    # another model's latents (SD's 64×64 → 8×8, 16-channel ones) are never decoded by the MNIST autoencoder
    a, b = torch.zeros(2, 16, 8, 8), torch.ones(2, 16, 8, 8)
    raw = R.compare_batches({"samples": a}, {"samples": b})
    assert raw["raw_latents"] and raw["latent_mse"] == 1.0 and raw["psnr"] is None
    report = R.format_report(raw, None)
    assert "another model" in report and "raw latents" in report and "PSNR  " not in report
    with pytest.raises(ValueError, match="calibration statistics"):
        R.QCorrectCompareToReference.execute(reference=latent, test=latent, stats="not stats")


def _stats(lib):
    from qcorrect.calibration import CorrectionStats, StatsMeta
    from qcorrect.reference.schedules import get_sigmas

    sigmas = get_sigmas("normal", lib.denoiser.sigmas, 5)
    stats = CorrectionStats.empty(sigmas, 4, StatsMeta(sampler="euler", scheduler="normal", steps=5, cfg=3.0,
                                                        n_samples=2, quantization="W4A8"))
    g = torch.Generator().manual_seed(4)
    errs = []
    for row in range(stats.rows):
        eps = torch.randn(2, 4, 14, 14, generator=g)
        eps_q = eps + 0.1 * (row + 1) * torch.randn(2, 4, 14, 14, generator=g)
        stats.add_eps(row, eps, eps_q)
        delta = 0.02 * row * torch.randn(2, 4, 14, 14, generator=g)
        stats.add_latent(row, delta)
        errs.append((float((eps_q.double() - eps.double()).square().mean().sqrt()), float(delta.double().square().mean().sqrt())))
    return stats, errs


def test_stats_give_the_per_step_error_and_a_plot(R, lib, sampled):
    from qcorrect.evaluation.plot import PLOT_COLORS

    stats, errs = _stats(lib)
    e = R.step_errors(stats)
    for row, (eps_rms, lat_rms) in enumerate(errs):
        assert float(e["eps_err_rms"][row]) == pytest.approx(eps_rms, rel=1e-9)
        assert float(e["latent_err_rms"][row]) == pytest.approx(lat_rms, rel=1e-9, abs=1e-12)
    out = R.QCorrectCompareToReference.execute(reference=sampled[0], test=sampled[0], stats=stats)
    report, plot = out.args
    blank = R.error_plot(None)
    assert plot.shape == blank.shape == (1, 192, 320, 3)
    for colour in PLOT_COLORS[:2]:
        assert ((plot[0] - torch.tensor(colour)).abs().amax(-1) < 1e-6).any()
        assert not ((blank[0] - torch.tensor(colour)).abs().amax(-1) < 1e-6).any()
    assert "stats: 5 steps" in report and "W4A8" in report
    assert f"{errs[2][0]:.4g}" in report


def test_empty_stats_rows_are_gaps_not_errors(R, lib):
    from qcorrect.calibration import CorrectionStats
    from qcorrect.reference.schedules import get_sigmas

    stats = CorrectionStats.empty(get_sigmas("normal", lib.denoiser.sigmas, 3), 4)
    e = R.step_errors(stats)
    assert all(math.isnan(v) for v in e["eps_err_rms"].tolist())
    assert R.error_plot(stats).shape == (1, 192, 320, 3)
    report = R.format_report({"kind": "IMAGE", "n": 2, "psnr": 30.0, "ssim": 0.9, "latent_mse": None,
                              "fid_to_fp": None, "fid_note": "too few"}, stats)
    assert "latent error: not recorded" in report and "nan" not in report and "n/a" in report


# ------------------------------------------------------------------ loading and schemas
def test_two_loads_give_independent_models(R, lib):
    from qcorrect.quant import preset, quantize_model

    (m1, v1), (m2, v2) = R.load_reference_model(), R.load_reference_model()
    assert m1.model is not m2.model and v1.autoencoder is not v2.autoencoder
    d1, d2 = m1.model.diffusion_model, m2.model.diffusion_model
    assert d1.conv_out.weight.data_ptr() != d2.conv_out.weight.data_ptr()
    x, t, ctx = torch.randn(2, 4, 14, 14), torch.tensor([500.0, 50.0]), lib.unet.context(torch.tensor([1, 10]))
    with torch.no_grad():
        before = d2(x, t, context=ctx)
        quantize_model(d1, preset("W4A16"))
        assert not torch.allclose(d1(x, t, context=ctx), before)
        assert torch.equal(d2(x, t, context=ctx), before)
    assert torch.equal(lib.unet.conv_out.weight, d2.conv_out.weight)


def test_node_schemas(R):
    from qcorrect.nodes.types import Stats

    assert [n.define_schema().node_id for n in R.NODES] == [
        "QCorrectLoadReferenceModel", "QCorrectReferenceClass", "QCorrectCompareToReference"]
    assert all(n.define_schema().category == "qcorrect" for n in R.NODES)
    load = R.QCorrectLoadReferenceModel.define_schema()
    assert load.inputs == [] and [o.get_io_type() for o in load.outputs] == ["MODEL", "VAE"]
    cls = R.QCorrectReferenceClass.define_schema()
    assert cls.inputs[0].options == [str(i) for i in range(10)] + ["empty"]
    assert [o.get_io_type() for o in cls.outputs] == ["CONDITIONING"]
    cmp = R.QCorrectCompareToReference.define_schema()
    types = {i.id: i.get_io_type() for i in cmp.inputs}
    assert types == {"reference": "LATENT,IMAGE", "test": "LATENT,IMAGE", "stats": Stats.io_type}
    assert Stats.io_type == "QCORRECT_STATS" and cmp.inputs[2].optional and cmp.is_output_node
    assert [o.get_io_type() for o in cmp.outputs] == ["STRING", "IMAGE"]


# ------------------------------------------------------------------ web/qcorrect.js
_JS_HARNESS = r"""
import assert from "node:assert/strict";
class Area { constructor() { this.style = {}; this.value = ""; } }
globalThis.document = { createElement: (tag) => { assert.equal(tag, "textarea"); return new Area(); } };
const { registered } = await import("./scripts/app.js");
await import("./extensions/qcorrect/qcorrect.js");
assert.equal(registered.length, 1);
const ext = registered[0];
function nodeType() {
  function Node() { this.widgets = []; this.size = [200, 60]; }
  Node.prototype.onExecuted = function () { this.previous = (this.previous ?? 0) + 1; };
  Node.prototype.addDOMWidget = function (name, type, element, options) {
    const w = { name, type, element, options };
    Object.defineProperty(w, "value", { get: () => options.getValue(), set: (v) => options.setValue(v) });
    this.widgets.push(w); return w;
  };
  Node.prototype.computeSize = function () { return [260, 180]; };
  Node.prototype.setSize = function (s) { this.size = s; };
  return Node;
}
const Q = nodeType(), Other = nodeType();
await ext.beforeRegisterNodeDef(Q, { name: "QCorrectCompareToReference" });
await ext.beforeRegisterNodeDef(Other, { name: "KSampler" });
const q = new Q(), o = new Other();
q.onExecuted({});                       // no text: nothing created
assert.equal(q.widgets.length, 0);
q.onExecuted({ text: ["PSNR 30 dB\nSSIM 0.9"] });
assert.equal(q.widgets.length, 1);
const w = q.widgets[0];
assert.equal(w.value, "PSNR 30 dB\nSSIM 0.9");
assert.equal(w.element.readOnly, true);
assert.equal(w.serialize, false);
assert.equal(w.options.serialize, false);
assert.deepEqual(q.size, [260, 180]);
q.onExecuted({ text: ["second run"] });  // updated, not duplicated
assert.equal(q.widgets.length, 1);
assert.equal(q.widgets[0].value, "second run");
assert.equal(q.previous, 3);            // the original onExecuted still runs
o.onExecuted({ text: ["not ours"] });
assert.equal(o.widgets.length, 0);
console.log("ok");
"""


def test_web_extension_shows_the_text_output_of_qcorrect_nodes(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    node = shutil.which("node")
    if node is None:
        pytest.skip("needs Node.js to run the frontend extension")
    src = Path(__file__).resolve().parents[2] / "web" / "qcorrect.js"
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(
        "export const registered = [];\nexport const app = { registerExtension: (e) => registered.push(e) };\n")
    (tmp_path / "extensions" / "qcorrect").mkdir(parents=True)
    shutil.copy(src, tmp_path / "extensions" / "qcorrect" / "qcorrect.js")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "harness.js").write_text(_JS_HARNESS)
    run = subprocess.run([node, "harness.js"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
