"""MXFP8: fp8-e4m3 weights with one power-of-two (E8M0) scale per 32 inputs, blocked layout.

E8M0 code c means 2**(c-127); code 0 decodes to 0.0 (comfy-kitchen's convention for zero
blocks; a plain ``float8_e8m0fnu`` cast would give 2**-127). Scales may be stored as uint8 or
``float8_e8m0fnu``; quantize writes uint8, which every safetensors version can store.
"""

from __future__ import annotations

import logging

import torch

from ...errors import WanquantError
from ._common import (E4M3_MAX, fp8_decode, from_blocked, kitchen, require, round_up, stochastic_round_fp8,
                      to_blocked)
from .base import BlockScaledFormat

BLOCK = 32
log = logging.getLogger(__name__)


def e8m0_to_f32(codes_u8: torch.Tensor) -> torch.Tensor:
    """uint8 exponent codes -> fp32 2**(c-127) built from the bits (code 0 -> 0.0)."""
    return (codes_u8.to(torch.int32) << 23).view(torch.float32)


class MXFP8(BlockScaledFormat):
    name = "mxfp8"
    storage_dtype = torch.float8_e4m3fn
    group_size = BLOCK
    quantizes_activations = True

    def _parts(self, tensors):
        w = require(tensors, "weight", self.name)
        bs = require(tensors, "weight_scale", self.name)
        if w.dtype == torch.uint8:
            w = w.view(torch.float8_e4m3fn)
        if w.dtype != torch.float8_e4m3fn or w.ndim != 2:
            raise WanquantError("mxfp8 weight must be 2-D fp8 e4m3", expected="float8_e4m3fn [N, K]",
                                found=f"{w.ndim}-D {w.dtype}")
        if w.shape[1] % BLOCK:
            raise WanquantError("mxfp8 weight must be stored padded to multiples of 32",
                                expected="K multiple of 32", found=str(tuple(w.shape)))
        if bs.dtype != torch.uint8:
            if bs.element_size() != 1:
                raise WanquantError("mxfp8 block scales must be E8M0 bytes", expected="uint8 or float8_e8m0fnu",
                                    found=str(bs.dtype))
            bs = bs.view(torch.uint8)
        return w, bs

    def dequantize_torch(self, tensors, out_dtype=torch.float32, conf=None):
        """fp8 values times power-of-two block scales. In bf16 (fp32's exponent range) both the
        decode and the product are exact, so bf16 is computed directly with no fp32 temporary;
        fp16 cannot hold every 2**e, so it is computed in fp32 and rounded once."""
        w, bs = self._parts(tensors)
        rows, cols = w.shape
        dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
        scales = e8m0_to_f32(from_blocked(bs, rows, cols // BLOCK)).to(dtype)
        full = fp8_decode(w, dtype).reshape(rows, cols // BLOCK, BLOCK).mul_(scales.unsqueeze(-1)).reshape(rows, cols)
        return self._finish(full, tensors, out_dtype, conf)

    def dequantize_kitchen(self, tensors, out_dtype=torch.float32, conf=None, ck=None):
        ck = ck or kitchen()
        w, bs = self._parts(tensors)
        full = ck.dequantize_mxfp8(w, bs.reshape(round_up(w.shape[0], 128), -1).view(torch.float8_e8m0fnu),
                                   output_type=out_dtype)
        return self._finish(full, tensors, out_dtype, conf)

    def kitchen_can_dequantize(self, ck) -> bool:
        return hasattr(torch, "float8_e8m0fnu") and super().kitchen_can_dequantize(ck)

    def quantize(self, w, *, generator=None, stochastic=False, conf=None):
        if w.ndim != 2:
            raise WanquantError("mxfp8 quantizes 2-D weights", expected="[N, K]", found=str(tuple(w.shape)))
        n, k = w.shape
        wf = w.float()
        pn, pk = round_up(n, BLOCK), round_up(k, BLOCK)
        if (pn, pk) != (n, k):
            wf = torch.nn.functional.pad(wf, (0, pk - k, 0, pn - n))
        blocks = wf.reshape(pn, pk // BLOCK, BLOCK)
        amax = blocks.abs().amax(-1)
        # kitchen's recipe: exponent = ceil(log2(amax / 448)) + 127, clamped to [0, 254]
        need = (amax / E4M3_MAX).clamp(min=2.0 ** -127)
        code = (torch.ceil(torch.log2(need)).to(torch.int32) + 127).clamp_(0, 254)
        zero = amax == 0
        code = torch.where(zero, torch.zeros_like(code), code)
        scale = e8m0_to_f32(code)
        data = blocks / torch.where(zero, torch.ones_like(scale), scale).unsqueeze(-1)
        data = torch.where(zero.unsqueeze(-1), torch.zeros_like(data), data).reshape(pn, pk)
        if stochastic:
            q = stochastic_round_fp8(data, torch.float8_e4m3fn, generator)
        else:
            q = data.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        out_conf = {"format": self.name}
        if (pn, pk) != (n, k):
            out_conf["orig_shape"] = [int(n), int(k)]
        return {"weight": q, "weight_scale": to_blocked(code.to(torch.uint8))}, out_conf


FORMAT = MXFP8()
