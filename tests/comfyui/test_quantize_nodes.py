"""Quantize Model, Relax Timesteps and Save/Load Quantized Model inside a real ComfyUI (in-process)."""

from __future__ import annotations

import re

import pytest
import torch

from nodekit import lora_state_dict, mse, node_output, sample, tiny_sd15, with_lora


@pytest.fixture(scope="module")
def fp(comfy):
    return tiny_sd15()


@pytest.fixture(scope="module")
def q4(fp):
    from qcorrect.nodes.quantize import QuantizeModel

    return node_output(QuantizeModel.execute(fp, "W4A8"))[0][0]


@pytest.fixture(scope="module")
def q8(fp):
    from qcorrect.nodes.quantize import QuantizeModel

    return node_output(QuantizeModel.execute(fp, "W8A8"))[0][0]


def _weights(model):
    return {k: v.clone() for k, v in model.get_model_object("diffusion_model").state_dict().items()}


def test_quantize_returns_a_new_packed_model_and_leaves_the_input_alone(comfy, fp):
    from qcorrect.nodes.quantize import QuantizeModel
    from qcorrect.quant import QuantLinear, QuantConv2d

    before = _weights(fp)
    (q,), text = node_output(QuantizeModel.execute(fp, "W4A8"))
    dm_q, dm_fp = q.get_model_object("diffusion_model"), fp.get_model_object("diffusion_model")
    assert dm_q is not dm_fp and q.model is not fp.model
    assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in dm_fp.modules())
    after = _weights(fp)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    convs = [m for m in dm_q.modules() if isinstance(m, QuantConv2d)]
    assert convs and any(isinstance(m, QuantLinear) for m in dm_q.modules())
    # ComfyUI's own accounting sees the packed bytes: int4 + fp16 scales/zeros per 64 ≈ 0.28 of fp16
    packed = sum(m.weight.numel() for m in dm_q.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    assert all(m.weight.dtype == torch.uint8 for m in dm_q.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    assert q.model_size() < 0.35 * fp.model_size() * 2 / 4 + 4 * 2**20  # fp32 input on CPU: 4 bytes a weight
    assert q.model_size() >= packed
    assert "quantized" in text and "MiB" in text


def test_quantized_sampling_is_close_to_full_precision(fp, q4):
    a, b, noise_scale = sample(fp), sample(q4), None
    assert torch.isfinite(b).all()
    assert mse(a, b) < 0.1 * float(a.double().pow(2).mean())


def test_a_latents_cond_and_uncond_passes_share_activation_ranges_in_comfyuis_batches(fp, q4):
    """ComfyUI batches the cond and uncond passes into one call; the σ wrapper tells the quantizers
    how many distinct latents that call holds (``cond_or_uncond``), so each latent's passes share one
    dynamic range; at CFG 1 (no uncond pass) every sample keeps its own."""
    from qcorrect.quant import QuantConv2d

    layer = next(m for m in q4.get_model_object("diffusion_model").modules() if isinstance(m, QuantConv2d))
    assert layer.act.ranges == "per_latent"
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append((int(args[0].shape[0]), m.act.context.latents)))
    try:
        sample(q4, cfg=3.0, batch=2, steps=2)
        guided = list(seen)
        seen.clear()
        sample(q4, cfg=1.0, batch=2, steps=2)
    finally:
        handle.remove()
    assert guided and set(guided) == {(4, 2)}  # two latents, each run twice in one batch
    assert seen and set(seen) == {(2, 2)}
    assert layer.act.context.latents is None  # published for the call only


def test_lora_before_and_after_quantize_both_apply(fp, q8):
    """W8A8 (the random test UNet amplifies 4-bit rounding of LoRA-sized weights chaotically)."""
    from qcorrect.nodes.quantize import QuantizeModel

    q4 = q8
    lora = lora_state_dict(fp, scale=0.3)
    ref = sample(with_lora(fp, lora))
    plain_fp = sample(fp)
    lora_effect = mse(ref, plain_fp)
    quant_noise = mse(sample(q4), plain_fp)
    assert lora_effect > 4 * quant_noise, "the test LoRA must change the image more than quantization does"

    (before,), text = node_output(QuantizeModel.execute(with_lora(fp, lora), "W8A8"))
    assert "patches applied before rounding" in text
    after = with_lora(q4, lora)
    plain = sample(q4)
    for got in (sample(before), sample(after)):
        assert mse(got, ref) < 0.2 * lora_effect           # the LoRA is in the image
        assert mse(got, ref) < 3 * quant_noise + 1e-12      # within quantization noise of FP + LoRA
    # the LoRA lives in the clone: the quantized model without it samples exactly as before
    assert torch.equal(sample(q4), plain)


def _apply(model, partial: bool):
    """One apply_model call after ComfyUI's loader put ``model`` in place, fully or partially (low VRAM)."""
    base = model.model
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([3.0, 3.0])
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(6))
    model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1 if partial else 0)
    try:
        assert base.model_lowvram == partial
        functions = sum(len(getattr(m, "weight_function", [])) for m in base.modules())
        with torch.no_grad():
            return base.apply_model(x, t, c_crossattn=ctx).clone(), functions
    finally:
        model.unpatch_model(device_to=torch.device("cpu"))


