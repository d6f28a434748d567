"""GGUF block quantization (llama.cpp / city96's ComfyUI-GGUF Wan files), decoded in torch.

A GGUF weight is a run of fixed-size blocks; each block holds its own fp16 scale(s) next to the
packed codes, so there is no separate ``weight_scale`` tensor. The canonical form keeps the file's
raw bytes as ``weight`` (uint8 [rows, bytes per row]) with ``{"format": "gguf_<type>",
"orig_shape": [...]}``: ``orig_shape`` is the tensor's logical torch shape (GGUF stores dims in
reverse order, and city96's tools may store a weight reshaped to [n/256, 256]), so dequant is
"decode every block, then reshape": the byte rows never have to match the logical rows.

The block tables (bytes per block, elements per block) and the decoders follow ggml's
``ggml-quants.c`` layouts; each decoder does the same fp32 operations, in the same order, as
gguf-py's ``gguf.quants`` reference, so fp32 output is bit-identical to it (tests check every
type on random valid blocks) and other dtypes are one rounding of that. gguf-py's numpy decode
is slower and holds several full-size temporaries; this one is vectorised over all blocks in
torch, runs on any device and needs no gguf import at run time.
"""

from __future__ import annotations

import torch

from ...errors import WanquantError
from ._common import require
from .base import QuantFormat

QK_K = 256

