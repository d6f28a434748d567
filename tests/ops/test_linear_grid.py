"""Row-wise fp8 and int8 W8A8 linears against an fp64 reference of their formula (activations
quantized per token, written here with Python-level loops over tokens), kernel calls counted,
and the fp8 -> int8 re-quantization error."""

import pytest
import torch

from wanquant.errors import WanquantError
from wanquant.ops import linear_grid
from wanquant.ops.formats import get_format


def ref_int8(x, q, s_w, bias=None):
    rows = []
    for xm in x.double():
        sx = max(float(xm.abs().max()) / 127.0, 1e-12)
        qx = torch.round(xm / sx).clamp(-127, 127)  # round half to even, as torch.round
        rows.append((qx @ q.double().t()) * sx)
    y = torch.stack(rows) * s_w.double().reshape(1, -1)
    return y if bias is None else y + bias.double()


def ref_fp8_rowwise(x, q, s_w, bias=None):
    rows = []
    for xm in x.float():
        sx = max(float(xm.abs().max()) / 448.0, 1e-12)
        qx = (xm / torch.tensor(sx, dtype=torch.float32)).clamp(-448, 448).to(torch.float8_e4m3fn).double()
        rows.append((qx @ q.double().t()) * sx)
    y = torch.stack(rows) * s_w.double().reshape(1, -1)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("shape", [(64, 256), (37, 72)])  # unpadded and padded (N, K not multiples of 8/16)
def test_int8_matches_fp64_reference(shape, per_tensor):
    g = torch.Generator().manual_seed(0)
    n, k = shape
    w = torch.randn(n, k, generator=g) * 0.05
    t, _ = get_format("int8_tensorwise").quantize(w, conf={"per_tensor": per_tensor})
    x = torch.randn(2, 5, k, generator=g) * torch.logspace(-2, 1, 5).reshape(1, 5, 1)  # tokens of different size
    bias = torch.randn(n, generator=g)
    before = linear_grid.CALLS["int8"]
    y = linear_grid.linear_int8(x, t["weight"], t["weight_scale"], bias)
    assert linear_grid.CALLS["int8"] == before + 1 and y.shape == (2, 5, n) and y.dtype == torch.float32
    ref = ref_int8(x.reshape(-1, k), t["weight"], t["weight_scale"].expand(n, 1) if per_tensor else t["weight_scale"],
                   bias).reshape(2, 5, n)
    # int32 accumulation is exact; the fp32 rescale adds a few ulps
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    yb = linear_grid.linear_int8(x.bfloat16(), t["weight"], t["weight_scale"], bias)
    assert yb.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(64, 256), (40, 72)])
def test_fp8_rowwise_matches_fp64_reference(shape):
    g = torch.Generator().manual_seed(1)
    n, k = shape
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n).unsqueeze(1)
    t, _ = get_format("float8_e4m3fn_rowwise").quantize(w)
    x = torch.randn(6, k, generator=g)
    before = linear_grid.CALLS["fp8_rowwise"]
    y = linear_grid.linear_fp8_rowwise(x, t["weight"], t["weight_scale"])
    assert linear_grid.CALLS["fp8_rowwise"] == before + 1
    ref = ref_fp8_rowwise(x, t["weight"], t["weight_scale"])
    # fp8 products are exact in fp32; CPU _scaled_mm accumulates in fp32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_requantize_fp8_to_int8_reports_its_error():
    w = torch.randn(128, 256) * torch.logspace(-3, 0, 128).unsqueeze(1)
    t, _ = get_format("float8_e4m3fn").quantize(w)
    q, s, err = linear_grid.requantize_fp8_to_int8(t["weight"], t["weight_scale"])
    fp8 = t["weight"].double() * t["weight_scale"].double()
    back = q.double() * s.double()
    want = float((back - fp8).norm() / fp8.norm())
    assert q.dtype == torch.int8 and s.shape == (128, 1) and abs(err - want) <= 1e-6 * want and 0 < err < 1e-2


def test_wrong_dtype_and_width_are_one_error():
    with pytest.raises(WanquantError, match="int8"):
        linear_grid.linear_int8(torch.randn(2, 8), torch.zeros(4, 8), torch.ones(4, 1))
    with pytest.raises(WanquantError, match="input features"):
        linear_grid.linear_int8(torch.randn(2, 9), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1))