def test_forced_partial_low_vram_load_gives_the_full_load_output(fp, q8):
    full, _ = _apply(q8, partial=False)
    part, _ = _apply(q8, partial=True)
    assert torch.equal(full, part)  # no patches: the offloaded path computes the same thing
    lora = lora_state_dict(fp, scale=0.3)
    model, ref = with_lora(q8, lora), _apply(with_lora(fp, lora), partial=False)[0]
    full, f_full = _apply(model, partial=False)
    part, f_part = _apply(model, partial=True)
    assert f_full == 0 and f_part > 0  # LoRA applied by set_weight (full) vs ComfyUI's LowVramPatch (partial)
    noise = mse(full, ref)
    assert noise > 0
    assert mse(part, ref) <= 1.5 * noise  # partial keeps ΔW in 16-bit: at most the full load's rounding
    assert mse(part, full) <= 2.0 * noise


def test_already_quantized_models_are_refused(comfy, fp, q4):
    from qcorrect.nodes.quantize import QuantizeModel
    from qcorrect.quant import QuantizationError

    with pytest.raises(QuantizationError, match="already quantized by qcorrect"):
        QuantizeModel.execute(q4, "W8A8")
    fp8 = tiny_sd15(dtype=torch.float8_e4m3fn)
    with pytest.raises(QuantizationError, match="fp8.*Calibrate Errors"):
        QuantizeModel.execute(fp8, "W4A8")


def test_advanced_node_builds_the_plan_it_says(fp):
    from qcorrect.nodes.quantize import QuantizeModelAdvanced
    from qcorrect.quant import QuantizationError, quantization_plan

    (q,), _ = node_output(QuantizeModelAdvanced.execute(fp, "4", "128", True, "16", "dynamic", True, "*.attn1.*"))
    layers = quantization_plan(q.get_model_object("diffusion_model"))["layers"]
    assert layers and all(spec["weight"] in ("int4_g128", "int4", "int4_g64", "int4_g32") for spec in layers.values())
    assert not any(".attn1." in name for name in layers)
    assert all(spec.get("act") is None for spec in layers.values())
    with pytest.raises(QuantizationError, match="per-channel"):
        QuantizeModelAdvanced.execute(fp, "8", "64", True, "8", "dynamic", True, "")


def test_relax_timesteps_copies_and_reports_the_average_bit_width(fp, q4):
    from qcorrect.nodes.quantize import QuantizeModel, RelaxTimesteps
    from qcorrect.quant import QuantizationError

    (relaxed,), text = node_output(RelaxTimesteps.execute(q4, 0.25, "near x0", "16", 4, "normal"))
    assert "1 of 4 steps" in text and "10.00" in text  # (1·16 + 3·8) / 4
    sched = [m.act.schedule for m in relaxed.get_model_object("diffusion_model").modules() if hasattr(m, "act")]
    assert sched and all(s for s in sched if s is not None)
    assert not any(m.act.schedule for m in q4.get_model_object("diffusion_model").modules() if hasattr(m, "act"))
    (none,), _ = node_output(RelaxTimesteps.execute(q4, 0.0, "near x_T", "10", 4, "normal"))
    assert torch.equal(sample(none), sample(q4))
    # all steps at 16-bit activations: the A8 error is gone, only the weight error is left
    (w4a16,), _ = node_output(QuantizeModel.execute(fp, "W4A16"))
    (full,), _ = node_output(RelaxTimesteps.execute(q4, 1.0, "near x0", "16", 4, "normal"))
    assert mse(sample(full), sample(w4a16)) < 1e-3 * mse(sample(q4), sample(w4a16)) + 1e-12
    (w,), _ = node_output(QuantizeModel.execute(fp, "W4A16"))
    with pytest.raises(QuantizationError, match="not quantized"):
        RelaxTimesteps.execute(w, 0.2, "near x0", "10", 4, "normal")
    with pytest.raises(QuantizationError, match=r"\[0, 1\]"):
        RelaxTimesteps.execute(q4, 1.5, "near x0", "10", 4, "normal")


