"""Point-cloud renderer: hand-computed projections, z-buffer order, alpha/motion semantics.
The multi-point cases also run with one point per pass (``CHUNK_POINTS = 1``): the nearest
surface and the blend must come out the same when the fragments arrive in separate passes."""

import pytest
import torch

from wanquant.errors import WanquantError
from wanquant.vista4d import render
from wanquant.vista4d.render import render_frame, render_video

EYE = torch.eye(4, dtype=torch.float64)


def _K(fx, cx, cy):
    return torch.tensor([[fx, 0, cx], [0, fx, cy], [0, 0, 1]], dtype=torch.float64)


def test_single_point_splats_bilinearly_where_the_pinhole_puts_it():
    p = torch.tensor([[0.1, 0.0, 2.0]], dtype=torch.float64)  # u = 10 * 0.1 / 2 + 2.75 = 3.25, v = 2.5
    rgb, alpha, motion = render_frame(torch.tensor([[0.2, 0.4, 0.6]], dtype=torch.float64), p,
                                      torch.tensor([True]), EYE, _K(10, 2.75, 2.5), 6, 8)
    want = torch.zeros(6, 8, dtype=torch.bool)
    want[2:4, 3:5] = True  # (u0, v0) = (3, 2) and its right/lower neighbours
    assert torch.equal(alpha, want)
    assert torch.allclose(rgb[alpha], torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64).expand(4, 3))
    assert torch.equal(motion, want)


def test_point_behind_the_camera_and_outside_the_image_draw_nothing():
    pts = torch.tensor([[0.0, 0.0, -2.0], [5.0, 0.0, 1.0]], dtype=torch.float64)
    _, alpha, _ = render_frame(torch.ones(2, 3, dtype=torch.float64), pts, torch.tensor([True, True]),
                               EYE, _K(10, 2.75, 2.5), 6, 8)
    assert not alpha.any()


def test_points_near_the_camera_plane_or_far_off_screen_never_wrap_onto_the_image():
    """Projections of 1e9 pixels (a point just in front of the camera) or at the image's edge: only
    the on-screen part of a footprint is drawn; nothing wraps around through an integer overflow."""
    pts = torch.tensor([[1.0, 1.0, 2e-5], [-1.0, -1.0, 2e-5], [1e12, 0.0, 1.0], [-0.275, 0.0, 1.0]], dtype=torch.float64)
    rgb, alpha, _ = render_frame(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64),
                                 pts, torch.ones(4, dtype=torch.bool), EYE, _K(10, 2.75, 2.5), 6, 8)
    # the last point: u = 10 * -0.275 + 2.75 = 0.0 exactly, v = 2.5: columns 0 (weight 1) and 1 (weight 0)
    want = torch.zeros(6, 8, dtype=torch.bool)
    want[2:4, 0] = True
    assert torch.equal(alpha, want)
    assert torch.allclose(rgb[alpha], torch.tensor([0, 1.0, 0], dtype=torch.float64).expand(2, 3))


def test_render_video_reports_each_frame_and_renders_on_the_device_asked():
    video, depths, cams, intr = _flat_scene(frames=3)
    seen = []
    rgb, alpha, motion = render_video(video, depths, cams, cams, intr, intr, device="cpu", frame_done=seen.append)
    assert seen == [0, 1, 2] and rgb.device.type == alpha.device.type == motion.device.type == "cpu"
    assert alpha.all()


@pytest.fixture(params=["one pass", "a pass per point"])
def passes(request, monkeypatch):
    if request.param == "a pass per point":
        monkeypatch.setattr(render, "CHUNK_POINTS", 1)
    return request.param


