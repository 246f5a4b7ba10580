"""The ComfyUI node pack (V3 API): registered by the root ``__init__`` through ``comfy_entrypoint``.

Thin glue over ``quant/`` and ``calibration/``; see ``nodes/README.md`` for every node's inputs.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import calibrate, quantize, quantize_calibrated, sampling
from .types import register_folders

register_folders()


def _reference_nodes() -> list:
    from . import reference
    return list(reference.NODES)


class QCorrectExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*quantize.NODES, *quantize_calibrated.NODES, *calibrate.NODES, *sampling.NODES, *_reference_nodes()]


async def comfy_entrypoint() -> QCorrectExtension:
    return QCorrectExtension()
