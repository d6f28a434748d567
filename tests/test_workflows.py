"""Static checks of the example workflows (UI/graph JSON in ``workflows/``), without ComfyUI.

Node definitions come from ``tests/data/object_info_snapshot.json``: ``/object_info`` of a real
ComfyUI with this pack, restricted to the node types the workflows use (regenerate with
``python workflows/_make.py --snapshot http://127.0.0.1:8188``). Our own nodes in that snapshot are
checked against the pack's source (input names, order, optional flags, output count), so a node
change without a snapshot refresh fails here; the core part is checked against a live server by
``tests/comfy/test_workflows_exec.py`` when ``COMFYUI_PATH`` is set.

``ui_to_api`` is the frontend's UI -> API mapping (widgets_values through the input order), used
here to prove each workflow converts completely and by the execution tests to submit them.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
SNAPSHOT = REPO / "tests" / "data" / "object_info_snapshot.json"
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # drawn by the frontend, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload")
NONE = "(none)"
# combos listing files of the input folder (example media, not downloads)
INPUT_FILE_COMBOS = {("LoadImage", "image"): "input", ("LoadVideo", "file"): "input"}
# combos listing model files (empty in the snapshot, taken on a server without models) -> models/<folder>
MODEL_FILE_COMBOS = {
    ("WanQuantLoadDiT", "model_name"): "diffusion_models", ("WanQuantLoadDiT", "base_name"): "diffusion_models",
    ("WanQuantInspect", "model_name"): "diffusion_models", ("WanQuantRemap", "model_name"): "diffusion_models",
    ("WanQuantRemap", "base_name"): "diffusion_models", ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae", ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("LoraLoaderModelOnly", "lora_name"): "loras", ("WanQuantApplyLoRA", "lora_name"): "loras",
}
MEDIA_EXT = (".png", ".jpg", ".jpeg", ".webp", ".mp4", ".webm", ".mov", ".mkv", ".gif")

EXPECTED = {  # issue 8: (a) .. (e)
    "wanquant_wan2.1_t2v_14B_fp8", "wanquant_vista4d_fp8_over_wan2.1_t2v", "wanquant_worldstereo_fp8_i2v",
    "wanquant_wan2.1_i2v_nvfp4_lightx2v_4step", "wanquant_wan2.2_animate_fp4_distill_6step",
    "wanquant_inspect_convert_remap",
}


# ------------------------------------------------------------------ helpers (also used by tests/comfy)

def load_snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


def workflow_paths() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def load_workflow(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def type_opts(entry) -> tuple[str, dict]:
    t = entry[0]
    opts = dict(entry[1]) if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if isinstance(t, list):
        opts["options"] = t
        t = "COMBO"
    return t, opts


def ordered_inputs(spec: dict):
    """(name, type, opts, required) in the frontend's order: required first, then optional."""
    for section in ("required", "optional"):
        for name in spec.get("input_order", {}).get(section, []):
            t, opts = type_opts(spec["input"][section][name])
            yield name, t, opts, section == "required"


def widget_slots(spec: dict) -> list[tuple[str, str, dict]]:
    """The widgets_values layout: (input name | '<name>:control' | '<name>:upload', type, opts)."""
    out = []
    for name, t, opts, _ in ordered_inputs(spec):
        if t not in WIDGET_TYPES:
            continue
        out.append((name, t, opts))
        if opts.get("control_after_generate") or (t == "INT" and name in ("seed", "noise_seed")):
            out.append((f"{name}:control", "CONTROL", {}))
        if any(opts.get(k) for k in UPLOAD_FLAGS):
            out.append((f"{name}:upload", "UPLOAD", {}))
    return out


def widget_map(node: dict, spec: dict) -> dict:
    slots = widget_slots(spec)
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some frontends save {name: value}
        return dict(values)
    if len(values) != len(slots):
        raise AssertionError(f"node {node['id']} ({node['type']}): {len(values)} widget values for "
                             f"{len(slots)} widgets {[s[0] for s in slots]}")
    return {name: v for (name, _, _), v in zip(slots, values)}


