"""Detector pre/post-processing against hand-computed boxes (POSE.md §4)."""

import numpy as np
import pytest

from wanquant.pose import detect


def table(*rows, n=300):
    t = np.zeros((1, n, 6), dtype=np.float32)
    for i, r in enumerate(rows):
        t[0, i] = r
    return t


def test_preprocess_is_a_plain_stretch_to_640_in_0_1():
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[:, :640] = 255  # left half white
    x = detect.preprocess(frame)
    assert x.shape == (1, 3, 640, 640) and x.dtype == np.float32
    # no letterbox: the white half fills exactly the left half of the input
    assert np.all(x[0, :, :, :319] == 1.0) and np.all(x[0, :, :, 321:] == 0.0)


def test_box_scaled_and_truncated_like_wan():
    # 640-space [200,100,440,620] on 1280x720: x*2, y*1.125 -> y1 112.5, h 585 -> int -> 697
    box = detect.postprocess(table([200, 100, 440, 620, 0.92, 0]), 1280, 720)
    np.testing.assert_allclose(box, [400, 112, 880, 697, 0.92], rtol=0, atol=1e-6)


@pytest.mark.parametrize("score", [0.0, 0.04])
def test_low_scores_fall_back_to_full_frame(score):
    box = detect.postprocess(table([200, 100, 440, 620, score, 0]), 1280, 720)
    assert box.tolist() == [0, 0, 1280, 720, -1]


def test_no_person_class_falls_back():
    box = detect.postprocess(table([200, 100, 440, 620, 0.9, 2]), 640, 640)  # a car
    assert box.tolist() == [0, 0, 640, 640, -1]


def test_overlapping_cat_suppresses_person_only_in_compat_mode():
    person = [100, 100, 300, 500, 0.8, 0]
    cat = [110, 110, 300, 500, 0.9, 15]  # IoU = 190*390/(200*400) = 0.926 > 0.5
    out = table(person, cat)
    assert detect.postprocess(out, 640, 640, class_agnostic_nms=True).tolist() == [0, 0, 640, 640, -1]
    np.testing.assert_allclose(detect.postprocess(out, 640, 640), [100, 100, 300, 500, 0.8], atol=1e-6)


def test_larger_person_wins_over_higher_score():
    small = [0, 0, 100, 200, 0.9, 0]       # area 20000
    large = [300, 0, 500, 300, 0.5, 0]     # area 60000, no overlap
    box = detect.postprocess(table(small, large), 640, 640)
    np.testing.assert_allclose(box, [300, 0, 500, 300, 0.5], atol=1e-6)


def test_shape_ratio_rejects_a_squat_box_with_a_larger_area():
    tall = [0, 0, 10, 600, 0.9, 0]         # area 6000, longer side 600
    squat = [100, 100, 300, 300, 0.8, 0]   # area 40000 but longer side 200 < 0.4*600
    box = detect.postprocess(table(tall, squat), 640, 640)
    np.testing.assert_allclose(box, [0, 0, 10, 600, 0.9], atol=1e-6)


def test_yolov8_layout_is_accepted():
    out = np.zeros((1, 84, 10), np.float32)
    out[0, :4, 3] = [320, 320, 100, 200]   # centre x,y, w,h
    out[0, 4 + 0, 3] = 0.9                 # person
    box = detect.postprocess(out, 640, 640)
    np.testing.assert_allclose(box, [270, 220, 370, 420, 0.9], atol=1e-6)


def test_unknown_output_layout_is_an_error():
    with pytest.raises(ValueError):
        detect.postprocess(np.zeros((1, 300, 7), np.float32), 640, 640)
