"""Quantized linear layers: the three compute paths the policy chooses between.

* ``linear_dequant``: dequantize the weight into the compute dtype, then a dense matmul. Works
  for every format on every device. For fp8 with fp32 compute (the CPU case) it upcasts the raw
  fp8 payload and scales the *output* instead of the weight, which is the fastest CPU recipe
  (COMFYUI.md §5: one cast pass over the weight, scale applied to the smaller tensor).
* ``linear_fp8_scaled_mm``: ``torch._scaled_mm`` on fp8 tensor cores (and, emulated, on CPU).
  Activations are quantized with a **dynamic per-tensor scale** (amax/448 computed on the
  device, no host sync) unless the checkpoint provides a calibrated ``input_scale``. ComfyUI and
  kijai's wrapper use a fixed scale of 1.0, which clips every activation above 448; the dynamic
  scale is what MagiHuman's release uses. K and N are zero-padded to multiples of 16 when
  needed (cuBLASLt's requirement), bias is fused where the kernel allows it, any input rank.

NVFP4 / MXFP8 on Blackwell run through ComfyUI's own forward (its layouts call comfy-kitchen's
block-scaled matmul), so there is one kitchen matmul path, ComfyUI's, and none here.

No ComfyUI import here: the bridge in ``nodes/comfy_ops.py`` calls these functions.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..errors import WanquantError
from .formats import FP8_FORMATS, get_format
from .formats._common import E4M3_MAX, fp8_decode, kitchen

#: smallest activation scale; keeps an all-zero input from dividing by zero
_MIN_SCALE = 1e-12


def _kitchen_cuda_usable(t: torch.Tensor):
    """comfy_kitchen when its CUDA backend can run on this tensor, else None.

    None under torch.compile: kitchen's ops are compiler-disabled custom ops (a graph break per
    layer, seen on an H200), while the plain torch formula below compiles into one fused kernel."""
    if not t.is_cuda or torch.compiler.is_compiling():
        return None
    ck = kitchen()
    if ck is None or not _kitchen_cuda_available(ck):
        return None
    return ck


@functools.lru_cache(maxsize=4)
def _kitchen_cuda_available(ck) -> bool:
    """Asked once per process: ``list_backends`` walks every backend's capabilities in Python, which
    cost more than the fp8 quantize kernel itself when asked per forward (H200, M = 4096)."""
    try:
        info = ck.list_backends().get("cuda", {})
    except Exception:  # noqa: BLE001
        return False
    return bool(info.get("available") and not info.get("disabled"))


def activation_scale_fp8(x2d: torch.Tensor) -> torch.Tensor:
    """Dynamic per-tensor scale amax(|x|)/448 as a 0-d fp32 tensor on x's device (no sync)."""
    # one reduction kernel, no |x| temporary the size of the activations
    amax = torch.linalg.vector_norm(x2d, float("inf")).to(torch.float32)
    return torch.clamp(amax / E4M3_MAX, min=_MIN_SCALE)


def quantize_activation_fp8(x2d: torch.Tensor, input_scale: torch.Tensor | None = None,
                            fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to fp8: ``clamp(x / scale, ±448)``.

    ``input_scale`` None means dynamic scaling; a given scale (a calibrated ``input_scale``, or
    1.0 to reproduce ComfyUI's behaviour) is used as is."""
    if input_scale is None:
        scale = activation_scale_fp8(x2d)
    else:
        scale = input_scale.to(device=x2d.device, dtype=torch.float32).reshape(())
    ck = _kitchen_cuda_usable(x2d)
    if ck is not None:
        try:
            return ck.quantize_per_tensor_fp8(x2d.contiguous(), scale, fp8_dtype), scale
        except ck.BackendError:
            pass
    fmax = torch.finfo(fp8_dtype).max
    # fp32 product, one rounding to fp8: kitchen's CUDA kernel's formula (bit-identical on an H200).
    # Multiplying in x's bf16 would round twice (bf16, then fp8) and disagree on ~1 value in 50.
    q = torch.mul(x2d.to(torch.float32), torch.reciprocal(scale)).clamp_(-fmax, fmax).to(fp8_dtype)
    return q, scale


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if tuple(t.shape) == (rows, cols):
        return t
    out = torch.zeros((rows, cols), dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _r16(n: int) -> int:
    return (n + 15) // 16 * 16


def linear_fp8_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, *, input_scale: torch.Tensor | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y = x @ (weight * weight_scale).T + bias`` with fp8 activations on fp8 tensor cores.

    ``weight`` is the fp8 [N, K] payload (e4m3 or e5m2), ``weight_scale`` its per-tensor
    multiplier. Activations go to e4m3 with a dynamic scale unless ``input_scale`` is given.
    ``x`` may have any rank; the output has x's leading dims and x's dtype unless ``out_dtype``."""
    if weight.dtype == torch.uint8:
        raise WanquantError("fp8 matmul needs a typed fp8 weight", expected="float8_e4m3fn/e5m2", found="uint8")
    if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise WanquantError("fp8 matmul needs an fp8 weight", expected="float8_e4m3fn/e5m2", found=str(weight.dtype))
    n, k = weight.shape
    if x.shape[-1] != k:
        raise WanquantError("input features do not match the weight", expected=str(k), found=str(x.shape[-1]))
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    qx, sa = quantize_activation_fp8(x2d, input_scale)
    sb = weight_scale.to(device=x.device, dtype=torch.float32).reshape(())
    kp, np_ = _r16(k), _r16(n)
    if kp != k:
        qx = _pad_to(qx, m, kp)
    w = _pad_to(weight, np_, kp) if (kp, np_) != (k, n) else weight
    fuse_bias = bias is not None and np_ == n and (out_dtype in (torch.bfloat16, torch.float16) or not x.is_cuda)
    if m == 0:
        y = torch.zeros((0, np_), dtype=out_dtype, device=x.device)
    else:
        y = torch._scaled_mm(qx, w.t(), scale_a=sa, scale_b=sb,
                             bias=bias.to(out_dtype) if fuse_bias else None, out_dtype=out_dtype)
    if np_ != n:
        y = y[:, :n]
    if bias is not None and not fuse_bias:
        y = y + bias.to(out_dtype)
    return y.reshape(*lead, n)


def linear_dequant(x: torch.Tensor, fmt: str, tensors: dict[str, torch.Tensor],
                   bias: torch.Tensor | None = None, conf: dict | None = None) -> torch.Tensor:
    """Dequantize-then-matmul in x's dtype; valid for every format on every device."""
    f = get_format(fmt)
    k = x.shape[-1]
    if fmt in FP8_FORMATS and x.dtype == torch.float32:
        # CPU-fast recipe: exact fp32 upcast of the payload, GEMM, scale the output once.
        w = f.payload(tensors)
        if w.shape[1] != k:
            raise WanquantError("input features do not match the weight", expected=str(w.shape[1]), found=str(k))
        y = F.linear(x, fp8_decode(w))
        y.mul_(f.scale(tensors).to(y.device))
        if bias is not None:
            y.add_(bias.to(y.dtype))
        return y
    w = f.dequantize(tensors, out_dtype=x.dtype, conf=conf)
    if w.shape[1] != k:  # a padded layer carries its orig_shape in conf; anything else is a mismatch
        raise WanquantError("input features do not match the weight", expected=str(w.shape[1]), found=str(k))
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
