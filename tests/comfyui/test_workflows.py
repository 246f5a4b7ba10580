"""The example workflows of workflows/ executed through a real ComfyUI server (POST /prompt).

Each UI workflow is converted to an API prompt from /object_info (server.ui_to_api), run on CPU and
must finish without an execution error: the reference-model workflows as committed, the SD1.5 ones
on the tiny random checkpoint (file names, image size, steps and batches overridden). Statistics
written by workflow 1 are read by workflow 3, a cancelled calibration leaves no file, and the
committed JSON is what make_workflows.py generates from the live node definitions.
"""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from . import make_workflows
from . import server as srvmod
from . import tiny_sd15
from .server import messages, ui_to_api

WORKFLOWS = srvmod.REPO / "workflows"
RUN_TIMEOUT = 600

# The SD1.5 workflows on the tiny random checkpoint: small latents, few steps, one batch.
TINY = {
    "CheckpointLoaderSimple": {"ckpt_name": tiny_sd15.CHECKPOINT},
    "UNETLoader": {"unet_name": tiny_sd15.UNET},
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "QCorrectCalibrateErrors": {"steps": 3, "batches": 4},
    "QCorrectCorrectedKSampler": {"steps": 3},
    "KSampler": {"steps": 3},
}


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def run_workflow(srv, name: str, overrides=None) -> tuple[dict, dict]:
    """Run a workflow file with every node executed (no outputs cached by earlier tests); returns
    (API prompt, history entry). Combo lists (stats files) are read fresh, as the frontend does."""
    prompt = ui_to_api(load(name), srv.object_info(refresh=True), overrides)
    srv.clear_cache()
    entry = srv.run(prompt, timeout=RUN_TIMEOUT)
    cached = [n for m in messages(entry, "execution_cached") for n in m.get("nodes", [])]
    assert not cached, f"{name}: nodes {cached} came from the cache"
    return prompt, entry


def outputs_of(prompt: dict, entry: dict, class_type: str) -> list:
    return [entry["outputs"][nid] for nid, node in prompt.items()
            if node["class_type"] == class_type and nid in entry["outputs"]]


def stats_path(srv, prompt: dict):
    (calib,) = [n for n in prompt.values() if n["class_type"] == "QCorrectCalibrateErrors"]
    return srv.models_dir / "qcorrect" / (calib["inputs"]["filename"] + ".safetensors")


def check_sampling_outputs(srv, prompt: dict, entry: dict) -> None:
    assert not messages(entry, "execution_error")
    (saved,) = outputs_of(prompt, entry, "SaveImage")
    batch = next(n for n in prompt.values() if n["class_type"] == "EmptyLatentImage")["inputs"]["batch_size"]
    assert len(saved["images"]) == batch
    for img in saved["images"]:
        assert (srv.output_dir / img["subfolder"] / img["filename"]).is_file()
    for out in outputs_of(prompt, entry, "QCorrectCompareToReference"):
        report = "\n".join(out["text"])
        mse = re.search(r"latent MSE\s+([-+0-9.eE]+|nan|inf)", report)
        assert mse and math.isfinite(float(mse.group(1))), report


@pytest.fixture(scope="module")
def end_to_end(comfy_server):
    """Workflow 1 as committed, run once for the tests that need its statistics file."""
    return run_workflow(comfy_server, "qcorrect_reference_end_to_end")


def test_reference_end_to_end(comfy_server, end_to_end):
    prompt, entry = end_to_end
    check_sampling_outputs(comfy_server, prompt, entry)
    assert stats_path(comfy_server, prompt).is_file()
    (calib,) = outputs_of(prompt, entry, "QCorrectCalibrateErrors")
    path = stats_path(comfy_server, prompt)
    shown = "models/" + "/".join(path.parts[path.parts.index("qcorrect"):])
    assert shown in "\n".join(calib["text"])  # shown relative to the model folder


def test_stats_saved_by_one_run_are_loaded_by_another(comfy_server, end_to_end):
    written = stats_path(comfy_server, end_to_end[0])
    prompt, entry = run_workflow(comfy_server, "qcorrect_shared_stats")
    (load_node,) = [n for n in prompt.values() if n["class_type"] == "QCorrectLoadCorrectionStats"]
    assert comfy_server.models_dir / "qcorrect" / load_node["inputs"]["stats_name"] == written
    check_sampling_outputs(comfy_server, prompt, entry)


