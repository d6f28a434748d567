"""Which linear path each quantized layer takes, chosen from the real device capability.

The same file must run fast on fp8 tensor cores (SM 8.9 / 9.0+), correctly on an RTX 3090
(SM 8.6, where ``torch._scaled_mm`` raises) and on CPU; NVFP4/MXFP8 matmul is gated as ComfyUI
gates it (SM >= 10; MXFP8 also torch >= 2.10) plus comfy-kitchen's own capability report (a GPU
backend that lists the block-scaled matmul). Users should not have to know this, so
``choose`` decides per layer, explains why, and a forced choice the device cannot honour is a
``WanquantError`` raised while the model is built, never a crash mid-sampling.

``probe_device`` is the one function that reads the hardware; tests replace it (or pass a
``DeviceCaps`` directly) to fake any GPU / torch / kitchen combination.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from ..errors import WanquantError
from .formats import FORMAT_NAMES, FP8_FORMATS, FP8_ROWWISE_FORMATS
from .policy_grid import INT8_MATMUL, choose_grid, int8_matmul_possible
from .formats._common import kitchen, kitchen_gpu_ops

log = logging.getLogger(__name__)

DENSE, DEQUANT, FP8_MATMUL, KITCHEN_MATMUL = "dense", "dequant", "fp8_matmul", "kitchen_matmul"
#: a comfy_quant algorithm only ComfyUI's own layout runs (loaders/comfy_algos.py): its forward, untouched
COMFY_LAYOUT = "comfy_layout"
PATHS = (DENSE, DEQUANT, FP8_MATMUL, KITCHEN_MATMUL, INT8_MATMUL, COMFY_LAYOUT)

#: user options: "auto" decides per layer; the others force a path where it applies
OPTIONS = ("auto", DEQUANT, FP8_MATMUL, KITCHEN_MATMUL, INT8_MATMUL)
KITCHEN_FORMATS = ("nvfp4", "mxfp8")

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.float64: "fp64", torch.float8_e4m3fn: "fp8 e4m3", torch.float8_e5m2: "fp8 e5m2"}


def dtype_name(dt) -> str:
    return _DTYPE_NAMES.get(dt, str(dt).replace("torch.", ""))


@dataclass(frozen=True)
class DeviceCaps:
    """What the policy needs to know about one device and the software around it."""

    device_type: str = "cpu"                 # "cpu", "cuda", "mps", "xpu", ...
    sm: tuple[int, int] | None = None        # CUDA compute capability
    name: str = "cpu"
    torch_version: tuple[int, int] = (2, 0)
    torch_cuda: tuple[int, int] | None = None  # torch.version.cuda
    is_hip: bool = False
    kitchen: bool = False                    # comfy_kitchen importable
    kitchen_gpu_ops: frozenset = frozenset()  # ops kitchen's available, enabled GPU backends list
    kitchen_note: str = ""                   # kitchen's reason when its CUDA backend is unavailable

    def describe(self) -> str:
        if self.device_type != "cuda":
            return self.name
        sm = f"SM {self.sm[0]}.{self.sm[1]}" if self.sm else "SM ?"
        cu = f"CUDA {self.torch_cuda[0]}.{self.torch_cuda[1]}" if self.torch_cuda else "no CUDA"
        kit = "kitchen GPU backend" if self.kitchen_gpu_ops else ("kitchen without GPU backend" if self.kitchen
                                                                    else "no kitchen")
        return f"{self.name} ({sm}, torch {self.torch_version[0]}.{self.torch_version[1]} {cu}, {kit})"


def _version_tuple(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    nums = re.findall(r"\d+", text)
    return (int(nums[0]), int(nums[1]) if len(nums) > 1 else 0) if nums else None


def probe_device(device=None) -> DeviceCaps:
    """Read the capability of ``device`` (default: CUDA if present, else CPU). Never raises."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tv = _version_tuple(torch.__version__) or (2, 0)
    ck = kitchen()
    gpu_ops, note = kitchen_gpu_ops(ck)
    if dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return DeviceCaps("cuda", tuple(torch.cuda.get_device_capability(idx)), torch.cuda.get_device_name(idx),
                          tv, _version_tuple(torch.version.cuda), torch.version.hip is not None,
                          ck is not None, gpu_ops, note)
    return DeviceCaps(dev.type, None, dev.type, tv, _version_tuple(torch.version.cuda), False,
                      ck is not None, frozenset(), note)


