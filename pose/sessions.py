"""onnxruntime sessions for the pose models: provider choice, I/O validation, fallbacks made visible.

The detector and ViTPose graphs come from several exporters; a wrong file (a COCO-17 ViTPose, a
YOLOv8 with another head, a truncated download) otherwise fails deep inside the pipeline with
a shape error. Each session is validated once at creation against the expected input/output
shapes, and the providers that actually run are reported, because "asked for CUDA, silently
got CPU" is the most common complaint about ONNX pose nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import WanquantError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

EXPECTED_IO = {
    "detector": "input [1,3,640,640] float32 (images, RGB 0..1); output [1,N,6] (x1,y1,x2,y2,score,class) "
                "or [1,84,N] (YOLOv8)",
    "pose": "input [batch,3,256,192] float32 (input_0); output [batch,133,64,48] heatmaps "
            "(COCO-WholeBody 133 keypoints)",
}
_warned_duplicates = False
_preloaded = False


def installed_ort_distributions() -> list[str]:
    """Which onnxruntime wheels are installed (several at once shadow each other); install.py,
    which must run on its own, owns the list and the lookup."""
    from ..install import installed

    return installed()


def warn_duplicate_ort() -> None:
    """Warn once when more than one onnxruntime wheel is installed (then the GPU one may be shadowed)."""
    global _warned_duplicates
    if _warned_duplicates:
        return
    _warned_duplicates = True
    dists = installed_ort_distributions()
    if len(dists) > 1:
        log.warning("several onnxruntime packages are installed (%s); they share one import name, so the "
                    "pose models may silently run on CPU. Fix: pip uninstall -y %s, then pip install "
                    "onnxruntime-gpu", ", ".join(dists), " ".join(dists))


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        from ..install import install_command

        raise WanquantError(f"onnxruntime is not installed (the pose nodes need it); install it with: "
                            f"{install_command()}", expected="an importable onnxruntime") from exc
    return ort


def provider_list(choice: str, device_id: int = 0) -> tuple[list, str]:
    """``auto | cuda | cpu`` -> (providers for InferenceSession, the provider asked for)."""
    ort = import_ort()
    choice = (choice or "auto").lower()
    if choice not in ("auto", "cuda", "cpu"):
        raise WanquantError(f"unknown execution provider choice {choice!r}", expected="auto, cuda or cpu")
    want_cuda = choice == "cuda" or (choice == "auto" and CUDA in ort.get_available_providers())
    if not want_cuda:
        return [CPU], CPU
    global _preloaded
    if not _preloaded and hasattr(ort, "preload_dlls"):
        _preloaded = True
        try:
            ort.preload_dlls()
        except Exception as exc:  # best effort: the session below reports what really runs
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    opts = {"device_id": int(device_id), "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC"}
    return [(CUDA, opts), CPU], CUDA


def _dims(shape) -> list:
    """Static dims as int, symbolic ones (str/None) as None."""
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


@dataclass
class OnnxModel:
    """An onnxruntime session plus what was learnt about it when it was opened."""
    path: Path
    role: str
    session: object
    input_name: str
    output_name: str
    input_shape: list
    output_shape: list
    providers: list = field(default_factory=list)

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.input_shape[2]), int(self.input_shape[3])

    @property
    def static_batch(self) -> int | None:
        """The fixed batch size of the graph, or None when the batch is dynamic."""
        return self.input_shape[0]

    def run(self, x):
        return self.session.run([self.output_name], {self.input_name: x})[0]


def _validate(role: str, path: Path, ins, outs) -> tuple[list, list]:
    if len(ins) < 1 or len(outs) < 1:
        raise WanquantError(f"is not a {role} model (no inputs or outputs)", file=path,
                            expected=EXPECTED_IO[role], found=f"{len(ins)} inputs, {len(outs)} outputs")
    i_shape, o_shape = _dims(ins[0].shape), _dims(outs[0].shape)
    found = f"input {ins[0].name} {list(ins[0].shape)}, output {outs[0].name} {list(outs[0].shape)}"
    ok = len(i_shape) == 4 and i_shape[1] == 3 and i_shape[2] is not None and i_shape[3] is not None \
        and "float" in str(ins[0].type)
    if role == "detector":
        ok = ok and len(o_shape) == 3 and (o_shape[2] == 6 or o_shape[1] == 84)
    else:
        ok = ok and len(o_shape) == 4 and o_shape[1] == 133
    if not ok:
        raise WanquantError(f"does not look like a {role} model", file=path, expected=EXPECTED_IO[role], found=found)
    return i_shape, o_shape


def open_model(path: str | Path, role: str, provider: str = "auto", device_id: int = 0) -> OnnxModel:
    """Open and validate one model. ``path`` must be a file path (ORT then finds external data)."""
    ort = import_ort()
    warn_duplicate_ort()
    path = Path(path)
    providers, wanted = provider_list(provider, device_id)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise WanquantError(f"onnxruntime cannot load this {role} model: {msg}", file=path,
                            expected=EXPECTED_IO[role]) from exc
    i_shape, o_shape = _validate(role, path, sess.get_inputs(), sess.get_outputs())
    used = list(sess.get_providers())
    if wanted == CUDA and (not used or used[0] != CUDA):
        log.warning("%s: CUDA was requested but onnxruntime runs it on %s. Likely causes: missing CUDA/cuDNN "
                    "libraries, the CPU onnxruntime wheel shadowing onnxruntime-gpu, or cuDNN 8 vs 9 "
                    "(onnxruntime-gpu >= 1.19 needs CUDA 12 + cuDNN 9, as torch >= 2.4 ships)",
                    path.name, used[0] if used else "nothing")
    log.info("%s model %s runs on %s", role, path.name, ", ".join(used))
    return OnnxModel(path, role, sess, sess.get_inputs()[0].name, sess.get_outputs()[0].name,
                     i_shape, o_shape, used)


_CACHE: dict[tuple[str, str, str, int], OnnxModel] = {}


def cached_model(path: str | Path, role: str, provider: str = "auto", device_id: int = 0) -> OnnxModel:
    """Open a model once per (path, role, provider, device) and reuse the session afterwards."""
    key = (str(Path(path).resolve()), role, provider, int(device_id))
    model = _CACHE.get(key)
    if model is None:
        model = _CACHE[key] = open_model(path, role, provider, device_id)
    return model


def release_model(path: str | Path, role: str, provider: str = "auto", device_id: int = 0) -> bool:
    """Drop a cached session (frees ViTPose-H's ~2.5 GB outside torch's allocator)."""
    return _CACHE.pop((str(Path(path).resolve()), role, provider, int(device_id)), None) is not None


@dataclass
class PoseModelSet:
    """The resolved detector + pose files and how to run them: what the loader node hands on.

    Sessions are opened lazily through the cache, so a released set reopens on next use."""
    detector_path: Path
    pose_path: Path
    provider: str = "auto"
    device_id: int = 0

    def open(self) -> tuple[OnnxModel, OnnxModel]:
        return (cached_model(self.detector_path, "detector", self.provider, self.device_id),
                cached_model(self.pose_path, "pose", self.provider, self.device_id))

    def release(self) -> None:
        release_model(self.detector_path, "detector", self.provider, self.device_id)
        release_model(self.pose_path, "pose", self.provider, self.device_id)
