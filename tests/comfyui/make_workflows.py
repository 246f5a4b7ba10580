"""Generate the pack's example workflows (``workflows/*.json`` + same-name ``.jpg`` thumbnails).

The workflows are written in the format ComfyUI's frontend saves (nodes with ``widgets_values``,
``links``, ``groups``, ``version`` 0.4) from short specs below: each node names its widget values
and its links; the order of ``widgets_values`` and the slots come from the live node definitions
(``/object_info``), so the files always match the nodes. Positions are laid out in columns.

It lives with the tests because it needs the test harness (a ComfyUI server for ``/object_info``)
and nothing of it is needed at run time; ``test_workflows.py`` regenerates the files from the
session's server and fails when the committed ones differ. To regenerate::

    COMFYUI_DIR=/path/to/ComfyUI python tests/comfyui/make_workflows.py          # starts a server
    python tests/comfyui/make_workflows.py --object-info object_info.json         # or reads a dump
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:  # imported by the tests
    from . import server
except ImportError:  # run as a script; by path, since ComfyUI has a top-level module named server
    _spec = importlib.util.spec_from_file_location("qcorrect_tests_server", HERE / "server.py")
    server = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(server)

REPO = server.REPO
WORKFLOWS = REPO / "workflows"
COL_X, COL_GAP, TOP, GAP = 40, 70, 100, 60
NODE_W = {"QCorrectCalibrateErrors": 330, "QCorrectCompareToReference": 560, "CLIPTextEncode": 330,
          "Note": 330, "MarkdownNote": 330, "SaveImage": 300, "PreviewImage": 300}
# Room for what a node shows besides its slots and widgets (text reports, images, prompts).
TALL = {"QCorrectCompareToReference": 300, "SaveImage": 260, "PreviewImage": 240, "CLIPTextEncode": 90,
        "QCorrectCalibrateErrors": 80, "QCorrectRelaxTimesteps": 60, "QCorrectQuantizeModel": 60,
        "QCorrectCorrectedKSampler": 70, "QCorrectLoadCorrectionStats": 60, "MarkdownNote": 110,
        "QCorrectQuantizeModelCalibrated": 90}
GROUP_COLORS = ["#3f789e", "#8A8", "#a1309b", "#b58b2a", "#8AA", "#88A"]  # LiteGraph group colours
FRONTEND_ONLY = {"Note": ["text"], "MarkdownNote": ["text"]}

# The reference model's sampling settings shared by every reference workflow: its default CFG
# (reference/model.py), few steps and small batches so each workflow runs in seconds on a CPU.
REF = {"steps": 10, "cfg": 3.0, "sampler": "euler", "scheduler": "normal"}
CALIB_SEED, EVAL_SEED = 0, 1000  # calibration and evaluation seeds are disjoint
STATS_FILE = "reference/w4a8_euler_10"


@dataclass
class N:
    """One node: ``key`` names it in the spec, ``col`` is its layout column, ``w`` its widget values
    by input name, ``i`` its links ``{input: "key"}`` or ``{input: ("key", output_index)}``."""

    key: str
    type: str
    col: int
    w: dict = field(default_factory=dict)
    i: dict = field(default_factory=dict)
    title: str | None = None


@dataclass
class Workflow:
    name: str
    nodes: list
    groups: dict  # title -> node keys
    note: str = ""


def reference_nodes(relax: bool = False) -> list:
    """Workflow 1 (and 5 with ``relax``): quantize, calibrate, sample corrected vs FP, compare."""
    q_key = "relax" if relax else "quant"
    nodes = [
        N("ref", "QCorrectLoadReferenceModel", 0),
        N("pos", "QCorrectReferenceClass", 0, {"label": "3"}, title="Reference Class (positive)"),
        N("neg", "QCorrectReferenceClass", 0, {"label": "empty"}, title="Reference Class (negative)"),
        N("latent", "EmptyLatentImage", 0, {"width": 112, "height": 112, "batch_size": 4}),
        N("quant", "QCorrectQuantizeModel", 1, {"preset": "W4A8"}, {"model": "ref"}),
    ]
    if relax:
        nodes.append(N("relax", "QCorrectRelaxTimesteps", 1,
                       {"fraction": 0.2, "where": "near x0", "bits": "10", "steps": REF["steps"],
                        "scheduler": REF["scheduler"]}, {"model": "quant"}))
    nodes += [
        N("calib", "QCorrectCalibrateErrors", 2,
          {"seed": CALIB_SEED, "sampler": REF["sampler"], "scheduler": REF["scheduler"], "steps": REF["steps"],
           "cfg": REF["cfg"], "denoise": 1.0, "batches": 2, "methods": "auto",
           "filename": "reference/w4a8_relaxed_euler_10" if relax else STATS_FILE},
          {"fp_model": "ref", "quantized_model": q_key, "positive": "pos", "negative": "neg", "latent_image": "latent"}),
        *samplers(q_key, "ref", "calib"),
        N("decode", "VAEDecode", 5, {}, {"samples": "corrected", "vae": ("ref", 1)}),
        N("save", "SaveImage", 5, {"filename_prefix": "qcorrect/relaxed" if relax else "qcorrect/corrected"},
          {"images": "decode"}),
    ]
    return nodes


def samplers(q_key: str, fp_key: str, stats_key: str, settings: dict = REF, pos="pos", neg="neg") -> list:
    """Corrected KSampler on the quantized model, KSampler on the FP model (same seed, same
    settings), and Compare To Reference between their latents."""
    common = {"seed": EVAL_SEED, "steps": settings["steps"], "cfg": settings["cfg"],
              "sampler_name": settings["sampler"], "scheduler": settings["scheduler"], "denoise": 1.0}
    links = {"positive": pos, "negative": neg, "latent_image": "latent"}
    return [
        N("corrected", "QCorrectCorrectedKSampler", 3, {**common, "method": "auto"},
          {"model": q_key, "stats": stats_key, **links}),
        N("fp", "KSampler", 3, common, {"model": fp_key, **links}, title="KSampler (full precision)"),
        N("compare", "QCorrectCompareToReference", 4, {}, {"reference": "fp", "test": "corrected", "stats": stats_key}),
        N("plot", "PreviewImage", 4, {}, {"images": ("compare", 1)}, title="Per-step error"),
    ]


SD15 = {"steps": 20, "cfg": 7.5, "sampler": "euler", "scheduler": "normal"}
SD15_CKPT = "v1-5-pruned-emaonly.safetensors"


def sd15_front(latent_size: int = 512) -> list:
    return [
        N("ckpt", "CheckpointLoaderSimple", 0, {"ckpt_name": SD15_CKPT}),
        N("pos", "CLIPTextEncode", 0, {"text": "a photograph of a lighthouse on a cliff at sunset, detailed"},
          {"clip": ("ckpt", 1)}, title="CLIP Text Encode (positive)"),
        N("neg", "CLIPTextEncode", 0, {"text": "blurry, low quality"}, {"clip": ("ckpt", 1)},
          title="CLIP Text Encode (negative)"),
        N("latent", "EmptyLatentImage", 0, {"width": latent_size, "height": latent_size, "batch_size": 1}),
    ]


def sd15_calibrate(q_key: str, filename: str) -> N:
    return N("calib", "QCorrectCalibrateErrors", 2,
             {"seed": CALIB_SEED, "sampler": SD15["sampler"], "scheduler": SD15["scheduler"], "steps": SD15["steps"],
              "cfg": SD15["cfg"], "denoise": 1.0, "batches": 4, "methods": "auto", "filename": filename},
             {"fp_model": "ckpt", "quantized_model": q_key, "positive": "pos", "negative": "neg",
              "latent_image": "latent"})


def sd15_back() -> list:
    return [
        N("decode", "VAEDecode", 5, {}, {"samples": "corrected", "vae": ("ckpt", 2)}),
        N("save", "SaveImage", 5, {"filename_prefix": "qcorrect/sd15_corrected"}, {"images": "decode"}),
    ]


#: the calibrated quantizer as measured (docs/BENCHMARKS.md, summary): 64 calibration samples, the byte
#: budget with mixed precision, the stored grid tuned for 200 iterations
CALIBRATED = {"preset": "W4A8", "seed": CALIB_SEED, "sampler": REF["sampler"], "scheduler": REF["scheduler"],
              "steps": REF["steps"], "cfg": REF["cfg"], "batches": 4, "rounding": "gptq", "awq": False,
              "budget": 0.30, "early_steps_weight": 4.0, "stats_memory_gb": 4.0, "tune_iterations": 200,
              "mixed_precision": True, "solve_on": "auto"}


def calibrated_nodes() -> list:
    """Workflow 6: the recommended quantizer next to round-to-nearest, each sampled with a plain
    KSampler on the full-precision run's seed and scored against it."""
    common = {"seed": EVAL_SEED, "steps": REF["steps"], "cfg": REF["cfg"], "sampler_name": REF["sampler"],
              "scheduler": REF["scheduler"], "denoise": 1.0}
    links = {"positive": "pos", "negative": "neg", "latent_image": "latent"}
    return [
        N("ref", "QCorrectLoadReferenceModel", 0),
        N("pos", "QCorrectReferenceClass", 0, {"label": "3"}, title="Reference Class (positive)"),
        N("neg", "QCorrectReferenceClass", 0, {"label": "empty"}, title="Reference Class (negative)"),
        N("latent", "EmptyLatentImage", 0, {"width": 112, "height": 112, "batch_size": 4}),
        N("calib_latent", "EmptyLatentImage", 0, {"width": 112, "height": 112, "batch_size": 16},
          title="Empty Latent Image (calibration batch)"),
        N("cal", "QCorrectQuantizeModelCalibrated", 1, CALIBRATED,
          {"model": "ref", "positive": "pos", "negative": "neg", "latent_image": "calib_latent"}),
        N("rtn", "QCorrectQuantizeModel", 1, {"preset": "W4A8"}, {"model": "ref"},
          title="Quantize Model (round-to-nearest)"),
        N("sample_cal", "KSampler", 2, common, {"model": "cal", **links}, title="KSampler (calibrated W4A8)"),
        N("sample_rtn", "KSampler", 2, common, {"model": "rtn", **links}, title="KSampler (round-to-nearest W4A8)"),
        N("fp", "KSampler", 2, common, {"model": "ref", **links}, title="KSampler (full precision)"),
        N("compare_cal", "QCorrectCompareToReference", 3, {}, {"reference": "fp", "test": "sample_cal"},
          title="Compare: calibrated vs full precision"),
        N("compare_rtn", "QCorrectCompareToReference", 3, {}, {"reference": "fp", "test": "sample_rtn"},
          title="Compare: round-to-nearest vs full precision"),
        N("decode", "VAEDecode", 4, {}, {"samples": "sample_cal", "vae": ("ref", 1)}),
        N("save", "SaveImage", 4, {"filename_prefix": "qcorrect/calibrated"}, {"images": "decode"}),
    ]


