"""Retarget a driving clip onto the reference character's proportions (Wan ``get_retarget_pose``).

Wan's "simplified" retargeting: bone-length ratios between the reference pose and frame 0 are
applied to every frame (angles kept), the skeleton is scaled by the height ratio of the two
people and anchored so the feet (full body) or the neck (otherwise) land where the reference's
are. It assumes front-facing poses with extended limbs in both the reference and frame 0.

Differences from upstream, all fixes (POSE.md §9): inputs are never mutated (upstream converts
its callers' arrays in place), a zero-length source bone or a zero/inf/NaN height ratio no
longer produces inf/NaN, and the output hands keep their own labels (upstream swaps the
left/right labels; drawing is symmetric so pictures are identical). The frame-0 x tweak and
the "right hand nearer the left wrist" displacement swap are reproduced.
"""

from __future__ import annotations

import math

import numpy as np

from .aapose import PoseMeta
from .draw import LIMBS

TAU = 0.4
FOOT_CAP = 0.5
_PAIRS = ((0, 1), (2, 4), (3, 5), (6, 9), (7, 10), (8, 11), (17, 18))
_FULL, _THREE_QUARTER, _HALF = 2, 1, 0


def _confident(body: np.ndarray, idx, thr: float = 0.5) -> bool:
    return all(body[i, 2] > thr for i in idx)


def height_ratio(src: PoseMeta, dst: PoseMeta) -> float:
    """``scale_min`` = source person height / reference person height (pixels).

    Nose-to-ankles when all three are confident in both, else nose-to-hips, else the ratio of
    the image diagonals' geometric sizes; a 0/inf/NaN result also falls back to the latter."""
    area = math.sqrt(src.width * src.height) / math.sqrt(dst.width * dst.height)
    s, d = src.body, dst.body
    for low in ((10, 13), (8, 11)):
        idx = (0,) + low
        if _confident(s, idx) and _confident(d, idx):
            hs = src.height * abs((s[low[0], 1] + s[low[1], 1]) / 2 - s[0, 1])
            hd = dst.height * abs((d[low[0], 1] + d[low[1], 1]) / 2 - d[0, 1])
            r = hs / hd if hd != 0 else math.inf
            return r if math.isfinite(r) and r > 0 else area
    return area


def body_class(body: np.ndarray, thr: float = TAU) -> int:
    """2 = full body (hips and ankles visible), 1 = three-quarter (hips), 0 = half body."""
    def seen(i):
        return body[i, 1] <= 1 and body[i, 2] >= thr
    if seen(10) and seen(13) and seen(8) and seen(11):
        return _FULL
    if seen(8) and seen(11):
        return _THREE_QUARTER
    return _HALF


def bone_ratios(src_px: np.ndarray, dst_px: np.ndarray) -> np.ndarray:
    """Per-limb reference/source length ratios, symmetrised as upstream.

    A zero (or non-finite) source length counts as missing and takes mean(r0, r1), the
    shoulder ratios (falling back to the mean of the known ratios, or 1)."""
    r = np.full(len(LIMBS), np.nan)
    for i, (a, b) in enumerate(LIMBS):
        ls = math.hypot(*(src_px[a, :2] - src_px[b, :2]))
        ld = math.hypot(*(dst_px[a, :2] - dst_px[b, :2]))
        if ls > 0 and math.isfinite(ls) and math.isfinite(ld):
            r[i] = ld / ls
    if np.isnan(r).any():
        if not np.isnan(r[:2]).any():
            fill = (r[0] + r[1]) / 2
        else:
            known = r[~np.isnan(r)]
            fill = float(known.mean()) if len(known) else 1.0
        r[np.isnan(r)] = fill
    for a, b in _PAIRS:
        r[a] = r[b] = max(r[a], r[b])
    r[13] = r[15] = (r[13] + r[15]) / 2
    r[14] = r[16] = (r[14] + r[16]) / 2
    return r


def _rescale(px: np.ndarray, ratios: np.ndarray, foot_cap: bool) -> np.ndarray:
    """New body positions: every limb keeps its original angle, its length times the ratio,
    placed parent-first from the (fixed) neck."""
    lengths = np.empty(len(LIMBS))
    angles = np.empty(len(LIMBS))
    for i, (a, b) in enumerate(LIMBS):
        dx, dy = px[a, 0] - px[b, 0], px[a, 1] - px[b, 1]
        lengths[i] = math.hypot(dx, dy) * ratios[i]
        angles[i] = math.atan2(dy, dx)
    if foot_cap:
        lengths[18] = min(lengths[18], lengths[8] * FOOT_CAP)
        lengths[17] = min(lengths[17], lengths[11] * FOOT_CAP)
    out = px.copy()
    for i, (a, b) in enumerate(LIMBS):
        out[b, 0] = out[a, 0] - lengths[i] * math.cos(angles[i])
        out[b, 1] = out[a, 1] - lengths[i] * math.sin(angles[i])
    return out


