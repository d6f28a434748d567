"""Builds the example workflows (UI/graph format) and their thumbnails from compact descriptions.

The JSON files next to this script are what ComfyUI serves as templates; this script is how they
are made, so a node change means editing one description and re-running it::

    python workflows/_make.py                 # rewrite workflows/*.json (+ .jpg if Pillow is there)
    python workflows/_make.py --snapshot URL  # first refresh tests/data/object_info_snapshot.json
                                              # from a running ComfyUI (node types the workflows use)

Widget order, socket lists and link types all come from the ``/object_info`` snapshot, the same
file ``tests/test_workflows.py`` checks the workflows against. Runs without ComfyUI and without
torch (Pillow is only needed for the thumbnails).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
SNAPSHOT = HERE.parent / "tests" / "data" / "object_info_snapshot.json"
FRONTEND_ONLY = {"MarkdownNote", "Note"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
OUR_PREFIX = "WanQuant"

# ------------------------------------------------------------------ download notes (from the model cards)

COMFY = "ComfyUI/models"
DL_T5 = ("hf download Comfy-Org/Wan_2.1_ComfyUI_repackaged split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors --local-dir .\n"
         f"mv split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors {COMFY}/text_encoders/")
DL_VAE = ("hf download Comfy-Org/Wan_2.1_ComfyUI_repackaged split_files/vae/wan_2.1_vae.safetensors --local-dir .\n"
          f"mv split_files/vae/wan_2.1_vae.safetensors {COMFY}/vae/")
DL_CLIPV = ("hf download Comfy-Org/Wan_2.1_ComfyUI_repackaged split_files/clip_vision/clip_vision_h.safetensors --local-dir .\n"
            f"mv split_files/clip_vision/clip_vision_h.safetensors {COMFY}/clip_vision/")
DL_T2V = ("hf download Comfy-Org/Wan_2.1_ComfyUI_repackaged split_files/diffusion_models/wan2.1_t2v_14B_fp8_scaled.safetensors --local-dir .\n"
          f"mv split_files/diffusion_models/wan2.1_t2v_14B_fp8_scaled.safetensors {COMFY}/diffusion_models/")
DL_VISTA = ("# Vista4D fp8 (seed card: AEmotionStudio/Vista4D), 384p49 checkpoint (672x384, 49 frames)\n"
            "hf download AEmotionStudio/Vista4D \\\n  --include \"384p49_step=30000-fp8/*\" \\\n"
            f"  --local-dir {COMFY}/diffusion_models/vista4d-fp8\n"
            "# -> pick vista4d-fp8/384p49_step=30000-fp8/diffusion_pytorch_model.safetensors.index.json\n"
            "# 720p49 (1280x720) instead: --include \"720p49_step=3000-fp8/*\"")
DL_WS = ("# WorldStereo memory-dmd, scaled fp8 (apozz/WorldStereo-fp8)\n"
         "hf download apozz/WorldStereo-fp8 WorldStereo-memory-dmd-fp8_e4m3fn_scaled.safetensors \\\n"
         f"  --local-dir {COMFY}/diffusion_models")
NVFP4_REPO = "InsecureErasure/Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v-NVFP4"
NVFP4_FILE = "Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v-bf16-nvfp4.safetensors"
NVFP4_LORA = "Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v-bf16-nvfp4_lora.safetensors"
DL_NVFP4 = (f"# NVFP4/MXFP8 model + its rank-64 error-compensation LoRA ({NVFP4_REPO})\n"
            f"hf download {NVFP4_REPO} --include \"*.safetensors\" --local-dir .\n"
            f"mv {NVFP4_FILE} {COMFY}/diffusion_models/\n"
            f"mv {NVFP4_LORA} {COMFY}/loras/\n"
            "# (names as convert_to_quant writes them: <model>-nvfp4.safetensors and <model>-nvfp4_lora.safetensors;\n"
            "#  if the repo renamed them, pick the model and the *_lora file in the two dropdowns)")
ANIM_FILE = "Wan2.2-Animate-14B-FP4/quantized_transformer.safetensors"
DL_ANIM = ("# Wan2.2-Animate-14B naive FP4 (group 32) transformer + its quantize_config.json (treksis/video-lab)\n"
           "hf download treksis/video-lab \\\n  Wan2.2-Animate-14B-FP4/quantized_transformer.safetensors \\\n"
           f"  Wan2.2-Animate-14B-FP4/quantize_config.json \\\n  --local-dir {COMFY}/diffusion_models\n"
           "# (quantized_text_encoder.safetensors there is INT4 AWQ for diffusers; ComfyUI uses umt5 below)")
DISTILL_LORA = "Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"
DL_DISTILL = ("# lightx2v distill LoRA, rank 64 (6-step inference)\n"
              "hf download Kijai/WanVideo_comfy \\\n  Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors \\\n"
              f"  --local-dir {COMFY}/loras\n"
              "# mirror: hf download treksis/video-lab --include \"distill_lora/**\" --local-dir .")
DL_POSE = ("Pose models: the '(auto-download)' entries fetch YOLOv10m from Wan-AI/Wan2.2-Animate-14B\n"
           "(process_checkpoint/det/yolov10m.onnx) and ViTPose-H from Kijai/vitpose_comfy into\n"
           f"{COMFY}/detection on first run and check their sha256. Offline, put them there yourself:\n"
           f"hf download Wan-AI/Wan2.2-Animate-14B process_checkpoint/det/yolov10m.onnx --local-dir .\n"
           f"mv process_checkpoint/det/yolov10m.onnx {COMFY}/detection/\n"
           f"hf download Kijai/vitpose_comfy onnx/vitpose_h_wholebody_model.onnx onnx/vitpose_h_wholebody_data.bin --local-dir .\n"
           f"mv onnx/vitpose_h_wholebody_* {COMFY}/detection/")

NEG = ("static, blurry details, subtitles, worst quality, low quality, JPEG artifacts, ugly, deformed, "
       "extra fingers, poorly drawn hands, poorly drawn face, still picture, cluttered background")


def md(*parts: str) -> str:
    return "\n".join(parts)


def code(s: str) -> str:
    return "```bash\n" + s + "\n```"


# ------------------------------------------------------------------ graph builder

class Graph:
    def __init__(self, info: dict):
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def _spec(self, ntype):
        return self.info[ntype]

    def widget_names(self, ntype) -> list[tuple[str, dict]]:
        """(input name, options) of every widget in frontend order (required then optional)."""
        spec = self._spec(ntype)
        out = []
        for section in ("required", "optional"):
            for name in spec.get("input_order", {}).get(section, []):
                t, opts = _type_opts(spec["input"][section][name])
                if t in WIDGET_TYPES:
                    out.append((name, opts))
        return out

    def add(self, ntype: str, pos, widgets: dict | None = None, title: str | None = None, width: int = 320,
            color: str | None = None) -> int:
        nid = len(self.nodes) + 1
        widgets = dict(widgets or {})
        node = {"id": nid, "type": ntype, "pos": list(pos), "flags": {}, "order": 0, "mode": 0}
        if ntype in FRONTEND_ONLY:
            text = widgets.pop("text")
            lines = sum(1 + len(l) // 60 for l in text.splitlines())
            node.update(size=[width, 40 + 17 * lines], inputs=[], outputs=[],
                        properties={}, widgets_values=[text], color="#432", bgcolor="#653")
            self.nodes.append(node)
            return nid
        spec = self._spec(ntype)
        values = []
        for name, opts in self.widget_names(ntype):
            v = widgets.pop(name) if name in widgets else opts.get("default", _first_option(opts))
            values.append(v)
            if opts.get("control_after_generate") or (name in ("seed", "noise_seed") and _type_opts(
                    _find_input(spec, name))[0] == "INT"):
                values.append(widgets.pop(f"{name}:control", "fixed"))
            if any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload")):
                values.append("image")
        if widgets:
            raise KeyError(f"{ntype}: unknown widgets {sorted(widgets)}")
        inputs = []
        for section in ("required", "optional"):
            for name in spec.get("input_order", {}).get(section, []):
                t, _ = _type_opts(spec["input"][section][name])
                if t not in WIDGET_TYPES:
                    inputs.append({"name": name, "type": t, "link": None})
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (t, n) in enumerate(zip(spec["output"], spec["output_name"]))]
        n_rows = max(len(inputs), len(outputs)) + len(values)
        node.update(size=[width, 46 + 24 * n_rows], inputs=inputs, outputs=outputs,
                    properties={"Node name for S&R": ntype,
                                "cnr_id": "wanquant" if ntype.startswith(OUR_PREFIX) else "comfy-core"},
                    widgets_values=values)
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color, _darker(color)
        self.nodes.append(node)
        return nid

    def bottom(self, nid: int, gap: int = 50) -> int:
        n = self.nodes[nid - 1]
        return n["pos"][1] + n["size"][1] + gap

    def link(self, src: int, out_name: str, dst: int, in_name: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        oi = next(i for i, o in enumerate(s["outputs"]) if o["name"] == out_name)
        otype = s["outputs"][oi]["type"]
        slot = next((i for i, x in enumerate(d["inputs"]) if x["name"] == in_name), None)
        if slot is None:  # a widget turned into a socket
            spec = self._spec(d["type"])
            t, _ = _type_opts(_find_input(spec, in_name))
            d["inputs"].append({"name": in_name, "type": t, "widget": {"name": in_name}, "link": None})
            slot = len(d["inputs"]) - 1
        lid = len(self.links) + 1
        d["inputs"][slot]["link"] = lid
        s["outputs"][oi]["links"].append(lid)
        self.links.append([lid, src, oi, dst, slot, otype])

    def group(self, title: str, ids: list[int], color: str = "#3f789e") -> None:
        xs = [self.nodes[i - 1]["pos"][0] for i in ids]
        ys = [self.nodes[i - 1]["pos"][1] for i in ids]
        x2 = [self.nodes[i - 1]["pos"][0] + self.nodes[i - 1]["size"][0] for i in ids]
        y2 = [self.nodes[i - 1]["pos"][1] + self.nodes[i - 1]["size"][1] for i in ids]
        self.groups.append({"id": len(self.groups) + 1, "title": title, "color": color, "font_size": 24, "flags": {},
                            "bounding": [min(xs) - 20, min(ys) - 60, max(x2) - min(xs) + 40, max(y2) - min(ys) + 80]})

    def to_json(self, name: str) -> dict:
        # execution order as the frontend stores it: a topological order of the links
        deps = {n["id"]: set() for n in self.nodes}
        for _, s, _, d, _, _ in self.links:
            deps[d].add(s)
        order, done = [], set()
        while len(order) < len(self.nodes):
            ready = sorted(n for n, ds in deps.items() if n not in done and ds <= done)
            order += ready
            done |= set(ready)
        for n in self.nodes:
            n["order"] = order.index(n["id"])
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "wanquant/" + name)), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [40, 60]}, "frontendVersion": "1.49.6"}, "version": 0.4}


def _type_opts(entry):
    t = entry[0]
    opts = dict(entry[1]) if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if isinstance(t, list):
        opts["options"] = t
        t = "COMBO"
    return t, opts


def _find_input(spec, name):
    for section in ("required", "optional"):
        if name in spec["input"].get(section, {}):
            return spec["input"][section][name]
    raise KeyError(name)


def _first_option(opts):
    o = opts.get("options") or [None]
    return o[0]


def _darker(color: str) -> str:
    c = color.lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    r, g, b = (int(c[i:i + 2], 16) for i in (0, 2, 4))
    return "#%02x%02x%02x" % (int(r * 0.7), int(g * 0.7), int(b * 0.7))


OURS = "#2a5a4a"  # our nodes stand out in the graph


# ------------------------------------------------------------------ shared pieces

def text_encoding(g: Graph, x: int, y: int, positive: str):
    clip = g.add("CLIPLoader", (x, y), {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                        "device": "default"}, title="Load umt5 (text encoder)")
    pos = g.add("CLIPTextEncode", (x + 360, y - 60), {"text": positive}, title="Positive prompt", width=420)
    neg = g.add("CLIPTextEncode", (x + 360, y + 180), {"text": NEG}, title="Negative prompt", width=420)
    g.link(clip, "CLIP", pos, "clip")
    g.link(clip, "CLIP", neg, "clip")
    return pos, neg


def sampler_tail(g: Graph, model: int, pos_src, neg_src, latent_src, x: int, y: int, *, shift: float, steps: int,
                 cfg: float, sampler: str, scheduler: str, vae: int, fps: float, prefix: str, seed: int = 42):
    ms = g.add("ModelSamplingSD3", (x, y - 140), {"shift": shift}, title=f"Shift {shift:g}")
    g.link(model[0], model[1], ms, "model")
    ks = g.add("KSampler", (x, y), {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                                    "scheduler": scheduler, "denoise": 1.0})
    g.link(ms, "MODEL", ks, "model")
    g.link(*pos_src, ks, "positive")
    g.link(*neg_src, ks, "negative")
    g.link(*latent_src, ks, "latent_image")
    dec = g.add("VAEDecode", (x + 360, y), width=220)
    g.link(ks, "LATENT", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    save = g.add("SaveAnimatedWEBP", (x + 360, y + 120), {"filename_prefix": prefix, "fps": fps, "lossless": False,
                                                          "quality": 90, "method": "default"}, width=420)
    g.link(dec, "IMAGE", save, "images")
    return ks, dec, save


def report_preview(g: Graph, loader: int, pos, title="Loader report (formats, ops per layer)"):
    p = g.add("PreviewAny", pos, title=title, width=420)
    g.link(loader, "report", p, "source")
    return p


# ------------------------------------------------------------------ the workflows

def wf_t2v_fp8(info):
    g = Graph(info)
    note = g.add("MarkdownNote", (20, 20), {"text": md(
        "## Wan2.1-T2V-14B, scaled fp8, with wanquant",
        "The fp8 file is read as it is published; **Load Wan DiT (quantized)** picks the linear op for your GPU "
        "(fp8 tensor cores with per-call activation scaling on SM 8.9+, dequantize-on-the-fly on Ampere/CPU) "
        "and prints a per-layer report.",
        "", "**Downloads** (run from the folder that holds `ComfyUI/`):",
        code("\n".join([DL_T2V, DL_T5, DL_VAE])),
        "Settings: 832x480, 33 frames, 30 steps, CFG 6, uni_pc/simple, shift 8 (Wan2.1 T2V defaults); "
        "raise length to 81 for 5 s at 16 fps.")}, width=520)
    y = g.bottom(note)
    dit = g.add("WanQuantLoadDiT", (20, y), {"model_name": "wan2.1_t2v_14B_fp8_scaled.safetensors"},
                title="Load Wan DiT (quantized)", color=OURS)
    report_preview(g, dit, (20, g.bottom(dit, 30)))
    pos, neg = text_encoding(g, 580, 140, "A red fox trotting through fresh snow at dawn, soft golden light, "
                                          "cinematic, shallow depth of field")
    vae = g.add("VAELoader", (580, 560), {"vae_name": "wan_2.1_vae.safetensors"})
    lat = g.add("EmptyHunyuanLatentVideo", (580, 700), {"width": 832, "height": 480, "length": 33, "batch_size": 1})
    sampler_tail(g, (dit, "MODEL"), (pos, "CONDITIONING"), (neg, "CONDITIONING"), (lat, "LATENT"), 1400, 260,
                 shift=8.0, steps=30, cfg=6.0, sampler="uni_pc", scheduler="simple", vae=vae, fps=16,
                 prefix="wanquant/t2v_fp8")
    return g


def wf_vista4d(info):
    g = Graph(info)
    note = g.add("MarkdownNote", (20, 20), {"text": md(
        "## Vista4D reshoot: a video from a new camera path (Vista4D fp8 over Wan2.1-T2V-14B)",
        "Pick the fp8 release's `*.index.json` as **model_name** and the Wan2.1-T2V-14B file as **base_name**; the "
        "loader overlays it and, with `latent_encoder`, `cam_encoder` and `projector` present, builds the Vista4D "
        "model (the report says so).",
        "**Inputs**: the source video, and its per-frame **depth as a video you provide** (made with any depth node "
        "pack, e.g. Depth Anything: bright = near). No depth, pose or segmentation model is bundled; the source "
        "camera is assumed static (locked-off) unless you give an upstream `.npz` of its poses, and every pixel "
        "counts as dynamic unless you connect a mask. Both videos are scaled to 672x384 and cut to 49 frames.",
        "**Camera**: a preset (orbit, pan, dolly, crane) or an upstream `cameras_tgt.npz`. The renderer splats the "
        "point cloud into the target cameras (plain torch); the conditioning node encodes source and render, packs "
        "the alpha/motion masks, makes the Plücker rays and sets them on positive *and* negative.",
        "", "**Downloads**:", code("\n".join([DL_VISTA, DL_T2V, DL_T5, DL_VAE])),
        "Settings (upstream): 672x384 (384p49), 49 frames, 50 steps, CFG 5, shift 5.")}, width=560)
    y = g.bottom(note)
    dit = g.add("WanQuantLoadDiT", (20, y), {
        "model_name": "vista4d-fp8/384p49_step=30000-fp8/diffusion_pytorch_model.safetensors.index.json",
        "base_name": "wan2.1_t2v_14B_fp8_scaled.safetensors"}, title="Load Vista4D over its base", color=OURS,
        width=420)
    report_preview(g, dit, (20, g.bottom(dit, 30)))
    frames = {}
    for i, (name, title) in enumerate((("source.mp4", "Source video"), ("source_depth.mp4", "Source depth video"))):
        yy = 20 + i * 330
        vid = g.add("LoadVideo", (620, yy), {"file": name}, title=title)
        comps = g.add("GetVideoComponents", (900, yy), width=240)
        g.link(vid, "VIDEO", comps, "video")
        sc = g.add("ImageScale", (1160, yy), {"upscale_method": "lanczos", "width": 672, "height": 384,
                                               "crop": "center"})
        g.link(comps, "images", sc, "image")
        cut = g.add("ImageFromBatch", (1160, yy + 170), {"batch_index": 0, "length": 49}, title="First 49 frames")
        g.link(sc, "IMAGE", cut, "image")
        frames[name] = cut
    cam = g.add("WanQuantVista4DCamera", (1440, 20), {"preset": "orbit", "amount": 20.0, "pivot_depth": 0.0,
                                                      "camera_file": ""}, title="Target camera", color=OURS, width=360)
    rnd = g.add("WanQuantVista4DRender", (1440, 260), {"depth_kind": "inverse (bright = near)", "near": 1.0,
                                                       "far": 10.0, "fov": 60.0, "source_camera_file": ""},
                title="Point-cloud render", color=OURS, width=360)
    g.link(frames["source.mp4"], "IMAGE", rnd, "source")
    g.link(frames["source_depth.mp4"], "IMAGE", rnd, "depth")
    g.link(cam, "camera", rnd, "camera")
    prev = g.add("PreviewImage", (1840, 20), title="Render preview", width=360)
    g.link(rnd, "render", prev, "images")
    pos, neg = text_encoding(g, 620, 760, "A skateboarder carves down an empty concrete bowl, late afternoon sun")
    vae = g.add("VAELoader", (620, 1180), {"vae_name": "wan_2.1_vae.safetensors"})
    cond = g.add("WanQuantVista4DConditioning", (1440, 700), title="Vista4D conditioning", color=OURS, width=360)
    g.link(dit, "MODEL", cond, "model")
    g.link(pos, "CONDITIONING", cond, "positive")
    g.link(neg, "CONDITIONING", cond, "negative")
    g.link(vae, "VAE", cond, "vae")
    g.link(frames["source.mp4"], "IMAGE", cond, "source")
    g.link(rnd, "render", cond, "render")
    g.link(rnd, "alpha", cond, "alpha")
    g.link(rnd, "motion", cond, "motion")
    g.link(rnd, "cameras", cond, "cameras")
    sampler_tail(g, (dit, "MODEL"), (cond, "positive"), (cond, "negative"), (cond, "latent"), 1900, 520,
                 shift=5.0, steps=50, cfg=5.0, sampler="euler", scheduler="simple", vae=vae, fps=16,
                 prefix="wanquant/vista4d_reshoot")
    return g

def i2v_front(g: Graph, x: int, y: int, width: int, height: int, length: int, image: str, positive: str):
    pos, neg = text_encoding(g, x, y, positive)
    vae = g.add("VAELoader", (x, y + 420), {"vae_name": "wan_2.1_vae.safetensors"})
    cv = g.add("CLIPVisionLoader", (x, y + 540), {"clip_name": "clip_vision_h.safetensors"})
    img = g.add("LoadImage", (x, y + 660), {"image": image}, title="Start image")
    enc = g.add("CLIPVisionEncode", (x + 360, y + 540), {"crop": "none"})
    g.link(cv, "CLIP_VISION", enc, "clip_vision")
    g.link(img, "IMAGE", enc, "image")
    i2v = g.add("WanImageToVideo", (x + 800, y + 300), {"width": width, "height": height, "length": length,
                                                        "batch_size": 1})
    g.link(pos, "CONDITIONING", i2v, "positive")
    g.link(neg, "CONDITIONING", i2v, "negative")
    g.link(vae, "VAE", i2v, "vae")
    g.link(enc, "CLIP_VISION_OUTPUT", i2v, "clip_vision_output")
    g.link(img, "IMAGE", i2v, "start_image")
    return i2v, vae


def wf_worldstereo(info):
    g = Graph(info)
    note = g.add("MarkdownNote", (20, 20), {"text": md(
        "## WorldStereo fp8 (Wan2.1-I2V-14B-480P backbone)",
        "WorldStereo's release is kijai-style scaled fp8 in **diffusers** key names (`attn1.to_q`, `ffn.net.0.proj`). "
        "wanquant maps them to native Wan keys while loading; the `controlnet.*` camera/scene branch is kept aside "
        "and listed in the report (core ComfyUI has no node that feeds it), so this is plain image-to-video with "
        "WorldStereo's backbone.",
        "", "**Downloads**:", code("\n".join([DL_WS, DL_T5, DL_VAE, DL_CLIPV])),
        "Settings: 832x480, 33 frames. memory-dmd is DMD-distilled: few steps without CFG (4 steps, CFG 1, "
        "euler/simple, shift 5 here); the repo's config.json lists the upstream sampling settings.")}, width=560)
    y = g.bottom(note)
    dit = g.add("WanQuantLoadDiT", (20, y), {"model_name": "WorldStereo-memory-dmd-fp8_e4m3fn_scaled.safetensors"},
                title="Load WorldStereo (fp8, diffusers keys)", color=OURS, width=420)
    report_preview(g, dit, (20, g.bottom(dit, 30)))
    i2v, vae = i2v_front(g, 620, 140, 832, 480, 33, "example.png",
                         "The camera slowly orbits a stone lighthouse on a cliff, waves breaking below")
    sampler_tail(g, (dit, "MODEL"), (i2v, "positive"), (i2v, "negative"), (i2v, "latent"), 1900, 400,
                 shift=5.0, steps=4, cfg=1.0, sampler="euler", scheduler="simple", vae=vae, fps=16,
                 prefix="wanquant/worldstereo_fp8")
    return g


def wf_nvfp4(info):
    g = Graph(info)
    note = g.add("MarkdownNote", (20, 20), {"text": md(
        "## Wan2.1-I2V-14B-480P lightx2v 4-step, NVFP4/MXFP8 + error-compensation LoRA",
        "The file mixes NVFP4, MXFP8 and bf16 layers (ComfyUI-native `comfy_quant`). Its rank-64 LoRA, extracted by "
        "convert_to_quant, restores part of the quantization error: keep it at strength 1.0. **Apply LoRA (quantized "
        "Wan)** runs it *on the fly* (added after dequantization), so it is not lost again by requantizing to 4 bit.",
        "NVFP4 matmuls need a Blackwell GPU (SM 10+/12) **and** a CUDA 13 torch with comfy-kitchen's CUDA backend; "
        "anywhere else wanquant dequantizes these layers on the fly (slower, same result).",
        "", "**Downloads**:", code("\n".join([DL_NVFP4, DL_T5, DL_VAE, DL_CLIPV])),
        "Settings from the model card (seed 003): **LCM sampler, normal scheduler, CFG 1.0, 4 steps, shift 5.0**; "
        "81 frames at 832x480 (33 here to start quickly). euler/simple and heun/linear_quadratic also work.")},
        width=600)
    y = g.bottom(note)
    dit = g.add("WanQuantLoadDiT", (20, y), {"model_name": NVFP4_FILE}, title="Load Wan DiT (NVFP4 mix)",
                color=OURS, width=460)
    lora = g.add("WanQuantApplyLoRA", (20, g.bottom(dit, 30)), {"lora_name": NVFP4_LORA, "strength": 1.0,
                                                                 "mode": "on the fly"},
                 title="Error-compensation LoRA (rank 64)", color=OURS, width=460)
    g.link(dit, "MODEL", lora, "model")
    report_preview(g, dit, (20, g.bottom(lora, 30)))
    report_preview(g, lora, (520, g.bottom(lora, 30)), title="LoRA report (matched keys)")
    i2v, vae = i2v_front(g, 660, 120, 832, 480, 33, "example.png",
                         "A woman in a yellow raincoat turns toward the camera and smiles, rain falling, city lights")
    sampler_tail(g, (lora, "MODEL"), (i2v, "positive"), (i2v, "negative"), (i2v, "latent"), 1940, 380,
                 shift=5.0, steps=4, cfg=1.0, sampler="lcm", scheduler="normal", vae=vae, fps=16,
                 prefix="wanquant/i2v_nvfp4_4step")
    return g


def wf_animate(info):
    g = Graph(info)
    W, H, L = 480, 832, 77
    note = g.add("MarkdownNote", (20, 20), {"text": md(
        "## Wan2.2-Animate-14B FP4 + lightx2v distill LoRA (6 steps)",
        "Character image + driving video -> the character performs the motion. The FP4 (E2M1, group 32, "
        "diffusers keys) transformer is loaded by wanquant (`quantize_config.json` beside it gives the nibble "
        "order); the distill LoRA (ComfyUI spelling with `diff_b`/`diff_m`, which core LoRA loaders partly skip) is "
        "applied by **Apply LoRA (quantized Wan)** on the fly, exact on 4-bit weights. wanquant's pose nodes detect the "
        "dancer (YOLOv10m + ViTPose wholebody, onnxruntime) and draw the pose video and 512x512 face crops that core "
        "**WanAnimateToVideo** expects. Use the same width/height on the detection node and on WanAnimateToVideo.",
        "", "**Downloads**:", code("\n".join([DL_ANIM, DL_DISTILL, DL_T5, DL_VAE, DL_CLIPV])), DL_POSE,
        "", "Settings (model card): 480x832 portrait, 16 fps, **6 steps**, CFG 1.0, shift 5.0, euler/simple. "
        "Put your driving video and character image into ComfyUI/input.")}, width=640)
    # models
    y = g.bottom(note)
    dit = g.add("WanQuantLoadDiT", (20, y), {"model_name": ANIM_FILE}, title="Load Wan2.2-Animate FP4",
                color=OURS, width=420)
    report_preview(g, dit, (480, y))
    lora = g.add("WanQuantApplyLoRA", (20, g.bottom(dit, 30)), {"lora_name": DISTILL_LORA, "strength": 1.0,
                                                                 "mode": "on the fly"},
                 title="lightx2v distill LoRA (rank 64)", color=OURS, width=440)
    g.link(dit, "MODEL", lora, "model")
    report_preview(g, lora, (480, g.bottom(lora, 30)), title="LoRA report (matched keys)")
    # inputs
    vid = g.add("LoadVideo", (700, 20), {"file": "dance.mp4"}, title="Driving video")
    comps = g.add("GetVideoComponents", (1060, 20), width=260)
    g.link(vid, "VIDEO", comps, "video")
    ref = g.add("LoadImage", (700, 380), {"image": "character.png"}, title="Character image")
    # pose preprocessing (ours)
    pm = g.add("WanQuantPoseModelLoader", (1060, 200), title="Pose models (Wan-Animate)", color=OURS, width=380)
    det = g.add("WanQuantPoseDetect", (1480, 20), {"width": W, "height": H, "retarget": False, "pose_batch_size": 8,
                                                   "face_padding": 0, "upstream_compat": False,
                                                   "keep_models_loaded": False},
                title="Pose & face detection (Wan-Animate)", color=OURS, width=380)
    g.link(pm, "models", det, "models")
    g.link(comps, "images", det, "images")
    g.link(ref, "IMAGE", det, "reference_image")
    draw = g.add("WanQuantDrawPose", (1480, 420), title="Draw pose (Wan-Animate)", color=OURS, width=380)
    g.link(det, "pose_data", draw, "pose_data")
    info_p = g.add("PreviewAny", (1060, 420), title="Pose info", width=380)
    g.link(det, "info", info_p, "source")
    # text / vision / vae
    pos, neg = text_encoding(g, 1000, 720, "A person dancing energetically, full body, clean background")
    vae = g.add("VAELoader", (1000, 1140), {"vae_name": "wan_2.1_vae.safetensors"})
    cv = g.add("CLIPVisionLoader", (1000, 1260), {"clip_name": "clip_vision_h.safetensors"})
    enc = g.add("CLIPVisionEncode", (1360, 1260), {"crop": "none"})
    g.link(cv, "CLIP_VISION", enc, "clip_vision")
    g.link(ref, "IMAGE", enc, "image")
    anim = g.add("WanAnimateToVideo", (1900, 300), {"width": W, "height": H, "length": L, "batch_size": 1,
                                                    "continue_motion_max_frames": 5, "video_frame_offset": 0},
                 width=360)
    g.link(pos, "CONDITIONING", anim, "positive")
    g.link(neg, "CONDITIONING", anim, "negative")
    g.link(vae, "VAE", anim, "vae")
    g.link(enc, "CLIP_VISION_OUTPUT", anim, "clip_vision_output")
    g.link(ref, "IMAGE", anim, "reference_image")
    g.link(det, "face_video", anim, "face_video")
    g.link(draw, "pose_video", anim, "pose_video")
    ms = g.add("ModelSamplingSD3", (2320, 120), {"shift": 5.0}, title="Shift 5")
    g.link(lora, "MODEL", ms, "model")
    ks = g.add("KSampler", (2320, 260), {"seed": 42, "steps": 6, "cfg": 1.0, "sampler_name": "euler",
                                         "scheduler": "simple", "denoise": 1.0})
    g.link(ms, "MODEL", ks, "model")
    g.link(anim, "positive", ks, "positive")
    g.link(anim, "negative", ks, "negative")
    g.link(anim, "latent", ks, "latent_image")
    trim = g.add("TrimVideoLatent", (2320, 620), {"trim_amount": 0}, width=300)
    g.link(ks, "LATENT", trim, "samples")
    g.link(anim, "trim_latent", trim, "trim_amount")
    dec = g.add("VAEDecode", (2680, 260), width=220)
    g.link(trim, "LATENT", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    save = g.add("SaveAnimatedWEBP", (2680, 380), {"filename_prefix": "wanquant/animate_fp4_6step", "fps": 16,
                                                   "lossless": False, "quality": 90, "method": "default"}, width=400)
    g.link(dec, "IMAGE", save, "images")
    prev = g.add("SaveAnimatedWEBP", (1900, 760), {"filename_prefix": "wanquant/animate_pose", "fps": 16,
                                                   "lossless": False, "quality": 80, "method": "default"},
                 title="Pose video (check before sampling)", width=360)
    g.link(draw, "pose_video", prev, "images")
    return g


def wf_utils(info):
    g = Graph(info)
    note = g.add("MarkdownNote", (20, 20), {"text": md(
        "## Inspect / convert / remap",
        "**Inspect** reads a checkpoint's header only: container, key style, model family and the format of every "
        "layer, plus what is missing (e.g. a partial finetune that needs its base). Same as `wanquant inspect FILE`.",
        "**Remap / convert** builds the model exactly as the loader does (diffusers -> native keys, partial finetune "
        "over its base) and, with **save_as** set, writes a ComfyUI-native file into models/diffusion_models that "
        "stock ComfyUI's *Load Diffusion Model* can open. fp8 payloads are copied bit for bit; FP4 group-32 layers "
        "become **fp4_target**. Same as `wanquant convert SRC DST [--base BASE] [--to ...]`.",
        "", "**Downloads** (only the files you inspect or convert):",
        code("\n".join([DL_VISTA, DL_T2V, DL_WS, DL_ANIM])))}, width=620)
    a = g.add("WanQuantInspect", (680, 20), {"model_name": "vista4d-fp8/384p49_step=30000-fp8/"
                                                           "diffusion_pytorch_model.safetensors.index.json"},
              title="Inspect Vista4D (sharded, partial)", color=OURS, width=460)
    b = g.add("WanQuantInspect", (680, 200), {"model_name": ANIM_FILE}, title="Inspect Animate FP4", color=OURS,
              width=460)
    c = g.add("WanQuantRemap", (1180, 20), {
        "model_name": "vista4d-fp8/384p49_step=30000-fp8/diffusion_pytorch_model.safetensors.index.json",
        "base_name": "wan2.1_t2v_14B_fp8_scaled.safetensors", "save_as": "vista4d_384p49_full_fp8",
        "fp4_target": "float8_e4m3fn"}, title="Vista4D + base -> one native fp8 file", color=OURS, width=460)
    d = g.add("WanQuantRemap", (1180, 300), {"model_name": "WorldStereo-memory-dmd-fp8_e4m3fn_scaled.safetensors",
                                             "save_as": "worldstereo_memory_dmd_native_fp8"},
              title="WorldStereo diffusers keys -> native", color=OURS, width=460)
    e = g.add("WanQuantRemap", (1180, 580), {"model_name": ANIM_FILE, "save_as": "wan2.2_animate_14B_fp8_from_fp4",
                                             "fp4_target": "float8_e4m3fn"},
              title="Animate FP4 group-32 -> fp8 (stock ComfyUI can load it)", color=OURS, width=460)
    for i, src in enumerate((a, b)):
        p = g.add("PreviewAny", (680, 420 + 260 * i), title="Inspect report", width=460)
        g.link(src, "report", p, "source")
    for i, src in enumerate((c, d, e)):
        p = g.add("PreviewAny", (1680, 20 + 280 * i), title="Remap report", width=460)
        g.link(src, "report", p, "source")
    return g


WORKFLOWS = {
    "wanquant_wan2.1_t2v_14B_fp8": wf_t2v_fp8,
    "wanquant_vista4d_fp8_over_wan2.1_t2v": wf_vista4d,
    "wanquant_worldstereo_fp8_i2v": wf_worldstereo,
    "wanquant_wan2.1_i2v_nvfp4_lightx2v_4step": wf_nvfp4,
    "wanquant_wan2.2_animate_fp4_distill_6step": wf_animate,
    "wanquant_inspect_convert_remap": wf_utils,
}


# ------------------------------------------------------------------ thumbnails

def thumbnail(wf: dict, path: Path, size=(640, 400)) -> None:
    """A picture of the graph: nodes as boxes (ours in green, notes in brown), links as curves."""
    from PIL import Image, ImageDraw, ImageFont

    nodes = wf["nodes"]
    x0 = min(n["pos"][0] for n in nodes) - 30
    y0 = min(n["pos"][1] for n in nodes) - 30
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + 30
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + 30
    s = min(size[0] / (x1 - x0), size[1] / (y1 - y0))
    ox = (size[0] - (x1 - x0) * s) / 2
    oy = (size[1] - (y1 - y0) * s) / 2

    def P(x, y):
        return ox + (x - x0) * s, oy + (y - y0) * s

    im = Image.new("RGB", size, "#1e1e1e")
    d = ImageDraw.Draw(im)
    for gx in range(0, size[0], 16):
        d.line([(gx, 0), (gx, size[1])], fill="#232323")
    for gy in range(0, size[1], 16):
        d.line([(0, gy), (size[0], gy)], fill="#232323")
    byid = {n["id"]: n for n in nodes}
    colors = {"MODEL": "#b39ddb", "CONDITIONING": "#ffa931", "LATENT": "#ff9cf9", "IMAGE": "#64b5f6",
              "VAE": "#ff6e6e", "CLIP": "#ffd500", "STRING": "#77ff77"}
    for _, a, _, b, _, t in wf["links"]:
        na, nb = byid[a], byid[b]
        p0 = P(na["pos"][0] + na["size"][0], na["pos"][1] + 20)
        p3 = P(nb["pos"][0], nb["pos"][1] + 20)
        dx = max(20.0, (p3[0] - p0[0]) / 2)
        pts = []
        for i in range(21):
            u = i / 20
            x = (1 - u) ** 3 * p0[0] + 3 * (1 - u) ** 2 * u * (p0[0] + dx) + 3 * (1 - u) * u ** 2 * (p3[0] - dx) + u ** 3 * p3[0]
            y = (1 - u) ** 3 * p0[1] + 3 * (1 - u) ** 2 * u * p0[1] + 3 * (1 - u) * u ** 2 * p3[1] + u ** 3 * p3[1]
            pts.append((x, y))
        d.line(pts, fill=colors.get(t, "#9e9e9e"), width=2)
    try:
        font = ImageFont.load_default(size=max(9, int(15 * s * 2.2)))
    except TypeError:  # old Pillow
        font = ImageFont.load_default()
    for n in nodes:
        a, b = P(*n["pos"]), P(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        if n["type"] in FRONTEND_ONLY:
            fill, head = "#4a3b2a", "#6b5540"
        elif n["type"].startswith(OUR_PREFIX):
            fill, head = "#24453a", "#2f7a5f"
        else:
            fill, head = "#353535", "#4a4a4a"
        d.rounded_rectangle([a, b], radius=4, fill=fill, outline="#111111")
        hb = (b[0], a[1] + max(8, 26 * s))
        d.rounded_rectangle([a, hb], radius=4, fill=head)
        label = n.get("title") or n["type"]
        d.text((a[0] + 4, a[1] + 1), label, fill="#eeeeee", font=font)
    title = wf.get("_title", "")
    if title:
        d.rectangle([0, size[1] - 24, size[0], size[1]], fill="#101010")
        d.text((8, size[1] - 20), title, fill="#ffffff", font=ImageFont.load_default())
    im.save(path, "JPEG", quality=88)


# ------------------------------------------------------------------ main

def snapshot_from(url: str) -> dict:
    """The /object_info entries of every node type the workflows use (notes are frontend-only)."""
    info = json.loads(urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=120).read())
    types = {n["type"] for fn in WORKFLOWS.values() for n in fn(info).nodes} - FRONTEND_ONLY
    return {t: info[t] for t in sorted(types)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", metavar="URL", help="refresh the object_info snapshot from a running ComfyUI first")
    ap.add_argument("--no-thumbnails", action="store_true")
    args = ap.parse_args(argv)
    if args.snapshot:
        snap = snapshot_from(args.snapshot)
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
        print(f"wrote {SNAPSHOT} ({len(snap)} node types)")
    info = json.loads(SNAPSHOT.read_text())
    thumbnails = not args.no_thumbnails
    for name, fn in WORKFLOWS.items():
        wf = fn(info).to_json(name)
        (HERE / f"{name}.json").write_text(json.dumps(wf, indent=1, ensure_ascii=False) + "\n")
        if thumbnails:
            try:
                thumbnail(dict(wf, _title=name), HERE / f"{name}.jpg")
            except ImportError:
                thumbnails = False
                print("Pillow is not installed: thumbnails (.jpg) not rendered; `pip install -e '.[dev]'` "
                      "(or `pip install Pillow`) and run this again to refresh them", file=sys.stderr)
        print("wrote", name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
