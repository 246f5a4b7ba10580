"""Quantize Model (+ Advanced), Relax Timesteps, Save / Load Quantized Model."""

from __future__ import annotations

import json

import comfy.samplers
import folder_paths
from comfy_api.latest import io, ui

from ..quant import PRESETS, QuantizationError, QuantPlan, load_quantized, plan_summary, save_quantized
from ..quant import preset as quant_preset
from ..quant.plan import TIME_EMBED_PATTERNS, set_activation_schedule
from ..quant.qtypes import ACTIVATION, qtype
from ..quant.relax import relaxed_schedule
from . import patching
from .comfy_export import save_comfy_checkpoint
from .types import QUANTIZED_FOLDER, output_path, shown_path

CATEGORY = "qcorrect"
GROUP_CHOICES = ("64", "128", "per-channel")


def _quantize(model, plan: QuantPlan):
    out, baked = patching.quantized_clone(model, plan)
    dm = patching.diffusion_model(out)
    size_q, size_fp = out.model_size(), model.model_size()
    lines = [plan_summary(dm), f"model size {size_q / 2**20:.1f} MiB (input {size_fp / 2**20:.1f} MiB)"]
    if baked:
        lines.append(f"{len(baked)} LoRA/weight patches applied before rounding")
    return io.NodeOutput(out, ui=ui.PreviewText("\n".join(lines)))


class QuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectQuantizeModel",
            display_name="Quantize Model",
            category=CATEGORY,
            description="Post-training quantization of the diffusion model with real packed storage (int8, or int4 "
                        "two per byte with fp16 group scales). Returns a new MODEL; the input is untouched.",
            inputs=[
                io.Model.Input("model", tooltip="The full-precision model (LoRA before this node is baked in)."),
                io.Combo.Input("preset", options=list(PRESETS), default="W4A8",
                               tooltip="W = weight bits, A = activation bits (A16 = weights only)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, preset) -> io.NodeOutput:
        return _quantize(model, quant_preset(preset))


def advanced_plan(weight_bits: int, group_size: str, symmetric: bool, activation_bits: int, activation_mode: str,
                  keep_first_last_conv: bool, keep_patterns: str) -> QuantPlan:
    """The QuantPlan of the Advanced node's widgets (validated; errors name the widget)."""
    if weight_bits == 8:
        if group_size != "per-channel":
            raise QuantizationError("int8 weights use one scale per output channel: set group_size to per-channel")
        if not symmetric:
            raise QuantizationError("int8 weights are symmetric in this pack: set symmetric to true")
        weights = "int8"
    elif weight_bits == 4:
        base = "int4" if symmetric else "uint4"
        weights = base if group_size == "per-channel" else f"{base}_g{group_size}"
    else:
        raise QuantizationError(f"weight_bits must be 8 or 4, got {weight_bits}")
    if activation_bits == 16 or activation_mode == "none":
        acts, mode = None, "none"
    else:
        acts = f"a{activation_bits}_asym"
        if qtype(acts).kind != ACTIVATION:
            raise QuantizationError(f"no activation type for {activation_bits} bits")
        mode = activation_mode
    extra = tuple(p.strip() for p in keep_patterns.split(",") if p.strip())
    label = f"W{weight_bits}A{activation_bits if acts else 16}"
    return QuantPlan(weights, acts, mode, keep_first_last_conv=keep_first_last_conv,
                     keep_patterns=TIME_EMBED_PATTERNS + extra, preset=label).validate()


class QuantizeModelAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectQuantizeModelAdvanced",
            display_name="Quantize Model (Advanced)",
            category=CATEGORY,
            description="Quantize Model with every knob: weight bits and group size, symmetry, activation bits and "
                        "mode, and which layers stay in 16-bit.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("weight_bits", options=["4", "8"], default="4"),
                io.Combo.Input("group_size", options=list(GROUP_CHOICES), default="64",
                               tooltip="Input elements per fp16 scale (int4); int8 always uses per-channel scales."),
                io.Boolean.Input("symmetric", default=False,
                                 tooltip="Symmetric codes (no zero point) or asymmetric (a zero point per group)."),
                io.Combo.Input("activation_bits", options=["8", "4", "16"], default="8",
                               tooltip="16 = activations stay full precision (weight-only quantization)."),
                io.Combo.Input("activation_mode", options=["dynamic", "static", "none"], default="dynamic",
                               tooltip="dynamic: per-sample ranges measured at every call. static: one range per σ, "
                                       "calibrated by Calibrate Errors (PCR's progressive calibration) — sample "
                                       "with Calibrate Errors' quantized_model output."),
                io.Boolean.Input("keep_first_last_conv", default=True),
                io.String.Input("keep_patterns", default="", multiline=False,
                                tooltip="Comma-separated fnmatch patterns of layer names kept in 16-bit, e.g. "
                                        "'*.attn2.*, out.*' (the time embedding is always kept)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, weight_bits, group_size, symmetric, activation_bits, activation_mode,
                keep_first_last_conv, keep_patterns) -> io.NodeOutput:
        plan = advanced_plan(int(weight_bits), group_size, bool(symmetric), int(activation_bits), activation_mode,
                             bool(keep_first_last_conv), keep_patterns)
        return _quantize(model, plan)


class RelaxTimesteps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectRelaxTimesteps",
            display_name="Relax Timesteps",
            category=CATEGORY,
            description="PCR's activation relaxing: the share of steps nearest x0 (or x_T) runs its activations at a "
                        "higher bit-width. Stored as σ ranges, so it applies to any step count.",
            inputs=[
                io.Model.Input("model", tooltip="A model quantized by Quantize Model, with quantized activations."),
                io.Float.Input("fraction", default=0.2, min=0.0, max=1.0, step=0.05),
                io.Combo.Input("where", options=["near x0", "near x_T"], default="near x0"),
                io.Combo.Input("bits", options=["10", "16"], default="10"),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The schedule the fraction is counted on (use your sampler's steps)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, fraction, where, bits, steps, scheduler) -> io.NodeOutput:
        if not patching.is_qcorrect_quantized(model):
            raise QuantizationError("Relax Timesteps needs a model quantized by qcorrect's Quantize Model")
        dm = patching.diffusion_model(model)
        act_bits = sorted({m.act.qtype.bits for m in dm.modules() if hasattr(m, "act") and m.act.qtype is not None})
        if not act_bits:
            raise QuantizationError("this model's activations are not quantized (a W*A16 preset): nothing to relax")
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, int(steps))
        schedule, k, avg = relaxed_schedule(sigmas, float(fraction), "x0" if where == "near x0" else "xT", int(bits),
                                            act_bits[0])
        base = patching.copy_model(model)
        set_activation_schedule(base.diffusion_model, schedule)
        out = patching.new_model_patcher(model, base)
        text = (f"{k} of {int(steps)} steps {where} at A{int(bits)}; average activation bit-width {avg:.2f} "
                f"(base A{act_bits[0]})")
        return io.NodeOutput(out, ui=ui.PreviewText(text))


class SaveQuantizedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectSaveQuantizedModel",
            display_name="Save Quantized Model",
            category=CATEGORY,
            description="Save the quantized diffusion model as safetensors (no pickle). qcorrect format: packed "
                        "weights, scales and the per-layer plan, in models/qcorrect_quantized/ (Load Quantized "
                        "Model). comfyui int8: ComfyUI's own layout (int8 Linear layers as comfy_quant int8, the "
                        "rest in fp16) in models/diffusion_models/, for the stock Load Diffusion Model node.",
            inputs=[io.Model.Input("model"), io.String.Input("filename", default="quantized/model_w4a8"),
                    io.Combo.Input("format", options=["qcorrect", "comfyui int8"], default="qcorrect")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename, format="qcorrect") -> io.NodeOutput:
        if not patching.is_qcorrect_quantized(model):
            raise QuantizationError("Save Quantized Model needs a model quantized by qcorrect's Quantize Model")
        meta = {"qcorrect.model_class": type(model.model).__name__,
                "qcorrect.latent_channels": json.dumps(patching.latent_channels(model))}
        dm = patching.diffusion_model(model)
        if format == "comfyui int8":
            path = output_path("diffusion_models", filename)
            counts = save_comfy_checkpoint(dm, path, meta)
            text = (f"saved models/{shown_path('diffusion_models', path)} in ComfyUI's layout: {counts['int8']} Linear layers as comfy_quant int8, "
                    f"{counts['fp16']} quantized layers written as fp16 (ComfyUI has no format for group-int4 "
                    "or quantized convolutions)")
            return io.NodeOutput(ui=ui.PreviewText(text))
        path = output_path(QUANTIZED_FOLDER, filename)
        save_quantized(dm, path, meta)
        return io.NodeOutput(ui=ui.PreviewText(f"saved models/{shown_path(QUANTIZED_FOLDER, path)}"))


class LoadQuantizedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QCorrectLoadQuantizedModel",
            display_name="Load Quantized Model",
            category=CATEGORY,
            description="Rebuild a model saved by Save Quantized Model on the full-precision model of the same "
                        "architecture (its weights are replaced by the file's).",
            inputs=[
                io.Model.Input("model", tooltip="The full-precision model of the same architecture."),
                io.Combo.Input("quantized_name", options=folder_paths.get_filename_list(QUANTIZED_FOLDER)),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, quantized_name) -> io.NodeOutput:
        if patching.is_qcorrect_quantized(model):
            raise QuantizationError("connect the full-precision model: this one is already quantized")
        path = folder_paths.get_full_path_or_raise(QUANTIZED_FOLDER, quantized_name)
        base = patching.copy_model(model)
        load_quantized(base.diffusion_model, path)
        out = patching.new_model_patcher(model, base)
        return io.NodeOutput(out, ui=ui.PreviewText(plan_summary(base.diffusion_model)))


NODES = [QuantizeModel, QuantizeModelAdvanced, RelaxTimesteps, SaveQuantizedModel, LoadQuantizedModel]
