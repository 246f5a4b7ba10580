"""Screenshot a workflow in ComfyUI's own web frontend (headless Chromium), e.g. for the README.

Starts a ComfyUI server with the pack (server.py), opens its frontend in headless Chromium through
selenium + chromedriver (Debian: ``apt-get install chromium chromium-driver``; ``pip install
selenium``), loads the workflow through the template route the frontend uses
(``/api/workflow_templates/<pack>/<name>.json``), refuses to continue if any node type is missing
(the red "missing node" boxes), runs it from the page (the frontend's own UI → API conversion)
so outputs and reports show on the nodes, fits the view and saves a PNG. Chromium may reach only
127.0.0.1 (host resolver rules, background networking off)::

    COMFYUI_DIR=/path/to/ComfyUI python tests/comfyui/screenshot.py              # → docs/images/workflow_reference.png
    COMFYUI_DIR=... python tests/comfyui/screenshot.py --workflow qcorrect_fp8 --out /tmp/fp8.png --no-run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:  # imported by the tests
    from . import server
except ImportError:  # run as a script; by path, since ComfyUI has a top-level module named server
    _spec = importlib.util.spec_from_file_location("qcorrect_tests_server", HERE / "server.py")
    server = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(server)

DEFAULT_OUT = server.REPO / "docs" / "images" / "workflow_reference.png"
WINDOW = (1920, 1080)
# A clean picture: no minimap, fps counter or zoom menu over the graph; workflow tabs in the sidebar
# (no leftover "Unsaved Workflow" tab); no update notifications.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
    "Comfy.Notification.ShowVersionUpdates": False,
}


def chromium_binaries() -> tuple[str, str] | None:
    """(browser, chromedriver) or None when either is missing."""
    browser = os.environ.get("QCORRECT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")
    driver = os.environ.get("QCORRECT_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def missing_requirements() -> str | None:
    """Why a screenshot cannot be taken here, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    if chromium_binaries() is None:
        return "no chromium + chromedriver (apt-get install chromium chromium-driver)"
    return None


def open_browser(size=WINDOW):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_binaries()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--no-first-run", "--no-default-browser-check",
                "--disable-features=MediaRouter,OptimizationHints,Translate",
                # Only loopback: every other host name fails to resolve.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    set_viewport(drv, size)
    drv.set_page_load_timeout(120)
    drv.set_script_timeout(300)
    return drv


def set_viewport(drv, size) -> None:
    """The page's viewport itself, not the window (which includes the headless browser's frame)."""
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})


def wait_for(drv, script: str, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = drv.execute_script(script)
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"the frontend did not {what} within {timeout:.0f}s")


def load_workflow(drv, srv, name: str) -> None:
    srv.post("/settings", SETTINGS).raise_for_status()
    drv.get(srv.url + "/")
    wait_for(drv, "return !!(window.app && window.app.graph && window.app.canvas && "
                  "window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types || {}).length > 100)",
             180, "start")
    drv.execute_async_script(
        """const [url, name, done] = arguments;
        fetch(url).then(r => r.json()).then(wf => window.app.loadGraphData(wf, true, true, name))
          .then(() => done(true), e => done(String(e)));""",
        f"{srv.url}/api/workflow_templates/{server.PACK_NAME}/{name}.json", name)
    wait_for(drv, "return window.app.graph.nodes.length > 0", 60, "load the workflow")


def missing_nodes(drv) -> list:
    """Nodes of the loaded graph whose type the frontend does not know (the red "missing node" boxes)."""
    return drv.execute_script(
        """const known = window.LiteGraph.registered_node_types;
        return window.app.graph.nodes.filter(n => !known[n.type]).map(n => `${n.id} ${n.type}`);""")


def flagged_nodes(drv) -> list:
    """Nodes the frontend marks as erroneous (e.g. a loader whose model file is not installed)."""
    return drv.execute_script(
        "return window.app.graph.nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`);")


def frontend_prompt(drv) -> dict:
    """The API prompt the frontend itself makes from the loaded graph (what Run would send)."""
    return drv.execute_async_script(
        "const done = arguments[0]; window.app.graphToPrompt().then(p => done(p.output), e => done(String(e)));")


