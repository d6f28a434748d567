"""Per-clip orchestration: frames -> person box -> batched ViTPose -> metas, face crops, drawings.

Frames are pulled one at a time through a callback so the caller (the ComfyUI node) never has
to hold a second full copy of the clip. The detector graph has a static batch of 1, so it runs
frame by frame; ViTPose crops are batched (``pose_batch_size``), which is the big win on GPU.
Time spent inside the two models is accounted separately so the benchmark can report the cost
of everything else.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import WanquantError
from . import crop as cropmod
from . import decode as decodemod
from . import detect as detectmod
from . import draw as drawmod
from . import face as facemod
from .aapose import PoseMeta, metas_from_keypoints
from .resize import center_crop_resize, fit_image
from .retarget import retarget

log = logging.getLogger(__name__)


@dataclass
class PoseOptions:
    """Choices that change results. ``upstream_compat`` = Wan's BGR feed + class-agnostic NMS."""
    upstream_compat: bool = False
    pose_batch_size: int = 8
    face_padding: int = 0


@dataclass
class PoseData:
    """Everything the draw node and exports need, passed between nodes as ``WANQUANT_POSE``."""
    metas: list[PoseMeta]
    face_boxes: list[tuple[int, int, int, int]]
    bboxes: np.ndarray
    frame_size: tuple[int, int]
    target_size: tuple[int, int]
    options: dict
    retargeted: list[PoseMeta] | None = None
    reference: PoseMeta | None = None
    no_person_frames: list[int] = field(default_factory=list)
    body_fallback_frames: list[int] = field(default_factory=list)
    face_fallback_frames: list[int] = field(default_factory=list)
    providers: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.metas)

    @property
    def draw_metas(self) -> list[PoseMeta]:
        return self.retargeted if self.retargeted is not None else self.metas

    def report(self) -> str:
        """A short human-readable summary (shown in the node's info output)."""
        w, h = self.frame_size
        lines = [f"{len(self.metas)} frames {w}x{h}, target {self.target_size[0]}x{self.target_size[1]}"]
        for role, prov in self.providers.items():
            lines.append(f"{role}: {', '.join(prov)}")
        lines.append("no person (full-frame fallback): " + _ranges(self.no_person_frames))
        lines.append("body reused from previous frame: " + _ranges(self.body_fallback_frames))
        lines.append("face box borrowed from a neighbour: " + _ranges(self.face_fallback_frames))
        if self.retargeted is not None:
            lines.append(f"retargeted onto reference {self.reference.width}x{self.reference.height}")
        return "\n".join(lines)


