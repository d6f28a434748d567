"""End to end with fake models: colour/geometry probe, batching, fallbacks and bad input."""

import numpy as np
import pytest

from wanquant.errors import WanquantError
from wanquant.pose import sessions
from wanquant.pose.pipeline import PoseOptions, PosePipeline, render_frame
from onnx_fakes import PROBE_A, PROBE_B, gaussian_maps, vitpose_const, vitpose_probe, vitpose_seeded, yolo

W, H = 320, 240
# frame box [100,30,220,210] is [200,80,440,560] in 640 space (x*0.5, y*0.375 exactly)
PERSON = [200, 80, 440, 560, 0.9, 0]


def model(path, role):
    return sessions.open_model(path, role, "cpu")


@pytest.fixture
def det(tmp_path):
    return model(yolo(tmp_path / "det.onnx", [PERSON]), "detector")


def red_square_frame(x0=150, y0=100, size=8):
    f = np.zeros((H, W, 3), np.uint8)
    f[y0:y0 + size, x0:x0 + size] = (255, 0, 0)
    return f


@pytest.mark.parametrize("compat", [False, True])
def test_probe_crop_affine_decode_and_colour_order(tmp_path, det, compat):
    pipe = PosePipeline(det, model(vitpose_probe(tmp_path / "probe.onnx"), "pose"),
                        PoseOptions(upstream_compat=compat))
    frame = red_square_frame()
    data, faces = pipe.run(1, lambda i: frame)
    raw = data.metas[0].raw
    np.testing.assert_allclose(data.bboxes[0], [100, 30, 220, 210, 0.9], atol=1e-6)
    lit, dark = (PROBE_B, PROBE_A) if compat else (PROBE_A, PROBE_B)
    # crop: hc = 1.25*180 = 225, wc = 168.75 -> one heatmap px = 3.52 image px
    assert abs(raw[lit, 0] - 153.5) < 168.75 / 48 and abs(raw[lit, 1] - 103.5) < 225 / 64
    assert raw[lit, 2] > 1 and abs(raw[dark, 2]) < 1e-5  # dark channel: all black (0 up to rounding)
    assert faces.shape == (1, 512, 512, 3)


def test_batched_pose_equals_one_by_one(tmp_path, det):
    pose = model(vitpose_seeded(tmp_path / "seeded.onnx"), "pose")
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(5)]
    one, _ = PosePipeline(det, pose, PoseOptions(pose_batch_size=1)).run(5, frames.__getitem__)
    many, _ = PosePipeline(det, pose, PoseOptions(pose_batch_size=4)).run(5, frames.__getitem__)
    for a, b in zip(one.metas, many.metas):
        np.testing.assert_allclose(a.raw, b.raw, atol=1e-4)


def test_static_batch_pose_model_is_fed_in_its_batch_size(tmp_path, det):
    maps = gaussian_maps({0: (24, 8)})
    pose = model(vitpose_const(tmp_path / "static.onnx", maps, batch=1), "pose")
    assert pose.static_batch == 1
    data, _ = PosePipeline(det, pose, PoseOptions(pose_batch_size=3)).run(4, lambda i: red_square_frame())
    assert len(data.metas) == 4 and all(m.raw[0, 2] == pytest.approx(0.9) for m in data.metas)


def test_no_person_frames_fall_back_and_are_reported(tmp_path):
    det = model(yolo(tmp_path / "det.onnx", [PERSON], score_from_input=True), "detector")
    pose = model(vitpose_const(tmp_path / "v.onnx", gaussian_maps({k: (24, 30) for k in range(133)})), "pose")
    frames = [np.full((H, W, 3), v, np.uint8) for v in (255, 0, 0, 255, 0)]  # black = nobody
    data, faces = PosePipeline(det, pose).run(5, frames.__getitem__)
    assert data.no_person_frames == [1, 2, 4]
    assert data.bboxes[1].tolist() == [0, 0, W, H, -1]
    assert "no person (full-frame fallback): 1-2, 4" in data.report()
    assert faces.shape == (5, 512, 512, 3)


