"""The pack as ComfyUI and pip see it: light root import, relative imports, any folder name."""

import ast
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["quant", "calibration", "reference", "evaluation", "bench"]


def test_root_import_is_light_and_registers_nothing_without_comfyui():
    code = "import sys, qcorrect; print(sorted(qcorrect.NODE_CLASS_MAPPINGS), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "False"]


def test_no_absolute_self_imports_in_the_pack():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".ci", "build") or ".venv" in rel.parts or "site-packages" in rel.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{rel}: {n}" for n in names if n.split(".")[0] in ("qcorrect", "nodes", *PACKAGES)]
    assert not offenders


def _load_under(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_imports_under_any_folder_name():
    name = "some_custom_nodes_folder"
    try:
        pack = _load_under(name)
        for sub in PACKAGES:
            importlib.import_module(f"{name}.{sub}")
        quality = importlib.import_module(f"{name}.bench.quality")
        assert quality.__name__.startswith(name)
        assert pack.NODE_CLASS_MAPPINGS == {}
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_with_comfyui_present_the_guard_tries_to_register(monkeypatch):
    """With ``comfy`` importable the root module imports ``nodes/`` (here a fake ``comfy`` without
    ``comfy_api``, so the import fails loudly instead of registering an empty pack)."""
    comfy = types.ModuleType("comfy")
    comfy.utils = types.ModuleType("comfy.utils")
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    name = "pack_with_fake_comfy"
    try:
        with pytest.raises(ImportError, match="comfy_api|folder_paths"):
            _load_under(name)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
