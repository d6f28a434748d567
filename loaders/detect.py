"""Per-layer format detection: which of the on-disk spellings each layer uses.

A layer's format is decided by the tensors beside its weight (dtype and shape), never by the
file name and never by a file-wide guess: the NVFP4 seed mixes nvfp4, mxfp8 and bf16 layers in
one file, and WorldStereo keeps some Linears in bf16 next to fp8 ones.

Input: native-style keys (prefix already stripped, diffusers already mapped) → :class:`TensorRef`.
Output: one :class:`Layer` per weight-bearing module (plus plain tensors as their own entries),
or a :class:`WanquantError` naming the layer and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import WanquantError
from . import comfy_algos, grid_detect, lightx2v, nibble_order
from .header import load_json
from .containers import TensorRef
from .nvfp4_layout import BLOCKED, UNTAGGED_NVFP4, fitting_layouts

FP8_DTYPES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}
PLAIN_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
COMFY_FORMATS = ("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "fp4_g32", *grid_detect.GRID_FORMATS,
                 grid_detect.HYBRID_MXFP8)

# Side keys, longest first so '.weight.scale_weight' is not read as '.scale_weight'.
SIDE_SUFFIXES = (
    (".weight.scale_weight", "scale_weight_w"),
    (".weight.__fp8_scale", "fp8_scale_magi"),
    (".weight_scale_2", "weight_scale_2"),
    (".weight_scale", "weight_scale"),
    (".input_scale", "input_scale"),
    (".scale_weight", "scale_weight"),
    (".scale_input", "scale_input"),
    (".comfy_quant", "comfy_quant"),
    (".weight_packed", "weight_packed"),
)
MARKER_KEY = "scaled_fp8"


@dataclass
class Layer:
    """One module's tensors and how they are spelled on disk."""

    name: str
    format: str  # canonical format name: bf16/fp16/fp32/float8_e4m3fn/float8_e5m2/nvfp4/mxfp8/fp4_g32
    spelling: str  # how the source spelled it (for the report)
    weight: TensorRef | None
    sides: dict[str, TensorRef] = field(default_factory=dict)  # role → ref
    conf: dict = field(default_factory=dict)  # comfy_quant JSON for quantized layers
    others: dict[str, TensorRef] = field(default_factory=dict)  # bias etc. (suffix → ref)
    nibble_order: str | None = None  # FP4 group-32 / LightX2V NVFP4: how the source packs nibbles
    scale_layout: str | None = None  # NVFP4 only: "blocked" / "row_major"; None = to be decided

    @property
    def quantized(self) -> bool:
        return self.format not in PLAIN_DTYPES.values()

    def source_keys(self) -> list[str]:
        keys = [self.weight.key] if self.weight else []
        keys += [r.key for r in self.sides.values()] + [r.key for r in self.others.values()]
        return keys


@dataclass
class Detection:
    layers: dict[str, Layer]  # weight-bearing modules, keyed by module name
    plain: dict[str, TensorRef]  # tensors that are not part of a weight-bearing module
    marker: TensorRef | None = None
    errors: list[WanquantError] = field(default_factory=list)


def _split(key: str) -> tuple[str, str]:
    """(module, role) for side keys, (module, 'weight'|'bias'|...) for params."""
    for suffix, role in SIDE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    if "." in key:
        module, param = key.rsplit(".", 1)
        return module, param
    return "", key


def check_scalar_scale(ref: TensorRef, file: str, layer: str, what: str = "scale") -> torch.Tensor:
    """Load a per-tensor scale and insist it is one finite positive number. Any all-ones shape is
    a scalar (kijai's scaled fp8 of Animate stores conv scales as [1, 1] / [1, 1, 1])."""
    if ref.numel != 1:
        raise WanquantError(f"{what} must be a per-tensor scalar", file=file, layer=layer,
                            expected="one element (shape [], [1], [1, 1], ...)", found=f"shape {list(ref.shape)} ({ref.key})")
    if ref.dtype not in FLOAT_DTYPES:
        raise WanquantError(f"{what} has a non-float dtype", file=file, layer=layer,
                            expected="bf16/fp16/fp32 scalar", found=str(ref.dtype))
    value = ref.load().reshape(())
    v = float(value.float())
    if not math.isfinite(v) or v <= 0:
        raise WanquantError(f"invalid {what} (would give zero, negative, NaN or Inf weights)", file=file,
                            layer=layer, expected="a finite positive number", found=f"{v} ({ref.key})")
    return value


