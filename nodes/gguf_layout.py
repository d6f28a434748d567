"""GGUF block-quantized Linear weights inside ComfyUI: a comfy-kitchen ``QuantizedLayout``.

ComfyUI's loader knows no GGUF format, so the bridge loads such a layer itself (as it does
``fp4_g32``) into a ``QuantizedTensor`` whose ``qdata`` is the file's raw blocks (memory-mapped
on CPU) and whose params carry the GGML type and the logical shape. Offloading, device moves and
``state_dict`` then work through ComfyUI unchanged, and the forward decodes the blocks into the
activations' dtype per call (city96's loader does the same). wanquant does not write GGUF, so a
weight ComfyUI patches into such a layer (its own LoRA loader) is kept dense by the bridge's
``set_weight`` until unpatched (``quantize`` refuses); the LoRA node runs LoRAs beside the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import WanquantError
from ..ops.formats.gguf import dequantize_bytes

GGUF_LAYOUT = "WanquantGGUFLayout"

try:  # the layout base classes live in comfy-kitchen, which ComfyUI requires
    from comfy_kitchen.tensor import BaseLayoutParams, QuantizedLayout, register_layout_class
except ImportError:  # pragma: no cover - ComfyUI without kitchen cannot load quantized models at all
    QuantizedLayout = None

if QuantizedLayout is not None:
    class GGUFLayout(QuantizedLayout):
        """Raw GGML blocks; weight-only on every device."""

        MIN_SM_VERSION = None

        @dataclass(frozen=True)
        class Params(BaseLayoutParams):
            qtype: str = "Q8_0"  # GGML block type name

        @classmethod
        def quantize(cls, tensor, scale=None, stochastic_rounding=0, inplace_ops=False, **kwargs):
            raise WanquantError("GGUF layers cannot be re-quantized in wanquant (it reads GGUF, never writes it)",
                                expected="LoRA applied on the fly, or convert the file first",
                                found=f"a request to quantize {tuple(tensor.shape)} to GGUF")

        @classmethod
        def dequantize(cls, qdata, params):
            return dequantize_bytes(qdata, params.qtype, params.orig_shape, params.orig_dtype)

        @classmethod
        def get_plain_tensors(cls, qtensor):
            return qtensor._qdata, qtensor._params.scale

        @classmethod
        def state_dict_tensors(cls, qdata, params):
            return {"": qdata}

    register_layout_class(GGUF_LAYOUT, GGUFLayout)
