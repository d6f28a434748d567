"""COCO-WholeBody 133 -> AAPose meta: indices, averages, normalisation, body fallback (§6)."""

import numpy as np
import pytest

from wanquant.pose.aapose import metas_from_keypoints, split_keypoints

W, H = 200, 100


def kps():
    i = np.arange(133, dtype=np.float64)
    return np.stack([10 + i, 20 + 2 * i, 0.5 + i / 1000], axis=1)


def test_body_rows_average_two_keypoints_including_score():
    body, lh, rh, face = split_keypoints(kps(), W, H)
    assert body.shape == (20, 3)
    # Neck = mean(kp6, kp5): x (16+15)/2 /200, y (32+30)/2 /100, score (0.506+0.505)/2
    np.testing.assert_allclose(body[1], [15.5 / 200, 31 / 100, 0.5055])
    # LToe = mean(17, 18), RToe = mean(20, 21)
    np.testing.assert_allclose(body[18], [27.5 / 200, 55 / 100, 0.5175])
    np.testing.assert_allclose(body[19], [30.5 / 200, 61 / 100, 0.5205])
    # RShoulder = kp6, LHip = kp11, REye = kp2, LEar = kp3
    np.testing.assert_allclose(body[2], [16 / 200, 32 / 100, 0.506])
    np.testing.assert_allclose(body[11], [21 / 200, 42 / 100, 0.511])
    np.testing.assert_allclose(body[14], [12 / 200, 24 / 100, 0.502])
    np.testing.assert_allclose(body[17], [13 / 200, 26 / 100, 0.503])


def test_hands_and_face_blocks():
    _, lh, rh, face = split_keypoints(kps(), W, H)
    assert lh.shape == (21, 3) and rh.shape == (21, 3) and face.shape == (69, 3)
    np.testing.assert_allclose(lh[0], [101 / 200, 202 / 100, 0.591])   # kp 91
    np.testing.assert_allclose(rh[20], [142 / 200, 284 / 100, 0.632])  # kp 132
    np.testing.assert_allclose(face[0], [32 / 200, 64 / 100, 0.522])   # row 0 = kp 22 (right heel)
    np.testing.assert_allclose(face[1], [33 / 200, 66 / 100, 0.523])   # first face landmark = kp 23


def test_inputs_are_not_modified():
    k = kps()
    before = k.copy()
    split_keypoints(k, W, H)
    np.testing.assert_array_equal(k, before)


def test_missing_body_reuses_previous_frame_and_frame0_keeps_its_own():
    good = kps()
    bad = kps()
    bad[:, 0] = -5.0  # every body row now has a negative coordinate
    metas, replaced, last = metas_from_keypoints(np.stack([bad, good, bad]), W, H)
    assert replaced == [2]
    assert metas[0].body[0, 0] == pytest.approx(-5 / 200)   # frame 0: nothing to reuse, no crash
    np.testing.assert_array_equal(metas[2].body, metas[1].body)
    assert metas[2].lhand[0, 0] == pytest.approx(-5 / 200)  # only the body is borrowed
    # the carried body continues across chunks
    more, replaced2, _ = metas_from_keypoints(np.stack([bad]), W, H, prev_body=last)
    assert replaced2 == [0]
    np.testing.assert_array_equal(more[0].body, metas[1].body)
