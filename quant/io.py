"""Save and load quantized models as safetensors: tensors in the body, the plan in the metadata.

Loading rebuilds the quantized modules of a full-precision *skeleton* of the same architecture
(any weights: they are all replaced) from the plan, then loads every tensor. The file is read and
checked completely (format, plan, keys, shapes, dtypes, finiteness) before the skeleton changes,
so a bad file leaves the model untouched. No pickle anywhere.

File versions: "2" stores each quantized layer's storage as one uint8 blob ``<layer>.weight`` (the
layer's own parameter, see ``weights.blob_layout``); "1" stored ``<layer>.qweight`` / ``.scale`` /
``.zero`` separately, and still loads (its tensors are packed into blobs before the checks).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors import SafetensorError, safe_open
import safetensors.torch
from safetensors.torch import load_file
from torch import nn

from .activations import ActQuantizer
from .context import attach_context, get_context
from .errors import QuantFileError, QuantizationError
from .modules import QuantConv2d, QuantLinear
from .plan import ACT_CALIBRATION_ATTR, KEPT_ATTR, PLAN_ATTR, PLAN_FORMAT, QuantPlan, _set_submodule, is_float_layer, quantization_plan
from .weights import decode_blob, encode_blob, input_size, storage_shapes

FORMAT_TAG = "qcorrect.quantized_model"
META_FORMAT = "qcorrect.format"
META_VERSION = "qcorrect.version"
META_PLAN = "qcorrect.quant_plan"
FILE_VERSION = "2"
READABLE_VERSIONS = ("1", "2")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the target folder, then rename: never a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_quantized(module: nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    plan = quantization_plan(module)
    if not plan["layers"]:
        raise QuantizationError("model has no quantized layer; quantize it before saving")
    meta = {META_FORMAT: FORMAT_TAG, META_VERSION: FILE_VERSION, META_PLAN: json.dumps(plan)}
    meta.update(metadata or {})
    atomic_save_safetensors(module.state_dict(), path, meta)


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise QuantFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if meta.get(META_FORMAT) != FORMAT_TAG:
        raise QuantFileError(f"{path}: not a qcorrect quantized model (metadata {META_FORMAT!r} missing)")
    version = meta.get(META_VERSION)
    if version not in READABLE_VERSIONS:
        raise QuantFileError(
            f"{path}: file version {version!r}, this qcorrect reads {' and '.join(READABLE_VERSIONS)}"
        )
    try:
        plan = json.loads(meta[META_PLAN])
    except (KeyError, ValueError):
        raise QuantFileError(f"{path}: the quantization plan in the metadata is missing or not JSON") from None
    if plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("layers"), dict):
        raise QuantFileError(f"{path}: unsupported plan format {plan.get('format')!r}")
    kept = plan.get("kept", {})
    if not isinstance(kept, dict) or not all(v is None or isinstance(v, str) for v in kept.values()):
        raise QuantFileError(f"{path}: the plan's 'kept' entry is not a map of layer names to notes")
    return tensors, plan, version


def read_plan(path: str) -> dict:
    return _read(path)[1]


def _rebuild(name: str, layer: nn.Module, spec: dict, context) -> nn.Module:
    # a layer written before ``act_ranges`` existed quantized every sample with its own range
    act = ActQuantizer(spec["act"], spec["act_mode"], context, name, spec.get("act_ranges", "per_sample"))
    if spec.get("schedule"):
        act.set_schedule([tuple(e) for e in spec["schedule"]])
    n = int(spec.get("static_points", 0))
    act.range_sigmas, act.range_lo, act.range_hi = torch.ones(n), torch.zeros(n), torch.zeros(n)
    bias = None if layer.bias is None else layer.bias
    if spec["type"] == "linear" and isinstance(layer, nn.Linear) and is_float_layer(layer):
        new = QuantLinear(layer.in_features, layer.out_features, bias, spec["weight"], act, name)
    elif spec["type"] == "conv2d" and isinstance(layer, nn.Conv2d):
        if list(layer.kernel_size) != spec["kernel_size"] or layer.groups != spec["groups"]:
            raise QuantFileError(f"layer {name!r}: conv geometry in the file differs from the model")
        new = QuantConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, bias, spec["weight"], act, name,
        )
    else:
        raise QuantFileError(f"layer {name!r}: file says {spec['type']}, model has {type(layer).__name__}")
    new.fallback = spec.get("fallback")
    # calibrated quantizers' extras (input scales, low-rank branch) and per-layer choices
    new.init_extras(int(spec.get("rank", 0)), bool(spec.get("input_scale", False)))
    new.calib = spec.get("calib")
    return new


def load_quantized(module: nn.Module, path: str) -> nn.Module:
    """Turn the full-precision skeleton ``module`` into the quantized model stored at ``path``."""
    tensors, plan, version = _read(path)
    context = get_context(module) or attach_context(module)
    replacements = {}
    for name, spec in plan["layers"].items():
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise QuantFileError(f"{path}: layer {name!r} of the file does not exist in the model") from None
        try:
            replacements[name] = _rebuild(name, layer, spec, context)
        except (KeyError, QuantizationError) as exc:
            raise QuantFileError(f"{path}: cannot rebuild layer {name!r}: {exc}") from None
    expected = {}
    for key, t in module.state_dict().items():
        if not any(key.startswith(n + ".") for n in replacements):
            expected[key] = t
    for name, new in replacements.items():
        for key, t in new.state_dict().items():
            expected[f"{name}.{key}"] = t
    if version == "1":
        tensors = _blobs_from_v1(path, tensors, replacements)
    _check_tensors(path, tensors, expected)
    _check_blobs(path, tensors, replacements)
    for name, new in replacements.items():
        _set_submodule(module, name, new)
    module.load_state_dict(tensors, strict=True)
    if plan.get("plan"):
        module.__dict__[PLAN_ATTR] = QuantPlan.from_json(json.dumps(plan["plan"]))
    module.__dict__[KEPT_ATTR] = dict(plan.get("kept", {}))
    if isinstance(plan.get("act_calibration"), dict):
        module.__dict__[ACT_CALIBRATION_ATTR] = plan["act_calibration"]
    return module


def _blobs_from_v1(path: str, tensors: dict, layers: dict) -> dict:
    """A version-1 file's separate ``.qweight`` / ``.scale`` / ``.zero`` tensors → one blob per layer.

    Each part is checked (present, shape, dtype, finite) under its own name before packing.
    """
    tensors = dict(tensors)
    for name, layer in layers.items():
        if f"{name}.weight" in tensors:
            raise QuantFileError(f"{path}: version 1 file with a tensor {name + '.weight'!r} (a version 2 key)")
        want = storage_shapes(layer.wqtype, layer.weight_shape[0], input_size(layer.weight_shape))
        parts = {}
        for part, (shape, dtype) in want.items():
            key = f"{name}.{part}"
            if key not in tensors:
                raise QuantFileError(f"{path}: tensor {key!r} is missing; is this file for another architecture?")
            t = tensors.pop(key)
            if tuple(t.shape) != shape:
                raise QuantFileError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, model needs {shape}")
            if t.dtype != dtype:
                raise QuantFileError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected {dtype}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise QuantFileError(f"{path}: tensor {key!r} contains NaN or inf")
            parts[part] = t
        tensors[f"{name}.weight"] = encode_blob(parts, layer.wqtype, layer.weight_shape)
    return tensors


def _check_blobs(path: str, tensors: dict, layers: dict) -> None:
    """The fp16 parts of every blob (scale, zero) must be finite."""
    for name, layer in layers.items():
        key = f"{name}.weight"
        for part, t in decode_blob(tensors[key], layer.wqtype, layer.weight_shape).items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise QuantFileError(f"{path}: tensor {key!r} contains NaN or inf in its {part} (fp16 part of the blob)")


def _check_tensors(path: str, tensors: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise QuantFileError(
            f"{path}: tensors do not fit the model (missing {missing[:5]}, unexpected {extra[:5]}); "
            "is this file for another architecture?"
        )
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape:
            raise QuantFileError(f"{path}: tensor {key!r} has shape {tuple(got.shape)}, model needs {tuple(want.shape)}")
        if got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point()):
            raise QuantFileError(f"{path}: tensor {key!r} has dtype {got.dtype}, expected {want.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise QuantFileError(f"{path}: tensor {key!r} contains NaN or inf")