def specs() -> list:
    main_groups = {"Model and conditioning": ["ref", "pos", "neg", "latent"],
                   "Quantize": ["quant"], "Calibrate (once)": ["calib"],
                   "Corrected vs full precision": ["corrected", "fp"],
                   "Compare": ["compare", "plot"], "Decode and save": ["decode", "save"]}
    relax_groups = {**main_groups, "Quantize": ["quant", "relax"]}
    sd_groups = {"Checkpoint and prompts": ["ckpt", "pos", "neg", "latent"], "Quantize": ["quant"],
                 "Calibrate (once)": ["calib"], "Corrected vs full precision": ["corrected", "fp"],
                 "Compare": ["compare", "plot"], "Decode and save": ["decode", "save"]}
    fp8_groups = {**sd_groups, "Quantize": ["unet"]}
    fp8_groups = {("fp8 model" if k == "Quantize" else k): v for k, v in fp8_groups.items()}
    shared = [
        N("ref", "QCorrectLoadReferenceModel", 0),
        N("pos", "QCorrectReferenceClass", 0, {"label": "3"}, title="Reference Class (positive)"),
        N("neg", "QCorrectReferenceClass", 0, {"label": "empty"}, title="Reference Class (negative)"),
        N("latent", "EmptyLatentImage", 0, {"width": 112, "height": 112, "batch_size": 4}),
        N("quant", "QCorrectQuantizeModel", 1, {"preset": "W4A8"}, {"model": "ref"}),
        N("stats", "QCorrectLoadCorrectionStats", 1, {"stats_name": STATS_FILE + ".safetensors"}),
        N("corrected", "QCorrectCorrectedKSampler", 2,
          {"seed": EVAL_SEED, "steps": REF["steps"], "cfg": REF["cfg"], "sampler_name": REF["sampler"],
           "scheduler": REF["scheduler"], "denoise": 1.0, "method": "auto"},
          {"model": "quant", "stats": "stats", "positive": "pos", "negative": "neg", "latent_image": "latent"}),
        N("decode", "VAEDecode", 3, {}, {"samples": "corrected", "vae": ("ref", 1)}),
        N("save", "SaveImage", 3, {"filename_prefix": "qcorrect/shared_stats"}, {"images": "decode"}),
    ]
    return [
        Workflow("qcorrect_reference_end_to_end", reference_nodes(), main_groups,
                 "Quantize the shipped reference model to W4A8, measure its error against full precision "
                 "once (Calibrate Errors writes models/qcorrect/reference/w4a8_euler_10.safetensors), "
                 "then sample with the correction and compare with the full-precision KSampler on the "
                 "same seed. Calibration and evaluation seeds differ (0… vs 1000)."),
        Workflow("qcorrect_sd15",
                 sd15_front() + [N("quant", "QCorrectQuantizeModel", 1, {"preset": "W4A8"}, {"model": "ckpt"}),
                                 sd15_calibrate("quant", "sd15/w4a8_euler_20"),
                                 *samplers("quant", "ckpt", "calib", SD15)] + sd15_back(),
                 sd_groups,
                 f"The same on an SD1.5 checkpoint ({SD15_CKPT} in models/checkpoints/). Calibrate once "
                 "per model, preset and sampler settings; later runs reuse the cached statistics, or load "
                 "the file with Load Correction Stats."),
        Workflow("qcorrect_shared_stats", shared,
                 {"Model and conditioning": ["ref", "pos", "neg", "latent"],
                  "Quantized model + shared stats": ["quant", "stats"],
                  "Corrected sampling": ["corrected"], "Decode and save": ["decode", "save"]},
                 "Reuse statistics calibrated elsewhere: run qcorrect_reference_end_to_end once (it writes "
                 "models/qcorrect/reference/w4a8_euler_10.safetensors), or copy a shared file there. "
                 "The stats file records the model's fingerprint; a mismatch is reported."),
        Workflow("qcorrect_fp8",
                 sd15_front() + [N("unet", "UNETLoader", 1, {"unet_name": SD15_CKPT, "weight_dtype": "fp8_e4m3fn"},
                                   title="Load Diffusion Model (fp8 = the quantized model)"),
                                 sd15_calibrate("unet", "sd15/fp8_e4m3fn_euler_20"),
                                 *samplers("unet", "ckpt", "calib", SD15)] + sd15_back(),
                 fp8_groups,
                 "Correct a model quantized by ComfyUI itself: the diffusion model loaded with weight_dtype "
                 "fp8_e4m3fn (put the checkpoint, or its UNet alone, in models/diffusion_models/) is the "
                 "quantized model, the checkpoint's model is the full-precision one."),
        Workflow("qcorrect_calibrated_quantizer", calibrated_nodes(),
                 {"Model and conditioning": ["ref", "pos", "neg", "latent", "calib_latent"],
                  "Quantize: calibrated and round-to-nearest": ["cal", "rtn"],
                  "Sample (same seed)": ["sample_cal", "sample_rtn", "fp"],
                  "Compare with full precision": ["compare_cal", "compare_rtn"], "Decode and save": ["decode", "save"]},
                 "The recommended quantizer: Quantize Model (Calibrated) samples the full-precision model on 64 "
                 "calibration latents (4 batches of 16, seeds 0…), rounds every layer with error compensation, spends a 0.30× fp16 "
                 "byte budget on 3-bit and int8 layers where they matter (mixed_precision) and tunes the stored "
                 "scales for 200 iterations; round-to-nearest (Quantize Model) beside it, both sampled on seed "
                 "1000 and compared with full precision. No correction is needed on top (docs/BENCHMARKS.md). "
                 "Save the result with Save Quantized Model to calibrate only once."),
        Workflow("qcorrect_relax_timesteps", reference_nodes(relax=True), relax_groups,
                 "PCR's relaxation: Relax Timesteps raises the activation precision on the steps near x0 "
                 "(fraction of the 10-step schedule the samplers use), then the relaxed model is calibrated "
                 "and corrected like any quantized model."),
    ]


