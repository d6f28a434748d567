"""Per-layer detection for GGUF block-quantized weights.

The container (:mod:`.gguf_file`) already knows each tensor's GGML type from the file's tensor
info, so the format comes from the tensor itself, never from the file name or a file-wide guess
(city96's files mix F16/F32 small tensors with one or two block types). What is checked here is
what a layer needs around its weight: GGUF blocks carry their own scales, so any scale tensor
next to one is a file this reader does not understand.
"""

from __future__ import annotations

from ..errors import WanquantError
from .containers import TensorRef
from .detect import Layer


def classify_gguf(module: str, weight: TensorRef, sides: dict[str, TensorRef], others: dict[str, TensorRef],
                  file: str) -> Layer:
    conf = dict(weight.quant_conf)
    if sides:
        raise WanquantError("scale tensor next to a GGUF block-quantized weight (blocks carry their own scales)",
                            file=file, layer=module, expected=f"{module}.weight alone (+ bias)",
                            found=", ".join(r.key for r in sides.values()))
    qtype = conf["format"].split("_", 1)[1].upper()
    return Layer(module, conf["format"], f"GGUF {qtype}", weight, {}, conf, others)
