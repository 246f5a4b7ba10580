"""Small real ComfyUI models and inputs for the in-process node tests (needs the ``comfy`` fixture)."""

from __future__ import annotations

import torch


def node_output(out):
    """The values of a V3 ``io.NodeOutput`` (tuple) and its UI text (or None)."""
    ui = getattr(out, "ui", None)
    text = None
    if ui is not None:
        d = ui.as_dict() if hasattr(ui, "as_dict") else ui
        text = "\n".join(d.get("text", ())) if isinstance(d, dict) else None
    return tuple(out.args), text


def tiny_sd15(dtype=None):
    """The tiny random SD1.5 UNet of ``tiny_sd15.py`` as a ComfyUI MODEL (fp32 on CPU by default)."""
    import comfy.sd

    from tiny_sd15 import unet_state_dict

    options = {} if dtype is None else {"dtype": dtype}
    return comfy.sd.load_diffusion_model_state_dict(unet_state_dict(), model_options=options)


def conditioning(seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=gen) * scale, {}]]


def lora_state_dict(model, rank: int = 4, scale: float = 0.5, seed: int = 3, pattern: str = "attn") -> dict:
    """A random LoRA (kohya key names) for the Linear layers of ``model`` whose name contains ``pattern``."""
    gen = torch.Generator().manual_seed(seed)
    dm = model.get_model_object("diffusion_model")
    sd = {}
    for name, m in dm.named_modules():
        if pattern not in name or not isinstance(m, torch.nn.Linear):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        out_f, in_f = m.out_features, m.in_features
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * scale / rank**0.5
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def with_lora(model, lora_sd, strength: float = 1.0):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0.0)[0]


def sample(model, seed=1, steps=4, cfg=3.0, sampler="euler", scheduler="normal", pos=None, neg=None, batch=1, size=8):
    """The stock KSampler's latent (``nodes.common_ksampler``)."""
    import nodes as comfy_nodes

    latent = {"samples": torch.zeros(batch, 4, size, size)}
    pos = conditioning(0) if pos is None else pos
    neg = conditioning(1, 0.0) if neg is None else neg
    return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent)[0]["samples"]


def mse(a, b) -> float:
    return float((a.double() - b.double()).pow(2).mean())