def test_save_and_load_quantized_model_round_trip(comfy, fp, q4):
    from qcorrect.nodes.quantize import LoadQuantizedModel, SaveQuantizedModel

    _, text = node_output(SaveQuantizedModel.execute(q4, "tests/tiny_w4a8"))
    path = comfy.models / "qcorrect_quantized" / "tests" / "tiny_w4a8.safetensors"
    assert path.is_file() and "saved models/qcorrect_quantized/tests/tiny_w4a8.safetensors" in text
    (loaded,), _ = node_output(LoadQuantizedModel.execute(fp, "tests/tiny_w4a8.safetensors"))
    assert torch.equal(sample(loaded), sample(q4))
    with pytest.raises(Exception, match="already quantized"):
        LoadQuantizedModel.execute(q4, "tests/tiny_w4a8.safetensors")


def test_int8_export_loads_with_comfyuis_stock_diffusion_model_loader(comfy, fp):
    import folder_paths
    from comfy import sd
    from comfy.quant_ops import QuantizedTensor
    from qcorrect.nodes.quantize import QuantizeModel, SaveQuantizedModel

    (w8,), _ = node_output(QuantizeModel.execute(fp, "W8A16"))
    folder_paths.add_model_folder_path("diffusion_models", str(comfy.models / "diffusion_models"), is_default=True)
    _, text = node_output(SaveQuantizedModel.execute(w8, "tests/tiny_w8_comfy", "comfyui int8"))
    assert "comfy_quant int8" in text and " 0 quantized layers written as fp16" not in text
    path = comfy.models / "diffusion_models" / "tests" / "tiny_w8_comfy.safetensors"
    stock = sd.load_diffusion_model(str(path))
    dm = stock.get_model_object("diffusion_model")
    native = [m for m in dm.modules() if isinstance(getattr(m, "weight", None), QuantizedTensor)]
    assert native, "ComfyUI did not load any layer as its own int8 tensor"
    # ComfyUI reads exactly qcorrect's codes and per-row scales
    mine = {n: m for n, m in w8.get_model_object("diffusion_model").named_modules()}
    for name, m in dm.named_modules():
        if isinstance(getattr(m, "weight", None), QuantizedTensor):
            want = mine[name].dequantized_weight(torch.float32)
            assert torch.equal(m.weight.dequantize().float(), want), name
    # and samples with them (ComfyUI computes these layers in its own compute dtype, bf16 by default)
    ours, theirs = sample(w8), sample(stock)
    assert torch.isfinite(theirs).all()
    assert mse(theirs, ours) < 1e-3 * float(ours.double().pow(2).mean())
    # a model in ComfyUI's native int8 format can be calibrated as "the quantized model"
    from qcorrect.nodes.calibrate import CalibrateErrors
    from nodekit import conditioning

    (stats, _), _ = node_output(CalibrateErrors.execute(
        fp, stock, conditioning(0), conditioning(1, 0.0), {"samples": torch.zeros(1, 4, 8, 8)}, 0, "euler",
        "normal", 3, 3.0, 1.0, 1, "ptqd", "tests/native_int8"))
    assert "comfy_quant" in stats.meta.quantization and stats.rows == 3