def _ranges(idx: list[int]) -> str:
    """[0,1,2,5] -> '0-2, 5' ('none' when empty)."""
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in list(idx[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


class PosePipeline:
    """Detector + ViTPose models and the options; :meth:`run` processes a clip."""

    def __init__(self, detector, pose, options: PoseOptions | None = None):
        self.detector = detector
        self.pose = pose
        self.options = options or PoseOptions()
        self.model_seconds = 0.0

    def _timed_run(self, model, x):
        t0 = time.perf_counter()
        try:
            return model.run(x)
        finally:
            self.model_seconds += time.perf_counter() - t0

    def detect_box(self, frame: np.ndarray) -> np.ndarray:
        """The person box of one frame (``[x1,y1,x2,y2,score]``, score -1 = none found)."""
        h, w = frame.shape[:2]
        in_hw = self.detector.input_hw
        out = self._timed_run(self.detector, detectmod.preprocess(frame, in_hw))
        return detectmod.postprocess(out, w, h, in_hw, class_agnostic_nms=self.options.upstream_compat)

    def _pose_batch(self, batch: np.ndarray, boxes: list) -> np.ndarray:
        """Run ViTPose on ``[n,3,h,w]`` crops (respecting a static batch) and decode ``[n,133,3]``."""
        n = len(batch)
        static = self.pose.static_batch
        if static is None:
            heat = self._timed_run(self.pose, batch)
        else:
            parts = []
            for s in range(0, n, static):
                part = batch[s:s + static]
                if len(part) < static:
                    part = np.concatenate([part, np.zeros((static - len(part),) + part.shape[1:], part.dtype)])
                parts.append(self._timed_run(self.pose, part)[:min(static, n - s)])
            heat = np.concatenate(parts)
        centers = np.array([[b.cx, b.cy] for b in boxes])
        sizes = np.array([[b.wc, b.hc] for b in boxes])
        return decodemod.decode(heat, centers, sizes)

    def keypoints(self, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Frames of one size -> (``[n,133,3]`` pixel keypoints, ``[n,5]`` person boxes)."""
        in_hw = self.pose.input_hw
        bgr = self.options.upstream_compat
        batch = np.empty((len(frames), 3) + in_hw, dtype=np.float32)
        boxes, cbs = [], []
        for i, frame in enumerate(frames):
            h, w = frame.shape[:2]
            box = self.detect_box(frame)
            cb = cropmod.crop_box(box, w, h, in_hw)
            cropmod.crop_input(frame, cb, in_hw, bgr=bgr, out=batch[i])
            boxes.append(box)
            cbs.append(cb)
        return self._pose_batch(batch, cbs), np.array(boxes).reshape(len(frames), 5)

    def run(self, num_frames: int, get_frame: Callable[[int], np.ndarray],
            target_size: tuple[int, int] | None = None, reference: np.ndarray | None = None,
            progress: Callable[[int, int], None] | None = None) -> tuple[PoseData, np.ndarray]:
        """Process a clip; returns the pose data and the face crops ``[T,512,512,3]`` uint8.

        ``get_frame(i)`` yields frame i as RGB uint8 (H,W,3); every frame must have the size of
        frame 0. With ``reference`` (RGB uint8 of any size), the reference is centre-cropped and
        resized to ``target_size`` the way WanAnimateToVideo will, and every frame is retargeted
        into that space."""
        if num_frames <= 0:
            raise WanquantError("the image batch is empty", expected="at least one frame", found="0 frames")
        t_start = time.perf_counter()
        self.model_seconds = 0.0
        first = get_frame(0)
        height, width = first.shape[:2]
        target = tuple(target_size) if target_size else (width, height)
        bs = max(int(self.options.pose_batch_size), 1)
        metas: list[PoseMeta] = []
        bboxes, face_boxes, faces = [], [], np.empty((num_frames, 512, 512, 3), dtype=np.uint8)
        body_fallback, prev_body = [], None
        for start in range(0, num_frames, bs):
            idx = range(start, min(start + bs, num_frames))
            frames = [first if i == 0 else get_frame(i) for i in idx]
            for i, fr in zip(idx, frames):
                if fr.shape != first.shape:
                    raise WanquantError(f"frame {i} has another size than frame 0",
                                        expected=f"{width}x{height}", found=f"{fr.shape[1]}x{fr.shape[0]}")
            kps, boxes = self.keypoints(frames)
            chunk, replaced, prev_body = metas_from_keypoints(kps, width, height, boxes, prev_body)
            body_fallback += [start + r for r in replaced]
            for i, fr, meta in zip(idx, frames, chunk):
                fb = facemod.face_box(meta.face, width, height, self.options.face_padding)
                face_boxes.append(fb)
                if fb is not None:
                    faces[i] = facemod.crop_face(fr, fb)
            metas += chunk
            bboxes.append(boxes)
            if progress is not None:
                progress(idx[-1] + 1, num_frames)
        filled_boxes, face_fallback = facemod.fill_boxes(face_boxes, width, height)
        for i in face_fallback:
            faces[i] = facemod.crop_face(get_frame(i), filled_boxes[i])
        bboxes = np.concatenate(bboxes)
        no_person = [int(i) for i in np.nonzero(bboxes[:, 4] < 0)[0]]
        if no_person:
            log.warning("no person found in %d of %d frames (%s); those use the whole frame as the pose crop",
                        len(no_person), num_frames, _ranges(no_person))
        if face_fallback:
            log.warning("no usable face box in frames %s; borrowed a neighbouring frame's box", _ranges(face_fallback))
        data = PoseData(metas=metas, face_boxes=filled_boxes, bboxes=bboxes, frame_size=(width, height),
                        target_size=target, options=self.options.__dict__.copy(),
                        no_person_frames=no_person, body_fallback_frames=body_fallback,
                        face_fallback_frames=face_fallback,
                        providers={"detector": list(getattr(self.detector, "providers", [])),
                                   "pose": list(getattr(self.pose, "providers", []))})
        if reference is not None:
            data.reference, data.retargeted = self.retarget_to(reference, metas, target)
        total = time.perf_counter() - t_start
        data.timings = {"total_s": total, "model_s": self.model_seconds, "frames": num_frames}
        return data, faces

    def reference_meta(self, reference: np.ndarray, target: tuple[int, int]) -> PoseMeta:
        """Pose of the reference image as WanAnimateToVideo will see it (centre crop + resize)."""
        tw, th = target
        ref = center_crop_resize(np.ascontiguousarray(reference), th, tw)
        kps, boxes = self.keypoints([ref])
        if boxes[0, 4] < 0:
            raise WanquantError("no person was found in the reference image, so the pose cannot be "
                                "retargeted onto it; use a reference with a clearly visible full body or "
                                "turn retarget off", file="reference_image", expected="one person",
                                found="no person detection")
        metas, _, _ = metas_from_keypoints(kps, tw, th, boxes)
        return metas[0]

    def retarget_to(self, reference: np.ndarray, metas: list[PoseMeta], target: tuple[int, int]):
        ref_meta = self.reference_meta(reference, target)
        return ref_meta, retarget(metas[0], ref_meta, metas)


def render_frame(data: PoseData, i: int, width: int, height: int, fit: str = "letterbox",
                 body_stick_width: int = -1, hand_stick_width: int = -1, draw_head: bool = True) -> np.ndarray:
    """Frame i of the pose video at width x height (RGB uint8).

    Retargeted metas already live in the target space and are drawn there directly. Otherwise
    the skeleton is drawn on a canvas of the source frame size (Wan's stick widths follow that
    canvas) and then fitted to the target: letterbox (Wan's ``padding_resize``) or centre crop
    (what ComfyUI would do to the frames themselves)."""
    meta = data.draw_metas[i]
    if data.retargeted is not None:
        canvas = drawmod.draw_pose(meta, meta.width, meta.height, body_stick_width, hand_stick_width, draw_head)
    else:
        canvas = drawmod.draw_pose(meta, None, None, body_stick_width, hand_stick_width, draw_head)
    return fit_image(canvas, height, width, fit)