def ui_to_api(wf: dict, info: dict) -> dict:
    """API prompt of a UI workflow: widget values by name, links as [src_id, src_slot]; notes and
    muted/bypassed nodes left out (none of ours are)."""
    links = {l[0]: l for l in wf["links"]}
    prompt = {}
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        spec = info[node["type"]]
        inputs = {k: v for k, v in widget_map(node, spec).items() if ":" not in k}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                l = links[inp["link"]]
                inputs[inp["name"]] = [str(l[1]), l[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or spec.get("display_name", node["type"])}}
    return prompt


def note_text(wf: dict) -> str:
    return "\n".join(str(v) for n in wf["nodes"] if n["type"] in FRONTEND_ONLY for v in n.get("widgets_values", []))


def is_file_combo(ntype: str, name: str, opts: dict) -> bool:
    """A combo whose options list files on disk; one not known as such must have fixed options."""
    if (ntype, name) in MODEL_FILE_COMBOS or (ntype, name) in INPUT_FILE_COMBOS:
        return True
    assert set(opts.get("options") or []) - {NONE}, f"{ntype}.{name}: a file list this test does not know"
    return False


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def info():
    return load_snapshot()


WF_PATHS = workflow_paths()
WF_IDS = [p.stem for p in WF_PATHS]


@pytest.fixture(params=WF_PATHS, ids=WF_IDS)
def wf(request):
    return load_workflow(request.param)


def nodes_of(wf, ntype):
    return [n for n in wf["nodes"] if n["type"] == ntype]


# ------------------------------------------------------------------ folder and files

def test_every_issue_workflow_is_there_with_a_thumbnail():
    names = {p.stem for p in WF_PATHS}
    assert EXPECTED <= names, sorted(EXPECTED - names)
    for p in WF_PATHS:
        jpg = p.with_suffix(".jpg")  # the frontend asks for <name>.jpg next to the JSON
        assert jpg.is_file(), f"{jpg.name} missing"
        data = jpg.read_bytes()
        assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9", f"{jpg.name} is not a JPEG"
        assert len(data) > 5000, f"{jpg.name} looks empty"


def test_no_other_template_folder_duplicates_the_workflows():
    # ComfyUI lists every *.json of example_workflows/, example/, examples/, workflow/, workflows/:
    # a second copy would show each template twice.
    for other in ("example_workflows", "example", "examples", "workflow"):
        assert not list((REPO / other).glob("*.json")), other


def test_generator_reproduces_the_checked_in_json(info):
    spec = importlib.util.spec_from_file_location("wanquant_make_workflows", WORKFLOWS / "_make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert set(make.WORKFLOWS) == set(WF_IDS)
    for name, fn in make.WORKFLOWS.items():
        built = json.loads(json.dumps(fn(info).to_json(name)))
        assert built == load_workflow(WORKFLOWS / f"{name}.json"), f"{name}.json is stale: run workflows/_make.py"


# ------------------------------------------------------------------ graph structure

def test_ui_format_and_consistent_ids(wf):
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids))
    assert wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max([l[0] for l in wf["links"]] or [0])
    for n in wf["nodes"]:
        assert len(n["pos"]) == 2 and len(n["size"]) == 2
        assert n.get("mode", 0) == 0, f"node {n['id']} is muted/bypassed"


def test_links_agree_with_node_slots(wf):
    byid = {n["id"]: n for n in wf["nodes"]}
    seen_in = {}
    for lid, src, sslot, dst, dslot, ltype in wf["links"]:
        s, d = byid[src], byid[dst]
        assert lid in s["outputs"][sslot]["links"], (lid, s["type"])
        assert d["inputs"][dslot]["link"] == lid, (lid, d["type"])
        assert (dst, dslot) not in seen_in, f"two links into node {dst} slot {dslot}"
        seen_in[(dst, dslot)] = lid
    link_ids = {l[0] for l in wf["links"]}
    for n in wf["nodes"]:
        for o in n.get("outputs", []):
            assert set(o.get("links") or []) <= link_ids
        for i in n.get("inputs", []):
            assert i.get("link") is None or i["link"] in link_ids