def test_dynamic_vram_bookkeeping_of_the_input_is_not_carried_into_the_copy(comfy, fp):
    """ComfyUI's dynamic-VRAM patcher (the NVIDIA default) leaves per-model allocations on modules
    (``_v`` …) and on the model; a quantized copy must never share them (CPU: simulated)."""
    from qcorrect.nodes.quantize import QuantizeModel

    marker = object()
    conv = next(m for m in fp.get_model_object("diffusion_model").modules() if isinstance(m, torch.nn.Conv2d))
    conv._v, fp.model.dynamic_vbars = marker, {"cuda:0": marker}
    try:
        (q,), _ = node_output(QuantizeModel.execute(fp, "W8A8"))
        assert not any("_v" in m.__dict__ for m in q.model.modules())
        assert "dynamic_vbars" not in q.model.__dict__
        assert conv._v is marker and fp.model.dynamic_vbars["cuda:0"] is marker
    finally:
        del conv._v, fp.model.dynamic_vbars


def test_calibrated_quantize_model_rounds_with_error_compensation(comfy, fp):
    """Quantize Model (Calibrated): same packed storage as Quantize Model, weights chosen from the model's own
    sampling, closer to full precision than round-to-nearest on this model; the input is untouched."""
    from nodekit import conditioning
    from qcorrect.nodes.quantize import QuantizeModel
    from qcorrect.nodes.quantize_calibrated import QuantizeModelCalibrated
    from qcorrect.quant import QuantLinear

    before = _weights(fp)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    (cal,), text = node_output(QuantizeModelCalibrated.execute(
        fp, "W4A16", conditioning(0), conditioning(1, 0.0), latent, 11, "euler", "normal", 4, 3.0, 2, "gptq",
        False, 0.0))
    (rtn,), _ = node_output(QuantizeModel.execute(fp, "W4A16"))
    assert "GPTQ" in text and "held-out" in text
    solve = re.search(r"solving (\d+) layers: [\d.]+ s", text)  # no budget, no probe: the solve alone
    assert solve and solve.group(1) == re.search(r"(\d+) layers: \d+ GPTQ", text).group(1), text
    assert all(torch.equal(before[k], v) for k, v in _weights(fp).items())
    dm_c, dm_r = cal.get_model_object("diffusion_model"), rtn.get_model_object("diffusion_model")
    lin_c = {n: m for n, m in dm_c.named_modules() if isinstance(m, QuantLinear)}
    lin_r = {n: m for n, m in dm_r.named_modules() if isinstance(m, QuantLinear)}
    assert lin_c.keys() == lin_r.keys()
    assert all(lin_c[n].weight.shape == lin_r[n].weight.shape for n in lin_c)  # zero extra bytes
    assert any(not torch.equal(lin_c[n].weight, lin_r[n].weight) for n in lin_c)
    ref = sample(fp, pos=conditioning(0), neg=conditioning(1, 0.0))
    assert torch.isfinite(sample(cal)).all()
    err_c = mse(sample(cal, pos=conditioning(0), neg=conditioning(1, 0.0)), ref)
    err_r = mse(sample(rtn, pos=conditioning(0), neg=conditioning(1, 0.0)), ref)
    print("calibrated", err_c, "rtn", err_r)
    assert err_c < err_r


