"""Drawing: colours, widths, thresholds and the closed palette (POSE.md §7), plus fitting."""

import colorsys

import numpy as np
import pytest

from wanquant.pose import draw
from wanquant.pose.aapose import PoseMeta
from wanquant.pose.resize import center_crop_box, fit_image, padding_geometry

S = 1000  # canvas 1000x1000 -> body sw = int(1000/200)-1 = 4, hand sw = 2


def meta(points: dict, lhand: dict | None = None, size=(S, S), p=0.9):
    w, h = size
    body = np.zeros((20, 3))
    for k, (x, y) in points.items():
        body[k] = [x / w, y / h, p]
    hands = []
    for pts in (lhand or {}, {}):
        hnd = np.zeros((21, 3))
        for k, (x, y) in pts.items():
            hnd[k] = [x / w, y / h, p]
        hands.append(hnd)
    return PoseMeta(w, h, body, hands[0], hands[1], np.zeros((69, 3)))


def colours(img):
    packed = np.unique(img.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))
    return {(int(v >> 16), int(v >> 8 & 255), int(v & 255)) for v in packed}


@pytest.mark.parametrize("w,h,expected", [(832, 480, (1, 1)), (1280, 720, (2, 1)), (1920, 1080, (4, 2))])
def test_stick_widths(w, h, expected):
    assert draw.stick_widths(w, h) == expected


def test_limb_fill_colour_width_and_point_colours():
    img = draw.draw_pose(meta({1: (300, 500), 2: (500, 500)}))  # Neck - RShoulder, horizontal
    assert img.shape == (S, S, 3) and img.dtype == np.uint8
    assert tuple(img[500, 400]) == (153, 0, 0)        # 0.6 x (255,0,0) at the midpoint
    assert tuple(img[500, 300]) == (255, 85, 0)       # Neck point colour
    assert tuple(img[500, 500]) == (255, 170, 0)      # RShoulder point colour
    column = img[:, 400].any(axis=1)
    assert column.sum() == 2 * 4 + 1                  # ellipse minor half-axis sw=4 each side
    assert column[496] and column[504] and not column[495] and not column[505]


def test_user_stick_width_overrides_formula():
    img = draw.draw_pose(meta({8: (300, 500), 9: (500, 500)}), body_stick_width=7)  # RHip-RKnee
    assert img[:, 400].any(axis=1).sum() == 15
    assert tuple(img[500, 400]) == (0, 153, 51)       # 0.6 x (0,255,85)


def test_nothing_below_threshold():
    img = draw.draw_pose(meta({1: (300, 500), 2: (500, 500)}, p=0.49))
    assert not img.any()


def test_draw_head_false_removes_head_points_and_neck_nose_limb():
    pts = {0: (500, 200), 1: (500, 300), 14: (480, 190), 15: (520, 190), 16: (460, 200), 17: (540, 200)}
    with_head = draw.draw_pose(meta(pts))
    without = draw.draw_pose(meta(pts), draw_head=False)
    assert (0, 0, 153) in colours(with_head)           # Neck-Nose limb fill
    assert colours(without) == {(0, 0, 0), (255, 85, 0)}  # only the neck point remains


def test_hand_edge_colours_follow_hsv_as_opencv_rounds_it():
    # OpenCV rounds float colours with cvRound; compute that independently from colorsys
    for e, table in enumerate(draw.HAND_COLORS):
        expected = tuple(int(v) for v in np.rint(np.array(colorsys.hsv_to_rgb(e / 20, 1.0, 1.0)) * 255))
        assert table == expected
    hand = {0: (600, 600), 1: (700, 600), 5: (600, 800), 6: (700, 800)}
    img = draw.draw_pose(meta({}, lhand=hand))
    assert tuple(img[600, 650]) == (255, 0, 0)         # edge 0 (0-1)
    assert tuple(img[800, 650]) == (128, 255, 0)       # edge 5 (5-6)
    assert tuple(img[600, 600]) == (0, 0, 255)         # joints are blue
    assert tuple(img[800, 700]) == (0, 0, 255)
    assert img[:, 650].any(axis=1).sum() == 2 * 3      # two lines of thickness hsw=2 -> 3 px each


def test_hand_points_in_row_or_column_zero_are_not_drawn():
    img = draw.draw_pose(meta({}, lhand={0: (0, 600), 1: (100, 600)}))
    assert tuple(img[600, 50]) == (0, 0, 0)            # no edge from a point at x=0
    assert tuple(img[600, 100]) == (0, 0, 255)         # the other joint is still drawn
    assert tuple(img[600, 0]) == (0, 0, 0)


def test_hand_width_zero_means_no_hands():
    img = draw.draw_pose(meta({}, lhand={0: (600, 600), 1: (700, 600)}), hand_stick_width=0)
    assert not img.any()


def test_palette_is_closed_no_antialiasing():
    rng = np.random.default_rng(0)
    pts = {k: tuple(rng.uniform(100, 900, 2)) for k in range(20)}
    hand = {k: tuple(rng.uniform(100, 900, 2)) for k in range(21)}
    img = draw.draw_pose(meta(pts, lhand=hand))
    allowed = {(0, 0, 0), draw.HAND_POINT_COLOR} | set(draw.COLORS) | set(draw.LIMB_FILL) | set(draw.HAND_COLORS)
    assert colours(img) <= allowed and len(colours(img)) > 10


def test_non_finite_points_are_skipped():
    m = meta({1: (300, 500), 2: (500, 500)})
    m.body[2, 0] = np.inf
    img = draw.draw_pose(m)
    assert tuple(img[500, 300]) == (255, 85, 0) and tuple(img[500, 400]) == (0, 0, 0)


def test_letterbox_geometry_and_fit():
    # 320x240 into 832x480: 240/320 = 0.75 > 480/832 -> width int(480/240*320)=640, left int(192/2)=96
    assert padding_geometry(320, 240, 832, 480) == (640, 480, 96, 0)
    img = np.full((240, 320, 3), 200, np.uint8)
    out = fit_image(img, 480, 832)
    assert out.shape == (480, 832, 3)
    assert not out[:, :96].any() and not out[:, 736:].any() and (out[:, 96:736] == 200).all()


def test_center_crop_matches_comfy_rule():
    # 1280x720 -> 832x480: old aspect 1.778 > 1.733: x = round((1280 - 1280*(1.7333/1.7778))/2) = 16
    assert center_crop_box(1280, 720, 832, 480) == (16, 0, 1248, 720)
    # 480x720 (portrait) -> 832x480: y = round((720 - 720*(0.6667/1.7333))/2) = round(221.54) = 222
    assert center_crop_box(480, 720, 832, 480) == (0, 222, 480, 276)
