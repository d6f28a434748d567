"""Skeleton drawing in Wan's conventions (``draw_aapose_by_meta_new``, stick width "v2").

Wan-Animate's pose encoder was trained on these exact pictures: ellipse limbs at 60% of the
limb colour, filled circles on the 20 body points, the 21-point hands in an HSV edge palette
with blue joints, no face landmarks, no anti-aliasing, all on black. Colours are RGB (ComfyUI
IMAGE order). Threshold 0.5 on the raw heatmap scores.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

THRESHOLD = 0.5
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
         (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (13, 18), (10, 19))
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
          (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
          (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
          (200, 200, 0), (100, 100, 0))
LIMB_FILL = tuple(tuple(int(c * 0.6) for c in col) for col in COLORS)
HEAD_POINTS = (0, 14, 15, 16, 17)
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
              (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18),
              (18, 19), (19, 20))
# Upstream passes HSV(e/20,1,1)*255 as float colours and OpenCV rounds them; these are the
# values it actually paints (POSE.md §7.4), not naive rounding.
HAND_COLORS = ((255, 0, 0), (255, 77, 0), (255, 153, 0), (255, 229, 0), (204, 255, 0),
               (128, 255, 0), (51, 255, 0), (0, 255, 25), (0, 255, 102), (0, 255, 179),
               (0, 255, 255), (0, 178, 255), (0, 102, 255), (0, 25, 255), (51, 0, 255),
               (128, 0, 255), (204, 0, 255), (255, 0, 230), (255, 0, 153), (255, 0, 77))
HAND_POINT_COLOR = (0, 0, 255)


def stick_widths(width: int, height: int) -> tuple[int, int]:
    """Wan "v2" widths for a canvas: body ``max(int(m/200)-1, 1)``, hands ``max(body//2, 1)``."""
    m = min(width, height)
    sw = max(int(m / 200) - 1, 1)
    return sw, max(sw // 2, 1)


def _finite(*vals) -> bool:
    return all(math.isfinite(v) for v in vals)


def draw_body(canvas: np.ndarray, body: np.ndarray, sw: int, threshold: float = THRESHOLD) -> None:
    """Limbs (ellipses, fill 0.6x colour) then body points; ``body`` in canvas pixels + score."""
    for i, (a, b) in enumerate(LIMBS):
        xa, ya, pa = body[a]
        xb, yb, pb = body[b]
        if pa < threshold or pb < threshold or not _finite(xa, ya, xb, yb):
            continue
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        poly = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), sw),
                                int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, poly, LIMB_FILL[i])
    for k in range(len(body)):
        x, y, p = body[k]
        if p < threshold or not _finite(x, y):
            continue
        cv2.circle(canvas, (int(x), int(y)), sw, COLORS[k], thickness=-1)


def draw_hand(canvas: np.ndarray, hand: np.ndarray, hsw: int, threshold: float = THRESHOLD) -> None:
    """Hand edges (HSV palette) then joints (blue); like upstream, nothing at x or y < 1."""
    pts = []
    for x, y, p in hand:
        ok = p >= threshold and _finite(x, y)
        pts.append((int(x), int(y), ok) if ok else (0, 0, False))
    for e, (a, b) in enumerate(HAND_EDGES):
        x1, y1, oka = pts[a]
        x2, y2, okb = pts[b]
        if oka and okb and x1 > 0.01 and y1 > 0.01 and x2 > 0.01 and y2 > 0.01:
            cv2.line(canvas, (x1, y1), (x2, y2), HAND_COLORS[e], thickness=hsw)
    for x, y, ok in pts:
        if ok and x > 0.01 and y > 0.01:
            cv2.circle(canvas, (x, y), hsw, HAND_POINT_COLOR, thickness=-1)


def draw_pose(meta, width: int | None = None, height: int | None = None, body_stick_width: int = -1,
              hand_stick_width: int = -1, draw_head: bool = True, threshold: float = THRESHOLD) -> np.ndarray:
    """Draw one :class:`~.aapose.PoseMeta` on a black RGB uint8 canvas.

    The canvas defaults to the meta's own size (the frame size, or the target size for
    retargeted metas); normalised coordinates are scaled to it. ``-1`` widths use Wan's formula,
    ``hand_stick_width=0`` leaves the hands out, ``draw_head=False`` drops the nose, eyes and
    ears (and with the nose, the neck-nose limb)."""
    width = int(meta.width if width is None else width)
    height = int(meta.height if height is None else height)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    sw, hsw = stick_widths(width, height)
    if body_stick_width is not None and body_stick_width >= 0:
        sw = max(int(body_stick_width), 1) if body_stick_width > 0 else 0
    if hand_stick_width is not None and hand_stick_width >= 0:
        hsw = int(hand_stick_width)
    scale = np.array([width, height, 1.0])
    body = np.asarray(meta.body, dtype=np.float64) * scale
    if not draw_head:
        body[list(HEAD_POINTS), 2] = 0.0
    if sw > 0:
        draw_body(canvas, body, sw, threshold)
    if hsw > 0:
        draw_hand(canvas, np.asarray(meta.lhand, dtype=np.float64) * scale, hsw, threshold)
        draw_hand(canvas, np.asarray(meta.rhand, dtype=np.float64) * scale, hsw, threshold)
    return canvas
