"""The pack's ComfyUI wire type and model folders.

``QCORRECT_STATS`` carries a :class:`~qcorrect.calibration.CorrectionStats` between nodes (Calibrate
Errors / Load Correction Stats → Corrected KSampler, Correction Sampler, Compare To Reference).
Statistics files live in ``models/qcorrect/`` and quantized models in ``models/qcorrect_quantized/``;
both folders are registered with ComfyUI's ``folder_paths`` (``extra_model_paths.yaml`` can add more).
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

Stats = io.Custom("QCORRECT_STATS")

STATS_FOLDER = "qcorrect"
QUANTIZED_FOLDER = "qcorrect_quantized"
EXTENSIONS = {".safetensors"}


def register_folders() -> None:
    """Add the pack's model folders (idempotent; keeps paths other packs or users registered)."""
    for name in (STATS_FOLDER, QUANTIZED_FOLDER):
        default = os.path.join(folder_paths.models_dir, name)
        paths, exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
        if default not in paths:
            paths = [*paths, default]
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | EXTENSIONS)


def output_path(folder: str, filename: str) -> str:
    """Where a node writes ``filename`` (``.safetensors`` added) in the first path of ``folder``.

    Sub-folders in the name are allowed; anything that would leave the folder is refused.
    """
    name = filename.strip()
    if not name:
        raise ValueError("give a file name")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    root = os.path.abspath(folder_paths.get_folder_paths(folder)[0])
    path = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"file name {filename!r} leaves the {folder} folder")
    return path


def shown_path(folder: str, path: str) -> str:
    """``path`` as a user reads it on the node: relative to its model folder (``qcorrect/…``)."""
    for root in folder_paths.get_folder_paths(folder):
        root = os.path.abspath(root)
        if os.path.commonpath([root, os.path.abspath(path)]) == root:
            return f"{folder}/{os.path.relpath(path, root)}"
    return path
