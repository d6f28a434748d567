"""COCO-WholeBody 133 keypoints -> Wan's "AAPose" meta (body-20, two hands, face).

The body-20 layout is what Wan-Animate's pose encoder was trained on: rows are averages of two
COCO keypoints (the neck is the shoulder midpoint, each toe the big/small toe midpoint) and the
*whole row is averaged, score included*. Coordinates are normalised by the frame size. The face
block keeps Wan's 69 rows whose row 0 is keypoint 22 (the right heel); consumers use rows 1..68.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

BODY_A = np.array([0, 6, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 17, 20])
BODY_B = np.array([0, 5, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 18, 21])
BODY_NAMES = ("Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist",
              "RHip", "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar",
              "LToe", "RToe")
LHAND = slice(91, 112)
RHAND = slice(112, 133)
FACE = slice(22, 91)


@dataclass
class PoseMeta:
    """One frame's pose: every block ``(n, 3)`` = (x/W, y/H, score), frame size in pixels.

    ``raw`` keeps the 133 ViTPose keypoints in pixels and ``bbox`` the detector box
    (``[x1,y1,x2,y2,score]``, score -1 = full-frame fallback); both are None for metas that
    were produced by retargeting."""
    width: int
    height: int
    body: np.ndarray
    lhand: np.ndarray
    rhand: np.ndarray
    face: np.ndarray
    raw: np.ndarray | None = None
    bbox: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def copy(self) -> "PoseMeta":
        """A deep copy (retargeting and drawing must never change the caller's arrays)."""
        cp = lambda a: None if a is None else np.array(a, copy=True)  # noqa: E731
        return replace(self, body=cp(self.body), lhand=cp(self.lhand), rhand=cp(self.rhand),
                       face=cp(self.face), raw=cp(self.raw), bbox=cp(self.bbox), extra=dict(self.extra))

    def to_dict(self) -> dict:
        """JSON-friendly form (lists), for export and debugging."""
        d = {"width": int(self.width), "height": int(self.height),
             "keypoints_body": self.body.tolist(), "keypoints_left_hand": self.lhand.tolist(),
             "keypoints_right_hand": self.rhand.tolist(), "keypoints_face": self.face.tolist()}
        if self.bbox is not None:
            d["bbox"] = [float(v) for v in self.bbox]
        return d


def split_keypoints(kps: np.ndarray, width: int, height: int):
    """133x3 pixel keypoints -> normalised (body20, lhand21, rhand21, face69)."""
    k = np.array(kps, dtype=np.float64, copy=True)
    k[:, 0] /= width
    k[:, 1] /= height
    body = (k[BODY_A] + k[BODY_B]) / 2
    return body, k[LHAND].copy(), k[RHAND].copy(), k[FACE].copy()


def body_missing(body: np.ndarray) -> bool:
    """Wan's "no body" test: every body row has at least one negative coordinate."""
    return bool(body[:, :2].min(axis=1).max() < 0)


def metas_from_keypoints(kps: np.ndarray, width: int, height: int, bboxes=None,
                         prev_body: np.ndarray | None = None) -> tuple[list[PoseMeta], list[int], np.ndarray | None]:
    """``[N,133,3]`` pixel keypoints of consecutive frames -> metas.

    A frame whose body is missing reuses the previous frame's body (Wan's behaviour). Upstream
    raises ``NameError`` when that happens on the very first frame; here the frame keeps its
    own body. ``prev_body`` carries the last body across chunks. Returns the metas, the indices
    (within this call) whose body was replaced, and the body to carry into the next chunk."""
    metas, replaced = [], []
    for i, kp in enumerate(kps):
        body, lh, rh, face = split_keypoints(kp, width, height)
        if body_missing(body) and prev_body is not None:
            body = prev_body.copy()
            replaced.append(i)
        prev_body = body
        bbox = None if bboxes is None else np.asarray(bboxes[i], dtype=np.float64)
        metas.append(PoseMeta(width, height, body, lh, rh, face,
                              raw=np.asarray(kp, dtype=np.float64).copy(), bbox=bbox))
    return metas, replaced, prev_body
