"""Detection of the scale-grid formats: per-row / block fp8 and int8 (``ops.formats._scale_grid``).

Decided by the tensors beside the weight only: the payload dtype, the scale's shape, and the
layer's ``comfy_quant`` when present. A per-tensor fp8 scale stays with :mod:`.detect`; this module
takes the layers whose scale is a grid:

* fp8 + scale [N] or [N, 1] (``weight_scale``, ``.__fp8_scale``, ``scale_weight``) -> per-row;
* fp8 + scale [N, K/bs, 1] -> ``float8_e4m3fn_block3d`` (bs = K / middle dim);
* fp8 + scale [N/bs, K/bs] with one square bs -> ``float8_e4m3fn_blockwise``;
* int8 + one-element or [N] / [N, 1] scale -> ``int8_tensorwise``; int8 + [N/bs, K/bs] ->
  ``int8_blockwise``; int8 without a scale is refused (no reload formula without one).

A grid that fits no rule, or NaN / Inf / zero / negative scales, is one ``WanquantError``. An
``input_scale`` is only accepted as convert_to_quant's placeholder 1.0 (activations are dynamic
in every consumer of these formats) and then dropped.
"""

from __future__ import annotations

import json

import torch

from ..errors import WanquantError
from ..ops.formats._scale_grid import BLOCK2D, BLOCK3D, ROW, TENSOR, expected_scale_shape, scale_fits

GRID_FORMATS = {
    "float8_e4m3fn_rowwise": ("fp8", ROW), "float8_e4m3fn_blockwise": ("fp8", BLOCK2D),
    "float8_e4m3fn_block3d": ("fp8", BLOCK3D), "int8_tensorwise": ("int8", ROW), "int8_blockwise": ("int8", BLOCK2D),
}
HYBRID_MXFP8 = "hybrid_mxfp8"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_PAYLOAD = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def _grid_block(shape: tuple[int, ...], n: int, k: int) -> tuple[str, int] | None:
    """(kind, block) that an untagged scale shape fits exactly, or None."""
    shape = tuple(int(s) for s in shape)
    if shape in ((n,), (n, 1)):
        return ROW, 0
    if len(shape) == 3 and shape[0] == n and shape[2] == 1 and shape[1] and k % shape[1] == 0:
        return BLOCK3D, k // shape[1]
    if len(shape) == 2 and all(shape) and n % shape[0] == 0 and k % shape[1] == 0 and n // shape[0] == k // shape[1]:
        return BLOCK2D, n // shape[0]
    return None


def _check_values(ref, file: str, layer: str) -> None:
    s = ref.load()
    bad = ~torch.isfinite(s.float()) | (s.float() <= 0)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise WanquantError("invalid weight scale (would give zero, negative, NaN or Inf weights)", file=file,
                            layer=layer, expected="finite positive scales",
                            found=f"{float(s.flatten()[i].float())} at index {i} of {ref.key} ({int(bad.sum())} bad)")


def _input_scale_placeholder(sides: dict, file: str, layer: str, fmt: str) -> None:
    inp = sides.get("input_scale") or sides.get("scale_input")
    if inp is None:
        return
    val = inp.load().float() if inp.numel == 1 and inp.dtype in _FLOATS else None
    if val is None or float(val.reshape(())) != 1.0:
        raise WanquantError(f"{fmt} layers take dynamic activation scales; a calibrated input scale has no "
                            "meaning here", file=file, layer=layer, expected="no input_scale, or the placeholder 1.0",
                            found=f"{inp.key} {list(inp.shape)}")