def test_only_core_and_our_node_types(wf, info):
    for n in wf["nodes"]:
        t = n["type"]
        if t in FRONTEND_ONLY:
            continue
        assert t in info, f"unknown node type {t}"
        assert not t.startswith("WanQuantTest"), "test-only nodes never ship in a workflow"
        python_module = info[t].get("python_module", "")
        if t.startswith("WanQuant"):
            assert python_module.startswith("custom_nodes.") and "wanquant" in python_module, (t, python_module)
            assert n["properties"].get("cnr_id") == "wanquant"
        else:
            assert not python_module.startswith("custom_nodes."), f"{t} comes from a custom pack ({python_module})"
            assert n["properties"].get("cnr_id") == "comfy-core"


def test_node_sockets_match_definitions(wf, info):
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        spec = info[n["type"]]
        assert [o["type"] for o in n["outputs"]] == spec["output"], n["type"]
        known = {name: (t, req) for name, t, _, req in ordered_inputs(spec)}
        for inp in n["inputs"]:
            assert inp["name"] in known, (n["type"], inp["name"])
            t, _ = known[inp["name"]]
            assert inp["type"] == t, (n["type"], inp["name"], inp["type"], t)
            if t in WIDGET_TYPES:
                assert inp.get("widget", {}).get("name") == inp["name"]
        names = {i["name"] for i in n["inputs"]}
        for name, (t, req) in known.items():
            if t not in WIDGET_TYPES:
                assert name in names, f"{n['type']} has no socket for {name}"


def test_every_link_connects_matching_types(wf, info):
    byid = {n["id"]: n for n in wf["nodes"]}
    for lid, src, sslot, dst, dslot, ltype in wf["links"]:
        s, d = byid[src], byid[dst]
        out_t = info[s["type"]]["output"][sslot]
        name = d["inputs"][dslot]["name"]
        in_t = next(t for nm, t, _, _ in ordered_inputs(info[d["type"]]) if nm == name)
        assert ltype == out_t, (lid, ltype, out_t)
        assert in_t == "*" or in_t == out_t, f"link {lid}: {s['type']}.{out_t} -> {d['type']}.{name} ({in_t})"


def test_required_inputs_all_connected(wf, info):
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        linked = {i["name"] for i in n["inputs"] if i.get("link") is not None}
        for name, t, _, req in ordered_inputs(info[n["type"]]):
            if req and t not in WIDGET_TYPES:
                assert name in linked, f"node {n['id']} {n['type']}: required input {name} is not connected"


def _check_value(ntype, name, t, opts, v, wf):
    where = f"{ntype}.{name}={v!r}"
    if t == "CONTROL":
        assert v in CONTROL_VALUES, where
    elif t == "UPLOAD":
        assert v == "image", where
    elif t == "INT":
        assert isinstance(v, int) and not isinstance(v, bool), where
        assert opts.get("min", -2 ** 64) <= v <= opts.get("max", 2 ** 64), where
        step = opts.get("step")
        if step and step > 1 and "min" in opts:
            assert (v - opts["min"]) % step == 0 or v % step == 0, where
    elif t == "FLOAT":
        assert isinstance(v, (int, float)) and not isinstance(v, bool), where
        assert opts.get("min", float("-inf")) <= v <= opts.get("max", float("inf")), where
    elif t == "BOOLEAN":
        assert isinstance(v, bool), where
    elif t == "STRING":
        assert isinstance(v, str), where
        if not opts.get("multiline"):
            assert "\n" not in v, where
    elif t == "COMBO":
        assert isinstance(v, str) and v, where
        if is_file_combo(ntype, name, opts):
            if (ntype, name) in INPUT_FILE_COMBOS:
                assert v.lower().endswith(MEDIA_EXT), where
            elif v not in opts.get("options", []):
                # a model file: the workflow's notes must say where to download it
                base = v.rsplit("/", 1)[-1]
                assert base in note_text(wf), f"{where}: no download note mentions {base}"
        else:
            assert v in opts["options"], f"{where} not in {opts['options']}"
    else:
        raise AssertionError(f"{where}: unexpected widget type {t}")


