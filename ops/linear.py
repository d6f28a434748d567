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
* ``linear_kitchen``: NVFP4 / MXFP8 through comfy-kitchen's block-scaled matmul. Only valid on
  SM >= 10 with kitchen's CUDA backend; the policy never selects it elsewhere (kitchen raises
  ``ValueError`` on CPU, which ComfyUI's fallback does not catch).

No ComfyUI import here: the bridge in ``nodes/comfy_ops.py`` calls these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import WanquantError
from .formats import FP8_FORMATS, get_format
from .formats._common import E2M1_MAX, E4M3_MAX, fp8_to_float32, kitchen

#: smallest activation scale; keeps an all-zero input from dividing by zero
_MIN_SCALE = 1e-12


def _kitchen_cuda_usable(t: torch.Tensor):
    """comfy_kitchen when its CUDA backend can run on this tensor, else None."""
    if not t.is_cuda:
        return None
    ck = kitchen()
    if ck is None:
        return None
    try:
        info = ck.list_backends().get("cuda", {})
    except Exception:  # noqa: BLE001
        return None
    return ck if info.get("available") and not info.get("disabled") else None


def activation_scale_fp8(x2d: torch.Tensor) -> torch.Tensor:
    """Dynamic per-tensor scale amax(|x|)/448 as a 0-d fp32 tensor on x's device (no sync)."""
    amax = x2d.abs().amax().to(torch.float32)
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
    # x * (1/scale) runs in fp32 inside the kernel and rounds once to x's dtype, then to fp8
    q = torch.mul(x2d, torch.reciprocal(scale)).clamp_(-fmax, fmax).to(fp8_dtype)
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
        raw, factor = fp8_to_float32(w)
        y = F.linear(x, raw)
        y.mul_(f.scale(tensors).to(y.device) * factor)
        if bias is not None:
            y.add_(bias.to(y.dtype))
        return y
    w = f.dequantize(tensors, out_dtype=x.dtype, conf=conf)
    if w.shape[1] != k:
        if w.shape[1] > k:  # stored padded without an orig_shape in conf
            w = w[:, :k]
        else:
            raise WanquantError("input features do not match the weight", expected=str(w.shape[1]), found=str(k))
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def linear_kitchen(x: torch.Tensor, fmt: str, tensors: dict[str, torch.Tensor],
                   bias: torch.Tensor | None = None, conf: dict | None = None) -> torch.Tensor:
    """NVFP4 / MXFP8 block-scaled tensor-core matmul through comfy-kitchen (SM >= 10 only).

    Activations are quantized dynamically (NVFP4: per-tensor amax/(448*6) plus per-16 block
    scales; MXFP8: per-32 E8M0 block scales), padded as the kernels require, and the output is
    cropped back to [..., N]."""
    ck = kitchen()
    if ck is None:
        raise WanquantError("comfy-kitchen is not importable", expected="comfy_kitchen", found="nothing")
    f = get_format(fmt)
    n, k = f.orig_shape(tensors, conf)
    if x.shape[-1] != k:
        raise WanquantError("input features do not match the weight", expected=str(k), found=str(x.shape[-1]))
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    if fmt == "nvfp4":
        if tensors.get("input_scale") is not None:
            sa = tensors["input_scale"].to(device=x.device, dtype=torch.float32).reshape(())
        else:
            sa = torch.clamp(x2d.abs().amax().to(torch.float32) / (E4M3_MAX * E2M1_MAX), min=_MIN_SCALE)
        qa, bsa = ck.quantize_nvfp4(x2d, sa, pad_16x=True)
        bs = tensors["weight_scale"]
        bs = bs.view(torch.float8_e4m3fn) if bs.dtype == torch.uint8 else bs
        y = ck.scaled_mm_nvfp4(qa, tensors["weight"], tensor_scale_a=sa,
                               tensor_scale_b=tensors["weight_scale_2"].to(torch.float32).reshape(()),
                               block_scale_a=bsa, block_scale_b=bs, out_dtype=x.dtype)
    elif fmt == "mxfp8":
        qa, bsa = ck.quantize_mxfp8(x2d, pad_32x=True)
        bs = tensors["weight_scale"]
        bs = bs.view(torch.float8_e8m0fnu) if bs.dtype == torch.uint8 else bs
        y = ck.scaled_mm_mxfp8(qa, tensors["weight"], block_scale_a=bsa, block_scale_b=bs, out_dtype=x.dtype)
    else:
        raise WanquantError("kitchen matmul serves nvfp4 and mxfp8 only", expected="nvfp4 | mxfp8", found=fmt)
    y = y[:m, :n]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)


def quant_linear(x: torch.Tensor, path: str, fmt: str | None, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, conf: dict | None = None) -> torch.Tensor:
    """Run one layer on the path the policy chose (``ops.policy`` path names)."""
    if path == "dense" or fmt is None:
        w = tensors["weight"]
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if path == "dequant":
        return linear_dequant(x, fmt, tensors, bias, conf)
    if path == "fp8_matmul":
        f = get_format(fmt)
        return linear_fp8_scaled_mm(x, f.payload(tensors), f.scale(tensors), bias,
                                    input_scale=tensors.get("input_scale"))
    if path == "kitchen_matmul":
        return linear_kitchen(x, fmt, tensors, bias, conf)
    raise WanquantError("unknown linear path", expected="dense | dequant | fp8_matmul | kitchen_matmul", found=path)


class QuantLinear(torch.nn.Module):
    """A standalone quantized Linear (no ComfyUI): canonical tensors as buffers plus a path.

    Used by the benchmark, the tests and any non-ComfyUI caller; inside ComfyUI the bridge
    keeps ComfyUI's own Linear (for LoRA and offloading) and calls ``quant_linear``."""

    def __init__(self, fmt: str | None, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                 conf: dict | None = None, path: str = "dequant"):
        super().__init__()
        self.fmt, self.conf, self.path = fmt, dict(conf or {}), path
        self._keys = []
        for key, t in tensors.items():
            if t is not None:
                self.register_buffer(key, t)
                self._keys.append(key)
        self.register_buffer("bias", bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._keys}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.path, self.fmt, self.tensors(), self.bias, self.conf)
