"""Independent fp64 references of each producer's dequant formula, for the ops tests.

Written without the code under test: the blocked scale layout via the documented offset
formula (COMFYUI.md §2), E2M1 via an explicit table and integer nibble arithmetic, and every
product in fp64.
"""

import torch

from fixtures import unblock

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1_value(code: int) -> float:
    v = E2M1[code & 7]
    return -v if code & 8 else v


# the blocked-scale offset formula, written once for all tests (tests/fixtures.py)
ref_unblock = unblock


def ref_e2m1_unpack(u8: torch.Tensor, hi_first: bool) -> torch.Tensor:
    table = torch.tensor([e2m1_value(i) for i in range(16)], dtype=torch.float64)
    b = u8.to(torch.int64)
    first, second = (b // 16, b % 16) if hi_first else (b % 16, b // 16)
    return torch.stack([table[first], table[second]], -1).reshape(u8.shape[0], -1)


def ref_dequant(fmt: str, t: dict, n: int, k: int) -> torch.Tensor:
    """The [n, k] weight in fp64 from canonical tensors."""
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        return (t["weight"].to(torch.float64) * float(t["weight_scale"]))[:n, :k]
    if fmt == "nvfp4":
        w = t["weight"]
        rows, cols = w.shape[0], w.shape[1] * 2
        sc = ref_unblock(t["weight_scale"].view(torch.float8_e4m3fn).to(torch.float64), rows, cols // 16)
        return (ref_e2m1_unpack(w, True) * sc.repeat_interleave(16, 1) * float(t["weight_scale_2"]))[:n, :k]
    if fmt == "mxfp8":
        q = t["weight"]
        rows, cols = q.shape
        codes = ref_unblock(t["weight_scale"].view(torch.uint8).to(torch.float64), rows, cols // 32)
        sc = torch.where(codes == 0, torch.zeros_like(codes), torch.pow(2.0, codes - 127))
        return (q.to(torch.float64) * sc.repeat_interleave(32, 1))[:n, :k]
    if fmt == "fp4_g32":
        return ref_e2m1_unpack(t["weight"], True) * t["weight_scale"].double().repeat_interleave(32, 1)
    raise ValueError(fmt)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())