def test_every_widget_value_is_valid(wf, info):
    checked = 0
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            assert isinstance(n["widgets_values"][0], str)
            continue
        spec = info[n["type"]]
        values = widget_map(n, spec)
        for name, t, opts in widget_slots(spec):
            _check_value(n["type"], name, t, opts, values[name], wf)
            checked += 1
    assert checked > 5


def test_converts_to_a_complete_api_prompt(wf, info):
    api = ui_to_api(wf, info)
    real = [n for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY]
    assert set(api) == {str(n["id"]) for n in real}
    for nid, node in api.items():
        spec = info[node["class_type"]]
        for name, t, _, req in ordered_inputs(spec):
            if req:
                assert name in node["inputs"], (nid, node["class_type"], name)
        for name, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                assert v[0] in api and api[v[0]]["class_type"], (nid, name)
    outputs = [n for n in api.values() if info[n["class_type"]].get("output_node")]
    assert outputs, "nothing would execute: no output node"


def test_notes_say_where_to_download(wf):
    text = note_text(wf)
    assert "hf download" in text
    for cmd in re.findall(r"hf download (\S+)", text):
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", cmd), f"not a repo id: {cmd}"


# ------------------------------------------------------------------ what each workflow is for (issue 8)

def _wf(name):
    return load_workflow(WORKFLOWS / f"{name}.json")


def _widgets(wf, info, ntype):
    return [widget_map(n, info[ntype]) for n in nodes_of(wf, ntype)]


def _upstream(wf, nid, input_name):
    """(node, output slot) feeding input_name of node nid."""
    n = next(x for x in wf["nodes"] if x["id"] == nid)
    lid = next(i["link"] for i in n["inputs"] if i["name"] == input_name)
    l = next(x for x in wf["links"] if x[0] == lid)
    return next(x for x in wf["nodes"] if x["id"] == l[1]), l[2]


def test_t2v_and_vista4d_load_fp8_with_our_loader(info):
    (t2v,) = _widgets(_wf("wanquant_wan2.1_t2v_14B_fp8"), info, "WanQuantLoadDiT")
    assert "fp8" in t2v["model_name"] and t2v["base_name"] == NONE
    (v,) = _widgets(_wf("wanquant_vista4d_fp8_over_wan2.1_t2v"), info, "WanQuantLoadDiT")
    assert v["model_name"].endswith(".index.json") and "Vista4D".lower() in v["model_name"].lower()
    assert v["base_name"] == t2v["model_name"], "Vista4D is overlaid on the Wan2.1-T2V-14B base"


def test_worldstereo_is_image_to_video(info):
    wf = _wf("wanquant_worldstereo_fp8_i2v")
    (ld,) = _widgets(wf, info, "WanQuantLoadDiT")
    assert ld["model_name"] == "WorldStereo-memory-dmd-fp8_e4m3fn_scaled.safetensors"
    (ks,) = nodes_of(wf, "KSampler")
    assert _upstream(wf, ks["id"], "latent_image")[0]["type"] == "WanImageToVideo"


def test_nvfp4_uses_the_error_comp_lora_and_seed_003_settings(info):
    wf = _wf("wanquant_wan2.1_i2v_nvfp4_lightx2v_4step")
    (ks_node,) = nodes_of(wf, "KSampler")
    ks = widget_map(ks_node, info["KSampler"])
    assert (ks["sampler_name"], ks["scheduler"], ks["cfg"], ks["steps"]) == ("lcm", "normal", 1.0, 4)
    ms_node, _ = _upstream(wf, ks_node["id"], "model")
    assert ms_node["type"] == "ModelSamplingSD3" and widget_map(ms_node, info["ModelSamplingSD3"])["shift"] == 5.0
    lora_node, _ = _upstream(wf, ms_node["id"], "model")
    lora = widget_map(lora_node, info[lora_node["type"]])
    assert lora_node["type"] == "WanQuantApplyLoRA", "core LoRA loaders do not read every Wan LoRA spelling"
    assert "lora" in lora["lora_name"].lower() and "nvfp4" in lora["lora_name"].lower()
    # exact on 4-bit weights: merging would requantize the correction away
    assert lora["strength"] == 1.0 and lora["mode"] == "on the fly"
    loader, _ = _upstream(wf, lora_node["id"], "model")
    assert loader["type"] == "WanQuantLoadDiT" and "nvfp4" in widget_map(loader, info["WanQuantLoadDiT"])["model_name"]


