"""The pose nodes inside a real headless ComfyUI (skips without COMFYUI_PATH).

Fake ONNX models (tests/pose/onnx_fakes.py) go into the server's models/detection; a prompt
runs EmptyImage -> loader -> detection -> draw, and core GetImageSize + PreviewAny report the
shapes and strings back through the history, so the check is on what ComfyUI really passed on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pose"))
from onnx_fakes import gaussian_maps, vitpose_const, yolo  # noqa: E402

W, H, T = 832, 480, 3
# a plausible standing skeleton in heatmap coordinates (48x64), every keypoint visible
BLOBS = {0: (24, 8), 1: (23, 7), 2: (25, 7), 3: (22, 8), 4: (26, 8), 5: (20, 14), 6: (28, 14), 7: (18, 22),
         8: (30, 22), 9: (17, 30), 10: (31, 30), 11: (21, 32), 12: (27, 32), 13: (21, 44), 14: (27, 44),
         15: (21, 56), 16: (27, 56), 17: (20, 59), 18: (19, 59), 19: (21, 58), 20: (28, 59), 21: (29, 59),
         22: (27, 58)}
BLOBS.update({23 + i: (21 + (i % 9) * 0.7, 5 + (i // 9) * 0.8) for i in range(68)})
BLOBS.update({91 + i: (15 + (i % 4), 29 + i // 4) for i in range(21)})
BLOBS.update({112 + i: (32 + (i % 4), 29 + i // 4) for i in range(21)})


@pytest.fixture(scope="module")
def server(comfy_server):
    det = comfy_server.models / "detection"
    yolo(det / "wq_fake_det.onnx", [[200, 80, 440, 560, 0.9, 0]])
    vitpose_const(det / "wq_fake_vitpose.onnx", gaussian_maps(BLOBS))
    (det / "wq_fake_data.bin").write_bytes(b"\0" * 16)           # must never be offered
    (det / "wq_broken.onnx").write_bytes(b"not a protobuf" * 10)
    ckpt = comfy_server.models / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "wq_not_a_checkpoint.onnx").write_bytes(b"\0" * 16)   # must stay out of checkpoint lists
    (ckpt / "wq_listed.safetensors").write_bytes(b"\0" * 16)      # proves the listing is live
    return comfy_server


def prompt(detector="wq_fake_det.onnx", pose="wq_fake_vitpose.onnx", retarget=False):
    p = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 640, "height": 360, "batch_size": T, "color": 0x808080}},
        "2": {"class_type": "WanQuantPoseModelLoader",
              "inputs": {"detector": detector, "pose_model": pose, "provider": "auto", "verify_hash": True}},
        "3": {"class_type": "WanQuantPoseDetect",
              "inputs": {"models": ["2", 0], "images": ["1", 0], "width": W, "height": H, "retarget": retarget,
                         "pose_batch_size": 2, "face_padding": 0, "upstream_compat": False,
                         "keep_models_loaded": False}},
        "4": {"class_type": "WanQuantDrawPose",
              "inputs": {"pose_data": ["3", 0], "body_stick_width": -1, "hand_stick_width": -1,
                         "draw_head": True, "fit": "letterbox"}},
        "5": {"class_type": "GetImageSize", "inputs": {"image": ["4", 0]}},
        "6": {"class_type": "GetImageSize", "inputs": {"image": ["3", 1]}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
        "12": {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}},
        "13": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
        "14": {"class_type": "PreviewAny", "inputs": {"source": ["6", 1]}},
        "15": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
        "16": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "17": {"class_type": "PreviewAny", "inputs": {"source": ["3", 4]}},
        "18": {"class_type": "PreviewAny", "inputs": {"source": ["3", 3]}},
    }
    if retarget:
        p["7"] = {"class_type": "EmptyImage", "inputs": {"width": 300, "height": 500, "batch_size": 1,
                                                        "color": 0xFFFFFF}}
        p["3"]["inputs"]["reference_image"] = ["7", 0]
    return p


def text(entry, node):
    return entry["outputs"][node]["text"][0]


def test_nodes_registered_with_onnx_only_combos(server):
    info = server.get_json("/object_info")
    for node in ("WanQuantPoseModelLoader", "WanQuantPoseDetect", "WanQuantDrawPose"):
        assert node in info, server.log()[-3000:]
        assert info[node]["category"] == "wanquant/pose"
    det_opts = info["WanQuantPoseModelLoader"]["input"]["required"]["detector"][1]["options"]
    assert det_opts[0] == "yolov10m (auto-download)"
    assert "wq_fake_det.onnx" in det_opts and "wq_fake_data.bin" not in det_opts
    # .onnx was added to the detection folder only, not to ComfyUI's shared extension set
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    ckpt_opts = ckpts[1]["options"] if isinstance(ckpts[1], dict) and "options" in ckpts[1] else ckpts[0]
    assert "wq_listed.safetensors" in ckpt_opts and "wq_not_a_checkpoint.onnx" not in ckpt_opts
    # every input carries a tooltip
    for node in ("WanQuantPoseModelLoader", "WanQuantPoseDetect", "WanQuantDrawPose"):
        spec = info[node]["input"]
        for group in ("required", "optional"):
            for name, (_, opts) in spec.get(group, {}).items():
                assert opts.get("tooltip"), f"{node}.{name} has no tooltip"
    # the outputs feed WanAnimateToVideo's IMAGE inputs
    wan = info["WanAnimateToVideo"]["input"]["optional"]
    assert wan["pose_video"][0] == "IMAGE" and wan["face_video"][0] == "IMAGE"
    assert info["WanQuantDrawPose"]["output"] == ["IMAGE"]
    assert info["WanQuantPoseDetect"]["output"][1] == "IMAGE"


@pytest.mark.parametrize("retarget", [False, True])
def test_detect_then_draw_gives_wan_animate_shapes(server, retarget):
    entry = server.run_prompt(prompt(retarget=retarget))
    assert entry["status"]["status_str"] == "success", str(entry["status"])[:3000] + server.log()[-3000:]
    assert (text(entry, "10"), text(entry, "11"), text(entry, "12")) == (str(W), str(H), str(T))
    assert (text(entry, "13"), text(entry, "14"), text(entry, "15")) == ("512", "512", str(T))
    assert "CPUExecutionProvider" in text(entry, "16")
    report = text(entry, "17")
    assert f"{T} frames 640x360" in report and "no person (full-frame fallback): none" in report
    assert text(entry, "18").startswith("[[")


def test_corrupt_model_file_fails_with_its_name(server):
    entry = server.run_prompt(prompt(pose="wq_broken.onnx"))
    assert entry["status"]["status_str"] == "error"
    msgs = str(entry["status"]["messages"])
    assert "wq_broken.onnx" in msgs and "133" in msgs
