"""How an NVFP4 file without ``comfy_quant`` / header metadata lays out its block scales.

ComfyUI / comfy-kitchen store the fp8 block scales in cuBLAS's tiled 128x4 layout
``[roundup(N,128), roundup(K/16,4)]``; other producers write them plain row-major ``[N, K/16]``.
At Wan sizes (N a multiple of 128, K/16 a multiple of 4) both have the same shape, and reading one
as the other gave 0.30 relative weight error, silently. The layout is decided, for the whole file:

1. an explicit override (``--nvfp4-scale-layout``; API ``nvfp4_scale_layout=``);
2. the scale shapes, when some layer's shape fits only one layout (and none fits only the other);
3. the scales themselves: a trained weight matrix has per-row and per-input-channel magnitudes,
   so in the *right* reading the log block scales follow a two-way additive model (row effect +
   column effect), while the wrong reading scatters each 128x4 tile over other rows and columns.
   The statistic is the two-way ANOVA F of ``log2(scale)`` for each reading (about 1 for
   structureless data, with standard deviation ``sqrt(2/df)``); the difference of the two,
   ``z = (F_a - F_b) * sqrt(df/2)``, is pooled over the ambiguous layers (Stouffer). Verified on
   the weights of an MLP trained in the test setup (tests/loaders/test_nvfp4_layout.py);
4. otherwise: refuse, naming the override (never a guess).
"""

from __future__ import annotations

import logging
import math

import torch

from ..errors import WanquantError
from ..ops.formats import from_blocked

log = logging.getLogger(__name__)

BLOCKED, ROW_MAJOR = "blocked", "row_major"
LAYOUTS = (BLOCKED, ROW_MAJOR)
OVERRIDE_HINT = "pass --nvfp4-scale-layout blocked|row_major to `wanquant inspect/convert` (API: nvfp4_scale_layout=)"
Z_DECIDE = 6.0  # pooled |z| below this: refuse
MAX_LAYERS = 16  # ambiguous layers read at most


def _roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def fitting_layouts(weight_shape, scale_shape) -> list[str]:
    """Which layouts a block-scale shape fits for a uint8 [N, K/2] NVFP4 weight."""
    n, k = int(weight_shape[0]), int(weight_shape[1]) * 2
    fits = []
    if tuple(scale_shape) == (_roundup(n, 128), _roundup(k // 16, 4)):
        fits.append(BLOCKED)
    if tuple(scale_shape) == (n, k // 16):
        fits.append(ROW_MAJOR)
    return fits


def additive_f(scales: torch.Tensor) -> float | None:
    """Two-way ANOVA F of log2(scale) (rows + columns vs residual); None when unusable
    (zero scales: padding or all-zero blocks give -inf logs)."""
    s = scales.double()
    if s.shape[0] < 2 or s.shape[1] < 2 or bool((s <= 0).any()) or not bool(torch.isfinite(s).all()):
        return None
    lg = torch.log2(s)
    mean = lg.mean()
    fit = lg.mean(1, keepdim=True) + lg.mean(0, keepdim=True) - mean
    n, c = lg.shape
    ss_model = float(((fit - mean) ** 2).sum())
    ss_res = float(((lg - fit) ** 2).sum())
    if ss_res == 0:
        return None
    return (ss_model / (n + c - 2)) / (ss_res / ((n - 1) * (c - 1)))


def layer_z(weight_shape, raw_scales: torch.Tensor) -> float | None:
    """Evidence for BLOCKED (positive) vs ROW_MAJOR (negative) from one layer's scales."""
    n, c = int(weight_shape[0]), int(weight_shape[1]) * 2 // 16
    raw = raw_scales.view(torch.float8_e4m3fn) if raw_scales.dtype == torch.uint8 else raw_scales
    f_blocked = additive_f(from_blocked(raw, n, c).float())
    f_row = additive_f(raw.reshape(n, c).float())
    if f_blocked is None or f_row is None:
        return None
    return (f_blocked - f_row) * math.sqrt((n + c - 2) / 2)


UNTAGGED_NVFP4 = "nvfp4 without comfy_quant"  # detect.py's spelling for these layers


def resolve(layers: dict, override: str | None) -> tuple[str, str]:
    """Decide the layout of every untagged NVFP4 layer (``scale_layout`` None) and set it.

    Returns (layout, why); raises WanquantError when nothing can tell."""
    pending = [l for l in layers.values() if l.format == "nvfp4" and l.scale_layout is None]
    if override and override != "auto":
        if override not in LAYOUTS:
            raise WanquantError("unknown NVFP4 scale layout", expected=" / ".join(LAYOUTS), found=override)
        layout, why = override, "override"
    else:
        shaped = {l.scale_layout for l in layers.values()
                  if l.format == "nvfp4" and l.scale_layout in LAYOUTS and l.spelling == UNTAGGED_NVFP4}
        if len(shaped) == 1:
            layout = shaped.pop()
            why = "scale shapes of other untagged layers fit only this layout"
        elif len(shaped) > 1:
            raise WanquantError("untagged NVFP4 layers use both scale layouts (by their shapes)",
                                expected="one layout per file", found="blocked and row-major shapes")
        elif not pending:
            return BLOCKED, "no ambiguous layers"
        else:
            layout, why = _from_scales(pending)
    for l in pending:
        l.scale_layout = layout
    return layout, why


def _from_scales(pending: list) -> tuple[str, str]:
    weighted, n, used = 0.0, 0, []
    for l in pending[:MAX_LAYERS]:
        z = layer_z(l.weight.shape, l.sides["weight_scale"].load())
        if z is None:
            continue
        weighted += z
        n += 1
        used.append(f"{l.name} z {z:+.1f}")
    z = weighted / math.sqrt(n) if n else 0.0
    what = f"two-way additive fit of log block scales over {n} layers, z = {z:+.1f} [{'; '.join(used[:3])}]"
    if abs(z) < Z_DECIDE:
        raise WanquantError(f"cannot tell the block-scale layout of NVFP4 layers without comfy_quant ({what}); "
                            f"{OVERRIDE_HINT}", layer=pending[0].name,
                            expected="cuBLAS blocked or row-major [N, K/16] scales, told apart by the weights",
                            found="no decisive evidence")
    layout = BLOCKED if z > 0 else ROW_MAJOR
    log.info("NVFP4 scale layout %s decided from the scales (%s)", layout, what)
    return layout, f"decided from the scales: {what}"
