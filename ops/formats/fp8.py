"""fp8 per-tensor scaled weights (``float8_e4m3fn`` / ``float8_e5m2``).

Dequant is the producers' own reload formula, ``W = fp8.to(fp32) * weight_scale`` (FORMATS.md,
"four spellings of one idea"); the canonical form keeps the fp8 payload bit-exact, so this must
reproduce it exactly in fp32 and round once into other dtypes.
"""

from __future__ import annotations

import torch

from ...errors import WanquantError
from ._common import E4M3_MAX, E5M2_MAX, as_scalar_f32, fp8_decode, require, stochastic_round_fp8
from .base import QuantFormat


class Fp8PerTensor(QuantFormat):
    group_size = 0
    quantizes_activations = True

    def __init__(self, name: str, dtype: torch.dtype, fmax: float):
        self.name = name
        self.storage_dtype = dtype
        self.fmax = fmax

    def payload(self, tensors: dict) -> torch.Tensor:
        """The fp8 weight, viewing uint8 storage (some writers use it) as this format's dtype."""
        w = require(tensors, "weight", self.name)
        if w.dtype == torch.uint8:
            w = w.view(self.storage_dtype)
        if w.dtype != self.storage_dtype or w.ndim != 2:
            raise WanquantError(f"{self.name} weight has the wrong dtype or rank",
                                expected=f"2-D {self.storage_dtype}", found=f"{w.ndim}-D {w.dtype}")
        return w

    def scale(self, tensors: dict) -> torch.Tensor:
        return as_scalar_f32(require(tensors, "weight_scale", self.name), f"{self.name} weight_scale")

    def dequantize(self, tensors, out_dtype=torch.float32, conf=None):
        w = self.payload(tensors)
        s = self.scale(tensors).to(w.device)
        if out_dtype == torch.float32:
            return fp8_decode(w).mul_(s)
        if out_dtype in (torch.bfloat16, torch.float16):
            # fp8 values (e4m3 and e5m2) are exact in bf16 and fp16; torch multiplies a reduced-precision
            # tensor by an fp32 0-d tensor in fp32 and rounds once, so this equals
            # (fp8.f32 * s).to(out) with no full-size fp32 temporary.
            return torch.mul(fp8_decode(w, out_dtype), s)
        return (fp8_decode(w) * s).to(out_dtype)

    def quantize(self, w, *, generator=None, stochastic=False, conf=None):
        if w.ndim != 2:
            raise WanquantError(f"{self.name} quantizes 2-D weights", expected="[N, K]", found=str(tuple(w.shape)))
        wf = w.float()
        amax = wf.abs().amax()
        scale = torch.where(amax > 0, amax / self.fmax, torch.ones_like(amax)).to(torch.float32)
        scaled = wf / scale
        if stochastic:
            q = stochastic_round_fp8(scaled, self.storage_dtype, generator)
        else:
            q = scaled.clamp_(-self.fmax, self.fmax).to(self.storage_dtype)
        out_conf = {"format": self.name}
        if conf and conf.get("full_precision_matrix_mult"):
            out_conf["full_precision_matrix_mult"] = True
        return {"weight": q, "weight_scale": scale.reshape(())}, out_conf


E4M3 = Fp8PerTensor("float8_e4m3fn", torch.float8_e4m3fn, E4M3_MAX)
E5M2 = Fp8PerTensor("float8_e5m2", torch.float8_e5m2, E5M2_MAX)
