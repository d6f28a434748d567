"""Block fp8 from convert_to_quant: ``float8_e4m3fn_blockwise`` and ``float8_e4m3fn_block3d``.

* blockwise: one fp32 scale per ``group_size`` x ``group_size`` tile, ``weight_scale``
  [N/bs, K/bs] (its ``BlockWiseFP8Layout``; default bs 64 when the JSON has none).
* block3d: one scale per row and ``group_size`` inputs, ``weight_scale`` [N, K/bs, 1] (its
  legacy ``Block3DFP8Layout``; older files tag it plain ``float8_e4m3fn``, the 3-D scale tells).

Both reload as ``q.to(fp32) * s[cell]``. No tensor-core kernel takes these grids: dequantized.
"""

from __future__ import annotations

import torch

from ._common import E4M3_MAX
from ._scale_grid import BLOCK2D, BLOCK3D, ScaleGridFormat

BLOCKWISE = ScaleGridFormat("float8_e4m3fn_blockwise", torch.float8_e4m3fn, E4M3_MAX, BLOCK2D, default_block=64)
BLOCK3D_FORMAT = ScaleGridFormat("float8_e4m3fn_block3d", torch.float8_e4m3fn, E4M3_MAX, BLOCK3D, default_block=64)
