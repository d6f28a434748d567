"""Plücker rays against an independent per-pixel formula; presets; mask packing; stream layout."""

import math

import numpy as np
import pytest
import torch

from wanquant.errors import WanquantError
from wanquant.vista4d import camera, streams


def _rot(ax, a):
    c, s = math.cos(a), math.sin(a)
    m = np.eye(3)
    i, j = [(1, 2), (0, 2), (0, 1)][ax]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def test_plucker_matches_ray_through_each_cell_centre():
    h, w, gh, gw = 48, 80, 3, 5
    intr = np.array([[60.0, 55.0, 41.0, 23.0], [70.0, 70.0, 40.0, 24.0]])
    c2w = np.stack([np.eye(4), np.eye(4)])
    c2w[0, :3, :3] = _rot(1, 0.3) @ _rot(0, -0.2)
    c2w[0, :3, 3] = [0.5, -1.0, 2.0]
    c2w[1, :3, :3] = _rot(2, 0.7)
    c2w[1, :3, 3] = [-0.3, 0.2, 0.1]
    got = camera.plucker(torch.tensor(intr), torch.tensor(c2w), h, w, gh, gw).numpy()
    assert got.shape == (2, gh, gw, 6)
    for f in range(2):
        K = np.array([[intr[f, 0], 0, intr[f, 2]], [0, intr[f, 1], intr[f, 3]], [0, 0, 1]])
        for j in range(gh):
            for i in range(gw):
                # cell (j, i) of a 16-pixel patch grid: pixel (i + 0.5) * 16 + 8 (upstream's sampling)
                px = np.array([(i + 0.5) * (w / gw) + (w / gw) / 2, (j + 0.5) * (h / gh) + (h / gh) / 2, 1.0])
                d_cam = np.linalg.solve(K, px)
                d = c2w[f, :3, :3] @ (d_cam / np.linalg.norm(d_cam))
                o = c2w[f, :3, 3]
                np.testing.assert_allclose(got[f, j, i], np.concatenate([np.cross(o, d), d]), atol=1e-12)


def test_plucker_shape_mismatch_is_one_error():
    with pytest.raises(WanquantError, match="camera arrays disagree"):
        camera.plucker(torch.zeros(3, 4), torch.eye(4).repeat(2, 1, 1), 32, 32, 2, 2)


def _apply(T, p):
    return T[:3, :3] @ p + T[:3, 3]


def test_presets_move_the_camera_as_named():
    pd = 3.0
    orbit = camera.preset_motion("orbit", 5, 30.0, pd)
    assert torch.equal(orbit[0], torch.eye(4, dtype=torch.float64))
    pivot = torch.tensor([0.0, 0.0, pd], dtype=torch.float64)
    for T in orbit:  # the pivot stays on the optical axis at the same distance
        w2c = torch.linalg.inv(T)
        assert torch.allclose(_apply(w2c, pivot), pivot, atol=1e-12)
    assert orbit[-1, 0, 3] > 0  # positive orbit: the camera moves right (+x)
    assert math.isclose(math.degrees(math.acos(orbit[-1, 0, 0])), 30.0, rel_tol=1e-9)
    dolly = camera.preset_motion("dolly", 3, 0.5, pd)
    assert dolly[-1, 2, 3] == pytest.approx(1.5) and dolly[1, 2, 3] == pytest.approx(0.75)
    crane = camera.preset_motion("crane", 3, 0.5, pd)
    assert crane[-1, 1, 3] == pytest.approx(-1.5)  # up is -y in the OpenCV convention
    pan = camera.preset_motion("pan", 2, 90.0, pd)
    assert torch.allclose(pan[-1, :3, 3], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(pan[-1, :3, 2], torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-12)  # looks +x
    with pytest.raises(WanquantError, match="unknown camera preset"):
        camera.preset_motion("zoom", 3, 1.0, pd)


def test_npz_frame_count_must_match(tmp_path):
    p = tmp_path / "cameras_tgt.npz"
    np.savez(p, cam_c2w=np.tile(np.eye(4), (5, 1, 1)), intrinsics=np.ones((5, 4)))
    c2w, intr = camera.load_npz(str(p), 5)
    assert c2w.shape == (5, 4, 4) and intr.shape == (5, 4)
    with pytest.raises(WanquantError, match="frame count") as e:
        camera.load_npz(str(p), 9)
    assert e.value.file == str(p)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(WanquantError, match="not an upstream Vista4D camera file"):
        camera.load_npz(str(tmp_path / "bad.npz"), 5)


def test_fov_intrinsics():
    intr = camera.intrinsics_from_fov(3, 384, 672, 90.0)
    assert torch.allclose(intr[0], torch.tensor([336.0, 336.0, 336.0, 192.0], dtype=torch.float64))


def test_mask_packing_puts_each_pixel_in_upstreams_channel():
    g = torch.Generator().manual_seed(0)
    f, h, w = 9, 16, 24
    alpha, motion = (torch.rand(f, h, w, generator=g) > 0.5).float(), (torch.rand(f, h, w, generator=g) > 0.5).float()
    packed = streams.pack_masks(alpha, motion)
    assert packed.shape == (1, 512, 3, 2, 3)
    for c, m in enumerate((alpha, motion)):
        for fl in range(3):
            for sf in range(4):
                src = 0 if fl == 0 else 4 * fl + sf - 3  # frame 0 stands for the first four
                for y in range(h):
                    for x in range(w):
                        ch = c * 256 + sf * 64 + (y % 8) * 8 + (x % 8)
                        assert packed[0, ch, fl, y // 8, x // 8] == m[src, y, x]


def test_mask_and_frame_errors():
    with pytest.raises(WanquantError, match="1 \\+ 4k"):
        streams.pack_masks(torch.zeros(6, 8, 8), torch.zeros(6, 8, 8))
    with pytest.raises(WanquantError, match="one size"):
        streams.pack_masks(torch.zeros(5, 8, 8), torch.zeros(5, 8, 16))
    assert streams.check_frames(49, "video") == 13


def test_stream_layout():
    assert streams.stream_t_starts() == (0, 31, 62)
    pl = torch.arange(2 * 13 * 2 * 3 * 6, dtype=torch.float64).reshape(2 * 13, 2, 3, 6)[None, :13]
    tok = streams.tokens_for_streams(pl)
    assert tok.shape == (1, 3 * 13 * 6, 6)
    assert torch.equal(tok[:, :78], tok[:, 78:156]) and torch.equal(tok[:, :78], tok[:, 156:])
    assert torch.equal(tok[0, 7], pl[0, 1, 0, 1])  # token 7 = frame 1, row 0, column 1 (f h w order)
    assert torch.equal(streams.plucker_for_latents(torch.arange(49)), torch.arange(0, 49, 4))
