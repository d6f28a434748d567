"""Image fitting rules shared by drawing and reference preparation.

Two conventions meet here: Wan's own ``padding_resize`` (aspect-preserving fit with centred
black bars, how Wan maps the drawn skeleton onto the reference size) and ComfyUI's
``common_upscale(..., "center")`` (centre crop to the target aspect, how ``WanAnimateToVideo``
treats every image it receives). Keypoints only line up with an image when the same geometry
is applied to both, so the geometry is exposed separately from the pixel resampling.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def padding_geometry(w0: int, h0: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Wan's letterbox: (new_w, new_h, left, top) of the resized image inside width x height.

    Mirrors Wan ``utils.padding_resize``: the side that limits the fit is taken exactly and
    the other is truncated with ``int``; the pad is ``int(diff / 2)``."""
    if h0 / w0 > height / width:
        nw = max(int(height / h0 * w0), 1)
        return nw, height, int((width - nw) / 2), 0
    nh = max(int(width / w0 * h0), 1)
    return width, nh, 0, int((height - nh) / 2)


def padding_resize(img: np.ndarray, height: int, width: int,
                   interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Aspect-preserving fit of ``img`` into height x width with centred black padding (uint8)."""
    h0, w0 = img.shape[:2]
    nw, nh, left, top = padding_geometry(w0, h0, width, height)
    out = np.zeros((height, width) + img.shape[2:], dtype=np.uint8)
    resized = img if (nw, nh) == (w0, h0) else cv2.resize(img, (nw, nh), interpolation=interpolation)
    out[top:top + nh, left:left + nw] = resized.reshape((nh, nw) + img.shape[2:])
    return out


def center_crop_box(w0: int, h0: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The (x, y, w, h) window ComfyUI's ``common_upscale(..., "center")`` keeps.

    ``x = round((w0 - w0 * new/old) / 2)`` columns (or rows) are cut from each side, with
    Python's half-to-even ``round`` exactly as ComfyUI does."""
    old_aspect = w0 / h0
    new_aspect = width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((w0 - w0 * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((h0 - h0 * (old_aspect / new_aspect)) / 2)
    return x, y, max(w0 - 2 * x, 1), max(h0 - 2 * y, 1)


def center_crop_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop to the target aspect, then resize (area when shrinking), like ComfyUI."""
    h0, w0 = img.shape[:2]
    x, y, cw, ch = center_crop_box(w0, h0, width, height)
    crop = img[y:y + ch, x:x + cw]
    if (cw, ch) == (width, height):
        return np.ascontiguousarray(crop)
    interp = cv2.INTER_AREA if cw * ch > width * height else cv2.INTER_LINEAR
    return cv2.resize(crop, (width, height), interpolation=interp)


def fit_image(img: np.ndarray, height: int, width: int, mode: str = "letterbox") -> np.ndarray:
    """Fit a drawn canvas to the generation size: ``letterbox`` (Wan) or ``crop`` (ComfyUI)."""
    if img.shape[:2] == (height, width):
        return img
    if mode == "letterbox":
        return padding_resize(img, height, width)
    if mode == "crop":
        return center_crop_resize(img, height, width)
    raise ValueError(f"unknown fit mode {mode!r}; expected 'letterbox' or 'crop'")


def resize_by_area(img: np.ndarray, area: float, divisor: int = 16) -> np.ndarray:
    """Wan's ``resize_by_area`` as it actually behaves (its search never runs, see POSE.md §10).

    Aspect-kept size with ``w*h ~= area``, each side floored to a multiple of ``divisor``
    (clamped to at least ``divisor``, a fix), then ``padding_resize``."""
    h, w = img.shape[:2]
    aspect = w / h
    nh = math.sqrt(area / aspect)
    nw = area / nh
    nh = max(int(nh // divisor * divisor), divisor)
    nw = max(int(nw // divisor * divisor), divisor)
    interp = cv2.INTER_AREA if nw * nh < w * h else cv2.INTER_LINEAR
    return padding_resize(img, nh, nw, interpolation=interp)
