"""A real ComfyUI server for tests: started as a subprocess, on loopback, with this pack installed.

``ComfyServer`` lays out a temporary ``--base-directory`` (``custom_nodes/qcorrect`` is a symlink
to this repository, so ComfyUI's own custom-node loader imports the pack; ``models/`` holds links
to test models; ``output/``, ``input/``, ``temp/`` and ``user/`` are fresh), starts ComfyUI's
``main.py`` on 127.0.0.1 and a free port in CPU mode with ``OMP_NUM_THREADS=1``, waits until it
answers, writes its log next to the base directory, and stops it (Ctrl-C, then kill) when done.
Every wait is bounded. Nothing but loopback traffic: the API nodes are off and the database is in
memory (nothing is written into the ComfyUI checkout).

On a CPU-only torch host the server is started through ``../shared/tools/launch_comfyui_cpu.py``
(found through ``QCORRECT_COMFYUI_LAUNCHER`` or next to the repository, like the shim in
``conftest.py``); elsewhere ``main.py`` runs directly.

``ui_to_api`` converts a workflow saved by the frontend (nodes with ``widgets_values``, links)
into the API prompt ``POST /prompt`` takes, using ``/object_info`` the way the frontend does.

``shared_server`` starts one server per pytest session for all the modules that ask for it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "qcorrect"
STARTUP_TIMEOUT = float(os.environ.get("QCORRECT_COMFYUI_STARTUP_TIMEOUT", "240"))
# A hard bound on the server's life (coreutils ``timeout``), should the test process die without
# stopping it.
MAX_LIFETIME = int(os.environ.get("QCORRECT_COMFYUI_MAX_LIFETIME", "5400"))


class ServerError(RuntimeError):
    pass


class PromptRejected(ServerError):
    """``POST /prompt`` refused the prompt (validation); ``body`` is the server's JSON answer."""

    def __init__(self, body):
        super().__init__(json.dumps(body, indent=1)[:4000])
        self.body = body


class ExecutionFailed(ServerError):
    """The prompt ran and ended in an error or an interruption; ``entry`` is its history entry."""

    def __init__(self, entry, log_tail=""):
        msgs = [m for m in entry.get("status", {}).get("messages", []) if m[0] != "execution_cached"]
        super().__init__(json.dumps(msgs, indent=1)[:6000] + ("\n--- server log ---\n" + log_tail if log_tail else ""))
        self.entry = entry


