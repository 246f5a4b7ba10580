"""qcorrect: quantize diffusion models and correct their accumulated error while sampling.

Imported by ComfyUI as ``custom_nodes/<folder>``; imported by pip as ``qcorrect``. The ComfyUI
nodes are registered only when ComfyUI itself is importable, so the rest of the pack stays a plain
PyTorch library (tests, benchmarks, the reference model) that loads nothing heavy at import time.
"""

__version__ = "0.1.0"

try:  # ComfyUI present: expose the node pack.
    import comfy.utils  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
    except ImportError as exc:  # nodes/ arrives with its issue
        if getattr(exc, "name", "") and "nodes" not in str(exc.name):
            raise
        NODE_CLASS_MAPPINGS = {}
        NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
