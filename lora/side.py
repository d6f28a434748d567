"""The low-rank side path: ``y = quantized_linear(x) + Σ_i s_i · (x·A_iᵀ)·B_iᵀ (+ Σ_i s_i · diff_b_i)``.

Why: merging a LoRA into a quantized weight adds a second quantization error (fatal for a 4-bit
error-compensation LoRA), and adding it to the dequantized weight every forward switches the
quantized kernels off. Kept beside the layer instead, the LoRA costs two rank-sized matmuls and the
layer keeps whatever fast path it has (fp8 ``_scaled_mm``, kitchen NVFP4/MXFP8, dequant).

The factors stay on CPU in their file dtype (the source of truth: a layer offloaded by ComfyUI does
not drag them along); copies in the compute device/dtype are cached per (device, dtype) on first use.
Each strength is a 0-d fp32 CPU tensor, never a Python float, so ``torch.compile`` reads it as an
input: changing it in place (``set_strength``) needs no recompile. ``alpha/rank`` is folded into B.
Pure torch; no ComfyUI import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SideTerm:
    """One LoRA on one layer: A [r, K] and B [N, r] (alpha/rank folded in) or None for a bias-only
    term, strength (0-d fp32 CPU tensor), diff_b [N] (scale folded in) or None."""

    name: str  # which LoRA (for the report)
    down: torch.Tensor | None
    up: torch.Tensor | None
    strength: torch.Tensor
    diff_b: torch.Tensor | None = None


class LoraSide:
    """The LoRAs of one linear layer. Immutable once built: stacking returns a new object, so a
    ComfyUI clone holding the old one (an object patch) is unaffected by a later node."""

    def __init__(self, terms: Sequence[SideTerm] = ()):
        self.terms: tuple[SideTerm, ...] = tuple(terms)
        self._cache: dict[tuple, tuple] = {}

    @staticmethod
    def term(name: str, strength: float | torch.Tensor, up: torch.Tensor | None = None,
             down: torch.Tensor | None = None, scale: float = 1.0, diff_b: torch.Tensor | None = None) -> SideTerm:
        """A term from a LoRA's up [N, r] / down [r, K] and its alpha/rank ``scale``, and/or a bias diff."""
        if not isinstance(strength, torch.Tensor):
            with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; this one must stay writable
                strength = torch.tensor(float(strength), dtype=torch.float32)
        s = strength
        if up is None:
            return SideTerm(name, None, None, s, diff_b.reshape(-1))
        up2 = up.reshape(up.shape[0], -1)
        up2 = up2 * scale if scale != 1.0 else up2
        return SideTerm(name, down.reshape(down.shape[0], -1), up2, s, None if diff_b is None else diff_b.reshape(-1))

    def plus(self, terms: Sequence[SideTerm]) -> "LoraSide":
        """A new side path with ``terms`` after this one's (chained LoRA nodes add up)."""
        return LoraSide(self.terms + tuple(terms))

    def set_strength(self, index: int, value: float) -> None:
        """Change one LoRA's strength in place (no new graph under torch.compile, no reload)."""
        self.terms[index].strength.fill_(float(value))

    def _factors(self, device, dtype) -> tuple:
        key = (device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            def to(t):
                return None if t is None else t.to(device=device, dtype=dtype)
            hit = tuple((to(t.down), to(t.up), t.strength, to(t.diff_b)) for t in self.terms)
            self._cache[key] = hit
        return hit

    def apply(self, x: torch.Tensor, y: torch.Tensor, *, owns_y: bool = False) -> torch.Tensor:
        """``y`` (the layer's own output for ``x``) plus every term, in ``y``'s dtype.

        ``owns_y``: the caller made ``y`` and reads it nowhere else, so outside autograd it is
        updated in place (no second [M, N] buffer; the fastest variant timed on an H200)."""
        xs = x.to(y.dtype)
        shape = y.shape
        y = y.reshape(-1, shape[-1])
        xs = xs.reshape(-1, xs.shape[-1])
        inplace = owns_y and not (torch.is_grad_enabled() and (y.requires_grad or x.requires_grad))
        for down, up, s, diff_b in self._factors(y.device, y.dtype):
            # s stays a 0-d CPU tensor: usable with any device, keeps y's dtype, read fresh each call
            if down is not None:
                h = torch.nn.functional.linear(xs, down) * s
                y = y.addmm_(h, up.t()) if inplace else torch.addmm(y, h, up.t())
            if diff_b is not None:
                y = y + diff_b * s
        return y.reshape(shape)

    def nbytes(self) -> int:
        return sum(0 if p is None else p.nbytes for t in self.terms for p in (t.down, t.up, t.diff_b))


__all__ = ["LoraSide", "SideTerm"]
