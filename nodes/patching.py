"""Adapters between ComfyUI's MODEL (a ModelPatcher) and the pack's quantization core.

A quantized MODEL is a *new* model object, never an edit of the input one: ComfyUI's
``ModelPatcher.clone()`` shares the underlying model, so :func:`quantized_clone` first makes a
structural copy of the model (new module objects; the tensors of the layers that stay in 16-bit
share their storage with the input, so no RAM is duplicated), quantizes the copy's diffusion model
with ``quant.quantize_model`` and hands it to a clone of the input patcher. The input MODEL, and
every graph that uses it, is untouched.

LoRA and other weight patches:

* placed **before** Quantize Model (patches on the input patcher): the patched weights of the
  layers being quantized are computed with ComfyUI's own ``comfy.lora.calculate_weight`` and
  quantized — W + ΔW is rounded once — and those patches are dropped from the clone; patches of the
  layers that stay in 16-bit are kept and applied by ComfyUI as usual;
* placed **after** (patches added to the quantized MODEL): ComfyUI applies them through the
  quantized layers' ``convert_weight``/``set_weight`` (dequantize, add ΔW, requantize) on a full
  load, and through ``weight_function`` (applied to the dequantized weight at each call) on a
  partial, low-VRAM load (``quant/modules.py``).

Weights are read clean: where ComfyUI currently has patches applied to the shared model (it patches
in place while a model is loaded), the patcher's backup holds the originals and the copy takes those.

The quantized model's activation quantizers read the σ of the model call (static per-σ ranges,
Relax Timesteps' bit-width schedules) from the model's own ``QuantContext``; a keyed
``APPLY_MODEL`` wrapper publishes it for each call. It finds the context through the model being
run (``executor.class_obj``), so a copy of the model (Relax Timesteps) gets its own σ.
"""

from __future__ import annotations

import copy
import uuid

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.utils
import torch
from torch import nn

from ..calibration.stats import state_fingerprint
from ..quant import QuantizationError, quantize_model, resolve_plan, sigma_scope
from ..quant.modules import QUANT_LAYERS

SIGMA_WRAPPER_KEY = "qcorrect.sigma_scope"
_BOOKKEEPING = {  # ComfyUI's per-model load state: a new model starts unloaded
    "model_lowvram": False, "lowvram_patch_counter": 0, "model_loaded_weight_memory": 0,
    "model_offload_buffer_memory": 0, "current_weight_patches_uuid": None,
}
#: what ComfyUI's dynamic-VRAM patcher (ModelPatcherDynamic, the NVIDIA default in 0.29) leaves on
#: modules and on the model: virtual-memory allocations of *that* model, never to be shared
_DYNAMIC_MODULE_ATTRS = ("_v", "_v_signature", "_pin_state", "_prefetch")
_DYNAMIC_MODEL_ATTRS = ("dynamic_vbars", "dynamic_pins")
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


class ModelMismatchError(ValueError):
    """Two inputs that must belong together do not (shown in the UI as the node's error)."""


def diffusion_model(model) -> nn.Module:
    return model.get_model_object("diffusion_model")


def is_qcorrect_quantized(model) -> bool:
    return any(isinstance(m, QUANT_LAYERS) for m in diffusion_model(model).modules())


def foreign_quantization(model) -> str | None:
    """A description of quantization done by ComfyUI itself (fp8 weight dtypes, comfy_quant layers)."""
    dm = diffusion_model(model)
    fp8 = sum(1 for p in dm.parameters() if p.dtype in _FP8)
    special = sum(1 for p in dm.parameters() if type(p.data) not in (torch.Tensor, nn.Parameter))
    if fp8:
        return f"{fp8} weights stored in an fp8 dtype (ComfyUI's fp8 weight_dtype)"
    if special:
        return f"{special} weights stored as ComfyUI quantized tensors (comfy_quant)"
    if getattr(model.model, "manual_cast_dtype", None) is not None and any(
            p.dtype in _FP8 for p in model.model.parameters()):
        return "fp8 weights"
    return None


def prediction_type(model) -> str:
    """"eps" or "v" (what the correction engine supports); anything else is refused.

    The prediction is the class that defines ``calculate_denoised`` first in the model sampling's
    MRO (ComfyUI builds it as ``type("ModelSamplingAdvanced", (schedule, prediction), {})``, and
    X0, EDM, IMG_TO_IMG … subclass EPS or V_PREDICTION).
    """
    ms = model.get_model_object("model_sampling")
    owner = next((c for c in type(ms).__mro__ if "calculate_denoised" in c.__dict__), None)
    known = {comfy.model_sampling.EPS: "eps", comfy.model_sampling.V_PREDICTION: "v"}
    if owner in known:
        return known[owner]
    raise ModelMismatchError(
        f"the model's prediction type ({getattr(owner, '__name__', type(ms).__name__)}) is not supported by the "
        "correction engine yet; it corrects ε- and v-prediction models (SD1.x, SD2.x, SDXL)")


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def fingerprint(model) -> str:
    """The fingerprint of the diffusion model's own weights (quantized storage included), without the
    patches ComfyUI may currently have applied to the shared model in place (their backups are used)."""
    state = diffusion_model(model).state_dict()
    prefix = "diffusion_model."
    for key, bk in model.backup.items():
        if key.startswith(prefix) and key[len(prefix):] in state:
            state[key[len(prefix):]] = bk.weight
    return state_fingerprint(state)


