"""Per-row / block fp8 and int8 formats: dequant against an fp64 reference written here from the
producers' formulas (element-wise index arithmetic, not the module's reshapes), quantize error
bounds, and the shape errors."""

import pytest
import torch

from wanquant.errors import WanquantError
from wanquant.ops.formats import get_format


def ref_grid(q, s, kind, block=0):
    """fp64 W[i, j] = q[i, j] * s[cell(i, j)] by explicit indices."""
    n, k = q.shape
    i = torch.arange(n).unsqueeze(1).expand(n, k)
    j = torch.arange(k).unsqueeze(0).expand(n, k)
    sd = s.to(torch.float64)
    if kind == "tensor":
        cell = sd.reshape(()).expand(n, k)
    elif kind == "row":
        cell = sd.reshape(-1)[i]
    elif kind == "block2d":
        cell = sd[i // block, j // block]
    else:
        cell = sd[i, j // block, 0]
    return q.to(torch.float64) * cell


CASES = [("float8_e4m3fn_rowwise", "row", 0, None), ("float8_e4m3fn_blockwise", "block2d", 32, {"group_size": 32}),
         ("float8_e4m3fn_block3d", "block3d", 16, {"group_size": 16}), ("int8_tensorwise", "row", 0, None),
         ("int8_tensorwise", "tensor", 0, {"per_tensor": True}), ("int8_blockwise", "block2d", 64, {"group_size": 64})]


@pytest.mark.parametrize("name,kind,block,conf", CASES)
def test_dequant_matches_fp64_reference_and_rounds_once(name, kind, block, conf):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(128, 192, generator=g) * torch.logspace(-3, 0, 128).unsqueeze(1)  # rows of very different size
    t, out_conf = fmt.quantize(w, conf=conf)
    assert t["weight"].dtype == fmt.storage_dtype and t["weight_scale"].dtype == torch.float32
    ref = ref_grid(t["weight"], t["weight_scale"], kind, block)
    got = fmt.dequantize(t, conf=out_conf)
    # one fp32 rounding of an exact product: within half an fp32 ulp of the fp64 value
    assert bool(((got.double() - ref).abs() <= ref.abs() * 2.0 ** -24).all())
    bf = fmt.dequantize(t, torch.bfloat16, conf=out_conf)
    assert torch.equal(bf, got.to(torch.bfloat16))
    # quantization error: int8 within half a step of its cell's scale; fp8 within half an e4m3 ulp
    cell = ref_grid(torch.ones_like(t["weight"], dtype=torch.float64), t["weight_scale"], kind, block)
    err = (ref - w.double()).abs()
    if fmt.storage_dtype == torch.int8:
        assert bool((err <= cell * 0.5 * (1 + 1e-6)).all())
    else:
        assert bool((err <= w.double().abs() * 2.0 ** -4 * 1.0001 + cell * 2.0 ** -9).all())


def test_per_row_scales_keep_small_rows_accurate():
    """The reason per-row formats exist: a per-tensor int8 scale flattens small rows to zero."""
    w = torch.randn(64, 128) * torch.logspace(-4, 0, 64).unsqueeze(1)
    row = get_format("int8_tensorwise")
    t_row, _ = row.quantize(w)
    t_ten, _ = row.quantize(w, conf={"per_tensor": True})
    small = slice(0, 8)
    err_row = (row.dequantize(t_row)[small] - w[small]).norm() / w[small].norm()
    err_ten = (row.dequantize(t_ten)[small] - w[small]).norm() / w[small].norm()
    assert err_row < 0.01 and err_ten > 0.5


@pytest.mark.parametrize("name,scale_shape", [("float8_e4m3fn_rowwise", (63, 1)), ("int8_tensorwise", (64, 2)),
                                              ("int8_blockwise", (1, 1, 1)), ("float8_e4m3fn_block3d", (64, 3, 1))])
def test_scale_that_does_not_fit_is_one_error(name, scale_shape):
    fmt = get_format(name)
    t = {"weight": torch.zeros(64, 128, dtype=fmt.storage_dtype), "weight_scale": torch.ones(scale_shape)}
    with pytest.raises(WanquantError, match="does not fit"):
        fmt.dequantize(t, conf={"group_size": 64} if "block" in name else None)


def test_wrong_payload_dtype_is_one_error():
    with pytest.raises(WanquantError, match="wrong dtype"):
        get_format("int8_tensorwise").dequantize({"weight": torch.zeros(4, 4), "weight_scale": torch.ones(4, 1)})


def test_block_quantize_needs_divisible_shape():
    with pytest.raises(WanquantError, match="divisible"):
        get_format("int8_blockwise").quantize(torch.randn(100, 128))