def test_relax_timesteps(comfy_server):
    prompt, entry = run_workflow(comfy_server, "qcorrect_relax_timesteps")
    check_sampling_outputs(comfy_server, prompt, entry)
    assert stats_path(comfy_server, prompt).is_file()


def latent_mse_of(out: dict) -> float:
    return float(re.search(r"latent MSE\s+([-+0-9.eE]+)", "\n".join(out["text"])).group(1))


def test_calibrated_quantizer_beats_round_to_nearest_as_committed(comfy_server):
    """Workflow 6 as committed (64 calibration latents, budget with mixed precision, 200 tuning
    iterations): the calibrated model's samples are closer to full precision than round-to-nearest's
    on the same seed, and the node reports what it did."""
    prompt, entry = run_workflow(comfy_server, "qcorrect_calibrated_quantizer")
    check_sampling_outputs(comfy_server, prompt, entry)
    titles = {nid: n["_meta"]["title"] for nid, n in prompt.items() if "_meta" in n}
    mse = {titles.get(nid, nid): latent_mse_of(entry["outputs"][nid]) for nid, n in prompt.items()
           if n["class_type"] == "QCorrectCompareToReference"}
    assert len(mse) == 2
    cal = next(v for k, v in mse.items() if "calibrated" in k)
    rtn = next(v for k, v in mse.items() if "round-to-nearest" in k)
    assert cal < 0.5 * rtn, mse
    (q,) = outputs_of(prompt, entry, "QCorrectQuantizeModelCalibrated")
    report = "\n".join(q["text"])
    assert "GPTQ" in report and "lowered to 3 bits" in report and "grid tuning: 200 iterations" in report, report


@pytest.mark.parametrize("name", ["qcorrect_sd15", "qcorrect_fp8"])
def test_sd15_workflows_on_the_tiny_checkpoint(comfy_server, name):
    prompt, entry = run_workflow(comfy_server, name, TINY)
    check_sampling_outputs(comfy_server, prompt, entry)
    assert stats_path(comfy_server, prompt).is_file()


def test_interrupting_calibration_leaves_no_stats_file(comfy_server):
    folder = comfy_server.models_dir / "qcorrect" / "qcorrect_test_interrupt"
    long_run = {"QCorrectCalibrateErrors": {"steps": 200, "batches": 64, "filename": f"{folder.name}/stats"}}
    prompt = ui_to_api(load("qcorrect_reference_end_to_end"), comfy_server.object_info(), long_run)
    calib_id = next(k for k, n in prompt.items() if n["class_type"] == "QCorrectCalibrateErrors")
    prompt_id = comfy_server.queue(prompt)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(item[1] == prompt_id for item in comfy_server.running()):
        time.sleep(0.2)
    time.sleep(4)  # well into the calibration (the nodes before it take well under a second)
    comfy_server.interrupt(prompt_id)
    entry = comfy_server.wait(prompt_id, timeout=120)
    interrupted = messages(entry, "execution_interrupted")
    assert interrupted, entry["status"]
    assert interrupted[0]["node_id"] == calib_id, interrupted
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())
    assert not (folder / "stats.safetensors").exists()


def test_committed_workflows_match_the_generator(comfy_server):
    generated = make_workflows.generate(comfy_server.object_info())
    committed = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert committed == sorted(generated)
    for name, wf in generated.items():
        assert make_workflows.dumps(wf) == (WORKFLOWS / f"{name}.json").read_text(), \
            f"{name}.json is stale: run tests/comfyui/make_workflows.py"
        assert (WORKFLOWS / f"{name}.jpg").is_file()


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKFLOWS.glob("*.json")))
def test_workflow_files_are_consistent_ui_graphs(name):
    wf = load(name)
    assert wf["version"] == 0.4 and wf["groups"]
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == len(wf["links"])
    for link_id, a, a_slot, b, b_slot, kind in wf["links"]:
        assert link_id in nodes[a]["outputs"][a_slot]["links"]
        assert nodes[b]["inputs"][b_slot]["link"] == link_id
        assert nodes[a]["outputs"][a_slot]["type"] == kind
    orders = sorted(n["order"] for n in nodes.values())
    assert orders == list(range(len(nodes)))
