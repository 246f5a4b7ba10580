"""A tiny, random, seeded SD1.5 checkpoint that ComfyUI's stock loaders accept, built at test time.

No Stable Diffusion weights are reachable where this project is tested, so the SD1.5 workflows run
on a file with the right *shape* and random weights, built from ComfyUI's own classes:

- the UNet is ComfyUI's ``UNetModel`` with what ``comfy/model_detection.py`` and the ``SD15`` entry
  of ``comfy/supported_models.py`` read as SD1.5 (``model_channels`` 320 and ``context_dim`` 768
  are fixed by detection; depth and levels are read from the keys, so one level with one res block
  and one transformer gives a 26M-parameter UNet);
- the text encoder is SD1's CLIP-L (``comfy.sd1_clip.SD1ClipModel``, the full 123M parameters:
  the tokenizer and the transformer's config are fixed), stored in fp16;
- the VAE is a TAESD (``comfy.taesd.taesd.TAESD``, 2.4M parameters), which the stock VAE loader
  recognises from its keys. Random VAEs may decode to garbage: compare latents, not images.

``build(out_dir)`` needs ComfyUI importable (the ``comfy`` fixture of ``conftest.py``); run as a
script it sets that up itself::

    COMFYUI_DIR=/path/to/ComfyUI python tests/comfyui/tiny_sd15.py OUT_DIR
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

CHECKPOINT = "qcorrect_tiny_sd15.safetensors"
UNET = "qcorrect_tiny_sd15_unet.safetensors"

# What ComfyUI's detection reads back from the keys of this UNet (detect_unet_config), plus the
# SD15 extras (num_heads 8): constructing with exactly this makes the saved keys match.
UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_checkpoint": False,
}


def _shapes(module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def _random_state(shapes: dict, seed: int, dtype, gain: float = 1.0) -> dict:
    """Seeded weights that keep activations near unit scale: N(0, gain²/fan_in) for weights, ones
    for norm scales, zeros for biases (deterministic for a seed, whatever the global RNG state)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, _) in sorted(shapes.items()):
        leaf = name.rsplit(".", 1)[-1]
        if len(shape) >= 2:  # conv and linear weights, embeddings
            value = torch.randn(shape, generator=gen) * (gain / math.sqrt(math.prod(shape[1:])))
        elif leaf in ("weight", "vae_scale"):  # 1-D weights are norm scales (GroupNorm, LayerNorm)
            value = torch.ones(shape)
        else:  # biases, shifts
            value = torch.zeros(shape)
        out[name] = value.to(dtype).contiguous()
    return out


def unet_state_dict(seed: int = 0):
    """The tiny UNet's state dict (fp16, ComfyUI's own UNetModel keys, no prefix)."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**UNET_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)
    return _random_state(_shapes(unet), seed, torch.float16)


def clip_state_dict(seed: int = 1):
    """SD1's CLIP-L text encoder in checkpoint keys (``cond_stage_model.transformer.text_model.*``)."""
    import torch
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float16)
    shapes = {
        k.replace("clip_l.", "cond_stage_model.", 1): v
        for k, v in _shapes(clip).items()
        if k.startswith("clip_l.transformer.text_model.")  # what SD15 saves (no projection, no logit scale)
    }
    state = _random_state(shapes, seed, torch.float16)
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state[ids] = torch.arange(77, dtype=torch.int64).unsqueeze(0)
    return state


def vae_state_dict(seed: int = 2):
    """A TAESD in checkpoint keys (``first_stage_model.taesd_encoder.*``/``taesd_decoder.*``)."""
    import torch
    import comfy.taesd.taesd

    with torch.device("meta"):
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    state = _random_state(_shapes(taesd), seed, torch.float32)
    return {"first_stage_model." + k: v for k, v in state.items()}


def paths_in(out_dir) -> dict:
    out_dir = Path(out_dir)
    return {"checkpoint": out_dir / "checkpoints" / CHECKPOINT, "unet": out_dir / "diffusion_models" / UNET}


def build(out_dir, seed: int = 0) -> dict:
    """Write ``checkpoints/<CHECKPOINT>`` (UNet + CLIP + VAE) and ``diffusion_models/<UNET>`` (the
    same UNet alone, for UNETLoader) under ``out_dir``; returns their paths. Skips existing files."""
    from safetensors.torch import save_file

    paths = paths_in(out_dir)
    if all(p.is_file() for p in paths.values()):
        return paths
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    unet = unet_state_dict(seed)
    meta = {"qcorrect_test_model": "tiny random SD1.5", "seed": str(seed)}
    save_file(unet, str(paths["unet"]), metadata=meta)
    sd = {"model.diffusion_model." + k: v for k, v in unet.items()}
    sd.update(clip_state_dict(seed + 1))
    sd.update(vae_state_dict(seed + 2))
    save_file(sd, str(paths["checkpoint"]), metadata=meta)
    return paths


def build_in_subprocess(out_dir, python: str | None = None, timeout: float = 600) -> dict:
    """``build`` in a fresh process (ComfyUI imported there, not in the caller), bounded in time."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([python or sys.executable, str(Path(__file__).resolve()), str(out_dir)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"building the tiny SD1.5 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return paths_in(out_dir)


def _setup_comfy() -> None:
    """Make ComfyUI importable in CPU mode in a plain process (what the conftest fixture does)."""
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from conftest import install_cpu_shim  # noqa: E402  (the shim, found the same way)

    sys.path.remove(str(here))
    install_cpu_shim()
    sys.path.insert(0, str(Path(os.environ["COMFYUI_DIR"]).resolve()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


if __name__ == "__main__":
    if len(sys.argv) != 2 or "COMFYUI_DIR" not in os.environ:
        sys.exit("usage: COMFYUI_DIR=/path/to/ComfyUI python tests/comfyui/tiny_sd15.py OUT_DIR")
    _setup_comfy()
    for kind, path in build(sys.argv[1]).items():
        print(kind, path, f"{path.stat().st_size / 2**20:.1f} MiB")
