"""Retargeting on synthetic skeletons: identity, scale about the ground, bone ratios, anchors (§9)."""

import copy

import numpy as np
import pytest

from wanquant.pose.aapose import PoseMeta
from wanquant.pose.retarget import retarget

W, H = 400, 800
# front-facing full body, pixels; toes level with the ankles and short (no foot cap)
BODY = {0: (200, 100), 1: (200, 160), 2: (160, 160), 3: (150, 240), 4: (145, 310), 5: (240, 160),
        6: (250, 240), 7: (255, 310), 8: (175, 380), 9: (172, 520), 10: (170, 650), 11: (225, 380),
        12: (228, 520), 13: (230, 650), 14: (190, 90), 15: (210, 90), 16: (180, 95), 17: (220, 95),
        18: (240, 650), 19: (160, 650)}
HAND = [(0, 0), (5, 8), (9, 15), (12, 21), (14, 27), (3, 20), (4, 30), (4, 38), (4, 45), (0, 21)] + \
       [(-3, 20 + i) for i in range(11)]  # 21 offsets from the wrist, integer pixels


def px_body(pts=BODY):
    return np.array([pts[k] for k in range(20)], dtype=np.float64)


def make_meta(body_px, w=W, h=H, score=0.9, hand_scale=1.0):
    body = np.concatenate([body_px / (w, h), np.full((20, 1), score)], axis=1)
    hands = []
    for wrist in (body_px[7], body_px[4]):  # left hand at LWrist, right hand at RWrist
        pts = np.array([(wrist[0] + dx * hand_scale, wrist[1] + dy * hand_scale) for dx, dy in HAND])
        hands.append(np.concatenate([pts / (w, h), np.full((21, 1), 0.9)], axis=1))
    return PoseMeta(w, h, body, hands[0], hands[1], np.zeros((69, 3)))


def moved_arms(body_px, angle_deg):
    """Rotate both forearms about the elbows (a second, different frame)."""
    out = body_px.copy()
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    for elbow, wrist in ((3, 4), (6, 7)):
        out[wrist] = out[elbow] + rot @ (out[wrist] - out[elbow])
    return out


def frames():
    b0 = px_body()
    b1 = moved_arms(b0, 25)
    return [make_meta(b0), make_meta(b1)]


def out_px(meta):
    return meta.body[:, :2] * (meta.width, meta.height)


def test_reference_equal_to_frame0_is_identity():
    metas = frames()
    out = retarget(metas[0], copy.deepcopy(metas[0]), metas)
    for src, got in zip(metas, out):
        assert (got.width, got.height) == (W, H)
        np.testing.assert_allclose(got.body, src.body, atol=1e-6)
        for a, b in ((got.lhand, src.lhand), (got.rhand, src.rhand)):
            # hands are placed with int() truncation upstream: within one pixel
            assert np.abs((a[:, :2] - b[:, :2]) * (W, H)).max() <= 1.0 + 1e-9
            np.testing.assert_allclose(a[:, 2], b[:, 2])


def test_half_size_reference_scales_about_the_ground_point():
    g = np.array([200.0, 650.0])  # between the feet
    metas = frames()
    ref = make_meta(g + 0.5 * (px_body() - g), hand_scale=0.5)
    out = retarget(metas[0], ref, metas)
    for src, got in zip(metas, out):
        expected = g + 0.5 * (src.body[:, :2] * (W, H) - g)
        np.testing.assert_allclose(out_px(got), expected, atol=1e-6)
        # the hand keeps its shape at half size, root on the new wrist
        hand = got.rhand[:, :2] * (W, H)
        src_hand = src.rhand[:, :2] * (W, H)
        np.testing.assert_allclose(hand - hand[0], 0.5 * (src_hand - src_hand[0]), atol=2.0)
        assert np.abs(hand[0] - out_px(got)[4]).max() <= 1.0


def test_bone_ratios_are_applied_to_every_frame():
    ref_px = px_body()
    for elbow, wrist in ((3, 4), (6, 7)):  # forearms 1.5x longer in the reference
        ref_px[wrist] = ref_px[elbow] + 1.5 * (ref_px[wrist] - ref_px[elbow])
    metas = frames()
    out = retarget(metas[0], make_meta(ref_px), metas)
    for src, got in zip(metas, out):
        s, o = src.body[:, :2] * (W, H), out_px(got)
        for elbow, wrist in ((3, 4), (6, 7)):
            np.testing.assert_allclose(o[wrist], s[elbow] + 1.5 * (s[wrist] - s[elbow]), atol=1e-6)
        others = [k for k in range(20) if k not in (4, 7)]
        np.testing.assert_allclose(o[others], s[others], atol=1e-6)


def test_half_body_is_anchored_at_the_neck():
    metas = frames()
    for m in metas:
        m.body[[8, 9, 10, 11, 12, 13, 18, 19], 2] = 0.1  # lower body not visible
    ref = copy.deepcopy(metas[0])
    ref.body[:, 0] += 30 / W
    ref.body[:, 1] += 20 / H
    out = retarget(metas[0], ref, metas)
    for src, got in zip(metas, out):
        np.testing.assert_allclose(out_px(got), src.body[:, :2] * (W, H) + (30, 20), atol=1e-6)


def test_output_lives_in_the_reference_image_space():
    metas = frames()
    ref = make_meta(px_body() * 0.5, w=W // 2, h=H // 2)  # same normalised pose, half-size image
    out = retarget(metas[0], ref, metas)
    assert (out[0].width, out[0].height) == (W // 2, H // 2)
    np.testing.assert_allclose(out[0].body, metas[0].body, atol=1e-6)


def test_inputs_are_not_modified():
    metas = frames()
    ref = make_meta(px_body() * 0.9)
    snap = copy.deepcopy((metas, ref))
    retarget(metas[0], ref, metas)
    for a, b in zip(metas + [ref], snap[0] + [snap[1]]):
        for name in ("body", "lhand", "rhand", "face"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert (a.width, a.height) == (b.width, b.height)


@pytest.mark.parametrize("ref_score", [0.9, 0.0])
def test_zero_length_bones_and_unusable_heights_stay_finite(ref_score):
    b0 = px_body()
    b0[16] = b0[14]            # REar on REye: limb 14 has zero length in the source
    b0[0] = b0[10] = b0[13]    # nose on the ankles: zero person height
    metas = [make_meta(b0), make_meta(moved_arms(b0, 10))]
    ref = make_meta(px_body())
    ref.body[:, 2] = ref_score  # 0.9: height ratio 0/x must fall back; 0.0: nothing confident
    out = retarget(metas[0], ref, metas)
    for m in out:
        assert np.isfinite(m.body).all() and np.isfinite(m.lhand).all() and np.isfinite(m.rhand).all()
