"""Face box formula, degenerate landmarks and the crop (POSE.md §8)."""

import numpy as np
import pytest

from wanquant.pose import face

W, H = 640, 480


def landmarks(x0, y0, x1, y1, n=68):
    """69 normalised rows: row 0 (right heel) far away, rows 1.. spanning the given extent."""
    rows = np.zeros((69, 3))
    rows[0] = [0.99, 0.99, 1.0]
    xs = np.linspace(x0, x1, n)
    ys = np.linspace(y0, y1, n)
    rows[1:, 0] = xs / W
    rows[1:, 1] = ys[::-1] / H
    rows[1:, 2] = 0.1  # confidence is ignored
    return rows


def test_box_from_known_extent():
    # extent x 100..200, y 50..150; sqrt(1.3) = 1.1401754
    # dw = 100*0.1401754/2 = 7.0088 -> x1 int(92.99)=92, x2 int(207.0088)=207
    # dh = 100*0.1401754/4 = 3.5044 -> y1 int(50-10.513)=39, y2 int(153.504)=153
    assert face.face_box(landmarks(100, 50, 200, 150), W, H) == (92, 39, 207, 153)


def test_box_is_clipped_to_the_frame_and_padding_is_added():
    assert face.face_box(landmarks(2, 3, 102, 63), W, H)[:2] == (0, 0)
    assert face.face_box(landmarks(100, 50, 200, 150), W, H, padding=10) == (82, 29, 217, 163)


@pytest.mark.parametrize("pts", [
    landmarks(300, 200, 300, 200),            # all landmarks on one point: w0 = h0 = 0
    landmarks(300, 200, 300.5, 260),          # under 2 px wide
    landmarks(-90, -80, -20, -10),            # undetected face at negative coordinates
])
def test_degenerate_landmarks_give_no_box(pts):
    assert face.face_box(pts, W, H) is None


def test_nan_landmarks_give_no_box():
    pts = landmarks(100, 50, 200, 150)
    pts[5, 0] = np.nan
    assert face.face_box(pts, W, H) is None


def test_fill_boxes_previous_then_next_then_default():
    a, b = (1, 2, 30, 40), (5, 6, 50, 60)
    filled, idx = face.fill_boxes([None, a, None, b, None], W, H)
    assert filled == [a, a, a, b, b] and idx == [0, 2, 4]
    # no valid box at all: centred square 0.3*480 = 144 with its top at 0.1*480 = 48
    filled, idx = face.fill_boxes([None, None], W, H)
    assert filled == [(248, 48, 392, 192)] * 2 and idx == [0, 1]


def test_default_box_on_a_one_pixel_frame_is_one_pixel():
    assert face.default_box(1, 1) == (0, 0, 1, 1)


def test_crop_is_a_512_stretch():
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:, :320] = (255, 0, 0)
    frame[:, 320:] = (0, 0, 255)
    out = face.crop_face(frame, (300, 100, 340, 400))  # 40x300 box, half red half blue
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    assert tuple(out[256, 10]) == (255, 0, 0) and tuple(out[256, 500]) == (0, 0, 255)
