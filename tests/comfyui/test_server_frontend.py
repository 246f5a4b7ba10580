"""ComfyUI's own web frontend (served by the test server) in headless Chromium: every example
workflow loads with no missing node, the frontend's UI → API conversion equals server.ui_to_api,
and the screenshot procedure of screenshot.py works. Skips without chromium + chromedriver +
selenium (apt-get install chromium chromium-driver; pip install selenium)."""

from __future__ import annotations

import json

import pytest

from . import screenshot
from . import server as srvmod
from . import tiny_sd15
from .server import ui_to_api

WORKFLOWS = srvmod.REPO / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="module")
def browser():
    why = screenshot.missing_requirements()
    if why:
        pytest.skip(why)
    drv = screenshot.open_browser()
    yield drv
    drv.quit()


def strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_in_the_frontend_with_no_missing_node(comfy_server, browser, name):
    screenshot.load_workflow(browser, comfy_server, name)
    assert screenshot.missing_nodes(browser) == []
    # Only loaders of files this server may not have can be flagged: the SD1.5 models, and the
    # stats file workflow 1 writes (absent unless it ran earlier in the session).
    flagged = {entry.split(" ", 1)[1] for entry in screenshot.flagged_nodes(browser)}
    assert flagged <= {"CheckpointLoaderSimple", "UNETLoader", "QCorrectLoadCorrectionStats"}, flagged
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    ours = ui_to_api(workflow, comfy_server.object_info())
    assert strip_meta(screenshot.frontend_prompt(browser)) == strip_meta(ours)


def test_screenshot_procedure(comfy_server, tmp_path):
    if screenshot.missing_requirements():
        pytest.skip(screenshot.missing_requirements())
    out = tmp_path / "workflow.png"
    result = screenshot.screenshot(comfy_server, "qcorrect_reference_end_to_end", out)
    assert result["missing"] == [] and result["nodes"] > 10
    from PIL import Image

    with Image.open(out) as img:
        assert img.size[0] == screenshot.WINDOW[0] and 500 <= img.size[1] <= screenshot.WINDOW[1]
        assert sum(1 for c in img.convert("L").histogram() if c) > 20  # not a blank page
