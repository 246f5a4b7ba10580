"""qcorrect: quantize diffusion models and correct their accumulated error while sampling.

Imported by ComfyUI as ``custom_nodes/<folder>``; imported by pip as ``qcorrect``. The ComfyUI
nodes are registered only when ComfyUI itself is importable (through ``comfy_entrypoint``, the V3
API), so the rest of the pack stays a plain PyTorch library (tests, benchmarks, the reference
model) that loads nothing heavy at import time.
"""

__version__ = "0.1.0"

#: the pack's frontend extension (shows the nodes' text output on the node)
WEB_DIRECTORY = "./web"

try:  # ComfyUI present: expose the node pack.
    import comfy.utils  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
else:  # ComfyUI's loader uses comfy_entrypoint when the module has no NODE_CLASS_MAPPINGS
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY", "__version__"]
