"""ComfyUI V3 nodes for Wan2.2-Animate pose preprocessing: thin wrappers over ``wanquant.pose``.

Three nodes: load the detector + ViTPose models (downloading and verifying them on first use),
detect pose and face over an IMAGE batch, and draw the pose video. Detection and drawing are
separate so restyling the skeleton reuses ComfyUI's cache instead of re-running the models. The
outputs plug straight into core ``WanAnimateToVideo``: ``pose_video`` at exactly its
width x height, ``face_video`` as 512x512 crops with the same frame count.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from comfy_api.latest import io

import comfy.utils
import folder_paths

from ..errors import WanquantError
from ..pose import models as pose_models
from ..pose.pipeline import PoseData, PoseOptions, PosePipeline, render_frame
from ..pose.sessions import PoseModelSet

log = logging.getLogger(__name__)

CATEGORY = "wanquant/pose"
FOLDER = "detection"
MAX_RES = 16384
PoseModelType = io.Custom("WANQUANT_POSE_MODEL")
PoseDataType = io.Custom("WANQUANT_POSE")


def register_detection_folder() -> None:
    """Make ``models/detection`` list ``.onnx`` files (ComfyUI registers it for .pt/.safetensors only).

    Idempotent and compatible with other packs doing the same; replaces the extension set with
    a new one instead of adding to ComfyUI's shared ``supported_pt_extensions``."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    new = pose_models.extensions_with_onnx(exts)
    if new is not None:
        folder_paths.folder_names_and_paths[FOLDER] = (paths, new)
    folder_paths.filename_list_cache.pop(FOLDER, None)


register_detection_folder()


def _local_onnx() -> list[str]:
    try:
        return pose_models.onnx_choices(folder_paths.get_filename_list(FOLDER))
    except Exception:  # listing must never break the schema
        log.debug("could not list %s models", FOLDER, exc_info=True)
        return []


def _device_id() -> int:
    try:
        import comfy.model_management as mm
        dev = mm.get_torch_device()
        return int(dev.index or 0) if getattr(dev, "type", "") == "cuda" else 0
    except Exception:
        return 0


def _resolve(choice: str, verify_hash: bool):
    spec = pose_models.spec_for_choice(choice)
    if spec is not None:
        folders = folder_paths.get_folder_paths(FOLDER)
        total = sum(f.size for f in spec.files)
        pbar = comfy.utils.ProgressBar(total)
        return pose_models.ensure_model(spec, folders, verify_hash,
                                        progress=lambda done, _t: pbar.update_absolute(min(done, total), total))
    try:
        path = folder_paths.get_full_path_or_raise(FOLDER, choice)
    except FileNotFoundError as exc:
        raise WanquantError(f"model '{choice}' is not in the {FOLDER} folders",
                            expected=", ".join(folder_paths.get_folder_paths(FOLDER))) from exc
    path = pose_models.resolve_user_path(path)
    pose_models.check_user_file(path, verify_hash)
    return path


def _frame_getter(images: torch.Tensor):
    """IMAGE [B,H,W,C] float 0..1 -> frame i as RGB uint8, converted with rounding one frame at a time."""
    def get(i: int) -> np.ndarray:
        f = images[i]
        if f.shape[-1] == 1:
            f = f.expand(-1, -1, 3)
        f = f[..., :3].float().clamp(0, 1).mul(255).round().to(torch.uint8)
        return np.ascontiguousarray(f.cpu().numpy())
    return get


class WanQuantPoseModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        local = _local_onnx()
        return io.Schema(
            node_id="WanQuantPoseModelLoader",
            display_name="Pose models (Wan-Animate)",
            category=CATEGORY,
            description="Loads the YOLOv10m person detector and a ViTPose wholebody model as ONNX. "
                        "'(auto-download)' entries are fetched once from Hugging Face into models/detection "
                        "and verified by sha256; a file you picked by name is used as is.",
            inputs=[
                io.Combo.Input("detector", options=pose_models.choices("detector") + local,
                               default=pose_models.choices("detector")[0],
                               tooltip="Person detector. Wan uses YOLOv10m (61.7 MB, AGPL-3.0, downloaded "
                                       "from Wan-AI/Wan2.2-Animate-14B on first use)."),
                io.Combo.Input("pose_model", options=pose_models.choices("pose") + local,
                               default=pose_models.choices("pose")[0],
                               tooltip="ViTPose wholebody (133 keypoints). H is what Wan uses (2.5 GB); L, B and "
                                       "S are lighter and less accurate. A Wan 'vitpose_h_wholebody.onnx' folder "
                                       "is listed as its end2end.onnx."),
                io.Combo.Input("provider", options=["auto", "cuda", "cpu"], default="auto",
                               tooltip="onnxruntime execution provider. auto = CUDA when onnxruntime-gpu offers "
                                       "it, else CPU. The provider actually used is shown in 'info'."),
                io.Boolean.Input("verify_hash", default=True,
                                 tooltip="Check the sha256 of catalog files (once; cached next to the file)."),
            ],
            outputs=[PoseModelType.Output(display_name="models"), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, detector, pose_model, provider, verify_hash) -> io.NodeOutput:
        det_path = _resolve(detector, verify_hash)
        pose_path = _resolve(pose_model, verify_hash)
        handle = PoseModelSet(det_path, pose_path, provider, _device_id())
        det, pose = handle.open()  # validates I/O now, so a wrong file fails here with its name
        info = (f"detector: {det_path.name} on {', '.join(det.providers)}\n"
                f"pose: {pose_path.name} on {', '.join(pose.providers)}")
        log.info("pose models ready: %s", info.replace("\n", "; "))
        return io.NodeOutput(handle, info)


class WanQuantPoseDetect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantPoseDetect",
            display_name="Pose & face detection (Wan-Animate)",
            category=CATEGORY,
            description="Detects the dancer in every frame, estimates 133 wholebody keypoints with ViTPose "
                        "(batched) and crops the face at 512x512 for WanAnimateToVideo's face_video. "
                        "Retargeting ('simplified' mode) rescales the driving skeleton to the reference "
                        "character's bone lengths; it needs front-facing poses with extended limbs in both "
                        "the reference and the first frame.",
            inputs=[
                PoseModelType.Input("models", tooltip="From 'Pose models (Wan-Animate)'."),
                io.Image.Input("images", tooltip="Driving video frames at their native size (no resize needed; "
                                                 "sharper frames give better face crops)."),
                io.Int.Input("width", default=832, min=16, max=MAX_RES, step=16,
                             tooltip="Generation width; use the same value as WanAnimateToVideo."),
                io.Int.Input("height", default=480, min=16, max=MAX_RES, step=16,
                             tooltip="Generation height; use the same value as WanAnimateToVideo."),
                io.Boolean.Input("retarget", default=False,
                                 tooltip="Retarget the pose onto the reference image's proportions (needs "
                                         "reference_image)."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="The character image, as given to WanAnimateToVideo. It is centre-cropped "
                                       "and resized to width x height exactly as that node does."),
                io.Int.Input("pose_batch_size", default=8, min=1, max=256,
                             tooltip="ViTPose crops per model call; larger is faster on GPU."),
                io.Int.Input("face_padding", default=0, min=0, max=512,
                             tooltip="Extra pixels around each face box (clamped to the frame)."),
                io.Boolean.Input("upstream_compat", default=False,
                                 tooltip="Bit-parity with Wan's script: feed ViTPose BGR (Wan's accidental channel "
                                         "swap) and run NMS across all classes before picking the person."),
                io.Boolean.Input("keep_models_loaded", default=False,
                                 tooltip="Keep the ONNX sessions (ViTPose-H ~2.5 GB outside torch) for the next "
                                         "run instead of freeing them."),
            ],
            outputs=[
                PoseDataType.Output(display_name="pose_data"),
                io.Image.Output(display_name="face_video"),
                io.String.Output(display_name="bboxes"),
                io.String.Output(display_name="face_bboxes"),
                io.String.Output(display_name="info"),
            ],
        )

    @classmethod
    def execute(cls, models, images, width, height, retarget, pose_batch_size, face_padding,
                upstream_compat, keep_models_loaded, reference_image=None) -> io.NodeOutput:
        if images is None or images.ndim != 4 or images.shape[0] == 0:
            raise WanquantError("the image batch is empty", file="images", expected="IMAGE [B,H,W,3] with B >= 1",
                                found="no frames" if images is None else str(tuple(images.shape)))
        if retarget and reference_image is None:
            raise WanquantError("retarget is on but no reference_image is connected", file="reference_image",
                                expected="an IMAGE")
        ref = None
        if retarget:
            prepared = comfy.utils.common_upscale(reference_image[:1, :, :, :3].movedim(-1, 1), width, height,
                                                  "area", "center").movedim(1, -1)
            ref = _frame_getter(prepared)(0)
        det, pose = models.open()
        pipe = PosePipeline(det, pose, PoseOptions(upstream_compat=upstream_compat, pose_batch_size=pose_batch_size,
                                                   face_padding=face_padding))
        total = int(images.shape[0])
        pbar = comfy.utils.ProgressBar(total)
        try:
            data, faces = pipe.run(total, _frame_getter(images), (width, height), ref,
                                   progress=lambda done, t: pbar.update_absolute(done, t))
        finally:
            if not keep_models_loaded:
                models.release()
        face_video = torch.from_numpy(faces).float().div_(255.0)
        bboxes = json.dumps([[round(float(v), 2) for v in b[:4]] + [round(float(b[4]), 4)] for b in data.bboxes])
        face_bboxes = json.dumps([list(map(int, b)) for b in data.face_boxes])
        info = data.report()
        log.info("pose detection: %s", info.replace("\n", "; "))
        return io.NodeOutput(data, face_video, bboxes, face_bboxes, info)


