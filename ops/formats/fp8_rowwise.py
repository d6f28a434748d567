"""Per-row fp8 (``float8_e4m3fn_rowwise``): fp8 e4m3 weight, one fp32 scale per output row.

Who writes it: convert_to_quant's ``--scaling_mode row`` (``weight_scale`` [N], comfy_quant
``float8_e4m3fn_rowwise``), LightX2V's per-channel fp8 (``weight_scale`` [N, 1]) and the
``.__fp8_scale`` [N] caches of SCAIL-2 / Bernini. All reload as ``q.to(fp32) * s[row]``.
Canonical ``weight_scale`` is fp32 [N, 1] (broadcasts against the weight as stored). Fast on
fp8 tensor cores via ``torch._scaled_mm`` with row-wise scales (``ops.linear``).
"""

from __future__ import annotations

import torch

from ._common import E4M3_MAX
from ._scale_grid import ROW, ScaleGridFormat

FORMAT = ScaleGridFormat("float8_e4m3fn_rowwise", torch.float8_e4m3fn, E4M3_MAX, ROW)
