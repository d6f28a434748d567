"""Shared test data builders and *independent* fp64 references.

Checkpoints are built with the producers' recipes (wanquant.loaders.synthetic follows each
model card); the reference dequantizers below are written from the specs in FORMATS.md /
COMFYUI.md, not from wanquant's own ops, so a test comparing the two can fail.
"""

from __future__ import annotations

import torch

from wanquant.loaders import synthetic as syn  # noqa: F401  (re-exported for tests)

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def ref_fp8(q: torch.Tensor, scale) -> torch.Tensor:
    """Every fp8 producer's reload formula: fp8 → float, times the per-tensor scale."""
    return q.to(torch.float64) * torch.as_tensor(scale).to(torch.float64)


def _e2m1(codes: torch.Tensor) -> torch.Tensor:
    mag = E2M1[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def unpack_nibbles(packed: torch.Tensor, order: str) -> torch.Tensor:
    """[N, K/2] bytes → [N, K] 4-bit codes in element order."""
    hi, lo = (packed >> 4) & 0xF, packed & 0xF
    first, second = (hi, lo) if order == "high_first" else (lo, hi)
    return torch.stack([first, second], dim=-1).reshape(packed.shape[0], -1)


def ref_fp4_g32(packed: torch.Tensor, scale: torch.Tensor, order: str) -> torch.Tensor:
    codes = unpack_nibbles(packed, order)
    vals = _e2m1(codes)
    return vals * scale.to(torch.float64).repeat_interleave(32, dim=1)


def unblock(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """cuBLAS 128x4 tiled scale layout → row-major [rows, cols], by the offset formula in COMFYUI.md:
    offset(r,c) = ((r//128)*nColTiles + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4."""
    flat = blocked.reshape(-1)
    n_col_tiles = (cols + 3) // 4
    r = torch.arange(rows).unsqueeze(1)
    c = torch.arange(cols).unsqueeze(0)
    off = ((r // 128) * n_col_tiles + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return flat[off]


def ref_nvfp4(w: torch.Tensor, block_scales: torch.Tensor, scale2, orig_shape) -> torch.Tensor:
    n_pad, half = w.shape
    k_pad = half * 2
    codes = unpack_nibbles(w, "high_first")
    bs = unblock(block_scales.view(torch.float8_e4m3fn), n_pad, k_pad // 16).to(torch.float64)
    vals = _e2m1(codes) * bs.repeat_interleave(16, dim=1) * float(scale2)
    return vals[: orig_shape[0], : orig_shape[1]]


def ref_mxfp8(w: torch.Tensor, block_scales: torch.Tensor, orig_shape) -> torch.Tensor:
    n_pad, k_pad = w.shape
    e = unblock(block_scales.view(torch.uint8), n_pad, k_pad // 32).to(torch.int64)
    scale = torch.where(e == 0, torch.zeros((), dtype=torch.float64), torch.pow(2.0, (e - 127).to(torch.float64)))
    vals = w.to(torch.float64) * scale.repeat_interleave(32, dim=1)
    return vals[: orig_shape[0], : orig_shape[1]]


def tiny_wan(**kw) -> dict[str, torch.Tensor]:
    kw.setdefault("dim", 256)
    kw.setdefault("ffn_dim", 512)
    kw.setdefault("num_blocks", 2)
    return syn.wan_state_dict(**kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, for bit-exact comparisons."""
    return t.contiguous().reshape(-1).view(torch.uint8)
