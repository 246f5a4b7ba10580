"""Fixtures for the tests that run inside a real ComfyUI (0.29 or newer).

They run only when ``COMFYUI_DIR`` points to a ComfyUI checkout and skip otherwise (CI has none).
Test modules here must not import ``comfy``/``comfy_api``/``qcorrect.nodes`` at module level: ask
for the ``comfy`` fixture, which puts the checkout on ``sys.path`` in CPU mode, then import.

On a host whose only torch is the CPU build (these machines), ComfyUI needs the import shim of
``../shared/tools/comfyui_cpu_shim.py``; it is found through ``QCORRECT_COMFYUI_SHIM`` or next to
the repository, and skipped where it does not exist (a normal ComfyUI install needs none).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:  # the helpers next to the tests (nodekit, tiny_sd15, server) import by name
    sys.path.insert(0, str(HERE))


def pytest_collection_modifyitems(config, items):
    if COMFYUI_DIR:
        return
    skip = pytest.mark.skip(reason="needs a ComfyUI checkout: set COMFYUI_DIR (see ../shared/tools/README.md)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def _shim_path() -> Path | None:
    for cand in (os.environ.get("QCORRECT_COMFYUI_SHIM"), REPO.parent / "shared" / "tools" / "comfyui_cpu_shim.py"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def install_cpu_shim() -> None:
    path = _shim_path()
    if path is None or "comfyui_cpu_shim" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("comfyui_cpu_shim", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_cpu_shim"] = mod
    spec.loader.exec_module(mod)
    mod.install()


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI importable in this process, in CPU mode, with the pack's model folders in a temp dir.

    Returns a namespace with ``dir`` (the checkout) and ``models`` (the temporary folder registered
    as the default ``qcorrect`` and ``qcorrect_quantized`` model folders).
    """
    if not COMFYUI_DIR:
        pytest.skip("COMFYUI_DIR not set")
    comfy_dir = str(Path(COMFYUI_DIR).resolve())
    install_cpu_shim()
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    import folder_paths

    models = tmp_path_factory.mktemp("comfy_models")
    for name in ("qcorrect", "qcorrect_quantized"):
        (models / name).mkdir()
    import qcorrect.nodes  # noqa: F401  (registers the pack's folders)

    for name in ("qcorrect", "qcorrect_quantized"):
        folder_paths.add_model_folder_path(name, str(models / name), is_default=True)
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("comfy_output")))

    class NS:
        pass

    ns = NS()
    ns.dir = Path(comfy_dir)
    ns.models = models
    return ns


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny random SD1.5 checkpoint and UNet file (``tiny_sd15.py``), built once per session."""
    from . import server as srvmod
    from . import tiny_sd15

    return srvmod.shared("tiny_sd15", lambda: tiny_sd15.build_in_subprocess(tmp_path_factory.mktemp("tiny_sd15")))


@pytest.fixture(scope="session")
def comfy_server(request, tmp_path_factory, tiny_models):
    """One real ComfyUI server for the session (``server.py``), with the tiny models available."""
    from . import server as srvmod

    models = {"checkpoints": [tiny_models["checkpoint"]], "diffusion_models": [tiny_models["unet"]]}
    return srvmod.shared_server(request, tmp_path_factory, models)
