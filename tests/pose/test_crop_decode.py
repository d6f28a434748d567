"""Crop geometry and DARK decoding against hand-computed numbers (POSE.md §5)."""


import cv2
import numpy as np
import pytest

from wanquant.pose import crop, decode
from onnx_fakes import gaussian_maps


def test_crop_box_and_window_match_the_worked_example():
    cb = crop.crop_box([400, 112, 880, 697, 0.9], 1280, 720)
    assert (cb.cx, cb.cy, cb.wc, cb.hc) == (640, 404.5, 600, 800)
    assert cb.window == (340, 4, 940, 804)  # y0 = round(4.5) = 4 (half to even)


@pytest.mark.parametrize("box", [None, [5, 5, 12, 100, 0.9], [0, 0, 100, 100, 0.0], [0, 0, 100, 100, -1]])
def test_missing_tiny_or_fallback_boxes_use_the_whole_frame(box):
    cb = crop.crop_box(box, 200, 100)
    # whole frame 200x100: size = max(200*4/3, 100) = 266.67 -> hc 333.33, wc 250
    assert (cb.cx, cb.cy) == (100, 50)
    assert cb.hc == pytest.approx(1.25 * 200 * 4 / 3) and cb.wc == pytest.approx(250)


def test_window_outside_the_frame_is_black_and_inside_is_copied():
    frame = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    cb = crop.CropBox(cx=2.0, cy=3.0, wc=6.0, hc=8.0)  # window x -1..5, y -1..7
    win = crop.crop_window(frame, cb)
    assert win.shape == (8, 6, 3) and win.dtype == np.float32
    assert np.all(win[0] == 0) and np.all(win[:, 0] == 0)
    np.testing.assert_array_equal(win[1:, 1:], frame[0:7, 0:5])


def test_normalisation_and_colour_order():
    frame = np.zeros((300, 300, 3), np.uint8)
    frame[..., 0] = 255  # pure red
    cb = crop.crop_box([50, 50, 250, 250, 0.9], 300, 300)  # window stays inside the frame
    rgb = crop.crop_input(frame, cb)
    bgr = crop.crop_input(frame, cb, bgr=True)
    assert rgb.shape == (3, 256, 192) and rgb.dtype == np.float32
    c = (128, 96)
    assert rgb[0][c] == pytest.approx((1 - 0.485) / 0.229, abs=1e-5)
    assert rgb[2][c] == pytest.approx((0 - 0.406) / 0.225, abs=1e-5)
    assert bgr[0][c] == pytest.approx((0 - 0.485) / 0.229, abs=1e-5)
    assert bgr[2][c] == pytest.approx((1 - 0.406) / 0.225, abs=1e-5)


def test_peak_maps_back_to_image_pixels():
    maps = gaussian_maps({5: (24, 8)})
    kp = decode.decode(maps, [[640, 404.5]], [[600, 800]])
    # x = 24*600/48 + 640 - 300 ; y = 8*800/64 + 404.5 - 400
    assert kp[0, 5, 0] == pytest.approx(640, abs=1e-6)
    assert kp[0, 5, 1] == pytest.approx(104.5, abs=1e-6)
    assert kp[0, 5, 2] == pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize("x,y", [(24.3, 8.7), (10.6, 40.2), (37.45, 20.55)])
def test_dark_recovers_subpixel_blob_centres(x, y):
    maps = gaussian_maps({0: (x, y)})
    kp = decode.decode(maps, [[96, 128]], [[192, 256]])  # 4 image px per heatmap px
    hx, hy = kp[0, 0, 0] / 4, kp[0, 0, 1] / 4  # x = px*192/48 + 96 - 96
    assert abs(hx - x) < 0.05 and abs(hy - y) < 0.05


def test_empty_and_negative_maps_give_minus_one_and_no_nan():
    maps = np.zeros((1, 133, 64, 48), np.float32)
    maps[0, 1] = -0.3
    kp = decode.decode(maps, [[100, 100]], [[48, 64]])
    assert np.isfinite(kp).all()
    # (-1) * 48/48 + 100 - 24 = 75 ; (-1) * 64/64 + 100 - 32 = 67
    np.testing.assert_allclose(kp[0, :2, :2], [[75, 67], [75, 67]])
    assert kp[0, 0, 2] == 0 and kp[0, 1, 2] == pytest.approx(-0.3)


