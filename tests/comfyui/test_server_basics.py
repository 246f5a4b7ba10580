"""The pack inside a real ComfyUI server (a subprocess on loopback, see server.py).

Loading through ComfyUI's custom-node loader, the node definitions of nodes/README.md in
/object_info, the tiny SD1.5 checkpoint (detected as SD15, loadable by the stock loaders), the
UI → API conversion on stock nodes, and the template listing of workflows/.
"""

from __future__ import annotations

import json
import re

import pytest

from . import server as srvmod
from . import tiny_sd15
from .server import ui_to_api

# nodes/README.md, "Inputs and outputs": node id -> (display name, input names, output types).
# The test also reads the README itself: every input a node declares must be named there.
SPEC = {
    "QCorrectQuantizeModel": ("Quantize Model", ["model", "preset"], ["MODEL"]),
    "QCorrectQuantizeModelAdvanced": ("Quantize Model (Advanced)",
                                      ["model", "weight_bits", "group_size", "symmetric", "activation_bits",
                                       "activation_mode", "keep_first_last_conv", "keep_patterns"], ["MODEL"]),
    "QCorrectQuantizeModelCalibrated": ("Quantize Model (Calibrated)",
                                        ["model", "preset", "positive", "negative", "latent_image", "seed",
                                         "sampler", "scheduler", "steps", "cfg", "batches", "rounding", "awq",
                                         "budget", "early_steps_weight", "stats_memory_gb", "tune_iterations",
                                         "mixed_precision", "solve_on"],
                                        ["MODEL"]),
    "QCorrectRelaxTimesteps": ("Relax Timesteps", ["model", "fraction", "where", "bits", "steps", "scheduler"],
                               ["MODEL"]),
    "QCorrectCalibrateErrors": ("Calibrate Errors",
                                ["fp_model", "quantized_model", "positive", "negative", "latent_image", "seed",
                                 "sampler", "scheduler", "steps", "cfg", "denoise", "batches", "methods",
                                 "filename"], ["QCORRECT_STATS", "MODEL"]),
    "QCorrectCorrectedKSampler": ("Corrected KSampler",
                                  ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                   "negative", "latent_image", "denoise", "stats", "method"], ["LATENT"]),
    "QCorrectCorrectionSampler": ("Correction Sampler", ["sampler", "stats", "method", "model"], ["SAMPLER"]),
    "QCorrectLoadCorrectionStats": ("Load Correction Stats", ["stats_name"], ["QCORRECT_STATS"]),
    "QCorrectSaveQuantizedModel": ("Save Quantized Model", ["model", "filename", "format"], []),
    "QCorrectLoadQuantizedModel": ("Load Quantized Model", ["model", "quantized_name"], ["MODEL"]),
    "QCorrectLoadReferenceModel": ("Load Reference Model", [], ["MODEL", "VAE"]),
    "QCorrectReferenceClass": ("Reference Class", ["label"], ["CONDITIONING"]),
    "QCorrectCompareToReference": ("Compare To Reference", ["reference", "test", "stats"], ["STRING", "IMAGE"]),
}
METHODS = ["auto", "none", "ptqd", "ptqd_vsc", "tac_ner", "tac", "tcec", "stepbaq", "ptqd_ibc", "ptqd_stepbaq",
           "tac_ner_stepbaq", "tcec_stepbaq"]
WORKFLOWS = ["qcorrect_reference_end_to_end", "qcorrect_sd15", "qcorrect_shared_stats", "qcorrect_fp8",
             "qcorrect_relax_timesteps", "qcorrect_calibrated_quantizer"]


def readme_bullets() -> dict:
    """Display name -> the text of its bullet in nodes/README.md's "Inputs and outputs"."""
    text = (srvmod.REPO / "nodes" / "README.md").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^- \*\*(.+?)\*\*:(.*?)(?=^- \*\*|^\S|\Z)", text, re.M | re.S)}


def combo_options(spec):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return kind if isinstance(kind, list) else opts.get("options")


