"""onnxruntime sessions: providers actually used, CUDA fallback warning, clear errors for bad files."""

import logging

import numpy as np
import pytest

from wanquant.errors import WanquantError
from wanquant.pose import sessions
from onnx_fakes import gaussian_maps, vitpose_conv, vitpose_const, yolo


@pytest.fixture
def yolo_path(tmp_path):
    return yolo(tmp_path / "yolov10m.onnx", [[200, 80, 440, 560, 0.9, 0]])


def test_cpu_session_reports_its_provider_and_shapes(yolo_path):
    m = sessions.open_model(yolo_path, "detector", "cpu")
    assert m.providers == ["CPUExecutionProvider"]
    assert m.input_hw == (640, 640) and m.static_batch == 1
    assert m.input_name == "images" and m.output_name == "output0"


def test_dynamic_batch_pose_model(tmp_path):
    m = sessions.open_model(vitpose_const(tmp_path / "v.onnx", gaussian_maps({})), "pose", "cpu")
    assert m.static_batch is None and m.input_hw == (256, 192)


def test_auto_without_cuda_uses_cpu(yolo_path):
    import onnxruntime as ort
    if sessions.CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA")
    assert sessions.provider_list("auto")[0] == ["CPUExecutionProvider"]
    assert sessions.open_model(yolo_path, "detector", "auto").providers == ["CPUExecutionProvider"]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_request_on_cpu_onnxruntime_warns_and_runs_on_cpu(yolo_path, caplog):
    import onnxruntime as ort
    if sessions.CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA")
    providers, wanted = sessions.provider_list("cuda", device_id=0)
    assert wanted == sessions.CUDA and providers[0][0] == sessions.CUDA
    assert providers[0][1]["cudnn_conv_algo_search"] == "HEURISTIC"
    with caplog.at_level(logging.WARNING, logger="wanquant.pose.sessions"):
        m = sessions.open_model(yolo_path, "detector", "cuda")
    assert m.providers[0] == "CPUExecutionProvider"
    assert any("CUDA was requested" in r.getMessage() and "cuDNN" in r.getMessage() for r in caplog.records)
    out = m.run(np.zeros((1, 3, 640, 640), np.float32))
    assert out.shape == (1, 300, 6)


def test_unknown_provider_choice(yolo_path):
    with pytest.raises(WanquantError, match="auto, cuda or cpu"):
        sessions.open_model(yolo_path, "detector", "tpu")


def test_corrupt_file_names_file_and_expected_io(tmp_path):
    bad = tmp_path / "vitpose-l-wholebody.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(WanquantError) as ei:
        sessions.open_model(bad, "pose", "cpu")
    assert str(bad) in str(ei.value) and "[batch,133,64,48]" in str(ei.value)


def test_coco17_vitpose_is_rejected(tmp_path):
    p = vitpose_conv(tmp_path / "coco17.onnx", np.zeros((17, 3)), np.zeros(17), channels=17)
    with pytest.raises(WanquantError) as ei:
        sessions.open_model(p, "pose", "cpu")
    assert "coco17.onnx" in str(ei.value) and "133" in str(ei.value) and "17" in ei.value.found


def test_detector_given_as_pose_model_is_rejected(yolo_path):
    with pytest.raises(WanquantError, match="does not look like a pose model"):
        sessions.open_model(yolo_path, "pose", "cpu")


def test_duplicate_onnxruntime_wheels_warn_once(monkeypatch, caplog):
    monkeypatch.setattr(sessions, "installed_ort_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    monkeypatch.setattr(sessions, "_warned_duplicates", False)
    with caplog.at_level(logging.WARNING, logger="wanquant.pose.sessions"):
        sessions.warn_duplicate_ort()
        sessions.warn_duplicate_ort()
    msgs = [r.getMessage() for r in caplog.records if "several onnxruntime" in r.getMessage()]
    assert len(msgs) == 1 and "pip uninstall -y onnxruntime onnxruntime-gpu" in msgs[0]