def _structural_copy(module: nn.Module) -> nn.Module:
    """New module objects; parameters are new Parameter objects over the same storage, buffers shared.

    New Parameter objects matter: ``Module.to()`` replaces ``param.data`` in place, so a shared
    Parameter would move (or be unloaded) together with the other model.
    """
    memo = {}
    for m in module.modules():
        for attr in _DYNAMIC_MODULE_ATTRS:
            if attr in m.__dict__:
                memo[id(m.__dict__[attr])] = None  # not copied; removed by _reset_load_state
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.data, requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b
    return copy.deepcopy(module, memo)


def _reset_load_state(base: nn.Module) -> None:
    for attr in _DYNAMIC_MODEL_ATTRS:
        base.__dict__.pop(attr, None)
    for m in base.modules():
        for attr in _DYNAMIC_MODULE_ATTRS:
            m.__dict__.pop(attr, None)
        if hasattr(m, "prev_comfy_cast_weights"):
            m.comfy_cast_weights = m.prev_comfy_cast_weights
            del m.prev_comfy_cast_weights
        if hasattr(m, "weight_function"):
            m.weight_function = []
        if hasattr(m, "bias_function"):
            m.bias_function = []
        if hasattr(m, "comfy_patched_weights"):
            del m.comfy_patched_weights
    for k, v in _BOOKKEEPING.items():
        if hasattr(base, k):
            setattr(base, k, v)


def call_latents(x, args: tuple, kwargs: dict) -> int | None:
    """How many distinct latents an APPLY_MODEL call's batch holds: ComfyUI's ``calc_cond_batch``
    concatenates one chunk per batched conditioning (``transformer_options["cond_or_uncond"]``, e.g.
    ``[0, 1]`` for cond and uncond), each chunk the whole latent batch. ``None`` where that is not
    known (no list, or a batch it does not divide): the quantizers then keep per-sample ranges."""
    options = args[3] if len(args) > 3 else kwargs.get("transformer_options")
    chunks = options.get("cond_or_uncond") if isinstance(options, dict) else None
    if not isinstance(chunks, (list, tuple)) or not chunks or not torch.is_tensor(x) or x.ndim == 0:
        return None
    batch = int(x.shape[0])
    return batch // len(chunks) if batch % len(chunks) == 0 else None


def sigma_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: publish the call's σ, and how many distinct latents its batch carries, to
    the quantizers of the model being run."""
    base = executor.class_obj
    with sigma_scope(base.diffusion_model, t, latents=call_latents(x, args, kwargs)):
        return executor(x, t, *args, **kwargs)


def new_model_patcher(model, base: nn.Module, drop_patches=()):
    """A clone of ``model``'s patcher around another model object ``base`` (non-dynamic: the quantized
    layers manage their own device moves), with ComfyUI's size accounting taken from ``base``."""
    state = ({}, {}, {}, set())  # backup, backup_buffers, object_patches_backup, pinned
    out = model.clone(disable_dynamic=True, model_override=(base, state))
    for key in drop_patches:
        out.patches.pop(key, None)
    out.patches_uuid = uuid.uuid4()
    out.size = 0
    out.size = out.model_size()  # the packed bytes, so ComfyUI's low-VRAM decisions see them
    out.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, SIGMA_WRAPPER_KEY)
    out.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, SIGMA_WRAPPER_KEY, sigma_wrapper)
    return out


def copy_model(model):
    """A structural copy of ``model.model`` on the offload device, in a fresh unloaded state.

    The BaseModel itself is copied shallowly (its configuration objects are shared, read-only),
    with its own module/parameter/buffer tables; each child module is copied structurally.
    """
    src = model.model
    base = copy.copy(src)
    base._parameters = {k: None if p is None else nn.Parameter(p.data, requires_grad=False)
                        for k, p in src._parameters.items()}
    base._buffers = dict(src._buffers)
    base._modules = {k: None if m is None else _structural_copy(m) for k, m in src._modules.items()}
    for key in list(model.backup):
        comfy.utils.set_attr_param(base, key, model.backup[key].weight)
    _reset_load_state(base)
    base.to(model.offload_device)
    if hasattr(base, "device"):
        base.device = model.offload_device
    return base


def refuse_quantized(model) -> None:
    """Quantize Model's refusals: a model quantized by qcorrect or by ComfyUI itself."""
    if is_qcorrect_quantized(model):
        raise QuantizationError("this MODEL is already quantized by qcorrect; connect the full-precision model "
                                "(e.g. straight from Load Checkpoint) to Quantize Model")
    foreign = foreign_quantization(model)
    if foreign:
        raise QuantizationError(
            f"this MODEL is already quantized by ComfyUI ({foreign}); load it in its default (16-bit) weight dtype "
            "to quantize it with qcorrect — or, to correct it as it is, connect it as the quantized model of "
            "Calibrate Errors and Corrected KSampler")


def baked_copy(model, plan):
    """A structural copy whose layers the plan quantizes carry the input's weight patches (LoRA before
    Quantize Model) baked in; returns ``(base, baked_keys)``. Nothing is quantized yet."""
    refuse_quantized(model)
    base = copy_model(model)
    dm = base.diffusion_model
    baked = []
    with torch.no_grad():
        for name, d in resolve_plan(dm, plan).items():
            if not d["weight"]:
                continue
            key = f"diffusion_model.{name}.weight"
            if key not in model.patches:
                continue
            layer = dm.get_submodule(name)
            w = comfy.lora.calculate_weight(model.patches[key], layer.weight.float().clone(), key)
            layer.weight = nn.Parameter(w.detach().to(layer.weight.device), requires_grad=False)
            baked.append(key)
    return base, baked


def quantized_clone(model, plan):
    """Quantize Model: a new MODEL whose diffusion model is quantized with ``plan`` (QuantPlan or preset)."""
    base, baked = baked_copy(model, plan)
    with torch.no_grad():
        quantize_model(base.diffusion_model, plan)
    return new_model_patcher(model, base, drop_patches=baked), baked
