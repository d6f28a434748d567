"""The interface every quantized weight format implements.

A format turns canonical tensors (keyed by suffix: ``weight``, ``weight_scale``,
``weight_scale_2``, ``input_scale``) into the original [N, K] weight and back. The loader,
the LoRA merger, the linear paths and the ComfyUI bridge all go through this one interface,
so adding a format is one module plus its tests.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class QuantFormat:
    """Base class; subclasses set the class attributes and implement the two methods."""

    #: canonical format name (FORMATS.md): "float8_e4m3fn", "nvfp4", "fp4_g32", ...
    name: str = ""
    #: dtype of the stored ``weight`` payload
    storage_dtype: torch.dtype = torch.uint8
    #: number of weight elements that share one scale (0 = one scale per tensor)
    group_size: int = 0
    #: whether a tensor-core path quantizes activations for this format
    quantizes_activations: bool = True

    def dequantize(self, tensors: dict[str, torch.Tensor], out_dtype: torch.dtype = torch.float32,
                   conf: dict | None = None) -> torch.Tensor:
        """Return the original-shape [N, K] weight in ``out_dtype``."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, *, generator: torch.Generator | None = None,
                 stochastic: bool = False, conf: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Quantize a float [N, K] weight; return canonical tensors and the comfy_quant JSON dict."""
        raise NotImplementedError

    def orig_shape(self, tensors: dict[str, torch.Tensor], conf: dict | None = None) -> tuple[int, int]:
        """The logical [N, K] shape: ``conf['orig_shape']`` when given, else the stored shape."""
        conf = conf or {}
        if conf.get("orig_shape") is not None:
            n, k = conf["orig_shape"]
            return int(n), int(k)
        return self.stored_shape(tensors)

    def stored_shape(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        w = tensors["weight"]
        return int(w.shape[0]), int(w.shape[1])

    def __repr__(self) -> str:
        return f"<QuantFormat {self.name}>"


class BlockScaledFormat(QuantFormat):
    """NVFP4 / MXFP8: padded storage, blocked scales, a kitchen dequant on GPU when one of its
    GPU backends has the kernel (fused, straight into the compute dtype), and our own table
    decode elsewhere (kitchen's eager fallback is slower and makes larger temporaries)."""

    def kitchen_can_dequantize(self, ck) -> bool:
        from ._common import kitchen_gpu_ops

        return f"dequantize_{self.name}" in kitchen_gpu_ops(ck)[0]

    def dequantize_kitchen(self, tensors, out_dtype=torch.float32, conf=None, ck=None):
        raise NotImplementedError

    def dequantize_torch(self, tensors, out_dtype=torch.float32, conf=None):
        raise NotImplementedError

    def dequantize(self, tensors, out_dtype=torch.float32, conf=None):
        from ._common import kitchen

        ck = kitchen()
        if ck is not None and tensors["weight"].device.type != "cpu" and self.kitchen_can_dequantize(ck):
            try:
                return self.dequantize_kitchen(tensors, out_dtype, conf, ck)
            except ck.BackendError as exc:  # no capable backend for this device/dtype: same math in torch
                log.debug("kitchen %s dequant unavailable (%s); using torch", self.name, exc)
        return self.dequantize_torch(tensors, out_dtype, conf)

    def _finish(self, full, tensors, out_dtype, conf):
        """Crop the padded result to the layer's original shape (cast only if not yet in out_dtype)."""
        n, k = self.orig_shape(tensors, conf)
        if (n, k) != tuple(full.shape):
            full = full[:n, :k]
        return full if full.dtype == out_dtype else full.to(out_dtype)
