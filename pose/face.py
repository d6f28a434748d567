"""Face crops for Wan-Animate's face encoder (Wan ``utils.get_face_bboxes``).

The box is the 68 landmarks' extent grown to 1.3x the area with the aspect kept, shifted up
(three quarters of the vertical growth above the brows, where the forehead is) and clipped to
the frame; the crop is stretched to 512x512. Wan computes the growth as
``sqrt(area*w/h)``, which divides by zero for a degenerate face and then crashes on
``int(NaN)``; the closed form below is the same number without that failure, and frames
without a usable box borrow a neighbour's box instead of crashing.
"""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np

log = logging.getLogger(__name__)

FACE_SIZE = 512
AREA_SCALE = 1.3
_GROW = math.sqrt(AREA_SCALE) - 1.0
MIN_SIDE = 2


def face_box(face: np.ndarray, width: int, height: int, padding: int = 0):
    """Normalised face rows (69 x >=2, row 0 unused) -> ``(x1, y1, x2, y2)`` ints, or None.

    None means "no usable box": non-finite landmarks, or a box under 2 px in either axis
    after clipping (e.g. a face that was not detected and sits at negative coordinates)."""
    pts = np.asarray(face, dtype=np.float64)[1:, :2] * (width, height)
    if pts.size == 0 or not np.isfinite(pts).all():
        return None
    minx, miny = pts.min(axis=0)
    maxx, maxy = pts.max(axis=0)
    dw = (maxx - minx) * _GROW / 2
    dh = (maxy - miny) * _GROW / 4
    x1 = int(max(minx - dw, 0))
    x2 = int(min(maxx + dw, width))
    y1 = int(max(miny - 3 * dh, 0))
    y2 = int(min(maxy + dh, height))
    if padding:
        x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
        x2, y2 = min(x2 + padding, width), min(y2 + padding, height)
    if x2 - x1 < MIN_SIDE or y2 - y1 < MIN_SIDE:
        return None
    return x1, y1, x2, y2


def default_box(width: int, height: int):
    """Last-resort box: a centred square of 0.3*min(H,W) whose top is at 0.1*H (kijai's)."""
    s = max(int(0.3 * min(width, height)), 1)
    x1 = max((width - s) // 2, 0)
    y1 = min(int(0.1 * height), max(height - s, 0))
    return x1, y1, min(x1 + s, width), min(y1 + s, height)


def fill_boxes(boxes: list, width: int, height: int) -> tuple[list, list[int]]:
    """Replace None boxes: previous valid box, else the next valid one, else ``default_box``.

    Returns the completed list and the indices that were filled."""
    filled = [i for i, b in enumerate(boxes) if b is None]
    out = list(boxes)
    last = None
    for i, b in enumerate(out):
        if b is None:
            out[i] = last
        else:
            last = b
    nxt = None
    for i in range(len(out) - 1, -1, -1):
        if out[i] is None:
            out[i] = nxt
        else:
            nxt = out[i]
    out = [default_box(width, height) if b is None else b for b in out]
    return out, filled


def crop_face(frame: np.ndarray, box, size: int = FACE_SIZE) -> np.ndarray:
    """Stretch the box's pixels of the (undrawn, RGB uint8) frame to size x size."""
    x1, y1, x2, y2 = box
    patch = frame[y1:y2, x1:x2]
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)