# -- spec -> UI workflow ----------------------------------------------------------------------
def node_def(object_info: dict, kind: str) -> dict:
    if kind in FRONTEND_ONLY:
        return {"input": {"required": {n: ["STRING", {"multiline": True}] for n in FRONTEND_ONLY[kind]}},
                "output": [], "output_name": []}
    if kind not in object_info:
        raise KeyError(f"node type {kind!r} is not known to the server (is the pack loaded?)")
    return object_info[kind]


def default_value(kind, opts: dict):
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    if kind == "COMBO":
        return (opts.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def node_height(n_sockets: int, n_widgets: int, kind: str) -> int:
    """LiteGraph's body height: 20 px a slot row, 24 px a widget, plus padding and ``TALL``."""
    return 16 + 20 * n_sockets + 24 * n_widgets + TALL.get(kind, 0)


def build(wf: Workflow, object_info: dict) -> dict:
    keys = [n.key for n in wf.nodes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{wf.name}: duplicate node keys")
    ids = {n.key: i + 1 for i, n in enumerate(wf.nodes)}
    note = N("note", "MarkdownNote", 0, {"text": wf.note}, title="About this workflow") if wf.note else None
    all_nodes = wf.nodes + ([note] if note else [])
    if note:
        ids["note"] = len(ids) + 1
    defs = {n.key: node_def(object_info, n.type) for n in all_nodes}

    links, ui_nodes, out_links = [], {}, {}
    for n in all_nodes:
        d = defs[n.key]
        inputs, widgets = [], []
        unknown = set(n.w) - {name for name, kind, opts in server.node_inputs(d) if server.is_widget(kind, opts)}
        unknown |= set(n.i) - {name for name, kind, opts in server.node_inputs(d) if not server.is_widget(kind, opts)}
        if unknown:
            raise KeyError(f"{wf.name}/{n.key} ({n.type}): no input(s) {sorted(unknown)}")
        for name, kind, opts in server.node_inputs(d):
            if server.is_widget(kind, opts):
                widgets.append(n.w.get(name, default_value(kind, opts)))
                if server.control_widget_follows(name, kind, opts):
                    widgets.append("fixed")
                continue
            slot = {"name": name, "type": kind if isinstance(kind, str) else "*", "link": None}
            src = n.i.get(name)
            if src is not None:
                src_key, out_idx = (src, 0) if isinstance(src, str) else src
                out_type = defs[src_key]["output"][out_idx]
                link_id = len(links) + 1
                links.append([link_id, ids[src_key], out_idx, ids[n.key], len(inputs), out_type])
                out_links.setdefault((src_key, out_idx), []).append(link_id)
                slot["link"] = link_id
                if "," in slot["type"]:
                    slot["type"] = out_type
            inputs.append(slot)
        ui = {"id": ids[n.key], "type": n.type, "pos": [0, 0], "size": [NODE_W.get(n.type, 315), 0],
              "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": [],
              "properties": {"Node name for S&R": n.type}, "widgets_values": widgets}
        if n.title:
            ui["title"] = n.title
        ui_nodes[n.key] = ui
    for n in all_nodes:
        d, ui = defs[n.key], ui_nodes[n.key]
        names = d.get("output_name") or d["output"]
        ui["outputs"] = [{"name": names[k], "type": t, "links": out_links.get((n.key, k), [])}
                         for k, t in enumerate(d["output"])]
        ui["size"][1] = node_height(max(len(ui["inputs"]), len(ui["outputs"])), len(ui["widgets_values"]), n.type)

    # Execution order (what the frontend stores as ``order``): a topological sort by links.
    deps = {n.key: {src if isinstance(src, str) else src[0] for src in n.i.values()} for n in all_nodes}
    order, done = [], set()
    while len(order) < len(all_nodes):
        ready = [k for k in [n.key for n in all_nodes] if k not in done and deps[k] <= done]
        if not ready:
            raise ValueError(f"{wf.name}: the links form a cycle")
        order += ready
        done |= set(ready)
    for rank, key in enumerate(order):
        ui_nodes[key]["order"] = rank

    # Layout: columns left to right (each as wide as its widest node), nodes stacked in spec
    # order; the note under column 0.
    widths = {}
    for n in all_nodes:
        widths[n.col] = max(widths.get(n.col, 0), ui_nodes[n.key]["size"][0])
    col_x = {c: COL_X + sum(widths.get(k, 0) + COL_GAP for k in range(c)) for c in widths}
    y_next = {}
    for n in all_nodes:
        ui = ui_nodes[n.key]
        y = y_next.get(n.col, TOP)
        ui["pos"] = [col_x[n.col], y]
        y_next[n.col] = y + ui["size"][1] + GAP

    groups = []
    for gi, (title, members) in enumerate(wf.groups.items()):
        boxes = [(ui_nodes[k]["pos"], ui_nodes[k]["size"]) for k in members]
        x0 = min(p[0] for p, s in boxes) - 15
        y0 = min(p[1] for p, s in boxes) - TITLE_H - 44  # node title bars, then the group's
        x1 = max(p[0] + s[0] for p, s in boxes) + 15
        y1 = max(p[1] + s[1] for p, s in boxes) + 15
        groups.append({"id": gi + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                       "color": GROUP_COLORS[gi % len(GROUP_COLORS)], "font_size": 22, "flags": {}})

    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "qcorrect/workflows/" + wf.name)),
        "revision": 0,
        "last_node_id": max(ids.values()),
        "last_link_id": len(links),
        "nodes": [ui_nodes[n.key] for n in all_nodes],
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},
        "version": 0.4,
    }


