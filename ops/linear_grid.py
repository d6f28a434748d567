"""Tensor-core paths for per-row fp8 and int8 weights, with per-token activation scales.

* ``linear_fp8_rowwise``: ``torch._scaled_mm`` with ``scale_a`` [M, 1] (activation amax/448 per
  token) and ``scale_b`` [1, N] (the weight's row scales), fp8 tensor cores on SM >= 8.9; torch
  2.13 also runs it on CPU (emulated), which is how the tests exercise it.
* ``linear_int8``: W8A8 through ``torch._int_mm``: activations to int8 per token (amax/127, round
  to nearest), int32 accumulation, then ``acc * s_x[m] * s_w[n]`` in fp32 (int8 tensor cores on
  SM >= 7.5, and a native int8 GEMM on CPU). The weight scale may be per tensor or per row.
* ``requantize_fp8_to_int8``: per-tensor fp8 -> per-channel int8 at load (policy ``int8_matmul``,
  for GPUs without fp8 tensor cores), returning the relative weight error it adds.

Shapes are padded where the kernels need it (cuBLAS: K, N multiples of 16 for fp8, of 8 for
int8; ``_int_mm`` on CUDA also wants M > 16). No ComfyUI import: the bridge calls these.
"""

from __future__ import annotations

import torch

from ..errors import WanquantError
from .formats._common import E4M3_MAX
from .linear import _pad_to

_MIN_SCALE = 1e-12
#: counts kernel launches per path (tests and benchmarks read it to prove the fast path ran)
CALLS = {"fp8_rowwise": 0, "int8": 0}


def _r(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _check(x, weight, dtype, what):
    if weight.dtype != dtype or weight.ndim != 2:
        raise WanquantError(f"{what} needs a 2-D {dtype} weight", expected=str(dtype), found=f"{weight.dtype} {list(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise WanquantError("input features do not match the weight", expected=str(weight.shape[1]), found=str(x.shape[-1]))


def _row_scale(scale: torch.Tensor, n: int, device) -> torch.Tensor:
    s = scale.to(device=device, dtype=torch.float32)
    return s.reshape(1, 1).expand(1, n) if s.numel() == 1 else s.reshape(1, n)


def per_token_scale(x2d: torch.Tensor, qmax: float) -> torch.Tensor:
    """[M, 1] fp32 amax(|x_m|)/qmax (one reduction; all-zero rows get the tiny floor, not 0)."""
    amax = torch.linalg.vector_norm(x2d, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    return torch.clamp(amax / qmax, min=_MIN_SCALE)


def quantize_int8_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = per_token_scale(x2d, 127.0)
    q = torch.round(x2d.to(torch.float32) / s).clamp_(-127, 127).to(torch.int8)
    return q, s


def linear_fp8_rowwise(x, weight, weight_scale, bias=None, *, out_dtype=None):
    """``y = x @ (weight * row_scale).T + bias`` with fp8 activations scaled per token."""
    _check(x, weight, torch.float8_e4m3fn, "row-wise fp8 matmul")
    n, k = weight.shape
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    sa = per_token_scale(x2d, E4M3_MAX)
    qx = torch.mul(x2d.to(torch.float32), torch.reciprocal(sa)).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    sb = _row_scale(weight_scale, n, x.device)
    kp, np_ = _r(k, 16), _r(n, 16)
    if kp != k:
        qx = _pad_to(qx, m, kp)
    w = _pad_to(weight, np_, kp)
    if np_ != n:
        sb = _pad_to(sb, 1, np_)
    if m == 0:
        return torch.zeros((*lead, n), dtype=out_dtype, device=x.device)
    CALLS["fp8_rowwise"] += 1
    # row-wise scaling in cuBLASLt takes bf16 output; other dtypes are cast after
    mm_dtype = torch.bfloat16 if x.is_cuda else out_dtype
    y = torch._scaled_mm(qx, w.t(), scale_a=sa, scale_b=sb.contiguous(), out_dtype=mm_dtype)
    y = y[:, :n] if np_ != n else y
    y = y.to(out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*lead, n)


def linear_int8(x, weight, weight_scale, bias=None, *, out_dtype=None):
    """``y = x @ (weight * scale).T + bias`` as int8 x int8 -> int32 with per-token x scales."""
    _check(x, weight, torch.int8, "int8 matmul")
    n, k = weight.shape
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    if m == 0:
        return torch.zeros((*lead, n), dtype=out_dtype, device=x.device)
    qx, sx = quantize_int8_per_token(x2d)
    kp, np_ = _r(k, 8), _r(n, 8)
    mp = max(m, 17) if x.is_cuda else m
    qx = _pad_to(qx, mp, kp)
    w = _pad_to(weight, np_, kp)
    CALLS["int8"] += 1
    acc = torch._int_mm(qx, w.t())[:m, :n]
    y = acc.to(torch.float32).mul_(sx).mul_(_row_scale(weight_scale, n, x.device))
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(out_dtype).reshape(*lead, n)


def requantize_fp8_to_int8(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-tensor fp8 -> int8 with one scale per output row; (int8, fp32 [N, 1], relative L2 error)."""
    from .formats import get_format

    w = get_format("float8_e4m3fn").dequantize({"weight": weight, "weight_scale": scale}, torch.float32)
    t, _ = get_format("int8_tensorwise").quantize(w)
    back = get_format("int8_tensorwise").dequantize(t)
    err = float(torch.linalg.vector_norm(back - w, dtype=torch.float64)
                / torch.linalg.vector_norm(w, dtype=torch.float64).clamp_min(1e-30))
    return t["weight"], t["weight_scale"], err
