"""Export a qcorrect-quantized diffusion model in ComfyUI's own quantized checkpoint layout.

ComfyUI 0.29 loads ``<layer>.weight`` (int8 codes) + ``<layer>.weight_scale`` + ``<layer>.comfy_quant``
(the JSON ``{"format": "int8_tensorwise"}`` as uint8 bytes) for a Linear layer with its stock
diffusion-model loader (UNETLoader) and runs it with its own int8 kernels (comfy-kitchen's
``TensorWiseINT8Layout``, whose dequantization ``codes · scale`` broadcasts a per-row scale).
qcorrect's int8 is per output channel and symmetric, so its codes and per-row scales are written
as they are: the exported Linear layers compute exactly what qcorrect's do (weights-wise).

ComfyUI has no format for group-wise int4 or for quantized convolutions: those layers are written
dequantized in fp16 (the file is then not smaller for them), and the caller is told how many.
Everything else (norms, embeddings, layers qcorrect kept in 16-bit) is written as stored.
"""

from __future__ import annotations

import json

import torch

from ..quant.io import atomic_save_safetensors
from ..quant.modules import QUANT_LAYERS, QuantLinear

COMFY_INT8 = {"format": "int8_tensorwise"}


def comfy_state_dict(dm: torch.nn.Module) -> tuple[dict, dict]:
    """``(tensors, counts)``: the diffusion model's state in ComfyUI's layout and what went where."""
    out, counts = {}, {"int8": 0, "fp16": 0}
    quant = {name: m for name, m in dm.named_modules() if isinstance(m, QUANT_LAYERS)}
    for key, t in dm.state_dict().items():
        layer = key.rsplit(".", 1)[0]
        if layer in quant or layer.rsplit(".", 1)[0] in quant:
            continue  # written below, per layer (the activation quantizers' buffers are qcorrect's own)
        out[key] = t
    conf = torch.tensor(list(json.dumps(COMFY_INT8).encode("utf-8")), dtype=torch.uint8)
    for name, m in quant.items():
        if isinstance(m, QuantLinear) and m.wqtype.name == "int8":
            out[f"{name}.weight"] = m.qweight.clone()
            out[f"{name}.weight_scale"] = m.scale.float().reshape(-1, 1).clone()
            out[f"{name}.comfy_quant"] = conf.clone()
            counts["int8"] += 1
        else:
            out[f"{name}.weight"] = m.dequantized_weight(torch.float16)
            counts["fp16"] += 1
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach()
    return out, counts


def save_comfy_checkpoint(dm: torch.nn.Module, path: str, metadata: dict | None = None) -> dict:
    tensors, counts = comfy_state_dict(dm)
    atomic_save_safetensors(tensors, path, {"qcorrect.export": "comfy_quant", **(metadata or {})})
    return counts
