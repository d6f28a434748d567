"""The example workflows inside a real headless ComfyUI (skips without COMFYUI_PATH).

* The checked-in ``/object_info`` snapshot (tests/data) still matches the live server.
* ``GET /workflow_templates`` lists every workflow of ``workflows/`` under this pack, the JSON and
  the ``.jpg`` thumbnail are served, and the log carries no import failure or rename hint.
* Every workflow is converted UI -> API with the live ``/object_info`` and executed end to end on
  CPU, with tiny stand-in files saved under **the exact names the workflow uses** (DiTs built with
  each release's recipe at dim 256, a Wan 2.1 VAE of width 8, LoRAs, fake ONNX pose models, a
  short video and images). Only what cannot be made small is replaced, identically everywhere:

  - ``CLIPLoader`` + ``CLIPTextEncode`` (umt5-xxl, 5.7B parameters of fixed size) -> the test
    pack's ``WanQuantTestConditioning`` (random 4096-wide context);
  - ``CLIPLoader``'s and ``CLIPVisionLoader``/``CLIPVisionEncode`` (ViT-H, fixed size) are dropped;
    the image-to-video nodes run without ``clip_vision_output``;
  - pose model choices ``(auto-download)`` -> fake ONNX detector / ViTPose files (no network);
  - width/height/length of the latent-making nodes -> 64x64, 5 frames (the workflow's own steps,
    sampler, scheduler, CFG, shift and LoRA strengths are kept).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from wanquant.loaders import synthetic as syn

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "pose"))
from onnx_fakes import gaussian_maps, vitpose_const, yolo  # noqa: E402
from test_workflows import (FRONTEND_ONLY, INPUT_FILE_COMBOS, MODEL_FILE_COMBOS, load_snapshot,  # noqa: E402
                            load_workflow, ordered_inputs, type_opts, ui_to_api, workflow_paths)

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

STUBS = os.environ.get("WANQUANT_COMFY_STUBS", str(TESTS.parents[1] / "shared" / "comfyui" / "stubs"))
SIZE, LENGTH = 64, 5
FAKE_DET, FAKE_POSE = "wq_wf_det.onnx", "wq_wf_vitpose.onnx"
FAMILY = {  # words the loader/inspect reports must contain per workflow
    "wanquant_wan2.1_t2v_14B_fp8": ("Wan2.1-T2V", "float8_e4m3fn"),
    "wanquant_vista4d_fp8_over_wan2.1_t2v": ("Wan2.1-T2V", "float8_e4m3fn", "Vista4D: three-stream"),
    "wanquant_worldstereo_fp8_i2v": ("Wan2.1-I2V", "key style: diffusers"),
    "wanquant_wan2.1_i2v_nvfp4_lightx2v_4step": ("Wan2.1-I2V", "nvfp4", "mxfp8"),
    "wanquant_wan2.2_animate_fp4_distill_6step": ("Wan2.2-Animate", "fp4_g32", "CPUExecutionProvider"),
    "wanquant_inspect_convert_remap": ("fp4_g32", "Wan2.2-Animate", "Wan2.1-T2V"),
}


# ------------------------------------------------------------------ stand-in files

def _comfy_py(code: str, *argv: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (STUBS, env.get("PYTHONPATH", "")) if p)
    py = os.environ.get("COMFY_PY", sys.executable)
    r = subprocess.run([py, "-c", code, os.environ["COMFYUI_PATH"], *argv], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


_TINY_VAE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args; args.cpu = True
import comfy.ldm.wan.vae as v
from safetensors.torch import save_file
torch.manual_seed(0)
m = v.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0)
save_file({k: t.contiguous() for k, t in m.state_dict().items()}, sys.argv[2])
"""