def _caps(device) -> DeviceCaps:
    return device if isinstance(device, DeviceCaps) else probe_device(device)


# ------------------------------------------------------------------ the capability table

@dataclass(frozen=True)
class Capability:
    """One hardware fact: ``path`` serves ``formats`` from SM ``min_sm`` on, with torch >=
    ``min_torch`` (only below SM ``torch_gate_below`` when that is set, as ComfyUI gates fp8) and,
    for kitchen paths, a comfy-kitchen GPU backend listing ``kitchen_op``."""

    path: str
    formats: tuple[str, ...]
    min_sm: tuple[int, int]
    hardware: str
    min_torch: tuple[int, int] | None = None
    torch_gate_below: tuple[int, int] | None = None
    kitchen_op: str | None = None

    def needs_torch(self, sm: tuple[int, int]) -> tuple[int, int] | None:
        if self.min_torch is None or (self.torch_gate_below is not None and sm >= self.torch_gate_below):
            return None
        return self.min_torch


#: The single source of "which SM runs which path": ``choose``'s reasons, the hardware probe and
#: the README's "What runs fast where" table (``render_capability_table``) all derive from it.
#: The gates are ComfyUI's own (``supports_fp8_compute``, ``supports_nvfp4_compute``,
#: ``supports_mxfp8_compute``) plus comfy-kitchen's ``list_backends`` for the block-scaled matmul.
CAPABILITIES = (
    Capability(FP8_MATMUL, tuple(FP8_FORMATS), (8, 9), "fp8 tensor cores (torch._scaled_mm)",
               min_torch=(2, 3), torch_gate_below=(9, 0)),
    Capability(FP8_MATMUL, FP8_ROWWISE_FORMATS, (8, 9), "fp8 tensor cores, row-wise scales (torch._scaled_mm)",
               min_torch=(2, 3), torch_gate_below=(9, 0)),
    Capability(INT8_MATMUL, ("int8_tensorwise",), (7, 5), "int8 tensor cores (torch._int_mm)"),
    Capability(KITCHEN_MATMUL, ("nvfp4",), (10, 0), "NVFP4 tensor cores (comfy-kitchen)",
               kitchen_op="scaled_mm_nvfp4"),
    Capability(KITCHEN_MATMUL, ("mxfp8",), (10, 0), "MXFP8 tensor cores (comfy-kitchen)",
               min_torch=(2, 10), kitchen_op="scaled_mm_mxfp8"),
)


def capability(fmt: str) -> Capability | None:
    """The table row for a format's fast path (None: weight-only dequant everywhere)."""
    return next((c for c in CAPABILITIES if fmt in c.formats), None)


def _sm_text(sm) -> str:
    return f"{sm[0]}.{sm[1]}"


# ------------------------------------------------------------------ capability predicates

def fp8_matmul_native(c: DeviceCaps) -> tuple[bool, str]:
    """fp8 tensor cores: NVIDIA SM 9.0+, or SM 8.9 with torch >= 2.3 (ComfyUI's gate)."""
    cap = capability(FP8_FORMATS[0])
    if c.device_type != "cuda":
        return False, f"{c.device_type.upper()} has no fp8 tensor cores"
    if c.is_hip:
        return False, "ROCm fp8 matmul is not verified by wanquant"
    if c.sm is None or c.sm < cap.min_sm:
        sm = _sm_text(c.sm) if c.sm else "?"
        return False, f"SM {sm} has no fp8 matmul (needs {_sm_text(cap.min_sm)}+)"
    need = cap.needs_torch(c.sm)
    if need and c.torch_version < need:
        return False, f"SM {_sm_text(c.sm)} fp8 matmul needs torch >= {_sm_text(need)}"
    return True, f"SM {_sm_text(c.sm)} has fp8 tensor cores"


def fp8_matmul_possible(c: DeviceCaps) -> tuple[bool, str]:
    """Where ``torch._scaled_mm`` runs at all: fp8 tensor cores, or CPU (emulated, slow)."""
    ok, why = fp8_matmul_native(c)
    if ok:
        return ok, why
    if c.device_type == "cpu":
        return True, "CPU runs torch._scaled_mm emulated (forced; slower than dequant)"
    return False, why


