import os

import pytest
import torch

from qcorrect.quant import (
    ActivationObserver, QuantFileError, QuantizationError, load_quantized, preset, quantization_plan,
    quantize_model, read_plan, save_quantized, set_activation_schedule, sigma_scope,
)

from .toy import make_toy, toy_inputs

SIGMAS = (14.6, 3.0, 0.5, 0.03)


def observe(m, method="minmax", **kw):
    x, t = toy_inputs(batch=4, seed=3)
    with ActivationObserver(m, method=method, **kw) as obs:
        for s in SIGMAS:
            with sigma_scope(m, torch.tensor([s])):
                m(x * s, t)
    return obs


@pytest.mark.parametrize("name", ["W8A8", "W4A8", "W4A16"])
def test_save_load_bit_exact(tmp_path, name):
    m = quantize_model(make_toy(), name)
    path = tmp_path / "q.safetensors"
    save_quantized(m, str(path), metadata={"qcorrect.source": "toy"})
    loaded = load_quantized(make_toy(seed=7), str(path))  # skeleton weights are irrelevant
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    x, t = toy_inputs()
    assert torch.equal(m(x, t), loaded(x, t))
    assert quantization_plan(loaded) == quantization_plan(m)
    assert read_plan(str(path))["preset"] == name


def test_static_ranges_and_schedule_survive_save_load(tmp_path):
    m = quantize_model(make_toy(), preset("W8A8", act_mode="static"))
    assert observe(m).apply() == 3
    set_activation_schedule(m, [(0.0, 0.1, 12)])
    save_quantized(m, str(tmp_path / "s.safetensors"))
    loaded = load_quantized(make_toy(), str(tmp_path / "s.safetensors"))
    x, t = toy_inputs()
    for s in SIGMAS:
        with sigma_scope(m, s), sigma_scope(loaded, s):
            assert torch.equal(m(x * s, t), loaded(x * s, t))
    assert loaded.block[2].act.schedule == [(0.0, 0.1, 12)]


def test_observer_records_per_sigma_and_removes_hooks():
    m = quantize_model(make_toy(), preset("W8A8", act_mode="static"))
    obs = observe(m)
    ranges = obs.ranges()
    sig, lo, hi = ranges["block.2"]
    assert sorted(sig.tolist()) == pytest.approx(sorted(SIGMAS), rel=1e-6)
    assert hi[-1] > hi[0]  # inputs scaled by σ: the largest σ has the widest range
    assert all(not l._forward_pre_hooks for l in (m.block[2], m.attn_q, m.emb_proj))
    assert m.block[2].act.mode == "static"  # restored


def test_observer_estimators_clip_less_or_equal_minmax():
    m = quantize_model(make_toy(), preset("W4A8", act_mode="static"))
    mm = observe(m, "minmax").ranges()["attn_q"]
    for method in ("percentile", "mse"):
        r = observe(m, method, percentile=99.0).ranges()["attn_q"]
        assert (r[2] <= mm[2] + 1e-6).all() and (r[1] >= mm[1] - 1e-6).all()
        assert (r[2] < mm[2]).any()


def test_observer_needs_sigma():
    m = quantize_model(make_toy(), preset("W8A8", act_mode="static"))
    x, t = toy_inputs()
    with pytest.raises(QuantizationError, match="without σ"):
        with ActivationObserver(m):
            m(x, t)
    assert not m.attn_q._forward_pre_hooks  # removed even after the error


def test_observer_bad_args():
    with pytest.raises(QuantizationError, match="no quantized layer"):
        ActivationObserver(make_toy())
    m = quantize_model(make_toy(), "W8A8")
    with pytest.raises(QuantizationError, match="unknown range estimator"):
        ActivationObserver(m, method="histogram")
    with pytest.raises(QuantizationError, match="recorded nothing"):
        ActivationObserver(m).ranges()


def _saved(tmp_path):
    m = quantize_model(make_toy(), "W4A8")
    path = str(tmp_path / "q.safetensors")
    save_quantized(m, path)
    return path


def _untouched(skeleton):
    from qcorrect.quant import quantized_layers
    return not quantized_layers(skeleton)


