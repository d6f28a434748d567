"""wanquant's ``fp4_g32``: E2M1 codes with one float scale per 32 inputs, row-major scales.

This is the naive FP4 release (Wan2.2-Animate-14B-FP4) in canonical form: ``weight`` uint8
[N, K/2] normalised to high-nibble-first by the loader (``loaders.nibble_order`` decides a file's
order), ``weight_scale`` float [N, K/32] in the file's own dtype (bf16 in the release: kept, an
fp32 copy would add ~1 GB to Animate-14B); value = E2M1(code) * scale[row, col // 32]. ComfyUI has
no such format, so dequant is ours and runs everywhere.
"""

from __future__ import annotations

import torch

from ...errors import WanquantError
from ._common import E2M1_MAX, decode_e2m1, encode_e2m1, pack_codes, require
from .base import QuantFormat

GROUP = 32


def check_canonical(conf: dict | None, layer: str | None = None) -> None:
    """Data here is always high-nibble-first: ``loaders.nibble_order`` is the one owner of the
    source order and the canonical loader swaps once. A conf still naming another order would be
    a second, conflicting owner, so it is refused rather than decoded (or swapped) again."""
    order = (conf or {}).get("nibble_order", "high_first")
    if order != "high_first":
        raise WanquantError("fp4_g32 data must be canonical (high-nibble-first); load it through "
                            "wanquant's loader, which owns the nibble order", layer=layer,
                            expected="high_first", found=f"nibble_order {order!r}")


class FP4G32(QuantFormat):
    name = "fp4_g32"
    storage_dtype = torch.uint8
    group_size = GROUP
    quantizes_activations = False

    def stored_shape(self, tensors):
        w = tensors["weight"]
        return int(w.shape[0]), int(w.shape[1]) * 2

    def dequantize(self, tensors, out_dtype=torch.float32, conf=None):
        w = require(tensors, "weight", self.name)
        s = require(tensors, "weight_scale", self.name)
        if w.dtype != torch.uint8 or w.ndim != 2:
            raise WanquantError("fp4_g32 weight must be packed uint8 [N, K/2]", expected="2-D uint8",
                                found=f"{w.ndim}-D {w.dtype}")
        n, k = w.shape[0], w.shape[1] * 2
        if k % GROUP or tuple(s.shape) != (n, k // GROUP) or not s.is_floating_point():
            raise WanquantError("fp4_g32 scale does not match the weight", expected=f"float [{n}, {k // GROUP}]",
                                found=f"{s.dtype} {list(s.shape)}")
        check_canonical(conf)
        return self.decode(w, s, out_dtype)

    def decode(self, w: torch.Tensor, s: torch.Tensor, out_dtype=torch.float32, *, hi_first: bool = True):
        """Codes and group scales -> [N, K]. ``hi_first`` False reads low-nibble-first bytes as they
        lie in the file; only a holder of ``loaders.nibble_order``'s decision passes it (the
        ComfyUI layout, which keeps the file's pages instead of a swapped private copy).

        Decoded straight into a 16-bit compute dtype (E2M1 values are exact there; the scale is
        rounded to it once, e.g. exact for the release's bf16 scales): no fp32 temporary."""
        n, k = w.shape[0], w.shape[1] * 2
        dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.float32
        vals = decode_e2m1(w, hi_first, dtype).reshape(n, k // GROUP, GROUP)
        full = vals.mul_(s.to(device=w.device, dtype=dtype).unsqueeze(-1)).reshape(n, k)  # fresh: in place
        return full if full.dtype == out_dtype else full.to(out_dtype)

    def quantize(self, w, *, generator=None, stochastic=False, conf=None):
        if w.ndim != 2 or w.shape[1] % GROUP:
            raise WanquantError("fp4_g32 needs a 2-D weight whose K is a multiple of 32",
                                expected="[N, 32*m]", found=str(tuple(w.shape)))
        n, k = w.shape
        groups = w.float().reshape(n, k // GROUP, GROUP)
        scale = groups.abs().amax(-1) / E2M1_MAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        data = (groups / safe.unsqueeze(-1)).clamp_(-E2M1_MAX, E2M1_MAX).reshape(n, k)
        codes = encode_e2m1(data, generator=generator, stochastic=stochastic)
        # always the canonical high-nibble-first packing; swap_nibbles() gives the other order
        return ({"weight": pack_codes(codes, hi_first=True), "weight_scale": scale.contiguous()},
                {"format": self.name, "group_size": GROUP})


FORMAT = FP4G32()
