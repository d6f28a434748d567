"""Tiny fake detector / ViTPose graphs built with ``onnx.helper`` (POSE.md §13).

They have the real models' names, shapes and static/dynamic batch, so the code under test can
not tell them apart, but their outputs are chosen by the test: a fixed detection table, fixed
Gaussian heatmaps, or a 1x1 convolution of the 4x4-pooled input (input-dependent, for batching
and colour/geometry probes). Built in milliseconds into ``tmp_path``; never committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
HM_H, HM_W = 64, 48


def _save(graph, path: Path, external: dict | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, size_threshold=1024, **external)
    else:
        onnx.save_model(model, str(path))
    return path


def yolo(path: Path, rows, n_rows: int = 300, score_from_input: bool = False) -> Path:
    """``images [1,3,640,640]`` -> ``output0 [1,n_rows,6]`` holding ``rows`` (x1,y1,x2,y2,score,cls).

    With ``score_from_input`` the first row's score is the mean input value (so a black image
    has no person and a white one a confident person); otherwise the table is constant."""
    table = np.zeros((1, n_rows, 6), dtype=np.float32)
    for i, r in enumerate(rows):
        table[0, i] = r
    mask = np.zeros((1, n_rows, 6), dtype=np.float32)
    if score_from_input:
        table[0, 0, 4] = 0.0
        mask[0, 0, 4] = 1.0 / (3 * 640 * 640)  # ReduceSum * this = mean
    nodes = [
        helper.make_node("ReduceSum", ["images", "axes"], ["s"], keepdims=1),
        helper.make_node("Squeeze", ["s", "sq_axes"], ["s3"]),
        helper.make_node("Mul", ["s3", "mask"], ["z"]),
        helper.make_node("Add", ["z", "table"], ["output0"]),
    ]
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([3], np.int64), "sq_axes"),
             numpy_helper.from_array(mask, "mask"),
             numpy_helper.from_array(table, "table")]
    g = helper.make_graph(nodes, "fake_yolo",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
                          [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, n_rows, 6])], inits)
    return _save(g, path)


def gaussian_maps(blobs: dict, sigma: float = 2.0, peak: float = 0.9) -> np.ndarray:
    """``[1,133,64,48]`` with a Gaussian at heatmap (x, y) for each keypoint in ``blobs``."""
    maps = np.zeros((1, 133, HM_H, HM_W), dtype=np.float32)
    yy, xx = np.mgrid[0:HM_H, 0:HM_W]
    for k, (x, y) in blobs.items():
        maps[0, k] = peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return maps


def vitpose_const(path: Path, maps: np.ndarray, batch="batch_size", external: dict | None = None) -> Path:
    """``input_0 [batch,3,256,192]`` -> ``output_0 [batch,133,64,48]`` = ``maps`` for every item."""
    nodes = [
        helper.make_node("ReduceSum", ["input_0", "axes"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["z", "maps"], ["output_0"]),
    ]
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
             numpy_helper.from_array(maps.astype(np.float32), "maps")]
    g = helper.make_graph(nodes, "fake_vitpose",
                          [helper.make_tensor_value_info("input_0", TensorProto.FLOAT, [batch, 3, 256, 192])],
                          [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, [batch, 133, HM_H, HM_W])],
                          inits)
    return _save(g, path, external)


def vitpose_conv(path: Path, weight: np.ndarray, bias: np.ndarray, channels: int = 133,
                 batch="batch_size") -> Path:
    """``AveragePool 4x4/4`` then ``Conv 1x1`` (3 -> channels): heatmaps depend on the input."""
    nodes = [
        helper.make_node("AveragePool", ["input_0"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["p", "w", "b"], ["output_0"], kernel_shape=[1, 1]),
    ]
    inits = [numpy_helper.from_array(weight.reshape(channels, 3, 1, 1).astype(np.float32), "w"),
             numpy_helper.from_array(bias.reshape(channels).astype(np.float32), "b")]
    g = helper.make_graph(nodes, "fake_vitpose_conv",
                          [helper.make_tensor_value_info("input_0", TensorProto.FLOAT, [batch, 3, 256, 192])],
                          [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, [batch, channels, HM_H, HM_W])],
                          inits)
    return _save(g, path)


def vitpose_seeded(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return vitpose_conv(path, rng.normal(size=(133, 3)), rng.normal(size=133))


# Channel probe: keypoint A follows the model's input channel 0, keypoint B input channel 2; the
# biases cancel the normalisation so black input gives exactly 0.
PROBE_A, PROBE_B = 0, 1


def vitpose_probe(path: Path) -> Path:
    w = np.zeros((133, 3))
    b = np.zeros(133)
    w[PROBE_A, 0] = 1.0
    b[PROBE_A] = 0.485 / 0.229
    w[PROBE_B, 2] = 1.0
    b[PROBE_B] = 0.406 / 0.225
    return vitpose_conv(path, w, b)