def test_truncated_file(tmp_path):
    path = _saved(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    sk = make_toy()
    with pytest.raises(QuantFileError, match="truncated or corrupt"):
        load_quantized(sk, path)
    assert _untouched(sk)


def test_corrupt_header(tmp_path):
    path = str(tmp_path / "junk.safetensors")
    open(path, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(QuantFileError):
        load_quantized(make_toy(), path)


def test_plain_safetensors_is_not_a_quantized_model(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "plain.safetensors")
    save_file({"a": torch.zeros(2)}, path)
    with pytest.raises(QuantFileError, match="not a qcorrect quantized model"):
        load_quantized(make_toy(), path)


def test_nan_in_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = _saved(tmp_path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    from qcorrect.quant import qtype
    from qcorrect.quant.weights import decode_blob
    decode_blob(tensors["block.2.weight"], qtype("uint4_g64"), (64, 64, 3, 3))["scale"][0, 0] = float("nan")
    save_file(tensors, path, meta)
    sk = make_toy()
    with pytest.raises(QuantFileError, match="'block.2.weight'.*NaN.*scale"):
        load_quantized(sk, path)
    assert _untouched(sk)


def test_wrong_skeleton_is_refused(tmp_path):
    path = _saved(tmp_path)
    from .toy import ToyUNet
    sk = ToyUNet(ch=128)
    with pytest.raises(QuantFileError, match="shape"):
        load_quantized(sk, path)
    assert _untouched(sk)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch
    m = quantize_model(make_toy(), "W8A8")
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(m, str(tmp_path / "x.safetensors"))
    assert os.listdir(tmp_path) == []


def _file(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_version_2_file_holds_one_blob_per_layer(tmp_path):
    from qcorrect.quant import quantized_layers
    m = quantize_model(make_toy(), "W4A8")
    path = str(tmp_path / "q.safetensors")
    save_quantized(m, path)
    tensors, meta = _file(path)
    assert meta["qcorrect.version"] == "2"
    for name, layer in quantized_layers(m).items():
        assert tensors[f"{name}.weight"].dtype == torch.uint8
        assert torch.equal(tensors[f"{name}.weight"], layer.weight)
        assert not {f"{name}.qweight", f"{name}.scale", f"{name}.zero"} & tensors.keys()


def _as_version_1(m, path):
    """Write ``m`` in the version-1 layout: separate qweight/scale/zero tensors, no blob."""
    import json
    from safetensors.torch import save_file
    from qcorrect.quant import quantized_layers
    tensors = dict(m.state_dict())
    for name, layer in quantized_layers(m).items():
        del tensors[f"{name}.weight"]
        tensors[f"{name}.qweight"] = layer.qweight.clone()
        tensors[f"{name}.scale"] = layer.scale.clone()
        if layer.zero is not None:
            tensors[f"{name}.zero"] = layer.zero.clone()
    plan = quantization_plan(m)
    del plan["kept"]  # version-1 plans had no such entry
    meta = {"qcorrect.format": "qcorrect.quantized_model", "qcorrect.version": "1",
            "qcorrect.quant_plan": json.dumps(plan)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, meta)
    return tensors, meta


@pytest.mark.parametrize("name", ["W8A8", "W4A8", "W4A16"])
def test_version_1_file_still_loads_to_the_same_outputs(tmp_path, name):
    m = quantize_model(make_toy(), name)
    path = str(tmp_path / "v1.safetensors")
    _as_version_1(m, path)
    loaded = load_quantized(make_toy(seed=5), path)
    x, t = toy_inputs()
    assert torch.equal(m(x, t), loaded(x, t))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in m.state_dict().items())


def test_version_1_nan_scale_and_bad_shape_refused_by_name(tmp_path):
    from safetensors.torch import save_file
    m = quantize_model(make_toy(), "W4A8")
    path = str(tmp_path / "v1.safetensors")
    tensors, meta = _as_version_1(m, path)
    tensors["attn_q.zero"][3, 0] = float("inf")
    save_file(tensors, path, meta)
    sk = make_toy()
    with pytest.raises(QuantFileError, match="'attn_q.zero'.*NaN or inf"):
        load_quantized(sk, path)
    assert _untouched(sk)
    tensors["attn_q.zero"] = torch.zeros(64, 2, dtype=torch.float16)
    save_file(tensors, path, meta)
    with pytest.raises(QuantFileError, match="'attn_q.zero' has shape"):
        load_quantized(sk, path)
    assert _untouched(sk)


def test_unknown_file_version_refused(tmp_path):
    from safetensors.torch import save_file
    path = _saved(tmp_path)
    tensors, meta = _file(path)
    save_file(tensors, path, {**meta, "qcorrect.version": "3"})
    with pytest.raises(QuantFileError, match="file version '3'"):
        load_quantized(make_toy(), path)


def test_per_latent_ranges_survive_save_load_and_older_files_keep_per_sample_ranges(tmp_path):
    import json
    from safetensors.torch import save_file
    from qcorrect.quant import QuantPlan, quantized_layers
    m = quantize_model(make_toy(), "W4A8")  # the presets share ranges between a latent's passes
    assert {l.act.ranges for l in quantized_layers(m).values()} == {"per_latent"}
    x, t = toy_inputs(batch=2, seed=4)
    x2, t2 = torch.cat([x, x * 1.1]), torch.cat([t, t])  # two passes of two latents
    path = str(tmp_path / "q.safetensors")
    save_quantized(m, path)
    loaded = load_quantized(make_toy(seed=3), path)
    with sigma_scope(m, None, latents=2), sigma_scope(loaded, None, latents=2):
        shared = m(x2, t2)
        assert torch.equal(shared, loaded(x2, t2))
    assert not torch.equal(shared, m(x2, t2))  # outside the scope every sample has its own range
    # a file written before the field existed: same tensors, a plan without act_ranges
    tensors, meta = _file(path)
    plan = json.loads(meta["qcorrect.quant_plan"])
    del plan["plan"]["act_ranges"]
    for spec in plan["layers"].values():
        del spec["act_ranges"]
    old = str(tmp_path / "old.safetensors")
    save_file(tensors, old, {**meta, "qcorrect.quant_plan": json.dumps(plan)})
    before = load_quantized(make_toy(), old)
    assert {l.act.ranges for l in quantized_layers(before).values()} == {"per_sample"}
    assert QuantPlan.from_json(json.dumps(plan["plan"])).act_ranges == "per_sample"
    with sigma_scope(before, None, latents=2):
        assert torch.equal(before(x2, t2), m(x2, t2))


def test_per_sample_ranges_can_be_asked_for_and_bad_values_are_refused():
    from qcorrect.quant import quantized_layers
    m = quantize_model(make_toy(), preset("W4A8", act_ranges="per_sample"))
    assert {l.act.ranges for l in quantized_layers(m).values()} == {"per_sample"}
    with pytest.raises(QuantizationError, match="unknown activation ranges"):
        preset("W4A8", act_ranges="per_pixel")