def kitchen_matmul_possible(c: DeviceCaps, fmt: str) -> tuple[bool, str]:
    """NVFP4/MXFP8 block-scaled matmul, gated as ComfyUI gates it (``supports_nvfp4_compute``:
    SM >= 10; ``supports_mxfp8_compute``: also torch >= 2.10) and by kitchen's own report: one
    of its GPU backends must list ``scaled_mm_<fmt>`` (its eager fallback is no tensor-core path).
    The reason names every condition that failed."""
    cap = capability(fmt)
    missing = []
    if c.device_type != "cuda" or c.is_hip:
        return False, (f"{fmt} matmul needs an NVIDIA GPU (SM {_sm_text(cap.min_sm)}+); "
                       f"{c.device_type.upper()} dequantizes")
    if c.sm is None or c.sm < cap.min_sm:
        missing.append(f"SM {_sm_text(c.sm)} < {_sm_text(cap.min_sm)}" if c.sm else "unknown SM")
    need = cap.needs_torch(c.sm or (0, 0))
    if need and c.torch_version < need:
        missing.append(f"torch < {_sm_text(need)}")
    op = cap.kitchen_op
    if not c.kitchen:
        missing.append("comfy-kitchen not importable")
    elif op not in c.kitchen_gpu_ops:
        missing.append(f"comfy-kitchen has no GPU backend for {op}" + (f" ({c.kitchen_note})" if c.kitchen_note else ""))
    if missing:
        return False, f"{fmt} matmul unavailable: " + ", ".join(missing)
    return True, f"SM {_sm_text(c.sm)}, comfy-kitchen GPU backend lists {op}"


# ------------------------------------------------------------------------------ choose

@dataclass(frozen=True)
class Choice:
    path: str
    reason: str
    forced: bool = False
    static_input_scale: bool = False

    def describe(self, fmt: str | None, compute_dtype=None) -> str:
        """Short label used in the summary line."""
        cd = dtype_name(compute_dtype) if compute_dtype is not None else "compute dtype"
        if self.path == FP8_MATMUL:
            if fmt in FP8_ROWWISE_FORMATS:
                return "fp8 matmul with row-wise weight scales, per-token activations"
            return "fp8 matmul with static input scale" if self.static_input_scale else \
                "fp8 matmul with dynamic scaling"
        if self.path == DEQUANT:
            return f"{fmt} dequantized to {cd}"
        if self.path == KITCHEN_MATMUL:
            return f"{fmt} tensor-core matmul (comfy-kitchen)"
        if self.path == COMFY_LAYOUT:
            return f"{fmt} in ComfyUI's own layout"
        if self.path == INT8_MATMUL:
            return f"int8 matmul (torch._int_mm, per-token activations{', re-quantized from ' + fmt if fmt in FP8_FORMATS else ''})"
        return cd


def validate_option(option: str, device=None) -> str:
    """Check a user option before anything is loaded; returns it normalised.

    Raises ``WanquantError`` for an unknown option or one the device can never run."""
    opt = (option or "auto").strip().lower()
    if opt not in OPTIONS:
        raise WanquantError("unknown linear path option", expected=" | ".join(OPTIONS), found=repr(option))
    c = _caps(device)
    if opt == FP8_MATMUL:
        ok, why = fp8_matmul_possible(c)
        if not ok:
            raise WanquantError(f"forced fp8_matmul cannot run on {c.describe()}: {why}",
                                expected="a GPU with SM 8.9+ or the CPU, or option 'auto'/'dequant'",
                                found=c.describe())
    if opt == KITCHEN_MATMUL:
        oks = [kitchen_matmul_possible(c, f) for f in KITCHEN_FORMATS]
        if not any(ok for ok, _ in oks):
            raise WanquantError(f"forced kitchen_matmul cannot run on {c.describe()}: {oks[0][1]}",
                                expected="SM 10+ and a comfy-kitchen GPU backend for nvfp4/mxfp8",
                                found=c.describe())
    if opt == INT8_MATMUL:
        ok, why = int8_matmul_possible(c)
        if not ok:
            raise WanquantError(f"forced int8_matmul cannot run on {c.describe()}: {why}",
                                expected="an NVIDIA GPU with SM 7.5+ or the CPU, or option 'auto'/'dequant'",
                                found=c.describe())
    return opt