def generate(object_info: dict) -> dict:
    """``{name: UI workflow}`` for every spec."""
    return {wf.name: build(wf, object_info) for wf in specs()}


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# -- thumbnails -------------------------------------------------------------------------------
TITLE_H = 30  # the frontend draws a node's title bar above its ``pos``


def thumbnail(workflow: dict, path: Path, labels: dict, size=(640, 400)) -> None:
    """A diagram of the graph in the frontend's dark colours: groups, nodes (display names),
    links. ``labels`` maps a node type to its display name."""
    from PIL import Image, ImageDraw, ImageFont

    nodes = {n["id"]: n for n in workflow["nodes"]}
    boxes = [g["bounding"] for g in workflow["groups"]]
    boxes += [[n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H] for n in nodes.values()]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    margin = 10
    scale = min((size[0] - 2 * margin) / (x1 - x0), (size[1] - 2 * margin) / (y1 - y0))

    def t(x, y):
        return margin + (x - x0) * scale, margin + (y - y0) * scale

    img = Image.new("RGB", size, "#1e1e1e")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, round(TITLE_H * scale * 0.62)))
    for g in workflow["groups"]:
        gx, gy, gw, gh = g["bounding"]
        draw.rounded_rectangle([*t(gx, gy), *t(gx + gw, gy + gh)], radius=4, fill="#292929", outline=g["color"], width=2)
    for _, a, a_slot, b, b_slot, _ in workflow["links"]:
        na, nb = nodes[a], nodes[b]
        (ax, ay), (bx, by) = t(na["pos"][0] + na["size"][0], na["pos"][1] + 14 + 22 * a_slot), \
            t(nb["pos"][0], nb["pos"][1] + 14 + 22 * b_slot)
        pull = max(20.0, abs(bx - ax) / 2)
        curve = [((1 - u) ** 3 * ax + 3 * (1 - u) ** 2 * u * (ax + pull) + 3 * (1 - u) * u * u * (bx - pull) + u ** 3 * bx,
                  (1 - u) ** 3 * ay + 3 * (1 - u) ** 2 * u * ay + 3 * (1 - u) * u * u * by + u ** 3 * by)
                 for u in (i / 24 for i in range(25))]
        draw.line(curve, fill="#8fb0d0", width=2)
    for n in nodes.values():
        (nx, ny), (nw, nh) = n["pos"], n["size"]
        ours = n["type"].startswith("QCorrect")
        draw.rounded_rectangle([*t(nx, ny - TITLE_H), *t(nx + nw, ny + nh)], radius=3, fill="#353535",
                               outline="#d9a441" if ours else "#666", width=2)
        draw.rectangle([*t(nx + 2, ny - TITLE_H + 2), *t(nx + nw - 2, ny)], fill="#6b5421" if ours else "#4a4a4a")
        label = n.get("title") or labels.get(n["type"], n["type"])
        tx, ty = t(nx + 8, ny - TITLE_H + 5)
        while label and draw.textlength(label, font=font) > nw * scale - 6:
            label = label[:-2] + "…"
        draw.text((tx, ty), label, fill="#eeeeee", font=font)
    img.save(path, "JPEG", quality=90)


def write(object_info: dict, out_dir: Path = WORKFLOWS) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, wf in generate(object_info).items():
        (out_dir / f"{name}.json").write_text(dumps(wf))
        labels = {k: v.get("display_name") or k for k, v in object_info.items()}
        thumbnail(wf, out_dir / f"{name}.jpg", {**labels, "MarkdownNote": "Note"})
        written.append(out_dir / f"{name}.json")
    return written


def live_object_info() -> dict:
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("set COMFYUI_DIR (a ComfyUI checkout) or pass --object-info FILE")
    with tempfile.TemporaryDirectory() as tmp, server.ComfyServer(comfy_dir, tmp) as srv:
        return srv.object_info()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--object-info", type=Path, help="a saved /object_info answer instead of a live server")
    p.add_argument("--out", type=Path, default=WORKFLOWS)
    args = p.parse_args(argv)
    info = json.loads(args.object_info.read_text()) if args.object_info else live_object_info()
    for path in write(info, args.out):
        print(path)


if __name__ == "__main__":
    main()
