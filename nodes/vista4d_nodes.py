"""Vista4D reshoot nodes: target camera → point-cloud render → conditioning for the Vista4D model.

The math is in ``vista4d/`` (no ComfyUI); these nodes only move ComfyUI's IMAGE/MASK/VAE/
CONDITIONING values in and out and check that frame counts and sizes agree, so a mismatch is one
message naming the input instead of a shape error deep inside sampling.
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..errors import WanquantError
from ..vista4d import camera as cam
from ..vista4d import streams

log = logging.getLogger(__name__)

CameraPath = io.Custom("WANQUANT_VISTA4D_CAMERA")   # a trajectory request (preset or file)
TargetCameras = io.Custom("WANQUANT_VISTA4D_CAMERAS")  # resolved per-frame target c2w + intrinsics
DEPTH_KINDS = ("inverse (bright = near)", "depth (bright = far)")
CAT = "wanquant/vista4d"


class WanQuantVista4DCamera(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantVista4DCamera", display_name="Vista4D target camera (wanquant)", category=CAT,
            description="The camera path to reshoot along: a parameterised preset relative to the source camera, "
                        "or an upstream Vista4D cameras_tgt.npz (cam_c2w f×4×4, intrinsics f×4, in the "
                        "reconstruction's frame).",
            inputs=[
                io.Combo.Input("preset", options=[*cam.PRESETS, "file"], default="orbit",
                               tooltip="orbit: around a point pivot_depth ahead; pan: yaw in place; dolly: forward "
                                       "(negative: back); crane: up (negative: down); static: the source camera; "
                                       "file: camera_file."),
                io.Float.Input("amount", default=20.0, min=-360.0, max=360.0, step=0.5,
                               tooltip="orbit/pan: degrees by the last frame; dolly/crane: distance as a "
                                       "multiple of the pivot depth."),
                io.Float.Input("pivot_depth", default=0.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Distance of the orbit pivot (and the unit of dolly/crane) in depth units; "
                                       "0 = the median depth of the first frame."),
                io.String.Input("camera_file", default="",
                                tooltip="Path of an upstream cameras_tgt.npz; used when preset is 'file'."),
            ],
            outputs=[CameraPath.Output(display_name="camera")],
        )

    @classmethod
    def execute(cls, preset, amount, pivot_depth, camera_file):
        if preset == "file" and not camera_file.strip():
            raise WanquantError("preset 'file' needs camera_file", expected="path of a cameras_tgt.npz", found="empty")
        return io.NodeOutput({"preset": preset, "amount": amount, "pivot_depth": pivot_depth,
                              "file": camera_file.strip()})


def _depth(depth_image: torch.Tensor, kind: str, near: float, far: float) -> torch.Tensor:
    """IMAGE (0..1, channel 0) of a depth node → metric-like depth between near and far."""
    if not 0 < near < far:
        raise WanquantError("depth range must satisfy 0 < near < far", expected="0 < near < far", found=f"{near}, {far}")
    d = depth_image[..., 0].double().clamp(0, 1)
    if kind == DEPTH_KINDS[0]:
        return 1.0 / (1.0 / far + d * (1.0 / near - 1.0 / far))
    return near + d * (far - near)


def _frames(name, t, f, h, w):
    if t.shape[0] != f or tuple(t.shape[1:3]) != (h, w):
        raise WanquantError(f"{name} does not match the source video", expected=f"{f} frames of {w}x{h}",
                            found=f"{t.shape[0]} frames of {t.shape[2]}x{t.shape[1]}")


class WanQuantVista4DRender(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantVista4DRender", display_name="Vista4D point-cloud render (wanquant)", category=CAT,
            description="Lifts the source video to a 4-D point cloud with per-frame depth and renders it from the "
                        "target camera (plain torch: unprojection, bilinear splatting, z-buffer), with the alpha "
                        "and motion masks Vista4D expects. No depth model is bundled: connect any depth node.",
            inputs=[
                io.Image.Input("source", tooltip="The source video frames (1 + 4k frames, width and height "
                                                 "multiples of 16, e.g. 49 frames of 672x384)."),
                io.Image.Input("depth", tooltip="Per-frame depth maps, same frames and size (e.g. Depth Anything)."),
                CameraPath.Input("camera"),
                io.Combo.Input("depth_kind", options=list(DEPTH_KINDS), default=DEPTH_KINDS[0],
                               tooltip="inverse: relative disparity, bright = near (Depth Anything, MiDaS); "
                                       "depth: bright = far."),
                io.Float.Input("near", default=1.0, min=0.001, max=1000.0, step=0.1,
                               tooltip="Depth of the brightest (inverse) / darkest (depth) value."),
                io.Float.Input("far", default=10.0, min=0.002, max=10000.0, step=0.1,
                               tooltip="Depth of the darkest (inverse) / brightest (depth) value."),
                io.Float.Input("fov", default=60.0, min=1.0, max=170.0, step=1.0,
                               tooltip="Horizontal field of view of the source camera (degrees), used when no "
                                       "source camera file is given; the target uses the same lens."),
                io.String.Input("source_camera_file", default="",
                                tooltip="Upstream-layout .npz of the source cameras (cam_c2w f×4×4, intrinsics f×4). "
                                        "Empty: a locked-off (static) camera is assumed."),
                io.Mask.Input("dynamic_mask", optional=True,
                              tooltip="Moving pixels (1) per frame, e.g. from a segmentation node. Default: "
                                      "everything dynamic (each frame's points live only in that frame)."),
            ],
            outputs=[io.Image.Output(display_name="render"), io.Mask.Output(display_name="alpha"),
                     io.Mask.Output(display_name="motion"), TargetCameras.Output(display_name="cameras")],
        )

    @classmethod
    def execute(cls, source, depth, camera, depth_kind, near, far, fov, source_camera_file, dynamic_mask=None):
        from ..vista4d.render import render_video

        f, h, w = source.shape[:3]
        streams.check_frames(f, "source video")
        _frames("depth", depth, f, h, w)
        if dynamic_mask is not None:
            _frames("dynamic_mask", dynamic_mask, f, h, w)
        z = _depth(depth, depth_kind, near, far)
        if source_camera_file.strip():
            c2w_src, intr_src = cam.load_npz(source_camera_file.strip(), f)
        else:
            c2w_src, intr_src = torch.eye(4, dtype=torch.float64).repeat(f, 1, 1), cam.intrinsics_from_fov(f, h, w, fov)
        if camera["preset"] == "file":
            c2w_tgt, intr_tgt = cam.load_npz(camera["file"], f)
        else:
            pivot = camera["pivot_depth"] or float(z[0].median())
            c2w_tgt = c2w_src @ cam.preset_motion(camera["preset"], f, camera["amount"], pivot)
            intr_tgt = intr_src.clone()
        dyn = None if dynamic_mask is None else dynamic_mask > 0.5
        args = (source[..., :3].float(), z, c2w_src, c2w_tgt, intr_src, intr_tgt, dyn)
        rgb, alpha, motion = _render_on_device(render_video, args, f)
        return io.NodeOutput(rgb.float(), alpha.float(), motion.float(),
                             {"c2w": c2w_tgt, "intrinsics": intr_tgt, "height": h, "width": w})


def _render_on_device(render_video, args, frames):
    """Render on ComfyUI's torch device (the GPU when there is one: a static-masked 81-frame clip
    draws every static point in every frame), one progress step per frame (ComfyUI's progress hook
    also stops an interrupted run there); a GPU without the memory for it falls back to the CPU."""
    import comfy.model_management as mm
    import comfy.utils

    device = mm.get_torch_device()
    pbar = comfy.utils.ProgressBar(frames)

    def run(dev):
        pbar.update_absolute(0, frames)
        return render_video(*args, device=dev, frame_done=lambda i: pbar.update_absolute(i + 1, frames))

    try:
        return run(device)
    except mm.OOM_EXCEPTION:
        if device.type == "cpu":
            raise
        log.warning("wanquant: Vista4D point-cloud render ran out of memory on %s; rendering on the CPU", device)
        mm.soft_empty_cache()
        return run(torch.device("cpu"))


class WanQuantVista4DConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantVista4DConditioning", display_name="Vista4D conditioning (wanquant)", category=CAT,
            description="Encodes the source video and the point-cloud render with the Wan VAE, packs the alpha/motion "
                        "masks pixel-to-channel and turns the target cameras into Plücker ray maps, then attaches "
                        "all of it to both positive and negative (upstream keeps the video/camera conditioning in "
                        "the negative pass; only the text differs). Outputs an empty latent of the right size.",
            inputs=[
                io.Model.Input("model", tooltip="The Vista4D model (loaded over Wan2.1-T2V-14B); checked here."),
                io.Conditioning.Input("positive"), io.Conditioning.Input("negative"),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE."),
                io.Image.Input("source", tooltip="Source video, the frames given to the renderer."),
                io.Image.Input("render", tooltip="Point-cloud render from 'Vista4D point-cloud render'."),
                io.Mask.Input("alpha", tooltip="Render alpha mask (1 = a point was drawn)."),
                io.Mask.Input("motion", tooltip="Render motion mask (1 = the drawn surface moves)."),
                TargetCameras.Input("cameras", tooltip="Target cameras from the renderer."),
                io.Mask.Input("source_motion", optional=True,
                              tooltip="Moving pixels of the source video; default: everything dynamic."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, source, render, alpha, motion, cameras, source_motion=None):
        if not getattr(model.model, "wanquant_vista4d", False):
            raise WanquantError("this model is not Vista4D: load the Vista4D DiT (with its latent_encoder, "
                                "cam_encoder and projector) over Wan2.1-T2V-14B with 'Load Wan DiT (wanquant)'",
                                expected="a Vista4D model", found=type(model.model).__name__)
        f, h, w = source.shape[:3]
        fl = streams.check_frames(f, "source video")
        if h % 16 or w % 16:
            raise WanquantError("Vista4D needs width and height multiples of 16", expected="e.g. 672x384",
                                found=f"{w}x{h}")
        _frames("render", render, f, h, w)
        _frames("alpha", alpha, f, h, w)
        _frames("motion", motion, f, h, w)
        if cameras["c2w"].shape[0] != f or (cameras["height"], cameras["width"]) != (h, w):
            raise WanquantError("target cameras do not match the source video", expected=f"{f} frames of {w}x{h}",
                                found=f"{cameras['c2w'].shape[0]} frames of {cameras['width']}x{cameras['height']}")
        ones = torch.ones(f, h, w)
        if source_motion is not None:
            _frames("source_motion", source_motion, f, h, w)
        rays = cam.plucker(cameras["intrinsics"], cameras["c2w"], h, w, h // 16, w // 16)
        value = {
            "source": vae.encode(source[..., :3]),
            "render": vae.encode(render[..., :3]),
            "source_mask": streams.pack_masks(ones, ones if source_motion is None else (source_motion > 0.5).float()),
            "render_mask": streams.pack_masks((alpha > 0.5).float(), (motion > 0.5).float()),
            "cam": streams.plucker_for_latents(rays).float()[None],
        }
        positive = [[t, {**d, "vista4d": value}] for t, d in positive]
        negative = [[t, {**d, "vista4d": value}] for t, d in negative]
        latent = torch.zeros(1, 16, fl, h // 8, w // 8)
        return io.NodeOutput(positive, negative, {"samples": latent})


NODES = [WanQuantVista4DCamera, WanQuantVista4DRender, WanQuantVista4DConditioning]
