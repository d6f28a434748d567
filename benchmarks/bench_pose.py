"""Pose preprocessing benchmark: everything except the two ONNX model calls, per frame.

Runs the real pipeline on 832x480 frames with tiny fake ONNX models (tests/pose/onnx_fakes.py,
needs ``onnx``), times the model calls separately and reports the rest: detector pre/post-
processing, crop + normalisation, DARK decoding, AAPose split, face crop and drawing (target:
<= 8 ms/frame). The baseline, timed in the same run, is a per-keypoint Python DARK decode
written the way upstream does it (Wan ``keypoints_from_heatmaps``: one blur per map, one
``np.linalg.inv`` per keypoint). Also reports whole-pipeline frames/s with the fake models for
ViTPose batch 1 versus batched (on CPU the tiny fake model gains nothing from batching; the
dynamic batch pays off with the real ViTPose on GPU).

    python -m wanquant.benchmarks.bench_pose [--frames 48] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

W, H = 832, 480


def _fakes():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pose"))
    import onnx_fakes
    return onnx_fakes


def upstream_style_decode(heatmaps, centers, sizes):
    """Baseline: Python loops over every keypoint, per-map blur in float64 (upstream's shape)."""
    n, k, h, w = heatmaps.shape
    hm = heatmaps.copy()
    maxvals = hm.reshape(n, k, -1).max(axis=2)
    idx = hm.reshape(n, k, -1).argmax(axis=2)
    preds = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
    preds = np.where(maxvals[..., None] > 0, preds, -1)
    for i in range(n):
        for j in range(k):
            origin_max = np.max(hm[i, j])
            dr = np.zeros((h + 10, w + 10), dtype=np.float32)
            dr[5:-5, 5:-5] = hm[i, j].copy()
            dr = cv2.GaussianBlur(dr, (11, 11), 0)
            hm[i, j] = dr[5:-5, 5:-5].copy()
            hm[i, j] *= origin_max / np.max(hm[i, j])
    hm = np.log(np.maximum(hm, 1e-10))
    for i in range(n):
        for j in range(k):
            px, py = int(preds[i, j, 0]), int(preds[i, j, 1])
            L = hm[i, j]
            if 1 < px < w - 2 and 1 < py < h - 2:
                dx = 0.5 * (L[py][px + 1] - L[py][px - 1])
                dy = 0.5 * (L[py + 1][px] - L[py - 1][px])
                dxx = 0.25 * (L[py][px + 2] - 2 * L[py][px] + L[py][px - 2])
                dxy = 0.25 * (L[py + 1][px + 1] - L[py - 1][px + 1] - L[py + 1][px - 1] + L[py - 1][px - 1])
                dyy = 0.25 * (L[py + 2][px] - 2 * L[py][px] + L[py - 2][px])
                hess = np.array([[dxx, dxy], [dxy, dyy]])
                if dxx * dyy - dxy ** 2 != 0:
                    preds[i, j] -= (np.linalg.inv(hess) @ np.array([dx, dy])).astype(np.float32)
    out = preds * (sizes[:, None, :] / np.array([w, h])) + centers[:, None, :] - sizes[:, None, :] * 0.5
    return np.concatenate([out, maxvals[..., None]], axis=2)


def median_of(fn, repeat=5):
    """Median wall time and median CPU time of ``repeat`` runs (reproducible across runs on a
    shared machine, unlike a minimum that rewards one lucky run)."""
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


class StubModel:
    """Stands in for an ONNX session with precomputed outputs, so a pipeline run times
    everything *except* the model calls."""

    def __init__(self, output, input_hw, static_batch):
        self.output, self.input_hw, self.static_batch = output, input_hw, static_batch
        self.providers = ["stub"]

    def run(self, x):
        return self.output[:len(x)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)

    from wanquant.pose import decode as decodemod
    from wanquant.pose.pipeline import PoseOptions, PosePipeline, render_frame
    from wanquant.pose.sessions import open_model

    fk = _fakes()
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="wq-bench-pose-"))
    # a standing person about 420 px tall in an 832x480 frame
    det = open_model(fk.yolo(tmp / "det.onnx", [[220, 60, 420, 620, 0.9, 0]]), "detector", "cpu")
    pose = open_model(fk.vitpose_seeded(tmp / "pose.onnx"), "pose", "cpu")
    frames = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(args.frames)]
    get = frames.__getitem__

    # 1. everything but the model calls: the pipeline with stub models returning realistic
    #    outputs (a person box; a Gaussian blob per keypoint)
    blobs = [fk.gaussian_maps({k: (rng.uniform(3, 45), rng.uniform(3, 61)) for k in range(133)},
                              peak=float(rng.uniform(0.5, 1.0))) for _ in range(args.batch)]
    det_out = np.zeros((1, 300, 6), np.float32)
    det_out[0, 0] = [220, 60, 420, 620, 0.9, 0]
    stub = PosePipeline(StubModel(det_out, (640, 640), 1), StubModel(np.concatenate(blobs), (256, 192), None),
                        PoseOptions(pose_batch_size=args.batch))
    holder = {}
    wall, cpu = median_of(lambda: holder.__setitem__("data", stub.run(args.frames, get, (W, H))[0]))
    non_model, non_model_cpu = wall / args.frames, cpu / args.frames
    data = holder["data"]
    t_draw, t_draw_cpu = median_of(lambda: [render_frame(data, i, W, H) for i in range(len(data))], 3)
    t_draw, t_draw_cpu = t_draw / len(data), t_draw_cpu / len(data)

    # 2. decode alone, one frame per call as upstream's pipeline does: ours vs upstream-style loops
    centers, sizes = np.array([[416.0, 255.0]]), np.array([[315.0, 420.0]])
    t_ours = median_of(lambda: [decodemod.decode(m, centers, sizes) for m in blobs])[0] / len(blobs)
    t_up = median_of(lambda: [upstream_style_decode(m, centers, sizes) for m in blobs], 3)[0] / len(blobs)
    diff = max(np.abs(decodemod.decode(m, centers, sizes) - upstream_style_decode(m, centers, sizes))[..., :2].max()
               for m in blobs)

    # 3. whole pipeline with the fake ONNX models: ViTPose batch 1 vs batched
    results = {}
    for bs in (1, args.batch):
        pipe = PosePipeline(det, pose, PoseOptions(pose_batch_size=bs))
        pipe.run(min(4, args.frames), get, (W, H))  # warm-up
        best = None
        for _ in range(3):
            t = pipe.run(args.frames, get, (W, H))[0].timings
            if best is None or t["total_s"] < best["total_s"]:
                best = dict(t)
        results[bs] = best

    print(f"pose benchmark, {args.frames} frames {W}x{H}, CPU (median of 5 runs; wall / CPU time)")
    print(f"  non-model work (detect pre/post, crop, decode, meta, face) : {non_model * 1e3:6.2f} / "
          f"{non_model_cpu * 1e3:6.2f} ms/frame")
    print(f"  drawing (832x480 canvas)                                   : {t_draw * 1e3:6.2f} / "
          f"{t_draw_cpu * 1e3:6.2f} ms/frame")
    print(f"  total excluding the two model calls                        : {(non_model + t_draw) * 1e3:6.2f} / "
          f"{(non_model_cpu + t_draw_cpu) * 1e3:6.2f} ms/frame  (target <= 8)")
    print(f"  DARK decode, ours                                          : {t_ours * 1e3:6.2f} ms/frame")
    print(f"  DARK decode, upstream-style loops (baseline, same run)     : {t_up * 1e3:6.2f} ms/frame"
          f"  -> {t_up / t_ours:5.1f}x (max |dx| {diff:.1e} px)")
    print(f"  upstream-style decode alone / our whole non-model path     : {t_up / (non_model + t_draw):5.2f}x")
    for bs, r in results.items():
        fps = r["frames"] / r["total_s"]
        print(f"  whole pipeline, fake models, ViTPose batch {bs:2d}             : {fps:6.1f} frames/s "
              f"(model calls {r['model_s'] / r['frames'] * 1e3:.2f} ms/frame)")
    print(f"  batched / batch-1 throughput                               : "
          f"{(results[args.batch]['frames'] / results[args.batch]['total_s']) / (results[1]['frames'] / results[1]['total_s']):5.2f}x")


if __name__ == "__main__":
    main()
