"""Formats whose weight is one fp8 or int8 value per element times a grid of float scales.

Per-row fp8, block fp8 (2-D tiles and convert_to_quant's "block3d" row groups) and int8
(tensor-wise, per-channel, block-wise) differ only in the scale grid. This module owns the one
dequant formula they share, ``W[i, j] = q[i, j] (as fp32) * s[grid(i, j)]`` computed in fp32 and
rounded once into other dtypes (what each producer's own reload does), the scale-shape rules and
the reference quantizer (amax / qmax per cell, round to nearest).
"""

from __future__ import annotations

import torch

from ...errors import WanquantError
from ._common import fp8_decode, require
from .base import QuantFormat

TENSOR, ROW, BLOCK2D, BLOCK3D = "tensor", "row", "block2d", "block3d"


def expected_scale_shape(kind: str, n: int, k: int, block: int = 0) -> tuple[int, ...]:
    """The canonical scale shape of an [n, k] weight (tensor scales are 0-d)."""
    if kind == TENSOR:
        return ()
    if kind == ROW:
        return (n, 1)
    if kind == BLOCK2D:
        return (n // block, k // block)
    return (n, k // block, 1)


def scale_fits(kind: str, shape: tuple[int, ...], n: int, k: int, block: int = 0) -> bool:
    """Whether a stored scale of ``shape`` serves an [n, k] weight (row scales may be [n] or [n, 1];
    tensor scales any one-element shape; block kinds need n and k divisible by the block)."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if kind == TENSOR:
        return numel == 1
    if kind == ROW:
        return shape in ((n,), (n, 1))
    if block <= 0 or k % block or (kind == BLOCK2D and n % block):
        return False
    return shape == expected_scale_shape(kind, n, k, block)


class ScaleGridFormat(QuantFormat):
    """One fp8/int8 payload, one scale grid. Subclass instances fix dtype, qmax and grid kind."""

    quantizes_activations = True

    def __init__(self, name: str, storage_dtype: torch.dtype, qmax: float, kind: str, default_block: int = 0):
        self.name = name
        self.storage_dtype = storage_dtype
        self.qmax = qmax
        self.kind = kind
        self.default_block = default_block
        self.group_size = default_block

    # ------------------------------------------------------------------ reading
    def block(self, conf: dict | None) -> int:
        """Block size from the layer's comfy_quant (``group_size``), else this format's default."""
        conf = conf or {}
        return int(conf.get("group_size") or conf.get("block_size") or self.default_block)

    def payload(self, tensors: dict) -> torch.Tensor:
        w = require(tensors, "weight", self.name)
        if w.dtype == torch.uint8 and self.storage_dtype.is_floating_point:
            w = w.view(self.storage_dtype)
        if w.dtype != self.storage_dtype or w.ndim != 2:
            raise WanquantError(f"{self.name} weight has the wrong dtype or rank",
                                expected=f"2-D {self.storage_dtype}", found=f"{w.ndim}-D {w.dtype}")
        return w

    def kind_of(self, tensors: dict) -> str:
        """The grid kind of these tensors (int8_tensorwise is tensor-wise or per-row by shape)."""
        if self.kind == ROW and require(tensors, "weight_scale", self.name).numel() == 1:
            return TENSOR
        return self.kind

    def scale(self, tensors: dict, conf: dict | None = None) -> torch.Tensor:
        """The fp32 scale in a shape that broadcasts against the weight's grid view."""
        w = self.payload(tensors)
        s = require(tensors, "weight_scale", self.name)
        n, k = w.shape
        kind, block = self.kind_of(tensors), self.block(conf)
        if not s.dtype.is_floating_point or not scale_fits(kind, tuple(s.shape), n, k, block):
            raise WanquantError(f"{self.name} weight_scale does not fit the weight",
                                expected=f"float {list(expected_scale_shape(kind, n, k, block or 1))} for weight "
                                         f"[{n}, {k}]" + (f" (block {block})" if block else ""),
                                found=f"{s.dtype} {list(s.shape)}")
        s = s.to(torch.float32)
        if kind == TENSOR:
            return s.reshape(())
        if kind == ROW:
            return s.reshape(n, 1)
        if kind == BLOCK2D:
            return s.reshape(n // block, 1, k // block, 1)
        return s.reshape(n, k // block, 1)

    def grid_view(self, q: torch.Tensor, kind: str, block: int) -> torch.Tensor:
        n, k = q.shape
        if kind == BLOCK2D:
            return q.reshape(n // block, block, k // block, block)
        if kind == BLOCK3D:
            return q.reshape(n, k // block, block)
        return q

    def decode(self, q: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Stored values as floats (fp8 and int8 are exact in fp32)."""
        return fp8_decode(q, dtype) if q.dtype.is_floating_point else q.to(dtype)

    def dequantize(self, tensors, out_dtype=torch.float32, conf=None):
        q = self.payload(tensors)
        s = self.scale(tensors, conf).to(q.device)
        kind, block = self.kind_of(tensors), self.block(conf)
        full = self.grid_view(self.decode(q), kind, block).mul_(s).reshape(q.shape)
        return full if out_dtype == torch.float32 else full.to(out_dtype)

    # ------------------------------------------------------------------ writing
    def requant_conf(self, conf: dict, scale_numel: int) -> dict:
        """The conf that requantizes a layer onto its own grid (a LoRA merge). A row-grid name
        (``int8_tensorwise``) covers one scale per tensor or per row; a stored one-element scale
        stays per tensor, so the rewritten layer keeps the shapes its header was planned with."""
        if self.kind == ROW and scale_numel == 1:
            return {**conf, "per_tensor": True}
        return dict(conf)

    def quantize(self, w, *, generator=None, stochastic=False, conf=None):
        """amax/qmax per grid cell (all-zero cells get scale 1), then round to nearest."""
        if w.ndim != 2:
            raise WanquantError(f"{self.name} quantizes 2-D weights", expected="[N, K]", found=str(tuple(w.shape)))
        n, k = w.shape
        kind, block = self.kind, self.block(conf)
        if kind == ROW and conf and conf.get("per_tensor"):
            kind = TENSOR
        if kind in (BLOCK2D, BLOCK3D) and not scale_fits(kind, expected_scale_shape(kind, n, k, block), n, k, block):
            raise WanquantError(f"{self.name} needs the weight divisible by its block", found=f"[{n}, {k}]",
                                expected=f"block {block} dividing {'both dimensions' if kind == BLOCK2D else 'K'}")
        wf = self.grid_view(w.float(), kind, block)
        dims = {TENSOR: None, ROW: (1,), BLOCK2D: (1, 3), BLOCK3D: (2,)}[kind]
        amax = wf.abs().amax() if dims is None else wf.abs().amax(dim=dims, keepdim=True)
        s = torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax)).to(torch.float32)
        scaled = wf / s
        if self.storage_dtype.is_floating_point:
            if stochastic:
                from ._common import stochastic_round_fp8
                q = stochastic_round_fp8(scaled, self.storage_dtype, generator)
            else:
                q = scaled.clamp_(-self.qmax, self.qmax).to(self.storage_dtype)
        else:
            if stochastic:
                noise = torch.rand(scaled.shape, generator=generator, device=scaled.device)
                scaled = torch.floor(scaled + noise)
            q = scaled.round_().clamp_(-self.qmax, self.qmax).to(self.storage_dtype)
        out_conf = {"format": self.name}
        if kind in (BLOCK2D, BLOCK3D):
            out_conf["group_size"] = block
        scale = s.reshape(expected_scale_shape(kind, n, k, block))
        return {"weight": q.reshape(n, k), "weight_scale": scale.contiguous()}, out_conf