@pytest.mark.parametrize("near_first", [True, False])
def test_nearest_surface_wins_regardless_of_point_order(near_first, passes):
    near = torch.tensor([0.1, 0.0, 2.0], dtype=torch.float64)
    far = near * 2.0  # same ray, twice as far: same (u, v)
    pts = torch.stack((near, far) if near_first else (far, near))
    cols = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]] if near_first else [[0, 1.0, 0], [1.0, 0, 0]], dtype=torch.float64)
    dyn = torch.tensor([False, True] if near_first else [True, False])
    rgb, alpha, motion = render_frame(cols, pts, dyn, EYE, _K(10, 2.75, 2.5), 6, 8)
    assert torch.allclose(rgb[2, 3], torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert not motion.any()  # the static near surface hides the dynamic far one


def test_surfaces_within_two_percent_blend_by_inverse_depth_power_ten(passes):
    a = torch.tensor([0.1, 0.0, 2.0], dtype=torch.float64)
    b = a * 1.01  # same pixel, 1 % further: |log1p(2.02) - log1p(2)| = 0.0066 <= 0.02
    rgb, _, motion = render_frame(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64), torch.stack((a, b)),
                                  torch.tensor([False, True]), EYE, _K(10, 2.75, 2.5), 6, 8)
    wa, wb = 2.0 ** -10, 2.02 ** -10
    assert torch.allclose(rgb[2, 3], torch.tensor([wa, 0, wb], dtype=torch.float64) / (wa + wb), atol=1e-12)
    assert motion[2, 3]  # any dynamic weight in the blend marks the pixel as moving (upstream: > 0)


def _flat_scene(frames=1, h=4, w=4):
    video = torch.rand(frames, h, w, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    depths = torch.ones(frames, h, w, dtype=torch.float64)
    intr = torch.tensor([[4.0, 4.0, 2.0, 2.0]], dtype=torch.float64).repeat(frames, 1)
    cams = EYE.repeat(frames, 1, 1)
    return video, depths, cams, intr


def test_same_camera_gives_upstreams_half_pixel_box_filter(passes):
    video, depths, cams, intr = _flat_scene()
    rgb, alpha, motion = render_video(video, depths, cams, cams, intr, intr)
    assert alpha.all() and motion.all()  # default masks: everything dynamic (Wan2GP's default)
    assert torch.allclose(rgb[0, 0, 0], video[0, 0, 0])  # only pixel (0, 0)'s point reaches it
    assert torch.allclose(rgb[0, 1, 1], video[0, :2, :2].reshape(4, 3).mean(0))  # four equal bilinear shares


def test_moving_the_camera_right_by_half_a_unit_uncovers_the_last_two_pixels_of_a_depth_one_plane():
    video, depths, cams, intr = _flat_scene()
    tgt = cams.clone()
    tgt[:, 0, 3] = 0.5  # fx * 0.5 / depth 1 = 2 pixels of parallax
    rgb, alpha, _ = render_video(video, depths, cams, tgt, intr, intr)
    assert alpha[0, :, :2].all() and not alpha[0, :, 3].any()
    # source columns 1 (u 1.5 → -0.5) and 2 (u 2.5 → 0.5) each put half their weight on column 0
    assert torch.allclose(rgb[0, 0, 0], (video[0, 0, 1] + video[0, 0, 2]) / 2)
    assert (rgb[0, :, 3] == 0).all()


def test_static_points_persist_across_frames_and_are_not_motion():
    video, depths, cams, intr = _flat_scene(frames=2)
    dynamic = torch.zeros(2, 4, 4, dtype=torch.bool)
    dynamic[:, :, 2:] = True  # right half moves, left half is static background
    tgt = cams.clone()
    tgt[1, 0, 3] = 0.5
    _, alpha, motion = render_video(video, depths, cams, tgt, intr, intr, dynamic=dynamic)
    assert not motion[0, :, 0].any() and motion[0, :, 3].all()
    # frame 1: static points of both frames are drawn; the dynamic right half only from frame 1
    assert alpha[1, :, :2].all() and not alpha[1, :, 3].any()


def test_frame_count_disagreement_is_one_clear_error():
    video, depths, cams, intr = _flat_scene(frames=2)
    with pytest.raises(WanquantError, match="depth") as e:
        render_video(video, depths[:1], cams, cams, intr, intr)
    assert e.value.expected == "2x4x4" and e.value.found == "1x4x4"
    with pytest.raises(WanquantError, match="target cameras"):
        render_video(video, depths, cams, cams[:1], intr, intr)
