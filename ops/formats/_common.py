"""Bit-level helpers shared by the format modules: E2M1 codes, nibble packing, the cuBLAS
blocked scale layout, stochastic rounding and comfy-kitchen detection.

Everything here is plain torch so every format dequantizes on any device, with or without
comfy-kitchen. Where kitchen has the same operation the format modules call it and the tests
check that both give identical values.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading

import torch

from ...errors import WanquantError

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
E2M1_MAX = 6.0

#: E2M1 magnitudes for codes 0-7; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

_LUT_CACHE: dict = {}


def kitchen():
    """comfy_kitchen when importable (and not switched off by ``WANQUANT_NO_KITCHEN=1``), else None.

    Read on every call (not cached at import) so tests can compare both code paths by
    monkeypatching this function, and users can rule kitchen out when debugging."""
    if os.environ.get("WANQUANT_NO_KITCHEN", "") not in ("", "0"):
        return None
    return _import_kitchen()


@functools.lru_cache(maxsize=1)
def _import_kitchen():
    try:  # comfy-kitchen is a kernel library, not ComfyUI: ops/ may use it
        ck = importlib.import_module("comfy_kitchen")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return ck


_GPU_OPS_CACHE: dict[int, tuple[frozenset, str]] = {}


def kitchen_gpu_ops(ck) -> tuple[frozenset, str]:
    """(ops that comfy-kitchen's available, enabled non-eager backends list, kitchen's own reason
    when its CUDA backend is unavailable). Read once per kitchen module: it is asked per forward.

    Only these are worth calling on a GPU: kitchen's eager fallback builds full-size int32 and
    stacked temporaries, more than wanquant's own table decode."""
    if ck is None:
        return frozenset(), ""
    hit = _GPU_OPS_CACHE.get(id(ck))
    if hit is not None:
        return hit
    try:
        backends = ck.list_backends()
    except Exception as exc:  # noqa: BLE001 - a broken kitchen is reported, not raised
        return frozenset(), f"list_backends failed: {exc}"
    ops: set[str] = set()
    for name, info in backends.items():
        if name != "eager" and info.get("available") and not info.get("disabled"):
            ops.update(info.get("capabilities") or ())
    cuda = backends.get("cuda", {})
    note = "" if cuda.get("available") else str(cuda.get("unavailable_reason") or "")
    _GPU_OPS_CACHE[id(ck)] = (frozenset(ops), note)
    return _GPU_OPS_CACHE[id(ck)]


def e2m1_lut(device, dtype) -> torch.Tensor:
    """16-entry table code -> value (codes 8-15 negative), cached per device and dtype."""
    key = (torch.device(device), dtype)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        vals = list(E2M1_VALUES) + [-v for v in E2M1_VALUES]
        lut = torch.tensor(vals, dtype=torch.float32).to(device=device, dtype=dtype)
        _LUT_CACHE[key] = lut
    return lut


_SWAP_CHUNK = 1 << 20
_swap_scratch = threading.local()  # one reused 1 MiB buffer per thread


def swap_nibbles(u8: torch.Tensor) -> torch.Tensor:
    """Exchange the two 4-bit halves of every byte (low-first <-> high-first packing)."""
    if u8.dtype != torch.uint8:
        raise WanquantError("nibble-packed data must be uint8", expected="uint8", found=str(u8.dtype))
    if u8.numel() <= _SWAP_CHUNK or u8.device.type != "cpu" or torch.compiler.is_compiling():
        return (u8 << 4) | (u8 >> 4)
    # Loading a LightX2V NVFP4 model swaps every weight. The one-line expression allocates two
    # weight-sized temporaries per weight; glibc keeps such freed blocks between the held outputs
    # (its mmap threshold grows with each free), so a load held ~1.4x the weights privately instead
    # of 1x. Here the only temporary is one reused buffer: private memory = the outputs.
    src = u8.contiguous().view(-1)
    out = torch.empty(u8.shape, dtype=torch.uint8)
    dst = out.view(-1)
    torch.bitwise_left_shift(src, 4, out=dst)
    buf = getattr(_swap_scratch, "buf", None)
    if buf is None:
        buf = _swap_scratch.buf = torch.empty(_SWAP_CHUNK, dtype=torch.uint8)
    for i in range(0, src.numel(), _SWAP_CHUNK):
        part = src[i:i + _SWAP_CHUNK]
        tmp = buf[:part.numel()]
        torch.bitwise_right_shift(part, 4, out=tmp)
        dst[i:i + _SWAP_CHUNK] |= tmp
    return out


def unpack_codes(u8: torch.Tensor, hi_first: bool = True) -> torch.Tensor:
    """uint8 [..., C] -> uint8 codes [..., 2C]; element 2i comes from the high nibble if hi_first."""
    hi = u8 >> 4
    lo = u8 & 0x0F
    pair = (hi, lo) if hi_first else (lo, hi)
    return torch.stack(pair, dim=-1).reshape(*u8.shape[:-1], u8.shape[-1] * 2)