class WanQuantDrawPose(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantDrawPose",
            display_name="Draw pose (Wan-Animate)",
            category=CATEGORY,
            description="Draws the skeleton video in Wan's style at the detection node's width x height, "
                        "ready for WanAnimateToVideo's pose_video.",
            inputs=[
                PoseDataType.Input("pose_data", tooltip="From 'Pose & face detection (Wan-Animate)'."),
                io.Int.Input("body_stick_width", default=-1, min=-1, max=100,
                             tooltip="Body limb half-width in pixels; -1 = Wan's formula (from the canvas size), "
                                     "0 = no body."),
                io.Int.Input("hand_stick_width", default=-1, min=-1, max=100,
                             tooltip="Hand line thickness; -1 = Wan's formula, 0 = no hands."),
                io.Boolean.Input("draw_head", default=True,
                                 tooltip="Draw nose, eyes and ears (and the neck-nose limb)."),
                io.Combo.Input("fit", options=["letterbox", "crop"], default="letterbox",
                               tooltip="How a skeleton drawn at the source frame size is fitted to width x height "
                                       "when the aspects differ: letterbox (Wan) or centre crop (as ComfyUI crops "
                                       "images). Retargeted poses are drawn at the target size directly."),
            ],
            outputs=[io.Image.Output(display_name="pose_video")],
        )

    @classmethod
    def execute(cls, pose_data: PoseData, body_stick_width, hand_stick_width, draw_head, fit) -> io.NodeOutput:
        if not isinstance(pose_data, PoseData):
            raise WanquantError("pose_data is not wanquant pose data", expected="WANQUANT_POSE",
                                found=type(pose_data).__name__)
        width, height = pose_data.target_size
        total = len(pose_data)
        out = torch.empty((total, height, width, 3), dtype=torch.float32)
        pbar = comfy.utils.ProgressBar(total)
        for i in range(total):
            img = render_frame(pose_data, i, width, height, fit, body_stick_width, hand_stick_width, draw_head)
            out[i] = torch.from_numpy(img).float().div_(255.0)
            pbar.update_absolute(i + 1, total)
        return io.NodeOutput(out)


NODES = [WanQuantPoseModelLoader, WanQuantPoseDetect, WanQuantDrawPose]
