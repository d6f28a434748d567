"""int8 weights: ``int8_tensorwise`` (one scale, or one per output row) and ``int8_blockwise``.

* ``int8_tensorwise`` is ComfyUI's own name (``comfy/quant_ops.py`` 0.33, comfy-kitchen's
  ``TensorWiseINT8Layout``): int8 [N, K] with a 0-d fp32 scale or a per-channel fp32 [N, 1] one;
  LightX2V's int8 (``weight_scale`` [out, 1]) and convert_to_quant's ``--scaling_mode row``
  (``per_row``) are the per-channel case. Activations are quantized per token at run time.
* ``int8_blockwise``: convert_to_quant's ``BlockWiseINT8Layout``, ``weight_scale`` [N/bs, K/bs]
  (default bs 128); its ``input_scale`` of 1.0 is a placeholder (activations are dynamic).

Reload formula ``q.to(fp32) * s[cell]`` (kitchen's ``dequantize_int8_simple``). Symmetric range
[-127, 127], round to nearest even, as kitchen and convert_to_quant quantize.
"""

from __future__ import annotations

import torch

from ._scale_grid import BLOCK2D, ROW, ScaleGridFormat

QMAX = 127.0
TENSORWISE = ScaleGridFormat("int8_tensorwise", torch.int8, QMAX, ROW)
BLOCKWISE = ScaleGridFormat("int8_blockwise", torch.int8, QMAX, BLOCK2D, default_block=128)