def pack_codes(codes: torch.Tensor, hi_first: bool = True) -> torch.Tensor:
    """uint8 codes [..., 2C] (values 0-15) -> uint8 [..., C]."""
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    even, odd = c[..., 0], c[..., 1]
    return (even << 4) | odd if hi_first else (odd << 4) | even


def _pair_lut(device, dtype, hi_first: bool) -> torch.Tensor:
    """[256, 2] table byte -> its two E2M1 values in element order."""
    key = ("pair", torch.device(device), dtype, hi_first)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        single = e2m1_lut("cpu", torch.float32)
        b = torch.arange(256)
        hi, lo = single[b >> 4], single[b & 0x0F]
        lut = (torch.stack((hi, lo) if hi_first else (lo, hi), dim=1)).to(device=device, dtype=dtype)
        _LUT_CACHE[key] = lut
    return lut


def decode_e2m1(u8: torch.Tensor, hi_first: bool, dtype) -> torch.Tensor:
    """Packed E2M1 bytes [..., C] -> values [..., 2C] in ``dtype``.

    One gather per byte from a 256x2 table: a single pass over the packed data with no
    unpacked-code intermediate (E2M1 values are exact in every float dtype)."""
    pair = _pair_lut(u8.device, dtype, hi_first)
    if u8.device.type == "cpu" and pair.element_size() in (2, 4) and u8.is_contiguous():
        # numpy indexes straight with the uint8 bytes (no int32 index tensor) and moves both
        # values of a byte as one 4/8-byte word: ~4x faster than torch's gather on CPU.
        word = torch.int32 if pair.element_size() == 2 else torch.int64
        table = pair.contiguous().view(word).reshape(256).numpy()
        vals = torch.from_numpy(table[u8.numpy()]).view(dtype)
    else:
        vals = pair[u8.to(torch.int32)]
    return vals.reshape(*u8.shape[:-1], u8.shape[-1] * 2)


# Rounding thresholds between neighbouring E2M1 magnitudes, with the tie direction that
# round-half-to-even gives (True: a tie goes up because the upper code is even).
_E2M1_THRESH = ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
                (2.5, False), (3.5, True), (5.0, False))


# code of an E2M1 magnitude, indexed by twice the magnitude (0, 1, 2, 3, 4, 6, 8, 12)
_E2M1_CODE_OF_TWICE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)


def encode_e2m1(x: torch.Tensor, *, generator: torch.Generator | None = None,
                stochastic: bool = False) -> torch.Tensor:
    """Values already divided by their scale (|x| <= 6 after clamping) -> uint8 codes 0-15.

    Round-to-nearest-even by default (what comfy-kitchen and the FP4 producers use);
    ``stochastic`` rounds up with probability equal to the distance from the lower grid point,
    so the expectation equals the input (used when merging LoRAs into FP4 weights)."""
    xf = x.float()
    a = xf.abs().clamp_(max=E2M1_MAX)
    a = torch.nan_to_num(a, nan=0.0)
    if stochastic:
        # E2M1 is a float with one mantissa bit and smallest normal 1.0 (step 0.5 below it).
        # At and above 1: add uniform random low bits to the fp32 pattern and clear them (a carry
        # is the round-up into the next binade). Below 1: floor(2a)/2 plus a Bernoulli step.
        r = _rand_like(a, generator)
        noise = (r * float(1 << 22)).to(torch.int32)
        big = a.contiguous().view(torch.int32).add(noise).bitwise_and_(~((1 << 22) - 1)).view(torch.float32)
        q = a * 2.0
        lo = torch.floor(q)
        small = lo.add_((r < (q - lo)).to(torch.float32)).mul_(0.5)
        val = torch.where(a < 1.0, small, big).clamp_(max=E2M1_MAX)
        code = _E2M1_CODE_OF_TWICE.to(x.device)[(val * 2.0).to(torch.int64)]
    else:
        code = torch.zeros(a.shape, dtype=torch.uint8, device=x.device)
        for t, up in _E2M1_THRESH:
            code += (a >= t if up else a > t).to(torch.uint8)
    sign = xf < 0  # negative values that round to zero keep the sign bit, as kitchen does
    return code | (sign.to(torch.uint8) << 3)


