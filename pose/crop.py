"""The ViTPose input crop: a 3:4 window around the person, padded by 1.25, black outside.

Reproduces Wan's ``bbox_from_detector`` + ``crop``: the window edges are *rounded* integers
(half to even) while decoding later uses the unrounded centre and size, exactly as the model's
published numbers were produced. The window is filled from the frame where they overlap and
left black elsewhere, then stretched to the model input with bilinear sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PADDING = 1.25
MIN_BOX = 10
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# (v/255 - mean)/std == v*SCALE + OFFSET, folded once.
_SCALE = (1.0 / (255.0 * STD)).astype(np.float32)
_OFFSET = (-MEAN / STD).astype(np.float32)


@dataclass(frozen=True)
class CropBox:
    """Unrounded crop centre and size (pixels) plus the rounded window that was sampled."""
    cx: float
    cy: float
    wc: float
    hc: float

    @property
    def window(self) -> tuple[int, int, int, int]:
        """(X0, Y0, X1, Y1) with Python's half-to-even round, at least one pixel each way."""
        x0 = int(round(self.cx - self.wc / 2))
        x1 = int(round(self.cx + self.wc / 2))
        y0 = int(round(self.cy - self.hc / 2))
        y1 = int(round(self.cy + self.hc / 2))
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def crop_box(box, width: int, height: int, input_hw: tuple[int, int] = (256, 192)) -> CropBox:
    """Person box -> crop centre/size. Missing, score <= 0 or < 10 px boxes use the whole frame."""
    if box is None or box[4] <= 0 or (box[2] - box[0]) < MIN_BOX or (box[3] - box[1]) < MIN_BOX:
        x1, y1, x2, y2 = 0.0, 0.0, float(width), float(height)
    else:
        x1, y1, x2, y2 = (float(v) for v in box[:4])
    ar = input_hw[0] / input_hw[1]
    size = max((x2 - x1) * ar, y2 - y1)
    hc = PADDING * size
    wc = hc / ar
    return CropBox((x1 + x2) / 2, (y1 + y2) / 2, wc, hc)


def crop_window(frame: np.ndarray, cb: CropBox) -> np.ndarray:
    """The rounded window as float32 (H,W,3), black where it leaves the frame."""
    x0, y0, x1, y1 = cb.window
    h, w = frame.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0, frame.shape[2]), dtype=np.float32)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = frame[sy0:sy1, sx0:sx1]
    return out


def crop_input(frame: np.ndarray, cb: CropBox, input_hw: tuple[int, int] = (256, 192),
               bgr: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """Frame (RGB uint8) -> normalised model input (3,h,w) float32.

    ``bgr=True`` feeds the channels reversed, which is what Wan's pipeline actually does
    (POSE.md §5.2; the model was trained on RGB, so it is an opt-in compatibility switch)."""
    win = crop_window(frame, cb)
    img = cv2.resize(win, (input_hw[1], input_hw[0]), interpolation=cv2.INTER_LINEAR)
    if img.ndim == 2:
        img = img[:, :, None]
    if out is None:
        out = np.empty((3,) + tuple(input_hw), dtype=np.float32)
    order = (2, 1, 0) if bgr else (0, 1, 2)
    for c, src in enumerate(order):  # normalise straight into the CHW batch slot
        np.multiply(img[:, :, src], _SCALE[c], out=out[c])
        out[c] += _OFFSET[c]
    return out