def test_face_fallback_when_landmarks_collapse(tmp_path, det):
    # every keypoint at the same heatmap spot -> zero-size face box -> default box, reported
    pose = model(vitpose_const(tmp_path / "v.onnx", gaussian_maps({k: (24, 30) for k in range(133)})), "pose")
    data, faces = PosePipeline(det, pose).run(2, lambda i: red_square_frame())
    assert data.face_fallback_frames == [0, 1]
    assert data.face_boxes[0] == (124, 24, 196, 96)  # 0.3*240=72 square, x (320-72)//2, top 0.1*240
    assert faces.shape == (2, 512, 512, 3)


def test_empty_batch_is_a_clear_error(tmp_path, det):
    pose = model(vitpose_seeded(tmp_path / "s.onnx"), "pose")
    with pytest.raises(WanquantError, match="empty"):
        PosePipeline(det, pose).run(0, lambda i: None)


def test_mixed_frame_sizes_are_a_clear_error(tmp_path, det):
    pose = model(vitpose_seeded(tmp_path / "s.onnx"), "pose")
    frames = [np.zeros((H, W, 3), np.uint8), np.zeros((H + 2, W, 3), np.uint8)]
    with pytest.raises(WanquantError, match="frame 1"):
        PosePipeline(det, pose).run(2, frames.__getitem__)


def test_one_pixel_frames(tmp_path, det):
    pose = model(vitpose_seeded(tmp_path / "s.onnx"), "pose")
    frame = np.full((1, 1, 3), 128, np.uint8)
    data, faces = PosePipeline(det, pose).run(3, lambda i: frame, target_size=(64, 48))
    assert faces.shape == (3, 512, 512, 3) and (faces == 128).all()
    img = render_frame(data, 0, 64, 48)
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8


def test_retarget_through_the_pipeline_and_reference_without_person(tmp_path):
    det = model(yolo(tmp_path / "det.onnx", [PERSON], score_from_input=True), "detector")
    blobs = {k: (10 + (k * 7) % 28, 8 + (k * 5) % 48) for k in range(133)}
    pose = model(vitpose_const(tmp_path / "v.onnx", gaussian_maps(blobs)), "pose")
    frames = [np.full((H, W, 3), 255, np.uint8)] * 2
    pipe = PosePipeline(det, pose)
    data, _ = pipe.run(2, frames.__getitem__, target_size=(160, 96),
                       reference=np.full((300, 500, 3), 255, np.uint8))
    assert data.retargeted is not None and len(data.retargeted) == 2
    assert (data.reference.width, data.reference.height) == (160, 96)
    assert all(np.isfinite(m.body).all() for m in data.retargeted)
    img = render_frame(data, 1, 160, 96)
    assert img.shape == (96, 160, 3) and img.any()
    with pytest.raises(WanquantError, match="no person was found in the reference image"):
        pipe.run(2, frames.__getitem__, target_size=(160, 96), reference=np.zeros((300, 500, 3), np.uint8))


def test_render_letterboxes_source_canvas_to_target(tmp_path, det):
    pose = model(vitpose_const(tmp_path / "v.onnx", gaussian_maps({k: (24, 30) for k in range(133)})), "pose")
    data, _ = PosePipeline(det, pose).run(1, lambda i: red_square_frame(), target_size=(832, 480))
    img = render_frame(data, 0, 832, 480)
    # 320x240 canvas -> 640x480 inside 832x480, bars of 96 px each side
    assert img.shape == (480, 832, 3) and not img[:, :96].any() and not img[:, 736:].any()
    assert img[:, 96:736].any()
    assert data.providers == {"detector": ["CPUExecutionProvider"], "pose": ["CPUExecutionProvider"]}