def test_a_memory_bound_collects_the_statistics_in_more_passes_with_the_same_result(comfy, fp):
    """Quantize Model (Calibrated)'s ``stats_memory_gb``: layers whose statistics do not fit together are
    collected in further sampling passes and handed to the solver group by group (``consume``); the
    statistics are the same, only one group is held at a time, and the progress bar counts every pass."""
    from comfy import utils
    from nodekit import conditioning
    from qcorrect.calibration.inputs import calibration_layers, stats_bytes
    from qcorrect.nodes import patching
    from qcorrect.nodes.quantize_calibrated import collect_model_inputs
    from qcorrect.quant import preset

    plan = preset("W4A8")
    args = (conditioning(0), conditioning(1, 0.0), {"samples": torch.zeros(2, 4, 8, 8)}, 3, "euler", "normal", 3, 3.0, 2)
    total = sum(stats_bytes(calibration_layers(fp.get_model_object("diffusion_model"))).values())
    runs, groups = {}, []
    for gb, consume in ((64.0, None), (total / 3 / 2**30, groups.append)):
        base, baked = patching.baked_copy(fp, plan)
        updates = []
        utils.set_progress_bar_global_hook(lambda value, total_, preview, node_id=None: updates.append((value, total_)))
        try:
            runs[gb] = (collect_model_inputs(fp, base, *args, baked, 4.0, gb, consume=consume), updates)
        finally:
            utils.set_progress_bar_global_hook(None)
    (one, up1), (many, upn) = runs.values()
    assert one["passes"] == 1 and many["passes"] >= 3 and len(groups) == many["passes"]
    assert many["layers"] == {} and many["peak_stats_bytes"] < one["peak_stats_bytes"] == total
    assert max(sum(s.nbytes() for s in g.values()) for g in groups) <= many["peak_stats_bytes"]
    assert up1[-1] == (3 * 2, 3 * 2) and upn[-1] == (many["passes"] * 6, many["passes"] * 6)
    got = {n: s for g in groups for n, s in g.items()}
    assert one["layers"].keys() == got.keys()
    for name, s in one["layers"].items():
        assert torch.allclose(s.h_fit, got[name].h_fit, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(s.h_hold, got[name].h_hold, rtol=1e-5, atol=1e-6), name


def test_the_calibrated_node_makes_the_same_model_under_any_statistics_memory_bound(comfy, fp):
    """The node solves each group of layers as its pass ends and drops its statistics: a bound that
    forces several passes gives the same quantized weights as one pass."""
    from nodekit import conditioning
    from qcorrect.calibration.inputs import calibration_layers, stats_bytes
    from qcorrect.nodes.quantize_calibrated import QuantizeModelCalibrated

    total = sum(stats_bytes(calibration_layers(fp.get_model_object("diffusion_model"))).values())
    outs = []
    for gb in (64.0, total / 3 / 2**30):
        (q,), text = node_output(QuantizeModelCalibrated.execute(
            fp, "W4A8", conditioning(0), conditioning(1, 0.0), {"samples": torch.zeros(2, 4, 8, 8)}, 0, "euler",
            "normal", 3, 3.0, 2, "gptq", False, 0.3, 4.0, gb, 0, False))
        outs.append((_weights(q), text))
    (a, ta), (b, tb) = outs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "1 sampling pass(es)" in ta and "1 sampling pass(es)" not in tb and "held at once" in tb


def test_cancelling_a_calibrated_quantization_leaves_no_model_and_the_input_untouched(comfy, fp):
    from comfy import model_management, utils
    from nodekit import conditioning
    from qcorrect.nodes.quantize_calibrated import QuantizeModelCalibrated

    before = _weights(fp)
    updates = []

    def hook(value, total, preview, node_id=None):
        updates.append(value)
        if len(updates) == 2:
            model_management.interrupt_current_processing(True)

    utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            QuantizeModelCalibrated.execute(fp, "W4A8", conditioning(0), conditioning(1, 0.0),
                                            {"samples": torch.zeros(2, 4, 8, 8)}, 0, "euler", "normal", 4, 3.0, 2,
                                            "gptq", False, 0.0)
    finally:
        utils.set_progress_bar_global_hook(None)
        model_management.interrupt_current_processing(False)
    assert len(updates) == 2
    assert all(torch.equal(before[k], v) for k, v in _weights(fp).items())


def test_the_layers_solve_has_its_own_progress_bar_and_can_be_cancelled(comfy, fp):
    """Between sampling passes the node solves the finished group's layers: a second bar counts them
    (total = the plan's quantized layers), and cancel stops it within one layer, input untouched."""
    from comfy import model_management, utils
    from nodekit import conditioning
    from qcorrect.nodes.quantize_calibrated import QuantizeModelCalibrated
    from qcorrect.quant import preset, resolve_plan

    layers = sum(1 for d in resolve_plan(fp.get_model_object("diffusion_model"), preset("W4A8")).values() if d["weight"])
    sampling_calls = 3 * 2
    assert layers > sampling_calls  # the two bars are told apart by their totals
    before = _weights(fp)
    updates = []

    def hook(value, total, preview, node_id=None):
        updates.append((value, total))
        if total == layers:  # the bar's first update is always sent (later ones are throttled)
            model_management.interrupt_current_processing(True)

    utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            QuantizeModelCalibrated.execute(fp, "W4A8", conditioning(0), conditioning(1, 0.0),
                                            {"samples": torch.zeros(2, 4, 8, 8)}, 0, "euler", "normal", 3, 3.0, 2,
                                            "gptq", False, 0.0)
    finally:
        utils.set_progress_bar_global_hook(None)
        model_management.interrupt_current_processing(False)
    assert (sampling_calls, sampling_calls) in updates  # the sampling pass ran to its end first
    assert [v for v, t in updates if t == layers] == [1]  # stopped at the next layer
    assert all(torch.equal(before[k], v) for k, v in _weights(fp).items())


def _calibrated(fp, tune_iterations, preset="W4A16"):
    from nodekit import conditioning
    from qcorrect.nodes.quantize_calibrated import QuantizeModelCalibrated

    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return node_output(QuantizeModelCalibrated.execute(
            fp, preset, conditioning(0), conditioning(1, 0.0), {"samples": torch.zeros(2, 4, 8, 8)}, 11, "euler",
            "normal", 4, 3.0, 2, "gptq", False, 0.0, tune_iterations=tune_iterations))


def test_calibrated_quantize_model_tunes_the_stored_grid_under_inference_mode(comfy, fp):
    """``tune_iterations``: the scales and zero points are tuned end to end with autograd re-enabled inside
    ComfyUI's inference mode; codes and bytes stay those of the untuned model, the input model is untouched."""
    from qcorrect.quant import QuantConv2d, QuantLinear
    from qcorrect.quant.weights import decode_blob

    before = _weights(fp)
    (plain,), _ = _calibrated(fp, 0)
    (tuned,), text = _calibrated(fp, 40)
    assert all(torch.equal(before[k], v) for k, v in _weights(fp).items())
    line = next(t for t in text.splitlines() if t.startswith("grid tuning"))
    assert "40 iterations" in line and "not kept" not in line, line
    a, b = (float(v) for v in line.split("held-out loss ")[1].split(" → "))
    assert b < a
    layers = lambda m: {n: l for n, l in m.get_model_object("diffusion_model").named_modules()  # noqa: E731
                        if isinstance(l, (QuantLinear, QuantConv2d))}
    lp, lt = layers(plain), layers(tuned)
    assert lp.keys() == lt.keys() and lp
    scales_moved = 0
    for n in lp:
        sp = decode_blob(lp[n].weight, lp[n].wqtype, lp[n].weight_shape)
        st = decode_blob(lt[n].weight, lt[n].wqtype, lt[n].weight_shape)
        assert torch.equal(sp["qweight"], st["qweight"]) and lp[n].weight.shape == lt[n].weight.shape
        scales_moved += int(not torch.equal(sp["scale"], st["scale"]))
        assert lt[n].calib["grid_tuned"] is True and not lt[n].weight_function
    assert scales_moved == len(lp)
    with torch.inference_mode():
        assert torch.isfinite(sample(tuned)).all()


def test_cancelling_during_the_grid_tuning_leaves_no_model_and_the_input_untouched(comfy, fp):
    from comfy import model_management, utils

    before = _weights(fp)
    updates = []

    def hook(value, total, preview, node_id=None):
        updates.append((value, total))
        if sum(1 for _, t in updates if t > 1000) == 3:  # three calls into the tuning's own bar
            model_management.interrupt_current_processing(True)

    utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            _calibrated(fp, 1000)
    finally:
        utils.set_progress_bar_global_hook(None)
        model_management.interrupt_current_processing(False)
    # the sampling pass had its bar; the tuning's counts its iterations and loss evaluations, and stopped there
    assert updates[0][1] < 1000 and updates[-1][1] > 1000 and updates[-1][0] < 100
    assert all(torch.equal(before[k], v) for k, v in _weights(fp).items())


def test_mixed_precision_lowers_some_layers_to_3_bits_within_the_budget(comfy, fp):
    """``mixed_precision`` (the default with a budget): the sketched probe runs our float copy through
    ComfyUI's guider under inference mode, some layers go to 3 bits and others to int8, the model stays
    within the budget's bytes, samples, and neither the input model nor its modules keep anything of it."""
    from nodekit import conditioning
    from qcorrect.nodes.quantize_calibrated import QuantizeModelCalibrated
    from qcorrect.quant import QuantConv2d, QuantLinear, resolve_plan
    from qcorrect.quant import preset as quant_preset

    before = _weights(fp)
    args = (fp, "W4A16", conditioning(0), conditioning(1, 0.0), {"samples": torch.zeros(2, 4, 8, 8)}, 11, "euler",
            "normal", 4, 3.0, 2, "gptq", False, 0.30)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        (mixed,), text = node_output(QuantizeModelCalibrated.execute(*args))
        (plain,), text_plain = node_output(QuantizeModelCalibrated.execute(*args, mixed_precision=False))
    assert all(torch.equal(before[k], v) for k, v in _weights(fp).items())
    dm = fp.get_model_object("diffusion_model")
    assert not any(m._forward_hooks for m in dm.modules())
    layers = {n: m for n, m in mixed.get_model_object("diffusion_model").named_modules()
              if isinstance(m, (QuantLinear, QuantConv2d))}
    types = {m.wqtype.name for m in layers.values()}
    assert "uint3_g64" in types and "int8" in types, types
    assert "lowered to 3 bits by the budget" in text and "lowered to 3 bits" not in text_plain
    assert re.search(r"solving \d+ layers, the sensitivity probe and the byte budget: [\d.]+ s", text), text
    assert re.search(r"solving \d+ layers and the byte budget: [\d.]+ s", text_plain), text_plain
    from qcorrect.quant.budget import fp16_bytes

    qdm = mixed.get_model_object("diffusion_model")
    resident = sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
                   for t in [*qdm.parameters(), *qdm.buffers()])
    assert resident <= 0.30 * fp16_bytes(dm)  # the budget: a share of the diffusion model's fp16 bytes
    assert len(resolve_plan(dm, quant_preset("W4A16"))) >= len(layers)
    with torch.inference_mode():
        assert torch.isfinite(sample(mixed, pos=conditioning(0), neg=conditioning(1, 0.0))).all()


