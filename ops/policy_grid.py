"""Path choice for the per-row fp8 and int8 formats and the opt-in ``int8_matmul`` policy.

* per-row fp8 (``float8_e4m3fn_rowwise``): fp8 tensor cores with row-wise scales wherever the
  per-tensor fp8 path runs (SM 8.9+); the CPU dequantizes (``_scaled_mm`` is emulated there and
  measured ~3x slower than fp32 dense at Wan-14B shapes).
* ``int8_tensorwise`` (per tensor or per channel): W8A8 ``torch._int_mm`` on NVIDIA SM 7.5+ and
  on the CPU (a native int8 GEMM: measured ~3x faster than fp32 dense at 512x5120x5120).
* block grids (fp8 blockwise / block3d, ``int8_blockwise``): no kernel takes them; dequantized.
* option ``int8_matmul``: also re-quantize per-tensor fp8 weights to per-channel int8 at load,
  for GPUs without fp8 tensor cores (Ampere, Turing); the bridge reports the added error.

Kept apart from :mod:`.policy` (whose ``choose`` calls ``choose_grid``) so the seed formats'
rules stay as they were.
"""

from __future__ import annotations

from ..errors import WanquantError
from .formats import FP8_FORMATS, FP8_ROWWISE_FORMATS, INT8_FORMATS

INT8_MATMUL = "int8_matmul"
INT8_MIN_SM = (7, 5)
BLOCK_GRID_FORMATS = ("float8_e4m3fn_blockwise", "float8_e4m3fn_block3d", "int8_blockwise")


def int8_matmul_possible(c) -> tuple[bool, str]:
    """Where ``torch._int_mm`` runs fast: NVIDIA SM 7.5+ (int8 tensor cores) or the CPU."""
    if c.device_type == "cpu":
        return True, "CPU has a native int8 GEMM (torch._int_mm)"
    if c.device_type != "cuda" or c.is_hip:
        return False, f"{c.device_type.upper()} int8 matmul is not verified by wanquant"
    if c.sm is None or c.sm < INT8_MIN_SM:
        sm = f"{c.sm[0]}.{c.sm[1]}" if c.sm else "?"
        return False, f"SM {sm} has no int8 tensor cores (needs 7.5+)"
    return True, f"SM {c.sm[0]}.{c.sm[1]} has int8 tensor cores"


def choose_grid(fmt: str, c, opt: str, layer: str | None):
    """The Choice for a grid format or for fp8 under ``int8_matmul``; None = not ours."""
    from .policy import DEQUANT, FP8_MATMUL, Choice, forced_fp8_matmul, fp8_matmul_native

    if opt == INT8_MATMUL and (fmt in INT8_FORMATS[:1] or fmt in FP8_FORMATS[:1]):
        ok, why = int8_matmul_possible(c)
        if not ok:
            raise WanquantError(f"forced int8_matmul cannot run here: {why}", layer=layer,
                                expected="NVIDIA SM 7.5+ or CPU", found=c.describe())
        if fmt in FP8_FORMATS:
            why = f"{why}; fp8 weight re-quantized to per-channel int8 at load (option int8_matmul)"
        return Choice(INT8_MATMUL, why, forced=True)
    if fmt in FP8_ROWWISE_FORMATS:
        if opt == FP8_MATMUL:
            return Choice(FP8_MATMUL, forced_fp8_matmul(c, layer) + "; row-wise scales", forced=True)
        ok, why = fp8_matmul_native(c)
        if ok:
            return Choice(FP8_MATMUL, f"{why}; row-wise weight scales, activations scaled per token")
        if c.device_type == "cpu":
            why = "CPU: emulated row-wise fp8 matmul is slower than dequant"
        return Choice(DEQUANT, why)
    if fmt == INT8_FORMATS[0]:
        ok, why = int8_matmul_possible(c)
        return Choice(INT8_MATMUL, f"{why}; activations quantized per token") if ok else Choice(DEQUANT, why)
    if fmt in BLOCK_GRID_FORMATS:
        return Choice(DEQUANT, "no tensor-core kernel takes a block scale grid; weight-only dequant")
    return None