# -- loading and definitions ------------------------------------------------------------------
def test_pack_loads_through_the_custom_node_loader(comfy_server):
    log = comfy_server.log()
    pack_dir = str(comfy_server.base / "custom_nodes" / srvmod.PACK_NAME)
    import_lines = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith(pack_dir)]
    assert import_lines, f"no import-time line for {pack_dir}:\n{log[-3000:]}"
    assert not any("IMPORT FAILED" in line for line in import_lines), import_lines
    for block in re.split(r"(?=Traceback \(most recent call last\))", log)[1:]:
        assert srvmod.PACK_NAME not in block[:4000], f"traceback mentioning the pack:\n{block[:4000]}"
    assert not re.search(rf"Cannot import .*{srvmod.PACK_NAME}", log)


def test_every_node_is_listed_with_its_inputs(comfy_server):
    info = comfy_server.object_info()
    bullets = readme_bullets()
    ours = {k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{srvmod.PACK_NAME}"}
    assert ours == set(SPEC), f"missing {set(SPEC) - ours}, unexpected {ours - set(SPEC)}"
    for node_id, (display, inputs, outputs) in SPEC.items():
        d = info[node_id]
        assert d["category"] == "qcorrect", (node_id, d["category"])
        assert d["display_name"] == display
        declared = [name for name, _, _ in srvmod.node_inputs(d)]
        assert sorted(declared) == sorted(inputs), (node_id, declared)
        named = set(re.findall(r"`([a-z_]+)`", bullets[display]))
        assert set(declared) <= named, f"{display}: {sorted(set(declared) - named)} not in nodes/README.md"
        assert d["output"] == outputs, (node_id, d["output"])
    assert info["QCorrectSaveQuantizedModel"]["output_node"] is True
    assert "model" in info["QCorrectCorrectionSampler"]["input"].get("optional", {})
    assert "stats" in info["QCorrectCompareToReference"]["input"].get("optional", {})


def test_combo_choices_match_the_spec(comfy_server):
    info = comfy_server.object_info()
    preset = info["QCorrectQuantizeModel"]["input"]["required"]["preset"]
    assert combo_options(preset) == ["W8A8", "W4A8", "W4A4", "W8A16", "W4A16"]
    assert preset[1].get("default") == "W4A8"
    for node in ("QCorrectCorrectedKSampler", "QCorrectCorrectionSampler"):
        assert combo_options(info[node]["input"]["required"]["method"]) == METHODS
    calib = info["QCorrectCalibrateErrors"]["input"]["required"]
    assert combo_options(calib["sampler"]) == ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
    assert combo_options(calib["methods"])[0] == "auto"
    assert set(combo_options(calib["methods"])) <= set(METHODS)
    assert combo_options(info["QCorrectReferenceClass"]["input"]["required"]["label"]) == \
        [str(i) for i in range(10)] + ["empty"]


# -- the tiny SD1.5 ---------------------------------------------------------------------------
@pytest.mark.usefixtures("comfy")  # ComfyUI importable in this process (conftest.py)
def test_tiny_checkpoint_is_detected_as_sd15(tiny_models):
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(tiny_models["checkpoint"]))
    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(config) is comfy.supported_models.SD15
    assert config.unet_config["model_channels"] == 320 and config.unet_config["context_dim"] == 768
    n_unet = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    assert 15e6 < n_unet < 30e6
    unet = comfy.utils.load_torch_file(str(tiny_models["unet"]))
    assert type(comfy.model_detection.model_config_from_unet(unet, "")) is comfy.supported_models.SD15