#: GGML type name -> (elements per block, bytes per block); the quantized types we decode
BLOCKS: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 2 + 32),
    "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q5_0": (32, 2 + 4 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q4_0": (32, 2 + 16),
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    "Q5_K": (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    "Q4_K": (QK_K, 2 + 2 + 12 + QK_K // 2),
    "Q3_K": (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    "Q2_K": (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
}
#: GGML type ids (ggml.h ``enum ggml_type``) of the block types above and the plain ones
GGML_TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
                 "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PREFIX = "gguf_"


def format_name(qtype: str) -> str:
    """Canonical format name of a GGML block type: ``Q4_K`` -> ``gguf_q4_k``."""
    return PREFIX + qtype.lower()


def is_gguf(fmt: str | None) -> bool:
    return bool(fmt) and fmt.startswith(PREFIX)


def byte_shape(shape: tuple[int, ...] | list[int], qtype: str) -> tuple[int, ...]:
    """Bytes a tensor of logical ``shape`` takes, as [*rows, bytes per row] (last dim in blocks)."""
    bs, ts = BLOCKS[qtype]
    if not shape or shape[-1] % bs:
        raise WanquantError(f"GGUF {qtype} needs the innermost dimension to be a multiple of {bs}",
                            expected=f"[..., {bs}*m]", found=str(list(shape)))
    return (*shape[:-1], shape[-1] // bs * ts)


# ----------------------------------------------------------------------------- decoders
# Each takes uint8 blocks [n, bytes per block] and returns fp32 [n, elements per block].

def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row (little-endian fp16) -> fp32 [n, 1]."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes: low nibbles are elements 0-15, high nibbles 16-31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """[n, count/8] bytes -> [n, count] single bits, bit i of the little-endian word first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(b.shape[0], count)


def _q8_0(b):
    # int8 codes times the fp32 scale in one kernel (type promotion; int8 -> fp32 is exact)
    return torch.mul(b[:, 2:].view(torch.int8), _f16(b[:, :2]))


def _q4_0(b):
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.to(torch.float32)


def _q4_1(b):
    q = _nibbles(b[:, 4:]).to(torch.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5_0(b):
    q = (_nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.to(torch.float32)


def _q5_1(b):
    q = (_nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)).to(torch.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (uint8 [n, 8] each)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_pairs(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes in 4 chunks of 32 -> [n, 8, 32] codes: per chunk its low nibbles, then high."""
    q = qs.reshape(qs.shape[0], 4, 1, 32)
    return torch.cat((q & 0x0F, q >> 4), dim=2).reshape(qs.shape[0], 8, 32)


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.to(torch.float32)).reshape(n, 8, 1)
    return (d * _k_pairs(b[:, 16:]).to(torch.float32) - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.to(torch.float32)).reshape(n, 8, 1)
    qh = b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    q = _k_pairs(b[:, 48:]) | ((qh & 1) << 4)
    return (d * q.to(torch.float32) - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                            device=b.device).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    return (d * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, s = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = torch.cat((s[:, :8] & 0x0F, s[:, :8] >> 4), dim=-1)
    hs = s[:, 8:12].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                     device=b.device).reshape(1, 4, 1)
    sc = (low | ((hs.reshape(n, 16) & 0x03) << 4)).to(torch.int8) - 32
    dl = (_f16(b[:, 108:110]) * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = qs.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                 device=b.device).reshape(1, 1, 4, 1)
    ql = ql.reshape(n, 16, 16) & 0x03
    qh = hmask.reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    qh = (qh.reshape(n, 16, 16) & 1) ^ 1  # a set high bit means "no offset"
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    dl = (_f16(b[:, 80:82]) * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (_f16(b[:, 82:84]) * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = qs.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                device=b.device).reshape(1, 1, 4, 1)
    q = (q & 0x03).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
             "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}

#: blocks decoded per step: bounds the fp32 temporaries to a few MB whatever the layer size
_CHUNK_BLOCKS = 1 << 15


def dequantize_bytes(raw: torch.Tensor, qtype: str, shape, out_dtype=torch.float32) -> torch.Tensor:
    """Raw GGUF bytes of one tensor -> values of logical ``shape`` in ``out_dtype``.

    Decoded in chunks of blocks straight into the output (fp32 math, one rounding into
    ``out_dtype``), so a 14B layer never holds a full-size fp32 copy next to a bf16 result."""
    bs, ts = BLOCKS[qtype]
    numel = 1
    for s in shape:
        numel *= int(s)
    if raw.dtype != torch.uint8 or numel % bs or raw.numel() != numel // bs * ts:
        raise WanquantError(f"GGUF {qtype} data does not fit its shape", expected=(
            f"uint8, {numel // bs * ts} bytes for {list(shape)}"), found=f"{raw.dtype}, {raw.numel()} bytes")
    blocks = raw.reshape(-1, ts)
    nb = blocks.shape[0]
    decode = _DECODERS[qtype]
    if nb <= _CHUNK_BLOCKS:
        out = decode(blocks)
        return (out if out.dtype == out_dtype else out.to(out_dtype)).reshape(tuple(shape))
    out = torch.empty((nb, bs), dtype=out_dtype, device=raw.device)
    for i in range(0, nb, _CHUNK_BLOCKS):
        out[i:i + _CHUNK_BLOCKS] = decode(blocks[i:i + _CHUNK_BLOCKS])
    return out.reshape(tuple(shape))


class GGUFBlocks(QuantFormat):
    """One GGML block type as a canonical format (``gguf_q8_0``, ``gguf_q4_k``, ...).

    Weight-only: no tensor-core kernel takes these blocks, so every device dequantizes per
    forward (city96's loader does the same); ``wanquant convert`` re-encodes for speed."""

    storage_dtype = torch.uint8
    quantizes_activations = False

    def __init__(self, qtype: str):
        self.qtype = qtype
        self.name = format_name(qtype)
        self.group_size = BLOCKS[qtype][0]

    def orig_shape(self, tensors, conf=None):
        shape = self.logical_shape(tensors, conf)
        if len(shape) != 2:
            raise WanquantError(f"{self.name} layer is not a matrix", expected="2-D orig_shape",
                                found=str(list(shape)))
        return int(shape[0]), int(shape[1])

    def logical_shape(self, tensors, conf=None) -> tuple[int, ...]:
        shape = (conf or {}).get("orig_shape")
        if shape is None:
            raise WanquantError(f"{self.name} needs orig_shape in its comfy_quant (blocks carry no shape)",
                                expected='{"orig_shape": [out, in]}', found=repr(conf))
        return tuple(int(s) for s in shape)

    def stored_shape(self, tensors):
        return tuple(tensors["weight"].shape)

    def dequantize(self, tensors, out_dtype=torch.float32, conf=None):
        w = require(tensors, "weight", self.name)
        return dequantize_bytes(w, self.qtype, self.logical_shape(tensors, conf), out_dtype)

    def quantize(self, w, *, generator=None, stochastic=False, conf=None):
        raise WanquantError(f"{self.name} is read-only in wanquant (GGUF files are made with llama.cpp / "
                            "city96's tools)", expected="a target such as bf16 or float8_e4m3fn",
                            found=self.name)


FORMATS = tuple(GGUFBlocks(q) for q in BLOCKS)


def example_tensors(qtype: str, shape: tuple[int, int], generator: torch.Generator | None = None,
                    device=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Random *valid* blocks of ``qtype`` for a [n, k] layer (finite fp16 scales of about 1e-2,
    random codes), plus the layer's comfy_quant: what benchmarks and the probe time, since
    wanquant does not quantize to GGUF and dequant cost does not depend on the values."""
    n, k = shape
    bs, ts = BLOCKS[qtype]
    byte_shape(shape, qtype)  # a clear error when k is not a whole number of blocks
    nb = n * k // bs
    raw = torch.randint(0, 256, (nb, ts), generator=generator, dtype=torch.uint8)
    for off in _F16_OFFSETS[qtype]:
        scale = (torch.randn(nb, 1, generator=generator) * 0.01).to(torch.float16)
        raw[:, off:off + 2] = scale.view(torch.uint8)
    fmt = format_name(qtype)
    return {"weight": raw.reshape(n, -1).to(device)}, {"format": fmt, "orig_shape": [n, k]}


#: byte offsets of each block's fp16 scale(s) (ggml-quants.h block structs)
_F16_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
                "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