# ComfyUI's own Animate model class at dim 256 (its face/motion encoders have fixed sizes), random
# weights; saved in native keys, then FP4 group-32 quantized by the release's recipe in this process.
_TINY_ANIMATE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args; args.cpu = True
import comfy.model_management, comfy.ops
from comfy.ldm.wan.model_animate import AnimateWanModel
from safetensors.torch import save_file
with torch.device("meta"):
    m = AnimateWanModel(dim=256, ffn_dim=512, num_heads=2, num_layers=5, in_dim=36, out_dim=16, model_type="i2v",
                        device="meta", dtype=torch.float32, operations=comfy.ops.disable_weight_init)
g = torch.Generator().manual_seed(3)
sd = {}
for k, t in m.state_dict().items():
    fan_in = max(1, t[0].numel()) if t.dim() > 1 else 1
    v = torch.randn(t.shape, generator=g) / fan_in ** 0.5 if t.dim() > 1 else 1 + 0.02 * torch.randn(t.shape, generator=g)
    if k.endswith(".bias"):
        v = 0.02 * torch.randn(t.shape, generator=g)
    sd[k] = v.to(torch.bfloat16).contiguous()
save_file(sd, sys.argv[2])
"""


def _lora(path: Path, sd: dict, layers: list[str], rank: int = 4, seed: int = 0, lightx2v: bool = False) -> Path:
    """A LoRA on some Linears. Error-comp (convert_to_quant): bare ``<native>.lora_up/down``, no alpha.
    lightx2v distill (Kijai's file): ``diffusion_model.`` prefix, ``alpha``, ``diff_b`` and ``diff_m``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    pre = "diffusion_model." if lightx2v else ""
    for layer in layers:
        o, i = sd[f"{layer}.weight"].shape
        out[f"{pre}{layer}.lora_down.weight"] = (torch.randn(rank, i, generator=g) * 0.02).bfloat16()
        out[f"{pre}{layer}.lora_up.weight"] = (torch.randn(o, rank, generator=g) * 0.02).bfloat16()
        if lightx2v:
            out[f"{pre}{layer}.alpha"] = torch.tensor(float(rank))
            out[f"{pre}{layer}.diff_b"] = (torch.randn(o, generator=g) * 0.01).bfloat16()
    if lightx2v:
        for b in sorted({l.split(".")[1] for l in layers}):
            out[f"{pre}blocks.{b}.diff_m"] = (torch.randn(sd[f"blocks.{b}.modulation"].shape, generator=g) * 0.01).bfloat16()
    return syn.save(out, path)


def _blobs() -> dict:
    """133 wholebody keypoints of a standing figure on ViTPose's 48x64 heatmap."""
    body = {0: (24, 8), 1: (23, 7), 2: (25, 7), 3: (22, 8), 4: (26, 8), 5: (20, 14), 6: (28, 14), 7: (18, 22),
            8: (30, 22), 9: (17, 30), 10: (31, 30), 11: (21, 32), 12: (27, 32), 13: (21, 44), 14: (27, 44),
            15: (21, 56), 16: (27, 56), 17: (20, 59), 18: (19, 59), 19: (21, 58), 20: (28, 59), 21: (29, 59),
            22: (27, 58)}
    body.update({23 + i: (21 + (i % 9) * 0.7, 5 + (i // 9) * 0.8) for i in range(68)})
    body.update({91 + i: (15 + (i % 4), 29 + i // 4) for i in range(21)})
    body.update({112 + i: (32 + (i % 4), 29 + i // 4) for i in range(21)})
    return body


def _video(path: Path, frames: int = 6, w: int = 160, h: int = 120) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 16, (w, h))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for i in range(frames):
        img = np.full((h, w, 3), 40 + 20 * i, np.uint8)
        cv2.rectangle(img, (60, 20), (100, 110), (200, 180, 160), -1)
        writer.write(img)
    writer.release()


def _image(path: Path, w: int = 96, h: int = 128) -> None:
    import cv2

    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    cv2.circle(img, (w // 2, h // 3), 14, (220, 200, 180), -1)
    cv2.imwrite(str(path), img)


def build_standins(models: Path, inputs: Path, names: dict[str, set[str]]) -> dict:
    """Create every file the workflows name; returns facts the tests check afterwards."""
    dm = models / "diffusion_models"
    made = {}

    def want(folder, name):
        return name in names.get(folder, set())

    t2v = syn.wan_state_dict(seed=1)
    base = "wan2.1_t2v_14B_fp8_scaled.safetensors"
    if want("diffusion_models", base):
        syn.save(syn.kijai_scaled_fp8(t2v, scale_dtype=torch.float32), dm / base)
    vista = "vista4d-fp8/384p49_step=30000-fp8/diffusion_pytorch_model.safetensors.index.json"
    if want("diffusion_models", vista):
        ft = syn.vista4d_extras(syn.wan_state_dict(seed=2), 256, 2, mask_channels=512)
        keep = {k: v for k, v in ft.items() if ".self_attn." in k or "cam_encoder" in k or "projector" in k
                or k.startswith("latent_encoder.")}
        idx = syn.save_sharded(syn.vista4d_fp8(keep), dm / Path(vista).parent, shards=1)
        assert idx == dm / vista, idx
    ws = "WorldStereo-memory-dmd-fp8_e4m3fn_scaled.safetensors"
    if want("diffusion_models", ws):
        d = syn.to_diffusers(syn.wan_state_dict(seed=3, i2v=True, in_dim=36))
        d["controlnet.controlnet_blocks.0.self_attn.to_q.weight"] = torch.randn(256, 256).bfloat16()
        syn.save(syn.kijai_scaled_fp8(d), dm / ws)
    i2v = syn.wan_state_dict(seed=4, i2v=True, in_dim=36)
    for name in names.get("diffusion_models", ()):
        if "nvfp4" in name:
            fmts = {l: ("nvfp4", "mxfp8", "float8_e4m3fn", "nvfp4")[i % 4]
                    for i, l in enumerate(l for l in syn.quantizable_linears(i2v) if l.startswith("blocks."))}
            q, _ = syn.comfy_native(i2v, fmts)
            syn.save(q, dm / name)
    for name in names.get("loras", ()):
        if "nvfp4" in name:  # error-compensation LoRA: convert_to_quant's targets ffn.(0|2), self_attn.(v|o)
            layers = [l for l in syn.quantizable_linears(i2v)
                      if any(l.endswith(s) for s in ("ffn.0", "ffn.2", "self_attn.v", "self_attn.o"))]
            _lora(models / "loras" / name, i2v, layers, seed=5)
            made["nvfp4_lora_layers"] = len(layers)
    anim = "Wan2.2-Animate-14B-FP4/quantized_transformer.safetensors"
    if want("diffusion_models", anim):
        raw = dm / "animate_native_bf16.tmp"
        _comfy_py(_TINY_ANIMATE, str(raw))
        from safetensors.torch import load_file

        sd = load_file(str(raw))
        raw.unlink()
        layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")
                  and sd[f"{l}.weight"].shape[1] % 32 == 0]
        (dm / anim).parent.mkdir(parents=True, exist_ok=True)
        syn.save(syn.fp4_g32(sd, layers, order="low_first"), dm / anim)
        (dm / anim).parent.joinpath("quantize_config.json").write_text(json.dumps({"group_size": 32}))
        for name in names.get("loras", ()):
            if "distill" in name:
                _lora(models / "loras" / name, sd, [l for l in layers if ".self_attn." in l or ".ffn." in l], seed=6,
                      lightx2v=True)
        made["animate_fp4_layers"] = len(layers)
    for name in names.get("vae", ()):
        (models / "vae").mkdir(parents=True, exist_ok=True)
        _comfy_py(_TINY_VAE, str(models / "vae" / name))
    det = models / "detection"
    det.mkdir(parents=True, exist_ok=True)
    yolo(det / FAKE_DET, [[40, 10, 120, 118, 0.9, 0]])
    vitpose_const(det / FAKE_POSE, gaussian_maps(_blobs()))
    for name in names.get("input", ()):
        (_video if name.endswith(".mp4") else _image)(inputs / name)
    return made


# ------------------------------------------------------------------ UI -> API with stand-ins

def standin_prompt(wf: dict, info: dict) -> tuple[dict, list[str]]:
    api = ui_to_api(wf, info)
    replaced = []
    for nid, node in list(api.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CLIPTextEncode":
            api[nid] = {"class_type": "WanQuantTestConditioning",
                        "inputs": {"seed": int(nid), "tokens": 8, "width": 4096}}
            replaced.append(f"{nid}:CLIPTextEncode")
        elif ct in ("CLIPLoader", "CLIPVisionLoader", "CLIPVisionEncode"):
            del api[nid]
            replaced.append(f"{nid}:{ct}")
        elif ct == "WanQuantPoseModelLoader":
            inp.update(detector=FAKE_DET, pose_model=FAKE_POSE)
        for key in ("width", "height"):
            if key in inp and not isinstance(inp[key], list):
                inp[key] = SIZE
        if "length" in inp and ct != "CreateVideo":
            inp["length"] = LENGTH
    gone = {r.split(":")[0] for r in replaced if not r.endswith("CLIPTextEncode")}
    for node in api.values():
        for k, v in list(node["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and v[0] in gone:
                del node["inputs"][k]  # only optional inputs (clip_vision_output) point at dropped nodes
    return api, replaced


def file_names(paths) -> dict[str, set[str]]:
    """models/<folder> (or 'input') -> file names the workflows choose."""
    info = load_snapshot()
    out: dict[str, set[str]] = {}
    for p in paths:
        for n in load_workflow(p)["nodes"]:
            if n["type"] in FRONTEND_ONLY:
                continue
            from test_workflows import widget_map

            for name, v in widget_map(n, info[n["type"]]).items():
                folder = MODEL_FILE_COMBOS.get((n["type"], name)) or INPUT_FILE_COMBOS.get((n["type"], name))
                if folder and v != "(none)":
                    out.setdefault(folder, set()).add(v)
    return out


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def server(comfy_server):
    names = file_names(workflow_paths())
    comfy_server.made = build_standins(comfy_server.models, comfy_server.base / "input", names)
    return comfy_server


@pytest.fixture(scope="module")
def live_info(server):
    return server.get_json("/object_info")


def _used_output_slots() -> dict[str, int]:
    """node type → number of leading output slots that some workflow links from."""
    used: dict[str, int] = {}
    for p in workflow_paths():
        wf = json.loads(p.read_text())
        types = {n["id"]: n["type"] for n in wf.get("nodes", [])}
        for link in wf.get("links", []):
            t = types.get(link[1])
            if t:
                used[t] = max(used.get(t, 0), int(link[2]) + 1)
    return used


def _workflow_texts() -> list[str]:
    return [p.read_text() for p in workflow_paths()]


# ------------------------------------------------------------------ tests

def test_snapshot_matches_the_live_server(live_info):
    snap = load_snapshot()
    for t, spec in snap.items():
        assert t in live_info, f"{t} is gone from this ComfyUI"
        live = live_info[t]
        assert live["input_order"] == spec["input_order"], t
        if t.startswith("WanQuant"):
            assert live["output"] == spec["output"] and live["output_name"] == spec["output_name"], t
        else:
            # core nodes may gain outputs between ComfyUI versions; the slots workflows link from must match
            n = _used_output_slots().get(t, 0)
            assert live["output"][:n] == spec["output"][:n], (t, live["output"], spec["output"])
        assert bool(live.get("output_node")) == bool(spec.get("output_node")), t
        for name, ty, opts, _ in ordered_inputs(spec):
            section = "required" if name in spec["input"].get("required", {}) else "optional"
            lty, lopts = type_opts(live["input"][section][name])
            assert lty == ty, (t, name, lty, ty)
            for k in ("default", "min", "max", "step", "control_after_generate", "multiline"):
                assert lopts.get(k) == opts.get(k), (t, name, k, lopts.get(k), opts.get(k))
            if ty == "COMBO" and (t, name) not in MODEL_FILE_COMBOS and (t, name) not in INPUT_FILE_COMBOS:
                if t.startswith("WanQuant"):
                    # ours: fixed entries must all still be there (pose loaders add local .onnx files after them)
                    assert lopts["options"][:len(opts["options"])] == opts["options"], (t, name)
                else:
                    # core combos differ between ComfyUI versions (the snapshot is from 0.33): only the
                    # values a workflow actually uses must exist in this ComfyUI
                    gone = set(opts["options"]) - set(lopts["options"])
                    used = [o for o in gone if isinstance(o, str) and any(f'"{o}"' in w for w in _workflow_texts())]
                    assert not used, (t, name, used)


def test_workflows_are_served_as_templates(server):
    listed = server.get_json("/workflow_templates")
    names = sorted(p.stem for p in workflow_paths())
    assert sorted(listed.get("wanquant", [])) == names, listed
    for name in names:
        body = urllib.request.urlopen(f"{server.url}/api/workflow_templates/wanquant/{name}.json", timeout=30).read()
        assert json.loads(body) == load_workflow(Path(__file__).resolve().parents[2] / "workflows" / f"{name}.json")
        r = urllib.request.urlopen(f"{server.url}/api/workflow_templates/wanquant/{name}.jpg", timeout=30)
        assert r.headers.get_content_type() == "image/jpeg" and r.read()[:3] == b"\xff\xd8\xff"
    log = server.log()
    assert "consider renaming" not in log, "ComfyUI asked to rename the template folder"
    assert not [l for l in log.splitlines() if "IMPORT FAILED" in l and "wanquant" in l], log[-3000:]


def _outputs_of(entry, node_id):
    return entry["outputs"].get(str(node_id), {})


@pytest.mark.parametrize("path", workflow_paths(), ids=lambda p: p.stem)
def test_workflow_executes_with_standins(server, live_info, path):
    wf = load_workflow(path)
    api, replaced = standin_prompt(wf, live_info)
    entry = server.run_prompt(api, timeout=900)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status)[:4000] + "\n" + server.log()[-4000:]
    # every output node of the workflow produced its output
    for nid, node in api.items():
        ct = node["class_type"]
        if ct == "SaveAnimatedWEBP":
            imgs = _outputs_of(entry, nid).get("images", [])
            assert imgs and imgs[0]["filename"].endswith(".webp"), (path.stem, nid)
        elif ct in ("PreviewAny", "WanQuantInspect", "WanQuantRemap"):
            text = "".join(_outputs_of(entry, nid).get("text", []))
            assert text.strip(), (path.stem, nid, ct)
    reports = "\n".join("".join(_outputs_of(entry, nid).get("text", [])) for nid in api)
    for word in FAMILY.get(path.stem, ()):  # the loader really built the intended model
        assert word in reports, (path.stem, word, reports[:2000])
    if any(n["class_type"] in ("WanQuantLoadDiT", "WanQuantRemap") for n in api.values()):
        assert "layers:" in reports, reports[:2000]
    for nid, node in api.items():  # files written by Remap exist and hold native comfy_quant layers
        if node["class_type"] == "WanQuantRemap" and node["inputs"]["save_as"]:
            out = server.models / "diffusion_models" / (node["inputs"]["save_as"] + ".safetensors")
            assert out.is_file() and out.stat().st_size > 100_000, out
    # the LoRAs land on the model: every key matched (the node's report) and ComfyUI skipped none
    for nid, node in api.items():
        if node["class_type"] == "WanQuantApplyLoRA":
            text = next("".join(_outputs_of(entry, k).get("text", [])) for k, n in api.items()
                        if n["class_type"] == "PreviewAny" and n["inputs"]["source"][0] == nid)
            m = re.search(r"matched: (\d+) of (\d+) keys", text)
            assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0, text[:2000]
            assert "on the fly" in text, text[:2000]
    log = server.log()
    assert "lora key not loaded" not in log, [l for l in log.splitlines() if "lora key not loaded" in l][:5]
    assert all(r.split(":")[1] in ("CLIPTextEncode", "CLIPLoader", "CLIPVisionLoader", "CLIPVisionEncode")
               for r in replaced)
