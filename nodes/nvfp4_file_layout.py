"""NVFP4 weights kept in a low-nibble-first file's own bytes (LightX2V's packing) inside ComfyUI.

ComfyUI's ``TensorCoreNVFP4Layout`` wants the even element in the high nibble; LightX2V's kernel
packs it low. Swapping at load costs a private copy of every NVFP4 weight (~90% of a LightX2V
file: 8 GB for Wan2.1-14B-NVFP4) where the weights would otherwise stay the file's mapped pages.
Only kitchen's NVFP4 matmul (SM >= 10) reads the bytes in place; every other path dequantizes
per forward anyway. So on those paths the bridge keeps the file's bytes in this layout and swaps
per dequant (a packed-weight-sized temporary, a quarter of the dense weight the dequant makes
anyway); on the kitchen path the Linear swaps once at load into ComfyUI's own layout.

Everything handed out of this layout (state dicts, plain tensors, a LoRA requant) is ComfyUI's
high-nibble-first form, so saved models and ComfyUI's weight patches see the canonical NVFP4.
It is deliberately *not* a subclass of ComfyUI's layout: comfy-kitchen dispatches ops by the
layout's MRO, and its NVFP4 handlers would read these bytes in the wrong order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfy.quant_ops import get_layout_class

from ..ops.formats import swap_nibbles

NVFP4_FILE_LAYOUT = "WanquantNVFP4FileOrderLayout"
COMFY_NVFP4_LAYOUT = "TensorCoreNVFP4Layout"

try:  # the layout base classes live in comfy-kitchen, which ComfyUI requires
    from comfy_kitchen.tensor import BaseLayoutParams, QuantizedLayout, register_layout_class
except ImportError:  # pragma: no cover - ComfyUI without kitchen cannot load quantized models at all
    QuantizedLayout = None


def _comfy():
    """ComfyUI's registered NVFP4 layout (its quantize adds stochastic rounding to kitchen's)."""
    return get_layout_class(COMFY_NVFP4_LAYOUT)


if QuantizedLayout is not None:
    class NVFP4FileOrderLayout(QuantizedLayout):
        """ComfyUI's NVFP4 (block scales blocked, per-tensor ``scale``) with the byte order kept."""

        MIN_SM_VERSION = None  # weight-only: dequantized on every device

        @dataclass(frozen=True)
        class Params(BaseLayoutParams):
            block_scale: torch.Tensor = None
            hi_first: bool = True  # byte order of qdata: False = the file's low-nibble-first bytes

            def _tensor_fields(self) -> list[str]:
                return ["scale", "block_scale"]

        @staticmethod
        def _wq_canonical(qdata, params):
            return qdata if params.hi_first else swap_nibbles(qdata)

        @classmethod
        def from_comfy(cls, params, hi_first: bool):
            """Our params from ComfyUI's NVFP4 params (same tensors, not copied)."""
            return cls.Params(scale=params.scale, orig_dtype=params.orig_dtype, orig_shape=params.orig_shape,
                              block_scale=params.block_scale, hi_first=hi_first)

        @classmethod
        def quantize(cls, tensor, scale=None, stochastic_rounding=0, inplace_ops=False, **kwargs):
            """ComfyUI's own NVFP4 quantization (a LoRA merge's requant): high-first bytes."""
            qdata, p = _comfy().quantize(tensor, scale=scale, stochastic_rounding=stochastic_rounding,
                                         inplace_ops=inplace_ops)
            return qdata, cls.from_comfy(p, hi_first=True)

        @classmethod
        def dequantize(cls, qdata, params):
            return _comfy().dequantize(cls._wq_canonical(qdata, params), params)

        @classmethod
        def get_plain_tensors(cls, qtensor):
            p = qtensor._params
            return cls._wq_canonical(qtensor._qdata, p), p.scale, p.block_scale

        @classmethod
        def state_dict_tensors(cls, qdata, params):
            return {"": cls._wq_canonical(qdata, params), "_scale": params.block_scale, "_scale_2": params.scale}

        @classmethod
        def get_padded_shape(cls, orig_shape):
            return _comfy().get_padded_shape(orig_shape)

        @classmethod
        def get_storage_shape(cls, orig_shape):
            return _comfy().get_storage_shape(orig_shape)

        @classmethod
        def get_logical_shape_from_storage(cls, storage_shape):
            return _comfy().get_logical_shape_from_storage(storage_shape)

    register_layout_class(NVFP4_FILE_LAYOUT, NVFP4FileOrderLayout)