def close_dialogs(drv) -> None:
    drv.execute_script(
        """document.querySelectorAll('.p-dialog-mask, .p-dialog').forEach(d => {
            const b = d.querySelector('button[aria-label="Close"], .p-dialog-close-button, .p-dialog-header-close');
            if (b) b.click(); });
        document.querySelectorAll('.p-toast-close-button').forEach(b => b.click());""")


def run_in_page(drv, srv, timeout: float = 300) -> None:
    """Queue the graph from the page (the frontend converts it itself) and wait until it ran."""
    before = len(srv.get("/history"))
    drv.execute_async_script(
        "const done = arguments[0]; window.app.queuePrompt(0, 1).then(() => done(true), e => done(String(e)));")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = srv.get("/history")
        if len(hist) > before and not srv.get("/queue")["queue_running"]:
            entry = list(hist.values())[-1]
            if entry["status"].get("status_str") != "success":
                raise server.ExecutionFailed(entry, srv.log_tail())
            time.sleep(2)  # let the websocket results reach the nodes and the canvas redraw
            return
        time.sleep(0.5)
    raise TimeoutError(f"the workflow did not finish within {timeout:.0f}s")


def fit_view(drv, margin=(70, 75, 20, 25)) -> list:
    """Scale and offset the canvas so every node and group is in view (margins: left, top, right,
    bottom, in screen pixels; the left and top ones clear the frontend's side bar and top bar)."""
    bounds = drv.execute_script(
        """const [ml, mt, mr, mb] = arguments[0], app = window.app, c = app.canvas;
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        const add = (x, y, w, h) => { x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h); };
        for (const n of app.graph.nodes) add(n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30);
        for (const g of app.graph.groups || []) add(...g._bounding ? Array.from(g._bounding) : g.bounding);
        const rect = c.canvas.getBoundingClientRect();
        const w = rect.width - ml - mr, h = rect.height - mt - mb;
        const s = Math.min(w / (x1 - x0), h / (y1 - y0), 1.2);
        c.ds.scale = s;
        c.ds.offset[0] = (ml + (w - s * (x1 - x0)) / 2) / s - x0;
        c.ds.offset[1] = (mt + (h - s * (y1 - y0)) / 2) / s - y0;
        c.setDirty(true, true); c.draw(true, true);
        return [x0, y0, x1, y1, s, rect.width, rect.height];""", margin)
    time.sleep(1)
    return bounds


def screenshot(srv, name: str, out: Path, run: bool = True, size=WINDOW) -> dict:
    """Load ``name`` into the frontend, check no node is missing, optionally run it, save ``out``.
    Returns ``{"missing": [...], "nodes": n}``; raises when nodes are missing."""
    drv = open_browser(size)
    try:
        load_workflow(drv, srv, name)
        close_dialogs(drv)
        missing = missing_nodes(drv) + flagged_nodes(drv)
        if missing:
            raise AssertionError(f"the frontend does not know, or flags, these nodes of {name}: {missing}")
        if run:
            run_in_page(drv, srv)
        close_dialogs(drv)
        bounds = fit_view(drv)
        x0, y0, x1, y1, scale = bounds[:5]
        height = round(min(size[1], max(600, scale * (y1 - y0) + 75 + 25)))  # no empty band under a wide graph
        if height < size[1]:
            set_viewport(drv, (size[0], height))
            time.sleep(1)
            bounds = fit_view(drv)
        out.parent.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(out))
        return {"missing": missing, "nodes": drv.execute_script("return window.app.graph.nodes.length"),
                "bounds": bounds}
    finally:
        drv.quit()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workflow", default="qcorrect_reference_end_to_end")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-run", action="store_true", help="screenshot the graph without running it")
    args = p.parse_args(argv)
    why = missing_requirements()
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if why or not comfy_dir:
        sys.exit(f"cannot take a screenshot: {why or 'set COMFYUI_DIR to a ComfyUI checkout'}")
    with tempfile.TemporaryDirectory() as tmp, server.ComfyServer(comfy_dir, tmp) as srv:
        result = screenshot(srv, args.workflow, args.out, run=not args.no_run)
    print(json.dumps({"out": str(args.out), **result}))


if __name__ == "__main__":
    main()