def test_blurred_max_not_positive_is_not_divided_by():
    m = np.full((64, 48), -1.0, np.float32)
    m[30, 20] = 0.5  # positive peak, but the blurred map is negative everywhere
    maps = np.zeros((1, 133, 64, 48), np.float32)
    maps[0, 0] = m
    kp = decode.decode(maps, [[24, 32]], [[48, 64]])
    assert np.isfinite(kp).all()
    assert kp[0, 0, 0] == pytest.approx(20) and kp[0, 0, 1] == pytest.approx(30)


def _reference_decode(heatmaps, centers, sizes):
    """Plain per-keypoint DARK in float64, written from the formulas in POSE.md §5.3."""
    n, k, h, w = heatmaps.shape
    out = np.zeros((n, k, 3))
    for i in range(n):
        for j in range(k):
            hm = heatmaps[i, j].astype(np.float64)
            idx = int(np.argmax(hm))
            px, py = float(idx % w), float(idx // w)
            score = float(hm.max())
            if score <= 0:
                px = py = -1.0
            padded = np.zeros((h + 10, w + 10))
            padded[5:-5, 5:-5] = hm
            blur = cv2.GaussianBlur(padded, (11, 11), 0)[5:-5, 5:-5]
            if blur.max() > 0:
                blur = blur * (score / blur.max())
            L = np.log(np.maximum(blur, 1e-10))
            ix, iy = int(px), int(py)
            if 2 <= ix <= w - 3 and 2 <= iy <= h - 3:
                dx = (L[iy, ix + 1] - L[iy, ix - 1]) / 2
                dy = (L[iy + 1, ix] - L[iy - 1, ix]) / 2
                dxx = (L[iy, ix + 2] - 2 * L[iy, ix] + L[iy, ix - 2]) / 4
                dyy = (L[iy + 2, ix] - 2 * L[iy, ix] + L[iy - 2, ix]) / 4
                dxy = (L[iy + 1, ix + 1] - L[iy - 1, ix + 1] - L[iy + 1, ix - 1] + L[iy - 1, ix - 1]) / 4
                hess = np.array([[dxx, dxy], [dxy, dyy]])
                if dxx * dyy - dxy ** 2 != 0:
                    off = -np.linalg.inv(hess) @ np.array([dx, dy])
                    px, py = px + off[0], py + off[1]
            cx, cy = centers[i]
            wc, hc = sizes[i]
            out[i, j] = (px * wc / w + cx - wc / 2, py * hc / h + cy - hc / 2, score)
    return out


def test_vectorised_decode_equals_the_per_keypoint_reference():
    rng = np.random.default_rng(3)
    n, k = 2, 133
    yy, xx = np.mgrid[0:64, 0:48]
    maps = np.zeros((n, k, 64, 48), np.float32)
    for i in range(n):
        for j in range(k):
            x, y = rng.uniform(-2, 50), rng.uniform(-2, 66)  # some peaks at/over the edge
            s = rng.uniform(1.0, 3.0)
            maps[i, j] = rng.uniform(0.2, 1.2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
            maps[i, j] += rng.normal(0, 0.01, size=(64, 48))
    maps[0, 7] = 0.0
    # a faint peak: its blurred values sit under the 1e-10 log floor until rescaled to the
    # original maximum, so the rescale factor really matters here
    maps[1, 9] = 2e-10 * np.exp(-((xx - 20.3) ** 2 + (yy - 30.6) ** 2) / 8)
    maps[1, 10] = np.where((xx - 30) ** 2 + (yy - 12) ** 2 < 2, 1e-9, 0.0)
    centers = np.array([[300.0, 200.0], [50.5, 60.25]])
    sizes = np.array([[150.0, 200.0], [90.0, 120.0]])
    got = decode.decode(maps, centers, sizes)
    ref = _reference_decode(maps, centers, sizes)
    # compare in heatmap units (image px / (wc/48))
    scale = np.stack([sizes[:, 0] / 48, sizes[:, 1] / 64], axis=1)[:, None, :]
    assert np.abs((got[..., :2] - ref[..., :2]) / scale).max() < 1e-5
    np.testing.assert_allclose(got[..., 2], ref[..., 2], atol=1e-7)