def classify(module: str, weight, scale, sides: dict, conf: dict | None, file: str, spelling: str):
    """A :class:`detect.Layer` for a grid-scaled layer; ``conf`` is its comfy_quant (None if untagged)."""
    from .detect import Layer

    if len(weight.shape) != 2:
        raise WanquantError("scale-grid layers quantize [out, in] matrices", file=file, layer=module,
                            expected="a 2-D weight", found=f"{weight.dtype} {list(weight.shape)}")
    n, k = (int(d) for d in weight.shape)
    payload = "int8" if weight.dtype == torch.int8 else "fp8"
    if scale is None:
        raise WanquantError(f"{payload} weight without a scale", file=file, layer=module,
                            expected=f"{module}.weight_scale (a scalar, [{n}, 1] per channel or a block grid)",
                            found="no scale tensor")
    if scale.dtype not in _FLOATS:
        raise WanquantError("weight scale must be a float tensor", file=file, layer=module,
                            expected="fp32/bf16/fp16 scale", found=f"{scale.dtype} ({scale.key})")
    tagged = (conf or {}).get("format")
    if tagged in GRID_FORMATS:
        fmt = tagged
        _, kind = GRID_FORMATS[fmt]
        if fmt == "int8_tensorwise" and scale.numel == 1:
            kind = TENSOR
        block = int(conf.get("group_size") or conf.get("block_size") or (0 if kind in (ROW, TENSOR) else
                    (128 if fmt == "int8_blockwise" else 64)))
        if not scale_fits(kind, tuple(scale.shape), n, k, block):
            raise WanquantError(f"{fmt} scale does not fit the weight", file=file, layer=module,
                                expected=f"{list(expected_scale_shape(kind, n, k, max(block, 1)))} for weight [{n}, {k}]"
                                         + (f" and group_size {block}" if block else ""),
                                found=f"{list(scale.shape)} ({scale.key})")
    else:
        if scale.numel == 1 and payload == "int8":
            kind, block = TENSOR, 0
        else:
            fit = _grid_block(tuple(scale.shape), n, k)
            if fit is None:
                raise WanquantError(f"{payload} weight scale shape fits no known layout", file=file, layer=module,
                                    expected=f"scalar, [{n}] / [{n}, 1] per row, [{n}, {k}/bs, 1] or [{n}/bs, {k}/bs]",
                                    found=f"{list(scale.shape)} ({scale.key})")
            kind, block = fit
        fmt = {("fp8", ROW): "float8_e4m3fn_rowwise", ("fp8", BLOCK2D): "float8_e4m3fn_blockwise",
               ("fp8", BLOCK3D): "float8_e4m3fn_block3d", ("int8", TENSOR): "int8_tensorwise",
               ("int8", ROW): "int8_tensorwise", ("int8", BLOCK2D): "int8_blockwise"}.get((payload, kind))
        if fmt is None:
            raise WanquantError("no int8 format with this scale grid", file=file, layer=module,
                                expected="int8 with a scalar, per-row or square-block scale", found=f"{list(scale.shape)}")
    if weight.dtype != _PAYLOAD[GRID_FORMATS[fmt][0]] and not (weight.dtype == torch.uint8 and payload == "fp8"):
        raise WanquantError("weight dtype does not match its format", file=file, layer=module,
                            expected=str(_PAYLOAD[GRID_FORMATS[fmt][0]]), found=str(weight.dtype))
    _check_values(scale, file, module)
    _input_scale_placeholder(sides, file, module, fmt)
    out_conf = {"format": fmt}
    if kind in (BLOCK2D, BLOCK3D):
        out_conf["group_size"] = block
    grid = {ROW: "per-row", TENSOR: "per-tensor", BLOCK2D: f"{block}x{block} blocks", BLOCK3D: f"row x {block} groups"}
    return Layer(module, fmt, f"{spelling}, {grid[kind]} scale", weight,
                 {"weight_scale": scale}, out_conf, {})


def hybrid_mxfp8(module: str, conf: dict, others: dict, file: str) -> tuple[dict, str, str]:
    """convert_to_quant's ``hybrid_mxfp8``: a complete MXFP8 layer (E8M0 blocked scales, the
    reload formula) plus ``.weight_scalar``, a per-tensor scale (its max block scale) meant for
    fp8 matmul on GPUs without MXFP8. The MXFP8 part is the exact weight, so the layer is read as
    ``mxfp8``; the scalar is checked and dropped (ComfyUI has no place for it)."""
    scalar = others.pop("weight_scalar", None)
    if scalar is None:
        raise WanquantError("hybrid_mxfp8 layer without its weight_scalar", file=file, layer=module,
                            expected=f"{module}.weight_scalar (one float)", found="no such tensor")
    if scalar.numel != 1 or scalar.dtype not in _FLOATS:
        raise WanquantError("hybrid_mxfp8 weight_scalar must be one float", file=file, layer=module,
                            expected="fp32 scalar", found=f"{scalar.dtype} {list(scalar.shape)}")
    _check_values(scalar, file, module)
    conf = {k: v for k, v in conf.items() if k not in ("format", "group_size")}
    conf["format"] = "mxfp8"
    return conf, "mxfp8", "hybrid_mxfp8 (convert_to_quant; its exact MXFP8 part, weight_scalar dropped)"


def canonical_entries(layer, entry_cls) -> list:
    """Canonical tensors of a grid layer: the payload as stored (fp8 / int8), the scale as fp32 in
    the canonical shape (0-d, [N, 1], [N/bs, K/bs] or [N, K/bs, 1]) and the comfy_quant JSON."""
    from ..ops.formats import comfy_quant_tensor

    n_, w, ws = layer.name, layer.weight, layer.sides["weight_scale"]
    n, k = int(w.shape[0]), int(w.shape[1])
    fmt = layer.format
    kind = GRID_FORMATS[fmt][1]
    if fmt == "int8_tensorwise" and ws.numel == 1:
        kind = TENSOR
    shape = expected_scale_shape(kind, n, k, int(layer.conf.get("group_size") or 0))
    dtype = torch.int8 if fmt.startswith("int8") else torch.float8_e4m3fn
    wload = w.loader if w.dtype == dtype else (lambda w=w, d=dtype: w.load().view(d))
    conf = dict(layer.conf)
    return [entry_cls(f"{n_}.weight", tuple(w.shape), dtype, wload, n_),
            entry_cls(f"{n_}.weight_scale", shape, torch.float32,
                      lambda ws=ws, shape=shape: ws.load().to(torch.float32).reshape(shape).contiguous(), n_),
            entry_cls(f"{n_}.comfy_quant", (len(json.dumps(conf).encode()),), torch.uint8,
                      lambda conf=conf: comfy_quant_tensor(conf), n_)]