def _comfy_quant_conf(ref: TensorRef, file: str, layer: str) -> dict:
    if ref.dtype not in (torch.uint8, torch.int8) or len(ref.shape) != 1:
        raise WanquantError("comfy_quant must be a 1-D uint8 tensor of JSON bytes", file=file, layer=layer,
                            expected="uint8 [n]", found=f"{ref.dtype} {list(ref.shape)}")
    conf = load_json(ref.load().view(torch.uint8).numpy().tobytes(), file=file, what=f"{layer}.comfy_quant")
    if not isinstance(conf, dict) or "format" not in conf:
        raise WanquantError("comfy_quant JSON has no 'format'", file=file, layer=layer, found=repr(conf)[:200])
    return conf


def _header_quant_layers(metadata: dict[str, str], file: str) -> dict[str, dict]:
    raw = metadata.get("_quantization_metadata")
    if not raw:
        return {}
    meta = load_json(raw, file=file, what="header _quantization_metadata")
    try:
        layers = meta.get("layers", {})
        if not isinstance(layers, dict):
            raise TypeError("layers is not an object")
        return {str(k): dict(v) for k, v in layers.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise WanquantError("header _quantization_metadata is malformed", file=file,
                            expected='{"layers": {layer: {"format": ...}}}', found=raw[:200]) from exc


def detect_layers(tensors: dict[str, TensorRef], file: str, *, header_conf: dict[str, dict] | None = None,
                  collect_errors: bool = False) -> Detection:
    """Group keys into modules and decide each module's format.

    ``header_conf`` is the per-layer ``_quantization_metadata`` (already in the same key space).
    Untagged FP4 group-32 layers come back with ``nibble_order=None``: :mod:`.nibble_order` decides.
    With ``collect_errors`` every bad layer is recorded and skipped (``inspect``); otherwise the
    first one raises (``convert``, the loader).
    """
    header_conf = header_conf or {}
    groups: dict[str, dict[str, TensorRef]] = {}
    marker = tensors.get(MARKER_KEY)
    for key, ref in tensors.items():
        if key == MARKER_KEY:
            continue
        module, role = _split(key)
        groups.setdefault(module, {})[role] = ref

    det = Detection({}, {}, marker)
    marker_two = marker is not None and marker.numel == 2
    for module, roles in groups.items():
        has_payload = "weight" in roles or "weight_packed" in roles
        side_roles = [r for _, r in SIDE_SUFFIXES if r in roles and r != "weight_packed"]
        if not has_payload and not side_roles and module not in header_conf:
            for role, ref in roles.items():
                det.plain[f"{module}.{role}" if module else role] = ref
            continue
        try:
            det.layers[module] = _classify(module, roles, file, header_conf.get(module), marker_two)
        except WanquantError as err:
            if not collect_errors:
                raise
            det.errors.append(err)
    return det


def _classify(module: str, roles: dict[str, TensorRef], file: str, header_conf: dict | None,
              marker_two: bool) -> Layer:
    sides = {r: roles[r] for _, r in SIDE_SUFFIXES if r in roles and r != "weight_packed"}
    others = {r: ref for r, ref in roles.items() if r not in sides and r not in ("weight", "weight_packed")}
    if "weight" in roles and "weight_packed" in roles:
        raise WanquantError("two payload spellings for one layer", file=file, layer=module,
                            expected="either .weight or .weight_packed", found="both")
    weight = roles.get("weight") or roles.get("weight_packed")
    if weight is None:
        found = ", ".join(r.key for r in sides.values())
        raise WanquantError("quantization scale without a weight (orphan scale)", file=file, layer=module,
                            expected=f"{module}.weight next to it", found=found)
    if weight.quant_conf is not None:  # the container knows the format from the tensor (GGUF)
        from .gguf_detect import classify_gguf
        return classify_gguf(module, weight, sides, others, file)

    conf = None
    if "comfy_quant" in sides:
        conf = _comfy_quant_conf(sides.pop("comfy_quant"), file, module)
    elif header_conf:
        conf = dict(header_conf)
    if conf is not None:
        return _classify_comfy(module, weight, sides, others, conf, file)

    if weight.dtype == torch.int8:
        return _grid(module, weight, sides, others, None, file, "int8 without comfy_quant")
    if weight.dtype in FP8_DTYPES:
        return _classify_fp8(module, weight, sides, others, file, marker_two)
    if weight.dtype == torch.uint8:
        return _classify_uint8(module, weight, sides, others, file)
    if weight.dtype in PLAIN_DTYPES:
        if sides:
            raise WanquantError("quantization scale next to a high-precision weight", file=file, layer=module,
                                expected="an fp8/uint8 weight for a scaled layer",
                                found=f"{weight.dtype} weight with {', '.join(r.key for r in sides.values())}")
        return Layer(module, PLAIN_DTYPES[weight.dtype], PLAIN_DTYPES[weight.dtype], weight, {}, {}, others)
    raise WanquantError("unknown weight format", file=file, layer=module,
                        expected="bf16/fp16/fp32, fp8 (e4m3/e5m2) or uint8-packed FP4",
                        found=f"{weight.dtype} {list(weight.shape)}")


def _one_scale(module: str, sides: dict[str, TensorRef], file: str) -> tuple[str, TensorRef] | None:
    spellings = [r for r in ("scale_weight", "scale_weight_w", "weight_scale", "fp8_scale_magi") if r in sides]
    if len(spellings) > 1:
        raise WanquantError("conflicting scale spellings for one layer", file=file, layer=module,
                            expected="exactly one weight scale",
                            found=", ".join(sides[r].key for r in spellings))
    return (spellings[0], sides[spellings[0]]) if spellings else None


SPELLING_NAMES = {
    "scale_weight": "scale_weight (kijai/legacy scaled_fp8)",
    "scale_weight_w": "weight.scale_weight (sibling scale, Vista4D)",
    "weight_scale": "weight_scale without comfy_quant",
    "fp8_scale_magi": "__fp8_scale (MagiHuman)",
}


def _classify_fp8(module, weight, sides, others, file, marker_two) -> Layer:
    fmt = FP8_DTYPES[weight.dtype]
    if len(weight.shape) < 2:
        raise WanquantError("fp8 tensor is not a matrix", file=file, layer=module,
                            expected="rank >= 2 fp8 weight", found=f"shape {list(weight.shape)}")
    scale = _one_scale(module, sides, file)
    unknown = set(sides) - {"scale_weight", "scale_weight_w", "weight_scale", "fp8_scale_magi",
                            "scale_input", "input_scale"}
    if unknown:
        raise WanquantError("unexpected side tensor on an fp8 layer", file=file, layer=module,
                            expected="a per-tensor scale (+ input scale)",
                            found=", ".join(sides[r].key for r in sorted(unknown)))
    if "scale_input" in sides and "input_scale" in sides:
        raise WanquantError("conflicting input scale spellings for one layer", file=file, layer=module,
                            expected="one of scale_input / input_scale",
                            found=f"{sides['scale_input'].key}, {sides['input_scale'].key}")
    if scale is not None and scale[1].numel != 1:  # a scale grid: per-row or block fp8
        return _grid(module, weight, sides, others, None, file, SPELLING_NAMES[scale[0]])
    new_sides = {}
    if scale is not None:
        check_scalar_scale(scale[1], file, module, "weight scale")
        new_sides["weight_scale"] = scale[1]
        spelling = SPELLING_NAMES[scale[0]]
    else:
        spelling = "unscaled fp8 (scale 1)"
    inp = sides.get("input_scale") or sides.get("scale_input")
    if inp is not None:
        check_scalar_scale(inp, file, module, "input scale")
        new_sides["input_scale"] = inp
    conf = {"format": fmt}
    if marker_two:
        conf["full_precision_matrix_mult"] = True
    return Layer(module, fmt, spelling, weight, new_sides, conf, others)


def _classify_uint8(module, weight, sides, others, file) -> Layer:
    ws = sides.get("weight_scale")
    if ws is None:
        raise WanquantError("packed uint8 weight without a weight_scale", file=file, layer=module,
                            expected="FP4 group-32: uint8 [out, in/2] + float weight_scale [out, in/32]",
                            found=f"uint8 {list(weight.shape)} and no scale")
    if ws.dtype == torch.float8_e4m3fn and "weight_scale_2" in sides:
        conf = {"format": "nvfp4"}
        return _classify_comfy(module, weight, sides, others, conf, file, spelling=UNTAGGED_NVFP4)
    if ws.dtype == torch.float8_e4m3fn:  # fp8 block scales, no weight_scale_2: LightX2V's spelling
        return lightx2v.classify(module, weight, sides, others, file)
    if ws.dtype not in FLOAT_DTYPES:
        raise WanquantError("packed uint8 weight with a non-float scale", file=file, layer=module,
                            expected="float weight_scale (FP4 group-32) or fp8 block scales + weight_scale_2 (NVFP4)",
                            found=str(ws.dtype))
    extra = set(sides) - {"weight_scale"}
    if extra:
        raise WanquantError("unexpected side tensor on an FP4 group-32 layer", file=file, layer=module,
                            expected="weight + weight_scale", found=", ".join(sides[r].key for r in sorted(extra)))
    conf = {"format": "fp4_g32", "group_size": 32}
    _check_fp4_shapes(module, weight, ws, file)
    return Layer(module, "fp4_g32", "FP4 group-32 (no comfy_quant)", weight, {"weight_scale": ws}, conf, others)


def _check_fp4_shapes(module, weight, ws, file) -> None:
    if ws.dtype not in FLOAT_DTYPES:
        raise WanquantError("FP4 group-32 scale must be a float tensor", file=file, layer=module,
                            expected="bf16/fp16/fp32 [out, in/32]", found=str(ws.dtype))
    if len(weight.shape) != 2 or len(ws.shape) != 2:
        raise WanquantError("FP4 group-32 tensors must be matrices", file=file, layer=module,
                            expected="uint8 [out, in/2] and scale [out, in/32]",
                            found=f"{list(weight.shape)} and {list(ws.shape)}")
    out, half = weight.shape
    k = half * 2
    if k % 32 != 0:
        raise WanquantError("FP4 input width is not divisible by the group size 32", file=file, layer=module,
                            expected="in_features % 32 == 0", found=f"in_features {k}")
    if tuple(ws.shape) != (out, k // 32):
        raise WanquantError("FP4 group scale shape does not fit the weight", file=file, layer=module,
                            expected=f"[{out}, {k // 32}] for weight [{out}, {half}]", found=f"{list(ws.shape)}")


def _classify_comfy(module, weight, sides, others, conf, file, spelling=None) -> Layer:
    fmt = conf.get("format")
    if fmt not in COMFY_FORMATS or comfy_algos.native_only(conf) or "num_experts" in conf:
        return comfy_algos.classify(module, weight, sides, others, conf, file)  # ComfyUI's own, untouched
    spelling = spelling or "comfy_quant (ComfyUI native)"
    if fmt == grid_detect.HYBRID_MXFP8:  # its MXFP8 part is exact; the fallback scalar is dropped
        conf, fmt, spelling = grid_detect.hybrid_mxfp8(module, conf, others, file)
    ws = sides.get("weight_scale")
    if fmt in grid_detect.GRID_FORMATS or (fmt == "float8_e4m3fn" and ws is not None and ws.numel != 1):
        # the grid formats, and convert_to_quant's older block3d files tagged plain float8_e4m3fn
        return _grid(module, weight, sides, others, conf if fmt in grid_detect.GRID_FORMATS else None, file,
                     spelling)
    if fmt in ("nvfp4", "mxfp8", "fp4_g32") and len(weight.shape) != 2:
        raise WanquantError(f"{fmt} weight must be 2-D (block formats quantize [out, in] matrices)", file=file,
                            layer=module, expected="[out, in] (packed)", found=f"{weight.dtype} {list(weight.shape)}")
    if fmt in FP8_DTYPES.values():
        if FP8_DTYPES.get(weight.dtype) != fmt:
            raise WanquantError("weight dtype does not match its comfy_quant format", file=file, layer=module,
                                expected=fmt, found=str(weight.dtype))
        if "weight_scale" not in sides:
            raise WanquantError("comfy_quant fp8 layer without weight_scale", file=file, layer=module,
                                expected=f"{module}.weight_scale")
        check_scalar_scale(sides["weight_scale"], file, module, "weight scale")
        if "input_scale" in sides:
            check_scalar_scale(sides["input_scale"], file, module, "input scale")
        keep = {r: sides[r] for r in ("weight_scale", "input_scale") if r in sides}
    elif fmt == "nvfp4":
        ws, ws2 = sides.get("weight_scale"), sides.get("weight_scale_2")
        if weight.dtype != torch.uint8 or ws is None or ws2 is None:
            raise WanquantError("incomplete NVFP4 layer", file=file, layer=module,
                                expected="uint8 weight + fp8 block weight_scale + weight_scale_2",
                                found=f"{weight.dtype} weight, scales: {sorted(sides)}")
        n, half = weight.shape
        want = (_roundup(n, 128), _roundup(half * 2 // 16, 4))
        # tagged files are ComfyUI's (blocked); an untagged one may be row-major: nvfp4_layout decides
        fits = (fitting_layouts(weight.shape, ws.shape) if spelling == UNTAGGED_NVFP4
                else [BLOCKED] if tuple(ws.shape) == want else [])
        if not fits or ws.dtype not in (torch.float8_e4m3fn, torch.uint8):
            also = f" or row-major {[n, half * 2 // 16]}" if spelling == UNTAGGED_NVFP4 else ""
            raise WanquantError("NVFP4 block scales do not fit the weight", file=file, layer=module,
                                expected=f"fp8 {list(want)} (blocked 128x4 layout){also}",
                                found=f"{ws.dtype} {list(ws.shape)}")
        layout = fits[0] if len(fits) == 1 else None
        check_scalar_scale(ws2, file, module, "weight_scale_2")
        if "input_scale" in sides:
            check_scalar_scale(sides["input_scale"], file, module, "input scale")
        keep = {r: sides[r] for r in ("weight_scale", "weight_scale_2", "input_scale") if r in sides}
    elif fmt == "fp4_g32":  # wanquant's own canonical form: high-nibble-first unless the JSON says
        order = nibble_order.parse(conf.pop("nibble_order", "high_first"), "comfy_quant", file, module)
        ws = sides.get("weight_scale")
        if weight.dtype != torch.uint8 or ws is None:
            raise WanquantError("incomplete FP4 group-32 layer", file=file, layer=module,
                                expected="uint8 weight [out, in/2] + float weight_scale [out, in/32]",
                                found=f"{weight.dtype} weight, scales: {sorted(sides)}")
        _check_fp4_shapes(module, weight, ws, file)
        keep = {"weight_scale": ws}
        leftover = set(sides) - set(keep)
        if leftover:
            raise WanquantError("unexpected side tensor on a fp4_g32 layer", file=file, layer=module,
                                found=", ".join(sides[r].key for r in sorted(leftover)))
        return Layer(module, fmt, spelling, weight, keep, dict(conf), others, order)
    else:  # mxfp8
        ws = sides.get("weight_scale")
        if weight.dtype != torch.float8_e4m3fn or ws is None:
            raise WanquantError("incomplete MXFP8 layer", file=file, layer=module,
                                expected="fp8 e4m3 weight + E8M0 block weight_scale",
                                found=f"{weight.dtype} weight, scales: {sorted(sides)}")
        n, k = weight.shape
        want = (_roundup(n, 128), _roundup(k // 32, 4))
        e8m0 = getattr(torch, "float8_e8m0fnu", None)
        if tuple(ws.shape) != want or ws.dtype not in (torch.uint8, e8m0):
            raise WanquantError("MXFP8 block scales do not fit the weight", file=file, layer=module,
                                expected=f"uint8/e8m0 {list(want)} (blocked 128x4 layout)",
                                found=f"{ws.dtype} {list(ws.shape)}")
        keep = {"weight_scale": ws}
    leftover = set(sides) - set(keep)
    if leftover:
        raise WanquantError(f"unexpected side tensor on a {fmt} layer", file=file, layer=module,
                            found=", ".join(sides[r].key for r in sorted(leftover)))
    return comfy_algos.check_pre_quant(Layer(module, fmt, spelling, weight, keep, dict(conf), others,
                                             scale_layout=layout if fmt == "nvfp4" else None), file)


def _grid(module, weight, sides, others, conf, file, spelling) -> Layer:
    """A per-row / block fp8 or int8 layer (:mod:`.grid_detect`); other side tensors are refused."""
    found = _one_scale(module, sides, file)
    extra = set(sides) - {"scale_weight", "scale_weight_w", "weight_scale", "fp8_scale_magi", "input_scale",
                          "scale_input"}
    if extra:
        raise WanquantError("unexpected side tensor on a scale-grid layer", file=file, layer=module,
                            expected="weight + weight_scale", found=", ".join(sides[r].key for r in sorted(extra)))
    layer = grid_detect.classify(module, weight, found[1] if found else None, sides, conf, file, spelling)
    layer.others = others
    return layer


def _roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m
