"""Quantization core: quantized types, quantized layers, activation quantizers, plans, observers, files.

Plain PyTorch (imports torch and safetensors only); ComfyUI glue lives in ``nodes/``.
"""

from .activations import ActQuantizer, fake_quantize
from .calibrated import CalibratedConfig, calibrated_summary, quantize_calibrated
from .context import QuantContext, SigmaScopedDenoiser, get_context, sigma_scope
from .errors import QuantFileError, QuantizationError
from .io import load_quantized, read_plan, save_quantized
from .layerinputs import LayerInputs
from .modules import QuantConv2d, QuantLinear
from .observers import ActivationObserver
from .plan import (
    PRESETS,
    QuantPlan,
    fit_weight_type,
    plan_summary,
    preset,
    quantization_plan,
    quantize_model,
    quantized_layers,
    resolve_plan,
    set_activation_schedule,
)
from .qtypes import QTYPES, QType, activation_qtype, qtype, weight_qtype

__all__ = [
    "ActQuantizer", "ActivationObserver", "CalibratedConfig", "LayerInputs", "PRESETS", "QTYPES", "QType", "QuantContext", "QuantConv2d",
    "QuantFileError", "QuantLinear", "QuantPlan", "QuantizationError", "SigmaScopedDenoiser",
    "activation_qtype", "calibrated_summary", "fake_quantize", "fit_weight_type", "get_context", "load_quantized",
    "plan_summary", "preset", "qtype", "quantization_plan", "quantize_calibrated", "quantize_model", "quantized_layers",
    "read_plan", "resolve_plan", "save_quantized", "set_activation_schedule", "sigma_scope", "weight_qtype",
]