def _scale_hand(hand: np.ndarray, k: float) -> np.ndarray:
    """Confident points scaled by k about the hand's point 0 (normalised units); others NaN."""
    out = np.full_like(hand, np.nan)
    keep = hand[:, 2] >= TAU
    out[keep, :2] = hand[keep, :2] * k - hand[0, :2] * (k - 1)
    out[keep, 2] = hand[keep, 2]
    return out


def _place_hand(scaled: np.ndarray, delta: np.ndarray, ws: int, hs: int) -> np.ndarray:
    """Scaled hand -> pixels moved by delta and truncated with int(), as upstream."""
    out = np.zeros_like(scaled)
    out[:, :2] = -1.0
    ok = ~np.isnan(scaled[:, 2])
    for j in np.nonzero(ok)[0]:
        out[j, 0] = int(scaled[j, 0] * ws + delta[0])
        out[j, 1] = int(scaled[j, 1] * hs + delta[1])
        out[j, 2] = scaled[j, 2]
    return out


def retarget(frame0: PoseMeta, reference: PoseMeta, metas: list[PoseMeta]) -> list[PoseMeta]:
    """Retarget ``metas`` (driving frames, template ``frame0``) into the reference's image space.

    The results are sized like ``reference`` (normalised by its width and height) and are meant
    to be drawn on a canvas of that size. Nothing passed in is modified."""
    s = height_ratio(frame0, reference)
    wd2 = max(int(reference.width * s), 1)
    hd2 = max(int(reference.height * s), 1)
    cls = min(body_class(frame0.body), body_class(reference.body))

    src_px = frame0.body * (frame0.width, frame0.height, 1.0)
    dst_px = reference.body * (wd2, hd2, 1.0)
    ratios = bone_ratios(src_px, dst_px)
    rescaled0 = _rescale(src_px, ratios, foot_cap=False)

    d = reference.body
    if cls == _FULL:
        ground_d = hd2 * max((d[10, 1] + d[19, 1]) / 2, (d[13, 1] + d[18, 1]) / 2)
        dy = max(rescaled0[10, 1], rescaled0[13, 1]) - ground_d
        anchor = (rescaled0[8, 0] + rescaled0[11, 0]) / 2
        dx = anchor - wd2 * (d[8, 0] + d[11, 0]) / 2
    else:
        dx = rescaled0[1, 0] - d[1, 0] * wd2
        dy = rescaled0[1, 1] - d[1, 1] * hd2
        anchor = rescaled0[1, 0]

    k_hand = max(ratios[0], ratios[1]) / s
    out = []
    for t, meta in enumerate(metas):
        ws, hs = meta.width, meta.height
        px = meta.body * (ws, hs, 1.0)
        new = _rescale(px, ratios, foot_cap=True)
        dxt = dx
        if t == 0:
            if cls == _FULL:
                dxt += (new[8, 0] + new[11, 0]) / 2 - anchor
            elif cls == _HALF:
                dxt += new[1, 0] - anchor
        new[:, 0] = (new[:, 0] - dxt) / s
        new[:, 1] = (new[:, 1] - dy) / s

        # Hands follow their wrists: RWrist (4) carries the right hand, LWrist (7) the left.
        rh = _scale_hand(meta.rhand, k_hand)
        lh = _scale_hand(meta.lhand, k_hand)
        # an unconfident root is (-1, -1) in upstream's normalised units, so (-W, -H) here
        r_root = np.array([-ws, -hs], float) if np.isnan(rh[0, 2]) else rh[0, :2] * (ws, hs)
        l_root = np.array([-ws, -hs], float) if np.isnan(lh[0, 2]) else lh[0, :2] * (ws, hs)
        r_delta = new[4, :2] - px[4, :2]
        l_delta = new[7, :2] - px[7, :2]
        if not np.isnan(rh[0, 2]):
            r_delta = r_delta + (px[4, :2] - r_root)
        if not np.isnan(lh[0, 2]):
            l_delta = l_delta + (px[7, :2] - l_root)
        if np.hypot(*(px[4, :2] - r_root)) > np.hypot(*(px[7, :2] - r_root)):
            r_delta, l_delta = l_delta, r_delta  # upstream's swap when the roots look crossed
        rhand = _place_hand(rh, r_delta, ws, hs)
        lhand = _place_hand(lh, l_delta, ws, hs)

        norm = np.array([reference.width, reference.height, 1.0])
        body = new / norm
        for hand in (rhand, lhand):
            ok = hand[:, 2] > 0
            hand[ok, :2] /= norm[:2]
        face = np.zeros((69, 3))
        face[:, :2] = -1.0
        out.append(PoseMeta(reference.width, reference.height, body, lhand, rhand, face,
                            extra={"retargeted": True}))
    return out