def forced_fp8_matmul(c: DeviceCaps, layer: str | None) -> str:
    """Why option ``fp8_matmul`` can run on ``c``; one ``WanquantError`` for the layer where it cannot."""
    ok, why = fp8_matmul_possible(c)
    if not ok:
        raise WanquantError(f"forced fp8_matmul cannot run here: {why}", layer=layer,
                            expected="SM 8.9+ GPU or CPU", found=c.describe())
    return why


def choose(fmt: str | None, device=None, option: str = "auto", *, conf: dict | None = None,
           shape: tuple[int, int] | None = None, has_input_scale: bool = False, layer: str | None = None) -> Choice:
    """The path for one layer of format ``fmt`` (None = not quantized) on ``device``.

    ``option`` is the per-model override (``OPTIONS``). A forced option applies to the layers
    whose format it serves and raises ``WanquantError`` when the device cannot run it; other
    layers follow ``auto``."""
    opt = (option or "auto").strip().lower()
    if opt not in OPTIONS:
        raise WanquantError("unknown linear path option", expected=" | ".join(OPTIONS), found=repr(option), layer=layer)
    if fmt is None:
        return Choice(DENSE, "not quantized")
    if fmt not in FORMAT_NAMES:
        raise WanquantError("unknown quantized format", expected=" | ".join(FORMAT_NAMES), found=repr(fmt), layer=layer)
    c = _caps(device)
    conf = conf or {}
    if opt == DEQUANT:
        return Choice(DEQUANT, "forced by option 'dequant'", forced=True)
    if conf.get("full_precision_matrix_mult"):
        return Choice(DEQUANT, "checkpoint marks the layer full_precision_matrix_mult")

    grid = choose_grid(fmt, c, opt, layer)
    if grid is not None:
        return grid

    if fmt in FP8_FORMATS:
        if opt == FP8_MATMUL:
            return Choice(FP8_MATMUL, forced_fp8_matmul(c, layer), forced=True, static_input_scale=has_input_scale)
        ok, why = fp8_matmul_native(c)
        if ok:
            scale = "static input_scale from the checkpoint" if has_input_scale else \
                "activations scaled per call (amax/448)"
            return Choice(FP8_MATMUL, f"{why}; {scale}", static_input_scale=has_input_scale)
        if c.device_type == "cpu":
            why = "CPU: fp32 upcast + output scaling beats emulated fp8 matmul"
        return Choice(DEQUANT, why)

    if fmt in KITCHEN_FORMATS:
        ok, why = kitchen_matmul_possible(c, fmt)
        if ok and shape is not None:
            n, k = shape
            if fmt == "nvfp4" and (k + 15) // 16 * 16 % 32:
                ok, why = False, f"nvfp4 matmul needs K padded to a multiple of 32 (K={k})"
        if opt == KITCHEN_MATMUL:
            if not ok:
                raise WanquantError(f"forced kitchen_matmul cannot run here: {why}", layer=layer,
                                    expected="SM 10+ GPU and a comfy-kitchen GPU backend", found=c.describe())
            return Choice(KITCHEN_MATMUL, why, forced=True)
        return Choice(KITCHEN_MATMUL, why) if ok else Choice(DEQUANT, why)

    if fmt.startswith("gguf_"):
        return Choice(DEQUANT, "GGUF blocks have no tensor-core kernel; dequantized per forward (as city96's loader)")
    # fp4_g32: no tensor-core kernel for group-32 E2M1 with float scales; weight-only everywhere
    return Choice(DEQUANT, "fp4_g32 has no tensor-core kernel; weight-only dequant")


# ------------------------------------------------------------------ README table

_KITCHEN_ALL = frozenset(c.kitchen_op for c in CAPABILITIES if c.kitchen_op)
#: README columns: a representative device per class (recent torch, comfy-kitchen with its GPU backend)
DEVICE_CLASSES = (
    ("NVIDIA SM 10+/12 (Blackwell) with a comfy-kitchen GPU backend",
     DeviceCaps("cuda", (10, 0), "Blackwell", (2, 10), (13, 0), False, True, _KITCHEN_ALL)),
    ("SM 8.9 / 9.0 (Ada, Hopper)", DeviceCaps("cuda", (9, 0), "Hopper", (2, 10), (13, 0), False, True, _KITCHEN_ALL)),
    ("SM 8.6 and older (Ampere: 3090, A100)",
     DeviceCaps("cuda", (8, 6), "Ampere", (2, 10), (13, 0), False, True, _KITCHEN_ALL)),
    ("CPU / other", DeviceCaps("cpu", None, "cpu", (2, 10), None, False, True)),
)
_PATH_TEXT = {FP8_MATMUL: "fp8 tensor-core matmul", KITCHEN_MATMUL: "kitchen block-scaled matmul",
              INT8_MATMUL: "int8 matmul (torch._int_mm)",
              DEQUANT: "dequantize per forward"}