def test_animate_is_fed_by_our_pose_nodes_with_the_distill_lora(info):
    wf = _wf("wanquant_wan2.2_animate_fp4_distill_6step")
    (anim,) = nodes_of(wf, "WanAnimateToVideo")
    assert _upstream(wf, anim["id"], "pose_video")[0]["type"] == "WanQuantDrawPose"
    face_src, slot = _upstream(wf, anim["id"], "face_video")
    assert face_src["type"] == "WanQuantPoseDetect" and info[face_src["type"]]["output_name"][slot] == "face_video"
    aw = widget_map(anim, info["WanAnimateToVideo"])
    dw = widget_map(face_src, info["WanQuantPoseDetect"])
    assert (aw["width"], aw["height"]) == (dw["width"], dw["height"]), "pose video must match the generation size"
    (ks_node,) = nodes_of(wf, "KSampler")
    ks = widget_map(ks_node, info["KSampler"])
    assert ks["steps"] == 6 and ks["cfg"] == 1.0
    ms_node, _ = _upstream(wf, ks_node["id"], "model")
    lora_node, _ = _upstream(wf, ms_node["id"], "model")
    assert lora_node["type"] == "WanQuantApplyLoRA"  # the distill LoRA carries diff_m, which core skips
    assert "distill" in widget_map(lora_node, info[lora_node["type"]])["lora_name"]
    loader, _ = _upstream(wf, lora_node["id"], "model")
    assert widget_map(loader, info["WanQuantLoadDiT"])["model_name"].endswith("quantized_transformer.safetensors")


def test_utilities_inspect_and_convert(info):
    wf = _wf("wanquant_inspect_convert_remap")
    assert len(nodes_of(wf, "WanQuantInspect")) >= 1
    remaps = _widgets(wf, info, "WanQuantRemap")
    assert any(r["save_as"] and r["base_name"] != NONE for r in remaps), "a partial finetune converted over its base"
    assert any(r["save_as"] for r in remaps)


# ------------------------------------------------------------------ our node definitions vs the pack's source

def _schemas_from_source() -> dict[str, dict]:
    """node_id -> {inputs: [(name, optional)], outputs: n} read from nodes/*.py with ast (no ComfyUI)."""
    out = {}
    for path in sorted((REPO / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text())
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", getattr(call.func, "id", None)) == "Schema"):
                continue
            kw = {k.arg: k.value for k in call.keywords}
            if not isinstance(kw.get("node_id"), ast.Constant):
                continue
            inputs = []
            for el in getattr(kw.get("inputs"), "elts", []):
                name = el.args[0].value if el.args and isinstance(el.args[0], ast.Constant) else None
                opt = any(k.arg == "optional" and getattr(k.value, "value", False) for k in el.keywords)
                inputs.append((name, opt))
            out[kw["node_id"].value] = {"inputs": inputs, "outputs": len(getattr(kw.get("outputs"), "elts", []))}
    return out


def test_our_nodes_in_the_snapshot_match_the_pack_source(info):
    src = _schemas_from_source()
    ours = [t for t in info if t.startswith("WanQuant")]
    assert ours
    for t in ours:
        assert t in src, f"{t} is in the snapshot but no longer in nodes/*.py"
        order = info[t]["input_order"]
        snap = [(n, False) for n in order.get("required", [])] + [(n, True) for n in order.get("optional", [])]
        assert sorted(snap) == sorted(src[t]["inputs"]), f"{t}: snapshot is stale, run workflows/_make.py --snapshot"
        assert [n for n, o in snap if not o] == [n for n, o in src[t]["inputs"] if not o], t
        assert len(info[t]["output"]) == src[t]["outputs"], t
