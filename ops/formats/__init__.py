"""Registry of quantized weight formats (names as in FORMATS.md).

``get_format(name)`` returns the ``QuantFormat`` for a canonical name; ``comfy_quant_tensor`` /
``parse_comfy_quant`` read and write the per-layer ``<L>.comfy_quant`` JSON the way ComfyUI does
(a uint8 tensor of UTF-8 JSON).
"""

from __future__ import annotations

import json

import torch

from ...errors import WanquantError
from . import fp4_g32 as _fp4_g32
from . import fp8_block as _fp8_block
from . import fp8_rowwise as _fp8_rowwise
from . import int8 as _int8
from . import fp8 as _fp8
from . import gguf as _gguf
from . import mxfp8 as _mxfp8
from . import nvfp4 as _nvfp4
from ._common import from_blocked, kitchen, swap_nibbles, to_blocked
from .base import QuantFormat

_REGISTRY: dict[str, QuantFormat] = {
    f.name: f for f in (_fp8.E4M3, _fp8.E5M2, _nvfp4.FORMAT, _mxfp8.FORMAT, _fp4_g32.FORMAT,
                        _fp8_rowwise.FORMAT, _fp8_block.BLOCKWISE, _fp8_block.BLOCK3D_FORMAT,
                        _int8.TENSORWISE, _int8.BLOCKWISE, *_gguf.FORMATS)
}

#: every quantized format name this pack understands
FORMAT_NAMES = tuple(_REGISTRY)
#: fp8 per-tensor formats (the ones torch._scaled_mm serves)
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
#: per-row fp8 (torch._scaled_mm with row-wise scales) and the int8 formats (torch._int_mm)
FP8_ROWWISE_FORMATS = ("float8_e4m3fn_rowwise",)
INT8_FORMATS = ("int8_tensorwise", "int8_blockwise")


def get_format(name: str) -> QuantFormat:
    """The format object for a canonical name; a clear error for anything else."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise WanquantError("unknown quantized format", expected=" | ".join(FORMAT_NAMES), found=repr(name)) from None


def comfy_quant_tensor(conf: dict) -> torch.Tensor:
    """The ``<L>.comfy_quant`` tensor for a conf dict (uint8 bytes of its JSON)."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def parse_comfy_quant(t) -> dict:
    """Inverse of ``comfy_quant_tensor``; also accepts bytes / str for header metadata."""
    if isinstance(t, torch.Tensor):
        raw = t.detach().cpu().to(torch.uint8).numpy().tobytes()
    elif isinstance(t, (bytes, bytearray)):
        raw = bytes(t)
    else:
        raw = str(t).encode("utf-8")
    try:
        conf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, huge ints
        raise WanquantError("comfy_quant is not valid UTF-8 JSON", expected='{"format": ...}',
                            found=repr(raw[:60])) from exc
    if not isinstance(conf, dict) or "format" not in conf:
        raise WanquantError("comfy_quant JSON has no 'format'", expected='{"format": ...}', found=repr(conf)[:80])
    return conf


__all__ = ["QuantFormat", "get_format", "FORMAT_NAMES", "FP8_FORMATS", "FP8_ROWWISE_FORMATS", "INT8_FORMATS", "comfy_quant_tensor",
           "parse_comfy_quant", "swap_nibbles", "to_blocked", "from_blocked", "kitchen"]
