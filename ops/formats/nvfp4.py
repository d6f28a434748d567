"""NVFP4: E2M1 codes packed high-nibble-first, one fp8-e4m3 scale per 16 inputs stored in
cuBLAS's blocked layout, and a per-tensor fp32 ``weight_scale_2``.

Value = E2M1(code) * (weight_scale_2 * block_scale). comfy-kitchen's dequant is used when it
is importable (its CUDA backend is fast); the pure-torch path below reproduces it bit for bit
(same operation order, always computed in fp32 and rounded once), so CPU-only installs and
kitchen-less environments get identical weights.
"""

from __future__ import annotations

import contextlib

import logging

import torch

from ...errors import WanquantError
from ._common import (E2M1_MAX, E4M3_MAX, as_scalar_f32, decode_e2m1, encode_e2m1, from_blocked,
                      kitchen, pack_codes, require, round_up, to_blocked)
from .base import BlockScaledFormat

BLOCK = 16
log = logging.getLogger(__name__)


class NVFP4(BlockScaledFormat):
    name = "nvfp4"
    storage_dtype = torch.uint8
    group_size = BLOCK
    quantizes_activations = True

    def stored_shape(self, tensors):
        w = tensors["weight"]
        return int(w.shape[0]), int(w.shape[1]) * 2

    def _parts(self, tensors):
        w = require(tensors, "weight", self.name)
        bs = require(tensors, "weight_scale", self.name)
        s2 = as_scalar_f32(require(tensors, "weight_scale_2", self.name), "nvfp4 weight_scale_2")
        if w.dtype != torch.uint8 or w.ndim != 2:
            raise WanquantError("nvfp4 weight must be packed uint8 [N, K/2]", expected="2-D uint8",
                                found=f"{w.ndim}-D {w.dtype}")
        if bs.dtype == torch.uint8:
            bs = bs.view(torch.float8_e4m3fn)
        if bs.dtype != torch.float8_e4m3fn:
            raise WanquantError("nvfp4 block scales must be fp8 e4m3", expected="float8_e4m3fn or uint8",
                                found=str(bs.dtype))
        rows, cols = w.shape[0], w.shape[1] * 2
        if rows % BLOCK or cols % BLOCK:
            raise WanquantError("nvfp4 weight must be stored padded to multiples of 16",
                                expected="N and K multiples of 16", found=f"{rows}x{cols}")
        exp = (round_up(rows, 128), round_up(cols // BLOCK, 4))
        if tuple(bs.shape) != exp and bs.numel() != exp[0] * exp[1]:
            raise WanquantError("nvfp4 block scales have the wrong shape", expected=str(exp),
                                found=str(tuple(bs.shape)))
        return w, bs, s2.to(w.device)

    def dequantize_torch(self, tensors, out_dtype=torch.float32, conf=None):
        """Pure-torch dequant: unswizzle the block scales, table-decode the nibbles, scale.

        Decodes straight into ``out_dtype`` (E2M1 values are exact in every float dtype) and
        scales in place, so a 16-bit compute dtype never makes a full-size fp32 temporary. The
        per-block scale is formed in ``out_dtype`` exactly as comfy-kitchen's own dequant forms it
        (``s2.to(out) * block.to(out)``), so both give the same bits in every dtype."""
        w, bs, s2 = self._parts(tensors)
        rows, cols = w.shape[0], w.shape[1] * 2
        dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.float32
        vals = decode_e2m1(w, True, dtype).reshape(rows, cols // BLOCK, BLOCK)
        total = s2.to(dtype) * from_blocked(bs, rows, cols // BLOCK).to(dtype)
        full = vals.mul_(total.unsqueeze(-1)).reshape(rows, cols)  # vals is a fresh tensor: scale in place
        return self._finish(full, tensors, out_dtype, conf)

    def dequantize_kitchen(self, tensors, out_dtype=torch.float32, conf=None, ck=None):
        ck = ck or kitchen()
        w, bs, s2 = self._parts(tensors)
        full = ck.dequantize_nvfp4(w, s2, bs.reshape(round_up(w.shape[0], 128), -1), output_type=out_dtype)
        return self._finish(full, tensors, out_dtype, conf)

    def quantize(self, w, *, generator=None, stochastic=False, conf=None):
        if w.ndim != 2:
            raise WanquantError("nvfp4 quantizes 2-D weights", expected="[N, K]", found=str(tuple(w.shape)))
        n, k = w.shape
        wf = w.float()
        amax = wf.abs().amax()
        s2 = torch.where(amax > 0, amax / (E4M3_MAX * E2M1_MAX), torch.ones_like(amax)).to(torch.float32)
        ck = kitchen()
        q = None
        if ck is not None and not stochastic:
            try:
                # kitchen's CUDA kernel takes only fp16/bf16 input; the fp32 weight would be rounded
                # first, so fp32 goes to its eager backend (same formula, in torch, on the same device)
                with ck.use_backend("eager") if wf.is_cuda else contextlib.nullcontext():
                    q, bs = ck.quantize_nvfp4(wf, s2, pad_16x=True)
            except ck.BackendError as exc:
                log.debug("kitchen nvfp4 quantize unavailable (%s); using torch", exc)
        if q is None:
            q, bs = self.quantize_torch(wf, s2, generator=generator, stochastic=stochastic)
        out_conf = {"format": self.name}
        if (n, k) != (q.shape[0], q.shape[1] * 2):
            out_conf["orig_shape"] = [int(n), int(k)]
        return {"weight": q, "weight_scale": bs, "weight_scale_2": s2.reshape(())}, out_conf

    def quantize_torch(self, wf, s2, *, generator=None, stochastic=False):
        """Pure-torch NVFP4 quantizer (kitchen's recipe: block amax / 6 over the global scale,
        rounded to fp8, then E2M1 round-to-nearest-even or stochastic)."""
        n, k = wf.shape
        pn, pk = round_up(n, BLOCK), round_up(k, BLOCK)
        if (pn, pk) != (n, k):
            wf = torch.nn.functional.pad(wf, (0, pk - k, 0, pn - n))
        blocks = wf.reshape(pn, pk // BLOCK, BLOCK)
        bscale = (blocks.abs().amax(-1) / E2M1_MAX / s2).clamp_(max=E4M3_MAX).to(torch.float8_e4m3fn)
        total = s2 * bscale.to(torch.float32)
        zero = total == 0
        data = blocks / torch.where(zero, torch.ones_like(total), total).unsqueeze(-1)
        data = torch.where(zero.unsqueeze(-1), torch.zeros_like(data), data).clamp_(-E2M1_MAX, E2M1_MAX)
        codes = encode_e2m1(data.reshape(pn, pk), generator=generator, stochastic=stochastic)
        return pack_codes(codes, hi_first=True), to_blocked(bscale)


FORMAT = NVFP4()
