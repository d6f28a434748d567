"""Wan families in a real ComfyUI: the family our report names is the one ComfyUI's own
model_detection builds, and every node our "to run:" lines name exists in the running ComfyUI.

Expected ComfyUI classes are written by hand from ``comfy/supported_models.py`` of ComfyUI 0.33.0
(commit 783545f6; 0.29.0, commit 4f874c5, has the same Wan classes but ``WAN_Animate2``).
In-process tests need ComfyUI's python; the node-name test uses the server.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from fixtures import tiny_wan
from wan_family_keys import extras, tensors

from wanquant.errors import WanquantError
from wanquant.loaders import synthetic as syn
from wanquant.loaders.family import recognise

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

ANIMATE2_CONFIG = {"config": json.dumps({"transformer": {"model_type": "animate2"}})}
FILES = {  # name: (tiny_wan kwargs, family keys, metadata, ComfyUI model_type, ComfyUI supported_models class)
    "s2v": (dict(in_dim=36), ("s2v",), None, "s2v", "WAN22_S2V"),
    "ti2v": (dict(in_dim=48, out_dim=48), (), None, "t2v", "WAN22_T2V"),
    "vace": (dict(), ("vace",), None, "vace", "WAN21_Vace"),
    "humo": (dict(in_dim=36), ("humo",), None, "humo", "WAN21_HuMo"),
    "cam21": (dict(in_dim=32, i2v=True), ("camera",), None, "camera", "WAN21_Camera"),
    "cam22": (dict(in_dim=36), ("camera",), None, "camera_2.2", "WAN22_Camera"),
    "fun21": (dict(in_dim=48, i2v=True), (), None, "i2v", "WAN21_FunControl2V"),
    "fun22": (dict(in_dim=52), ("ref_conv",), None, "t2v", "WAN21_T2V"),
    "i2v22": (dict(in_dim=36), (), None, "t2v", "WAN21_T2V"),
    "animate2": (dict(in_dim=36, i2v=True), (), ANIMATE2_CONFIG, "animate2", "WAN_Animate2"),
}


def _comfy_version() -> tuple[int, ...]:
    text = Path(os.environ["COMFYUI_PATH"], "comfyui_version.py").read_text()
    return tuple(int(x) for x in re.search(r'"(\d+)\.(\d+)\.(\d+)"', text).groups())


def _write(folder: Path, name: str) -> Path:
    kw, kinds, metadata, _, _ = FILES[name]
    sd = tiny_wan(seed=6, **kw)
    for kind in kinds:
        sd.update(tensors(kind, 256))
    return syn.save(sd, folder / f"{name}.safetensors", metadata=metadata)


@pytest.mark.parametrize("name", list(FILES))
def test_reported_family_is_what_comfyui_builds(comfy_inprocess, tmp_path, name):
    from wanquant.nodes.bridge import load_wan_model

    _, _, metadata, model_type, cls = FILES[name]
    path = _write(tmp_path, name)
    if name == "animate2" and _comfy_version() < (0, 33, 0):  # the config names a model 0.29 lacks
        with pytest.raises(WanquantError, match="could not detect the model type"):
            load_wan_model(str(path))
        return
    res = load_wan_model(str(path))
    config = res.patcher.model.model_config
    ours = recognise(res.canonical.shapes(), metadata)
    assert config.unet_config["model_type"] == model_type == ours.comfy_type
    assert type(config).__name__ == cls
    assert res.report_lines[0] == f"{path.name}: {ours.variant}"  # the loader node's report names it
    assert f"note: to run: {ours.needs}" in res.report_lines


NODE_NAME = re.compile(r"\b(?:Wan\w*To\w+|Wan\w*(?:Cache|Embedding|Latent)|Wan22\w+|WanQuant\w+|AudioEncoder\w+|"
                       r"TrimVideoLatent|SCAIL2ColoredMask|WanDancer\w+|KSamplerAdvanced)\b")


def _every_family_text() -> list[str]:
    shapes = {k: tuple(v.shape) for k, v in tiny_wan(in_dim=36).items()}
    texts = []
    for kinds, meta, kw in [((), None, {}), ((), ANIMATE2_CONFIG, {"i2v": True}), (("vace",), None, {}),
                            (("s2v",), None, {}), (("humo",), None, {}), (("animate",), None, {"i2v": True}),
                            (("camera",), None, {}), (("camera",), None, {"i2v": True})]:
        s = {k: tuple(v.shape) for k, v in tiny_wan(in_dim=36, **kw).items()}
        for kind in kinds:
            s.update(extras(kind, 256))
        fam = recognise(s, meta)
        texts += [fam.needs, *fam.notes]
    for in_dim, out_dim, i2v in [(16, 16, False), (36, 16, True), (48, 16, True), (52, 16, False), (48, 48, False)]:
        s = {k: tuple(v.shape) for k, v in tiny_wan(in_dim=in_dim, out_dim=out_dim, i2v=i2v).items()}
        fam = recognise(s)
        texts += [fam.needs, *fam.notes]
    flf = {k: tuple(v.shape) for k, v in tiny_wan(in_dim=36, i2v=True).items()}
    texts.append(recognise({**flf, "img_emb.emb_pos": (1, 514, 1280)}).needs)
    a14b = {k: tuple(5120 if d == 256 else d for d in v) for k, v in shapes.items()}  # the expert note
    texts += recognise(a14b).notes
    fam = recognise({**shapes, "patch_embedding_mask.weight": (256, 4, 1, 2, 2)})
    texts.append(fam.needs)
    fam = recognise({**shapes, "patch_embedding_global.weight": (256, 16, 1, 2, 2)})
    texts.append(fam.needs)
    return texts


def test_every_node_a_family_needs_exists(comfy_server):
    info = comfy_server.get_json("/object_info")
    named = sorted({n for t in _every_family_text() for n in NODE_NAME.findall(t)})
    assert {"WanSoundImageToVideo", "WanVaceToVideo", "Wan22FunControlToVideo", "KSamplerAdvanced",
            "WanAnimate2ToVideo", "WanFirstLastFrameToVideo"} <= set(named), named  # the pattern finds them
    animate2_only = {"WanAnimate2ToVideo", "WanAnimate2Cache"}
    missing = [n for n in named if n not in info]
    if _comfy_version() >= (0, 33, 0):
        assert missing == []
    else:  # 0.29: exactly what our note says it lacks
        assert set(missing) == animate2_only