def find_launcher() -> Path | None:
    for cand in (os.environ.get("QCORRECT_COMFYUI_LAUNCHER"), REPO.parent / "shared" / "tools" / "launch_comfyui_cpu.py"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI process. ``models`` maps a ComfyUI model folder (``checkpoints``,
    ``diffusion_models``, …) to files linked into ``models/<folder>/`` of the base directory."""

    def __init__(self, comfy_dir, root, models: dict | None = None, extra_args=(), python: str | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT):
        self.comfy_dir = Path(comfy_dir).resolve()
        self.root = Path(root)
        self.base = self.root / "base"
        self.log_path = self.root / "server.log"
        self.models = models or {}
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.port = None
        self.proc = None
        import requests  # here, not at import: CI collects this folder without ComfyUI's requirements

        self.http = requests.Session()
        self.http.trust_env = False  # loopback only: never through a proxy from the environment
        self._object_info = None

    # -- layout and process -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def _layout(self) -> None:
        for sub in ("custom_nodes", "models", "output", "input", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        for folder, files in self.models.items():
            dest = self.models_dir / folder
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                target = dest / Path(f).name
                if not target.exists():
                    target.symlink_to(Path(f).resolve())
        # The frontend's first-run template browser would cover the graph in screenshots.
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    def command(self) -> list:
        launcher = find_launcher()
        entry = [str(launcher)] if launcher else [str(self.comfy_dir / "main.py")]
        bound = ["timeout", "--signal=INT", "--kill-after=30", str(MAX_LIFETIME)] if shutil.which("timeout") else []
        return [*bound, self.python, "-u", *entry, "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
                "--disable-api-nodes", "--disable-auto-launch", *self.extra_args]

    def start(self) -> "ComfyServer":
        self._layout()
        self.port = free_port()
        env = dict(os.environ, COMFYUI_DIR=str(self.comfy_dir), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import requests

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if self.http.get(self.url + "/system_stats", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # ComfyUI stops on Ctrl-C (``timeout`` passes it on)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
        self.http.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:]

    # -- HTTP API -----------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30, **params):
        r = self.http.get(self.url + path, params=params or None, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, payload=None, timeout: float = 30):
        return self.http.post(self.url + path, json=payload if payload is not None else {}, timeout=timeout)

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self.get("/object_info", timeout=120)
        return self._object_info

    def queue(self, prompt: dict) -> str:
        """Queue an API-format prompt; returns its id, raises PromptRejected on validation errors."""
        r = self.post("/prompt", {"prompt": prompt, "client_id": "qcorrect-tests"})
        body = r.json()
        if r.status_code != 200 or body.get("node_errors"):
            raise PromptRejected(body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The prompt's history entry once it has finished (success, error or interruption)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.25)
        self.interrupt()
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue, wait, and return the history entry; raises ExecutionFailed unless it succeeded."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"].get("status_str") != "success":
            raise ExecutionFailed(entry, self.log_tail())
        return entry

    def clear_cache(self, timeout: float = 120) -> None:
        """Drop ComfyUI's cached node outputs (``POST /free``) so the next prompt executes every node.

        The worker applies the flag after its current wait or prompt; a throwaway prompt queued
        behind it makes sure that has happened before anything queued later runs.
        """
        self.post("/free", {"free_memory": True}).raise_for_status()
        self.run({"1": {"class_type": "PrimitiveString", "inputs": {"value": uuid.uuid4().hex}},
                  "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}, timeout)

    def running(self) -> list:
        return self.get("/queue")["queue_running"]

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {}).raise_for_status()


def messages(entry: dict, kind: str) -> list:
    """The payloads of one kind of status message (``execution_error``, ``execution_interrupted``…)."""
    return [m[1] for m in entry.get("status", {}).get("messages", []) if m[0] == kind]


# -- UI workflow → API prompt -----------------------------------------------------------------
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only, never sent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4


def node_inputs(node_def: dict) -> list:
    """``(name, type, options)`` of a node definition's inputs, required then optional, in the
    declared order (``input_order`` where the server gives it)."""
    out = []
    for group in ("required", "optional"):
        specs = node_def.get("input", {}).get(group, {}) or {}
        order = node_def.get("input_order", {}).get(group) or list(specs)
        for name in order:
            spec = specs[name]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, kind, opts))
    return out


def is_widget(kind, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def control_widget_follows(name: str, kind, opts: dict) -> bool:
    """Whether the frontend adds a ``control_after_generate`` widget after this one (its value is
    saved in ``widgets_values`` but never sent): INT widgets when the option says so, or by default
    when named ``seed``/``noise_seed``; FLOAT and COMBO widgets only when the option says so."""
    flag = opts.get("control_after_generate")
    if kind == "INT":
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return bool(flag)


def widget_names(node_def: dict) -> list:
    """The names behind each slot of ``widgets_values``; ``None`` for a control widget's slot."""
    names = []
    for name, kind, opts in node_inputs(node_def):
        if is_widget(kind, opts):
            names.append(name)
            if control_widget_follows(name, kind, opts):
                names.append(None)
    return names


def widget_values(node: dict, node_def: dict) -> dict:
    values = node.get("widgets_values")
    if isinstance(values, dict):  # some nodes save their widgets by name
        return {k: v for k, v in values.items() if k in set(widget_names(node_def))}
    names = widget_names(node_def)
    values = list(values or [])
    if len(values) > len(names):
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for {names}")
    return {n: v for n, v in zip(names, values) if n is not None}


def ui_to_api(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """The API prompt for a UI workflow. ``overrides`` maps a node id (int or str) or a node type
    to ``{input_name: value}`` replacing widget values (e.g. file names, sizes, steps in tests)."""
    overrides = overrides or {}
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if node.get("mode", 0) in (MUTED, BYPASSED) or kind in VIRTUAL_NODES:
            if node.get("mode", 0) == BYPASSED:
                raise NotImplementedError(f"bypassed node {node['id']} ({kind})")
            continue
        if kind not in object_info:
            raise KeyError(f"node {node['id']}: type {kind!r} is not known to this server")
        node_def = object_info[kind]
        inputs = widget_values(node, node_def)
        for slot in node.get("inputs", []) or []:
            link_id = slot.get("link")
            if link_id is None:
                continue
            _, origin, origin_slot, _, _, _ = links[link_id][:6]
            inputs[slot["name"]] = [str(origin), origin_slot]
        for key in (kind, node["id"], str(node["id"])):
            inputs.update(overrides.get(key, {}))
        prompt[str(node["id"])] = {
            "class_type": kind,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or node_def.get("display_name") or kind},
        }
    return prompt


# -- one server per pytest session ------------------------------------------------------------
_SHARED: dict = {}


def shared(key: str, factory):
    """``factory()``'s result, computed once per test session (shared by all test modules); a
    failure is remembered too, so later modules fail fast instead of waiting again."""
    if key not in _SHARED:
        try:
            _SHARED[key] = factory()
        except Exception as exc:
            _SHARED[key] = exc
            raise
    if isinstance(_SHARED[key], Exception):
        raise ServerError(f"{key} failed earlier in this session: {_SHARED[key]}")
    return _SHARED[key]


def shared_server(request, tmp_path_factory, models: dict | None = None) -> ComfyServer:
    """The session's ComfyServer, started on first use and stopped when the session ends.

    Call it from a session-scoped fixture in each test module that needs a server (fixtures live
    in the modules, so ``conftest.py`` stays as it is); skips without ``COMFYUI_DIR``.
    """
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        import pytest

        pytest.skip("COMFYUI_DIR not set")

    def start():
        srv = ComfyServer(comfy_dir, tmp_path_factory.mktemp("comfy_server"), models=models)
        request.session.config.add_cleanup(srv.stop)
        return srv.start()

    srv = shared("server", start)
    if srv.proc.poll() is not None:
        raise ServerError(f"the session's ComfyUI has stopped:\n{srv.log_tail()}")
    return srv