def _rand_like(a: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None or generator.device == a.device:
        return torch.rand(a.shape, generator=generator, device=a.device, dtype=torch.float32)
    return torch.rand(a.shape, generator=generator, dtype=torch.float32).to(a.device)


def stochastic_round_fp8(x: torch.Tensor, fp8_dtype, generator: torch.Generator | None) -> torch.Tensor:
    """Round fp32 values (already scaled into range) to ``fp8_dtype`` stochastically.

    The step between neighbours is 2**(e - mantissa_bits) for the value's binade (constant
    below the smallest normal); rounding up with probability equal to the fractional position
    makes the result unbiased. In the normal range that is done on the fp32 bit pattern: add a
    uniform random integer below the dropped mantissa bits, then clear them (a carry into the
    exponent is exactly the round-up into the next binade). Few passes, no frexp/ldexp. The
    rare values below the smallest normal fp8 (fixed step) take the arithmetic route."""
    info = torch.finfo(fp8_dtype)
    mbits = 3 if fp8_dtype == torch.float8_e4m3fn else 2
    emin = -6 if fp8_dtype == torch.float8_e4m3fn else -14
    xf = torch.nan_to_num(x.float(), nan=0.0)
    a = xf.abs().clamp_(max=info.max).contiguous()
    drop = 23 - mbits
    noise = _randint_like(a, 1 << drop, generator)
    res = a.view(torch.int32).add(noise).bitwise_and_(~((1 << drop) - 1)).view(torch.float32)
    res.clamp_(max=info.max)
    small = a < 2.0 ** emin
    if bool(small.any()):
        ulp = 2.0 ** (emin - mbits)
        q = a[small] / ulp
        lo = torch.floor(q)
        up = (_rand_like(q, generator) < (q - lo)).to(q.dtype)
        res[small] = (lo + up) * ulp
    return torch.copysign(res, xf).to(fp8_dtype)


def _randint_like(a: torch.Tensor, high: int, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None or generator.device == a.device:
        return torch.randint(0, high, a.shape, generator=generator, device=a.device, dtype=torch.int32)
    return torch.randint(0, high, a.shape, generator=generator, dtype=torch.int32).to(a.device)


def fp8_decode(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 (e4m3 / e5m2) → ``dtype`` exactly where ``dtype`` can hold the value (fp32 and bf16
    always; fp16 for e4m3 and all but e5m2's extremes), NaN included: the one fp8 decoder.

    On CPU, torch's fp8 cast is a slow scalar loop (COMFYUI.md §5): a 256-entry table in the
    target dtype indexed by the raw bytes through numpy does one pass (~2x faster than the cast
    here, ~10x faster than a bit-twiddling decode). Elsewhere, and under torch.compile, the cast."""
    if (w.device.type != "cpu" or not w.is_contiguous() or dtype.itemsize not in (2, 4)
            or torch.compiler.is_compiling()):  # compiled: a numpy table guard fails under inference_mode
        return w.to(dtype)
    key = ("fp8", w.dtype, dtype)
    table = _LUT_CACHE.get(key)
    if table is None:
        word = torch.int16 if dtype.itemsize == 2 else torch.int32
        table = torch.arange(256, dtype=torch.uint8).view(w.dtype).to(dtype).view(word).numpy()
        _LUT_CACHE[key] = table
    return torch.from_numpy(table[w.view(torch.uint8).numpy()]).view(dtype)


# --- cuBLAS blocked ("swizzled") scale layout -------------------------------------------
# 128x4 tiles of 512 bytes; inside a tile, entry (r, c) sits at
# (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4, tiles row-major over (r // 128, c // 4).

def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def to_blocked(m: torch.Tensor) -> torch.Tensor:
    """Row-major scales [rows, cols] -> blocked [r(rows,128), r(cols,4)] (zero padded)."""
    rows, cols = m.shape
    pr, pc = round_up(rows, 128), round_up(cols, 4)
    if (pr, pc) != (rows, cols):
        padded = torch.zeros((pr, pc), dtype=m.dtype, device=m.device)
        padded[:rows, :cols] = m
        m = padded
    nrt, nct = pr // 128, pc // 4
    # rows = rt*128 + r4*32 + r32, cols = ct*4 + c4 ; stored order (rt, ct, r32, r4, c4)
    return (m.reshape(nrt, 4, 32, nct, 4).permute(0, 3, 2, 1, 4).reshape(pr, pc).contiguous())


def from_blocked(b: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Blocked scales -> row-major [rows, cols] (the unpadded part)."""
    pr, pc = round_up(rows, 128), round_up(cols, 4)
    if b.numel() != pr * pc:
        raise WanquantError("blocked scale tensor has the wrong size",
                            expected=f"{pr}x{pc} entries for a {rows}x{cols} scale grid",
                            found=f"{tuple(b.shape)}")
    nrt, nct = pr // 128, pc // 4
    m = b.reshape(nrt, nct, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(pr, pc)
    return m[:rows, :cols]


def as_scalar_f32(t: torch.Tensor, what: str) -> torch.Tensor:
    """A per-tensor scale as a 0-d fp32 tensor; 0-d or one-element inputs are accepted."""
    if t.numel() != 1:
        raise WanquantError(f"{what} must be a scalar", expected="0-d or [1] tensor", found=str(tuple(t.shape)))
    return t.reshape(()).to(torch.float32)


def require(tensors: dict, key: str, fmt: str) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise WanquantError(f"{fmt} layer is missing its '{key}' tensor", expected=key,
                            found=", ".join(sorted(tensors)) or "nothing")
    return t
