"""ViTPose heatmaps -> keypoints with DARK ("unbiased") refinement, vectorised.

Same maths as Wan's ``keypoints_from_heatmaps(unbiased=True, kernel=11, use_udp=False)``:
argmax, Gaussian blur of each zero-padded map rescaled to its original maximum, log, then one
Newton step on the log-heatmap at the peak. Upstream blurs all 133 maps and loops over every
keypoint in Python; here the Taylor step is vectorised over all keypoints and the blur is only
evaluated on the 5x5 neighbourhood each step reads (see :func:`dark_refine` for why that is
exact), with a full blur, one OpenCV call over the maps stacked with zero gaps, only for the
rare maps that need their rescale factor.

One upstream bug is fixed: a map whose blurred maximum is <= 0 is not rescaled (upstream
divides by zero and gets NaN).
"""

from __future__ import annotations

import cv2
import numpy as np

KERNEL = 11
_BORDER = (KERNEL - 1) // 2


def blurred_maps(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blur every ``[N,K,h,w]`` map as if zero-padded by 5 on each side.

    Returns a ``[N*K,h,w]`` *view* of the blurred maps and each map's blurred maximum. The maps
    are stacked vertically with 5 zero rows between them and 5 zero columns on each side, so no
    11-tap window reaches a neighbouring map: the single ``GaussianBlur`` call equals the
    per-map loop. The rescale to the original maximum is left to the caller."""
    n, k, h, w = heatmaps.shape
    b = _BORDER
    m = n * k
    stride = h + b
    canvas = np.zeros((b + m * stride, w + 2 * b), dtype=np.float32)
    canvas[b:].reshape(m, stride, w + 2 * b)[:, :h, b:b + w] = heatmaps.reshape(m, h, w)
    blurred = cv2.GaussianBlur(canvas, (KERNEL, KERNEL), 0)
    view = blurred[b:].reshape(m, stride, w + 2 * b)[:, :h, b:b + w]
    return view, view.max(axis=(1, 2))


def _rescale(orig_max: np.ndarray, new_max: np.ndarray) -> np.ndarray:
    ratio = np.ones(len(new_max), dtype=np.float64)
    ok = new_max > 0
    ratio[ok] = orig_max[ok] / new_max[ok]
    return ratio


def argmax_peaks(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer peak (x, y) as float ``[N,K,2]`` (first max on ties) and the raw peak value.

    A map whose peak is <= 0 gets (-1, -1), as upstream."""
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, h * w)
    idx = flat.argmax(axis=2)
    score = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
    xy = np.stack([idx % w, idx // w], axis=-1).astype(np.float64)
    xy[score <= 0] = -1.0
    return xy, score


_KERNEL_1D = cv2.getGaussianKernel(KERNEL, 0)[:, 0]  # sigma 0 -> 2.0 for 11 taps, as GaussianBlur
_REACH = 2 + _BORDER  # Taylor needs +-2 px, each blurred value +-5 px more
# (dy, dx) offsets the Taylor step reads, as indices into the 5x5 neighbourhood
_USED = np.array([(0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (0, 2), (0, -2), (2, 0), (-2, 0),
                  (1, 1), (-1, 1), (1, -1), (-1, -1)]) + 2


def local_blur(maps: np.ndarray, mi: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Blurred values (zero padding, 11x11 Gaussian) on the 5x5 grid around each peak.

    Only these 25 values per keypoint enter the Taylor step, so they are computed directly
    (separable, 15x15 patch per peak) instead of blurring every 64x48 map."""
    m, h, w = maps.shape
    offs = np.arange(-_REACH, _REACH + 1)
    ys = y[:, None] + offs
    xs = x[:, None] + offs
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    patch = maps[mi[:, None, None], np.clip(ys, 0, h - 1)[:, :, None], np.clip(xs, 0, w - 1)[:, None, :]]
    patch = np.where(inside, patch.astype(np.float64), 0.0)
    rows = np.lib.stride_tricks.sliding_window_view(patch, KERNEL, axis=2) @ _KERNEL_1D      # (M,15,5)
    return np.lib.stride_tricks.sliding_window_view(rows, KERNEL, axis=1) @ _KERNEL_1D       # (M,5,5)


def dark_refine(heatmaps: np.ndarray, score: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """One Newton step on log(max(rescaled blur, 1e-10)) at each integer peak (2 px from the edges).

    The rescale to the original maximum multiplies the whole map by one constant, which cancels
    in every derivative of the log, unless the 1e-10 floor clips one of the values read. Since
    the blurred maximum never exceeds the original one, the rescale factor is >= 1, so values
    already above 1e-10 can never clip: only maps with a value at or below it need the full
    blur to learn their factor (upstream's exact result, without blurring every map)."""
    n, k, h, w = heatmaps.shape
    maps = heatmaps.reshape(n * k, h, w)
    px = xy[..., 0].astype(np.int64).reshape(-1)
    py = xy[..., 1].astype(np.int64).reshape(-1)
    ok = (px >= 2) & (px <= w - 3) & (py >= 2) & (py <= h - 3)
    out = xy.reshape(-1, 2).copy()
    if not ok.any():
        return out.reshape(n, k, 2)
    mi = np.nonzero(ok)[0]
    vals = local_blur(maps, mi, px[ok], py[ok])
    ratio = np.ones(len(mi))
    need = (vals[:, _USED[:, 0], _USED[:, 1]] <= 1e-10).any(axis=1)
    if need.any():
        sub = maps[mi[need]]
        _, new_max = blurred_maps(sub[None])
        ratio[need] = _rescale(score.reshape(-1)[mi[need]], new_max)
    L = np.log(np.maximum(vals * ratio[:, None, None], 1e-10))
    c = L[:, 2, 2]
    dx = 0.5 * (L[:, 2, 3] - L[:, 2, 1])
    dy = 0.5 * (L[:, 3, 2] - L[:, 1, 2])
    dxx = 0.25 * (L[:, 2, 4] - 2 * c + L[:, 2, 0])
    dyy = 0.25 * (L[:, 4, 2] - 2 * c + L[:, 0, 2])
    dxy = 0.25 * (L[:, 3, 3] - L[:, 1, 3] - L[:, 3, 1] + L[:, 1, 1])
    det = dxx * dyy - dxy ** 2
    good = det != 0
    safe = np.where(good, det, 1.0)
    # -H^{-1} g with H = [[dxx, dxy], [dxy, dyy]]
    ox = np.where(good, -(dyy * dx - dxy * dy) / safe, 0.0)
    oy = np.where(good, -(-dxy * dx + dxx * dy) / safe, 0.0)
    out[mi, 0] += ox
    out[mi, 1] += oy
    return out.reshape(n, k, 2)


def decode(heatmaps: np.ndarray, centers: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``[N,K,h,w]`` heatmaps + crop centres ``[N,2]`` and sizes ``[N,2]`` (wc, hc) -> ``[N,K,3]``.

    Returns image-pixel x, y and the raw peak score (not squashed; it can exceed 1)."""
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    n, k, h, w = heatmaps.shape
    xy, score = argmax_peaks(heatmaps)
    xy = dark_refine(heatmaps, score, xy)
    centers = np.asarray(centers, dtype=np.float64).reshape(n, 1, 2)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(n, 1, 2)
    img_xy = xy * (sizes / np.array([w, h])) + centers - sizes * 0.5
    return np.concatenate([img_xy, score[..., None].astype(np.float64)], axis=2)