def stock_sd15_workflow(ckpt: str) -> dict:
    """A UI workflow (as the frontend saves it) on stock nodes: checkpoint → text → KSampler → save."""
    def node(i, kind, widgets, inputs=(), outputs=()):
        return {"id": i, "type": kind, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": i, "mode": 0,
                "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
                "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs],
                "properties": {"Node name for S&R": kind}, "widgets_values": widgets}

    nodes = [
        node(4, "CheckpointLoaderSimple", [ckpt], outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [3, 5]),
                                                              ("VAE", "VAE", [8])]),
        node(6, "CLIPTextEncode", ["a lighthouse"], [("clip", "CLIP", 3)], [("CONDITIONING", "CONDITIONING", [4])]),
        node(7, "CLIPTextEncode", ["blurry"], [("clip", "CLIP", 5)], [("CONDITIONING", "CONDITIONING", [6])]),
        node(5, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT", [2])]),
        node(3, "KSampler", [42, "randomize", 2, 7.5, "euler", "normal", 1.0],
             [("model", "MODEL", 1), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 6),
              ("latent_image", "LATENT", 2)], [("LATENT", "LATENT", [7])]),
        node(8, "VAEDecode", [], [("samples", "LATENT", 7), ("vae", "VAE", 8)], [("IMAGE", "IMAGE", [9])]),
        node(9, "SaveImage", ["qcorrect_test/stock"], [("images", "IMAGE", 9)]),
        node(10, "Note", ["frontend-only, never sent"]),
    ]
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"], [4, 6, 0, 3, 1, "CONDITIONING"],
             [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"],
             [9, 8, 0, 9, 0, "IMAGE"]]
    return {"last_node_id": 10, "last_link_id": 9, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def test_ui_to_api_maps_widgets_like_the_frontend(comfy_server):
    prompt = ui_to_api(stock_sd15_workflow(tiny_sd15.CHECKPOINT), comfy_server.object_info())
    assert "10" not in prompt  # the Note
    assert prompt["3"] == {
        "class_type": "KSampler",
        "inputs": {"seed": 42, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                   "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                   "latent_image": ["5", 0]},
        "_meta": {"title": "KSampler"},
    }
    assert prompt["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    assert prompt["8"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}
    over = ui_to_api(stock_sd15_workflow("x"), comfy_server.object_info(),
                     {"CheckpointLoaderSimple": {"ckpt_name": "y"}, 3: {"steps": 1}})
    assert over["4"]["inputs"]["ckpt_name"] == "y" and over["3"]["inputs"]["steps"] == 1


def test_control_widget_rule():
    seed = ("seed", "INT", {})
    assert srvmod.control_widget_follows(*seed)
    assert not srvmod.control_widget_follows("seed", "INT", {"control_after_generate": False})
    assert srvmod.control_widget_follows("n", "INT", {"control_after_generate": True})
    assert not srvmod.control_widget_follows("steps", "INT", {})
    assert not srvmod.control_widget_follows("cfg", "FLOAT", {})
    assert not srvmod.is_widget("INT", {"forceInput": True})
    assert srvmod.is_widget(["a", "b"], {}) and srvmod.is_widget("COMBO", {"options": ["a"]})
    assert not srvmod.is_widget("MODEL", {})


def test_stock_sd15_runs_on_the_tiny_checkpoint(comfy_server):
    prompt = ui_to_api(stock_sd15_workflow(tiny_sd15.CHECKPOINT), comfy_server.object_info())
    entry = comfy_server.run(prompt, timeout=240)
    images = entry["outputs"]["9"]["images"]
    assert len(images) == 1 and (comfy_server.output_dir / images[0]["subfolder"] / images[0]["filename"]).is_file()


def test_fp8_unet_loader_runs_on_the_tiny_unet(comfy_server):
    prompt = ui_to_api(stock_sd15_workflow(tiny_sd15.CHECKPOINT), comfy_server.object_info())
    prompt["20"] = {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_sd15.UNET, "weight_dtype": "fp8_e4m3fn"}}
    prompt["3"]["inputs"]["model"] = ["20", 0]
    prompt["9"]["inputs"]["filename_prefix"] = "qcorrect_test/stock_fp8"
    comfy_server.run(prompt, timeout=240)


# -- templates --------------------------------------------------------------------------------
def test_template_listing_lists_the_workflows(comfy_server):
    listing = comfy_server.get("/workflow_templates")
    assert sorted(listing.get(srvmod.PACK_NAME, [])) == sorted(WORKFLOWS), listing
    for name in WORKFLOWS:
        r = comfy_server.http.get(f"{comfy_server.url}/api/workflow_templates/{srvmod.PACK_NAME}/{name}.json",
                                  timeout=30)
        assert r.status_code == 200, name
        assert r.json() == json.loads((srvmod.REPO / "workflows" / f"{name}.json").read_text())
        thumb = comfy_server.http.get(f"{comfy_server.url}/api/workflow_templates/{srvmod.PACK_NAME}/{name}.jpg",
                                      timeout=30)
        assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff", name
