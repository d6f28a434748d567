"""Person detection: YOLO pre/post-processing as Wan's ``pose2d.Yolo`` does it.

The detector only has to give ViTPose a box around the dancer; the crop that follows pads it
by 1.25, so Wan's integer truncation and its "largest person" rule are reproduced as they are
(the pose model was trained and evaluated behind exactly this box logic). One upstream quirk is
fixed by default: Wan runs NMS across *all* classes before it filters persons, so a chair or a
cat that overlaps the dancer with a higher score deletes the person and the frame falls back to
the whole image; ``class_agnostic_nms=True`` restores that for bit-parity.
"""

from __future__ import annotations

import cv2
import numpy as np

CONF_THRESHOLD = 0.05
IOU_THRESHOLD = 0.5
SHAPE_RATIO = 0.4
PERSON_CLASS = 0


def preprocess(frame: np.ndarray, input_hw: tuple[int, int] = (640, 640)) -> np.ndarray:
    """RGB uint8 frame -> ``[1,3,h,w]`` float32 in 0..1: a plain stretch, no letterbox."""
    h, w = input_hw
    img = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
    out = img.transpose(2, 0, 1)[None].astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


def fallback_box(width: int, height: int) -> np.ndarray:
    """The full-frame box Wan uses when nobody is found; score -1 marks it as a fallback."""
    return np.array([0.0, 0.0, float(width), float(height), -1.0])


def _rows(output: np.ndarray) -> np.ndarray:
    """Detector output -> rows ``x1,y1,x2,y2,score,class`` in input pixels (float64).

    ``[1,N,6]`` is the YOLOv10 end-to-end export; ``[1,84,N]`` (YOLOv8 style: centre xywh and
    80 class scores, transposed) is also accepted, as upstream does."""
    out = np.asarray(output, dtype=np.float64)
    out = out.reshape(out.shape[-2], out.shape[-1]) if out.ndim == 3 else out
    if out.ndim != 2:
        raise ValueError(f"detector output must be [1,N,6] or [1,84,N], got shape {np.shape(output)}")
    if out.shape[-1] == 6:
        return out
    if out.shape[0] == 84:
        out = out.T
        scores = out[:, 4:].max(axis=1)
        cls = out[:, 4:].argmax(axis=1).astype(np.float64)
        x, y, w, h = out[:, 0], out[:, 1], out[:, 2], out[:, 3]
        return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2, scores, cls], axis=1)
    raise ValueError(f"detector output must be [1,N,6] or [1,84,N], got shape {np.shape(output)}")


def nms_detections(output: np.ndarray, width: int, height: int,
                   input_hw: tuple[int, int] = (640, 640), conf: float = CONF_THRESHOLD,
                   iou: float = IOU_THRESHOLD, class_agnostic_nms: bool = False) -> np.ndarray:
    """Detections surviving the threshold and NMS, in frame pixels, sorted by score.

    Returns ``[M,6]`` rows ``x1,y1,x2,y2,score,class`` with integer-truncated boxes: Wan scales
    to the frame, converts to ``x,y,w,h``, casts to int32 (truncation), and hands that to
    ``cv2.dnn.NMSBoxes``; the result comes back as ``x,y,x+w,y+h``."""
    rows = _rows(output)
    rows = rows[rows[:, 4] >= conf]
    if not class_agnostic_nms:
        rows = rows[rows[:, 5] == PERSON_CLASS]
    if len(rows) == 0:
        return np.zeros((0, 6))
    in_h, in_w = input_hw
    xf, yf = width / in_w, height / in_h
    b = rows[:, :4].copy()
    b[:, [0, 2]] *= xf
    b[:, [1, 3]] *= yf
    b[:, 2] -= b[:, 0]
    b[:, 3] -= b[:, 1]
    b = b.astype(np.int32)
    keep = np.asarray(cv2.dnn.NMSBoxes(b.tolist(), rows[:, 4].tolist(), conf, iou), dtype=np.int64).reshape(-1)
    out = np.zeros((len(keep), 6))
    for j, i in enumerate(keep):
        x, y, w, h = (float(v) for v in b[i])
        out[j] = (x, y, x + w, y + h, rows[i, 4], rows[i, 5])
    return out


def select_person(dets: np.ndarray, width: int, height: int, conf: float = CONF_THRESHOLD,
                  shape_ratio: float = SHAPE_RATIO) -> np.ndarray:
    """Wan's person pick (``Yolo.process_results``, select_type 'max', strict).

    Walk persons in NMS order; a box wins if its area beats the best so far and its longer side
    is at least ``shape_ratio`` x the reference (first the largest longer side among persons,
    then the last winner's). In practice the largest person. ``[x1,y1,x2,y2,score]`` or the
    full-frame fallback ``[0,0,W,H,-1]``."""
    cand = [r for r in dets if r[5] == PERSON_CLASS and r[4] > conf]
    if not cand:
        return fallback_box(width, height)
    ref_shape = max(max(r[2] - r[0], r[3] - r[1]) for r in cand)
    best, best_size = None, width * height * -10.0
    for r in cand:
        size = (r[2] - r[0]) * (r[3] - r[1])
        shape = max(r[2] - r[0], r[3] - r[1])
        if size > best_size:
            if shape < ref_shape * shape_ratio:
                continue
            best, best_size, ref_shape = r, size, shape
    if best is None:
        return fallback_box(width, height)
    return np.asarray(best[:5], dtype=np.float64)


def postprocess(output: np.ndarray, width: int, height: int, input_hw: tuple[int, int] = (640, 640),
                class_agnostic_nms: bool = False) -> np.ndarray:
    """Detector output for one frame -> the chosen person box ``[x1,y1,x2,y2,score]``."""
    dets = nms_detections(output, width, height, input_hw, class_agnostic_nms=class_agnostic_nms)
    return select_person(dets, width, height)