def test_solve_on_auto_uses_a_cuda_device_where_layers_fit_and_reports_where_they_went(comfy, fp, monkeypatch):
    """``solve_on``: "cpu" and "auto" without a GPU make the same model and no placement note; "auto" with a
    CUDA torch device hands it to the solver, which solves there only the layers that fit its free memory
    (none here: the free memory is made 0) and says so in the report."""
    import comfy.model_management as mm
    from nodekit import conditioning
    import qcorrect.quant.calibrated as calibrated
    import qcorrect.nodes.quantize_calibrated as qc
    from qcorrect.nodes.quantize_calibrated import QuantizeModelCalibrated

    args = (fp, "W4A16", conditioning(0), conditioning(1, 0.0), {"samples": torch.zeros(2, 4, 8, 8)}, 0, "euler",
            "normal", 3, 3.0, 2, "gptq", False, 0.0, 4.0, 4.0, 0, False)
    outs = {}
    for solve_on in ("cpu", "auto"):
        (q,), text = node_output(QuantizeModelCalibrated.execute(*args, solve_on))
        outs[solve_on] = (_weights(q), text)
    (a, ta), (b, tb) = outs["cpu"], outs["auto"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "solved on" not in ta and "solved on" not in tb
    assert mm.get_torch_device().type == "cpu" and qc._solve_device("auto") is None and qc._solve_device("cpu") is None
    seen = []
    # as on a CUDA machine (only the solver's device: ComfyUI itself stays on the CPU)
    monkeypatch.setattr(qc, "_solve_device", lambda solve_on: torch.device("cuda") if solve_on == "auto" else None)
    monkeypatch.setattr(calibrated, "free_bytes", lambda device: seen.append(str(device)) or 0)
    (q,), text = node_output(QuantizeModelCalibrated.execute(*args, "auto"))
    n = int(re.search(r"solving (\d+) layers", text).group(1))
    assert seen and set(seen) == {"cuda"}, seen
    assert f"(0 layers solved on cuda, {n} on the CPU: {n} too large for its free memory)" in text, text
    c = _weights(q)
    assert all(torch.equal(a[k], c[k]) for k in a)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="solve_on"):
        QuantizeModelCalibrated.execute(*args, "gpu")