def render_capability_table() -> str:
    """The README's "What runs fast where" table, rendered from ``choose`` on ``DEVICE_CLASSES``
    (formats with identical rows share one). tests/ops/test_probe.py keeps the README
    equal to this; regenerate with ``python -m wanquant.ops.policy``."""
    rows: dict[tuple[str, ...], list[str]] = {}
    for fmt in FORMAT_NAMES:
        cells = []
        for _, caps in DEVICE_CLASSES:
            ch = choose(fmt, caps)
            cells.append(f"{_PATH_TEXT[ch.path]}: {ch.reason}")
        rows.setdefault(tuple(cells), []).append(f"`{fmt}`")
    lines = ["| weight format | " + " | ".join(label for label, _ in DEVICE_CLASSES) + " |",
             "|---" * (len(DEVICE_CLASSES) + 1) + "|"]
    for cells, fmts in rows.items():
        lines.append(f"| {' / '.join(fmts)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report

@dataclass
class LayerChoice:
    name: str
    fmt: str | None
    choice: Choice
    shape: tuple[int, int] | None = None
    dtype: torch.dtype | None = None   # storage dtype of an unquantized layer


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_CATEGORY = (("self_attn.", "self-attention"), ("cross_attn.", "cross-attention"), ("ffn.", "FFN"))
_HEAD_PREFIXES = ("head.", "patch_embedding", "text_embedding", "time_embedding", "time_projection",
                  "img_emb", "ref_conv", "vace_patch_embedding")


def _category(sub: str) -> str:
    for prefix, label in _CATEGORY:
        if sub.startswith(prefix):
            return label
    return sub.rsplit(".", 1)[0] if "." in sub else sub


def _describe_group(names: list[str]) -> str:
    """'40×4 self-attention + 40×2 FFN layers + head and embeddings' for a list of layer names."""
    per_cat: dict[str, dict[int, int]] = {}
    others = []
    for nm in names:
        m = _BLOCK_RE.match(nm)
        if m:
            cat = _category(m.group(2))
            per_cat.setdefault(cat, {}).setdefault(int(m.group(1)), 0)
            per_cat[cat][int(m.group(1))] += 1
        else:
            others.append(nm)
    parts = []
    for cat, blocks in per_cat.items():
        counts = set(blocks.values())
        parts.append(f"{len(blocks)}×{counts.pop()} {cat}" if len(counts) == 1 else f"{sum(blocks.values())} {cat}")
    text = (" + ".join(parts) + " layers") if parts else ""
    if others:
        if all(o.startswith(_HEAD_PREFIXES) for o in others):
            extra = "head and embeddings"
        else:
            extra = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        text = f"{text} + {extra}" if text else extra
    return text


class OpsPlan:
    """Per-model record of the option, the device and every layer's choice.

    The bridge calls ``decide`` for each Linear while ComfyUI loads the state dict, then
    ``finalize`` (raises if a forced option served no layer); ``summary()`` and ``report()``
    are what the loader node shows."""

    def __init__(self, option: str = "auto", device=None, compute_dtype=torch.bfloat16):
        self.caps = _caps(device)
        self.option = validate_option(option, self.caps)
        self.compute_dtype = compute_dtype
        self.layers: dict[str, LayerChoice] = {}
        self.executed: dict[str, dict[str, str]] = {}  # layer -> {path it ran: why, if not planned}
        self._warned: set[tuple[str, str, str]] = set()
        self.requantized: dict[str, float] = {}  # layer -> relative weight error added at load (int8_matmul)

    def record(self, name: str, path: str, why: str = "") -> None:
        """A layer ran ``path`` (called once per layer and path by the forward).

        The plan is what the load-time report promises; this is what happened. A layer that runs
        another path than planned is logged once per (planned, ran, why), so a user reading the
        log sees e.g. that LoRA weight patches switched the fp8 matmul off."""
        self.executed.setdefault(name, {})[path] = why
        lc = self.layers.get(name)
        planned = lc.choice.path if lc else None
        if planned is not None and planned != path:
            key = (planned, path, why)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("wanquant: layer %s was planned '%s' but ran '%s'%s (further layers like it are "
                            "not logged; see the plan's divergences())", name, planned, path,
                            f": {why}" if why else "")

    def divergences(self) -> dict[tuple[str, str, str], list[str]]:
        """(planned, ran, why) -> layers, for every layer that ran a path it was not planned for."""
        out: dict[tuple[str, str, str], list[str]] = {}
        for name, ran in self.executed.items():
            lc = self.layers.get(name)
            for path, why in ran.items():
                if lc is not None and lc.choice.path != path:
                    out.setdefault((lc.choice.path, path, why), []).append(name)
        return out

    def executed_summary(self) -> str:
        """What ran, grouped like ``summary()`` (layers that have not run yet are left out)."""
        groups: dict[str, list[str]] = {}
        for name, ran in self.executed.items():
            for path, why in ran.items():
                groups.setdefault(path + (f" ({why})" if why else ""), []).append(name)
        return "; ".join(f"{_describe_group(names)}: {label}" for label, names in groups.items()) or "nothing ran yet"

    def decide(self, name: str, fmt: str | None, conf: dict | None = None, shape=None,
               has_input_scale: bool = False, dtype=None) -> Choice:
        ch = choose(fmt, self.caps, self.option, conf=conf, shape=shape, has_input_scale=has_input_scale, layer=name)
        self.layers[name] = LayerChoice(name, fmt, ch, tuple(shape) if shape is not None else None, dtype)
        return ch

    def comfy_layout(self, name: str, fmt: str, layout: str, shape=None, note: str = "") -> Choice:
        """Plan a layer that runs in ComfyUI's own ``layout`` (no policy choice: wanquant has no decoder)."""
        ch = Choice(COMFY_LAYOUT, f"ComfyUI's own {layout}; wanquant has no decoder for this comfy_quant algorithm"
                    + (f"; {note}" if note else ""))
        self.layers[name] = LayerChoice(name, fmt, ch, tuple(shape) if shape is not None else None, None)
        return ch

    def finalize(self) -> OpsPlan:
        forced = self.option in (FP8_MATMUL, KITCHEN_MATMUL, INT8_MATMUL)
        if forced and not any(lc.choice.forced for lc in self.layers.values()):
            formats = sorted({lc.fmt for lc in self.layers.values() if lc.fmt}) or ["none"]
            serves = {FP8_MATMUL: "float8_e4m3fn / float8_e5m2 / float8_e4m3fn_rowwise", KITCHEN_MATMUL: "nvfp4 / mxfp8",
                      INT8_MATMUL: "int8_tensorwise / float8_e4m3fn"}[self.option]
            raise WanquantError(f"option '{self.option}' applies to no layer of this model",
                                expected=f"layers in {serves}", found=", ".join(formats))
        log.info("wanquant linear ops on %s: %s", self.caps.describe(), self.summary())
        return self

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lc in self.layers.values():
            out[lc.choice.path] = out.get(lc.choice.path, 0) + 1
        return out

    def _label(self, lc: LayerChoice) -> str:
        if lc.choice.path == DENSE:
            return dtype_name(lc.dtype if lc.dtype is not None else self.compute_dtype)
        return lc.choice.describe(lc.fmt, self.compute_dtype)

    def summary(self) -> str:
        groups: dict[str, list[str]] = {}
        for lc in self.layers.values():
            groups.setdefault(self._label(lc), []).append(lc.name)
        order = sorted(groups.items(), key=lambda kv: (kv[0] in {dtype_name(d) for d in _DTYPE_NAMES}, -len(kv[1])))
        return "; ".join(f"{_describe_group(names)}: {label}" for label, names in order) or "no linear layers"

    def report(self) -> str:
        lines = [f"device: {self.caps.describe()}; option: {self.option}; compute dtype: {dtype_name(self.compute_dtype)}",
                 self.summary(), ""]
        for lc in self.layers.values():
            shape = f" {lc.shape[0]}x{lc.shape[1]}" if lc.shape else ""
            fmt = lc.fmt if lc.fmt else (dtype_name(lc.dtype) if lc.dtype is not None else "dense")
            lines.append(f"{lc.name}{shape} [{fmt}] -> {lc.choice.path}: {lc.choice.reason}"
                         + (" (forced)" if lc.choice.forced else ""))
        return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - regenerates the README table
    print(render_capability_table())
