"""Linear paths against an fp64 reference of the producer's formula.

Tolerances (relative Frobenius error of the output against ``x64 @ W64.T + b64``, where W64 is
the fp64 dequantized weight from wq_ops_refs):
* dequant path, fp32 compute: <= 2e-6 (only fp32 GEMM rounding);
* dequant path, bf16 compute: <= 1.5e-2 (bf16 inputs and outputs);
* fp8 matmul (activations quantized to e4m3, per-element relative step 2**-4): <= 3e-2, also
  against the bf16 dense reference. This path runs for real on CPU through torch._scaled_mm.
"""

import pytest
import torch

from wanquant.errors import WanquantError
from wanquant.ops.formats import get_format
from wanquant.ops.linear import activation_scale_fp8, linear_dequant, linear_fp8_scaled_mm, quantize_activation_fp8
from wq_ops_refs import ref_dequant, rel_err

ALL = ["float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "fp4_g32"]
# (N, K): odd sizes wherever the format can store them (nvfp4/mxfp8 pad, fp4_g32 needs K % 32)
SHAPES = {"float8_e4m3fn": [(48, 64), (37, 53)], "float8_e5m2": [(48, 64), (37, 53)],
          "nvfp4": [(48, 64), (37, 40)], "mxfp8": [(48, 64), (37, 53)], "fp4_g32": [(48, 64), (37, 96)]}
LEADS = [(9,), (2, 5), (2, 3, 4)]  # 2-D, 3-D and 4-D inputs


def make(fmt, n, k, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    t, conf = get_format(fmt).quantize(w)
    b = torch.randn(n, generator=g) if bias else None
    return t, conf, b, ref_dequant(fmt, t, n, k)


def reference(x, w64, b):
    y = x.double() @ w64.T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [True, False])
def test_dequant_path_fp32_matches_fp64(fmt, lead, bias):
    for n, k in SHAPES[fmt]:
        t, conf, b, w64 = make(fmt, n, k, bias=bias)
        x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1))
        y = linear_dequant(x, fmt, t, b, conf)
        assert y.shape == (*lead, n) and y.dtype == torch.float32
        assert not torch.isnan(y).any()
        assert rel_err(y, reference(x, w64, b)) <= 2e-6


@pytest.mark.parametrize("fmt", ALL)
def test_dequant_path_bf16_compute(fmt):
    n, k = SHAPES[fmt][1]
    t, conf, b, w64 = make(fmt, n, k)
    x = torch.randn(4, 6, k, generator=torch.Generator().manual_seed(2))
    y = linear_dequant(x.bfloat16(), fmt, t, b, conf)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 6, n)
    assert rel_err(y, reference(x.bfloat16().float(), w64, b)) <= 1.5e-2


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("shape", [(48, 64), (37, 53), (16, 200)])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_scaled_mm_dynamic_matches_fp64_and_bf16(fmt, shape, lead, bias):
    n, k = shape
    t, _, b, w64 = make(fmt, n, k, bias=bias)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(3)) * 4
    y = linear_fp8_scaled_mm(x, t["weight"], t["weight_scale"], b)
    assert y.shape == (*lead, n) and y.dtype == torch.float32 and not torch.isnan(y).any()
    ref = reference(x, w64, b)
    assert rel_err(y, ref) <= 3e-2
    bf16_ref = torch.nn.functional.linear(x.bfloat16(), w64.bfloat16(), None if b is None else b.bfloat16())
    assert rel_err(y, bf16_ref.double()) <= 3e-2
    # bf16 activations in, bf16 out (the GPU case)
    yb = linear_fp8_scaled_mm(x.bfloat16(), t["weight"], t["weight_scale"], b)
    assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) <= 3e-2


def test_fp8_static_input_scale_mode():
    t, _, b, w64 = make("float8_e4m3fn", 32, 64)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(4))
    dyn = linear_fp8_scaled_mm(x, t["weight"], t["weight_scale"], b)
    # a static scale equal to the one dynamic scaling computes gives the identical result
    same = linear_fp8_scaled_mm(x, t["weight"], t["weight_scale"], b, input_scale=x.abs().amax() / 448)
    assert torch.equal(dyn, same)
    # a calibrated scale (amax 2x larger than seen) is still accurate
    tensors = dict(t, input_scale=(x.abs().amax() * 2 / 448).reshape(()))
    y = linear_fp8_scaled_mm(x, t["weight"], t["weight_scale"], b, input_scale=tensors["input_scale"])
    assert rel_err(y, reference(x, w64, b)) <= 3e-2
    q, s = quantize_activation_fp8(x, tensors["input_scale"])
    assert torch.equal(s, tensors["input_scale"]) and float(q.float().abs().max()) <= 224


def test_dynamic_scaling_keeps_large_activations_where_unit_scale_clamps():
    """ComfyUI/kijai quantize activations with scale 1.0: anything above 448 is clipped."""
    t, _, _, w64 = make("float8_e4m3fn", 32, 128)
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(5)) * 2
    x[:8, :16] *= 900  # Wan's FFN inputs do reach the thousands
    assert float(x.abs().max()) > 448
    ref = reference(x, w64, None)
    dyn = linear_fp8_scaled_mm(x, t["weight"], t["weight_scale"])
    unit = linear_fp8_scaled_mm(x, t["weight"], t["weight_scale"], input_scale=torch.tensor(1.0))
    rows = slice(0, 8)  # the rows that carry the large activations
    assert rel_err(dyn[rows], ref[rows]) <= 3e-2
    assert rel_err(unit[rows], ref[rows]) >= 0.3
    assert rel_err(dyn, ref) <= 3e-2 < rel_err(unit, ref)


def test_padding_path_equals_unpadded_math():
    """Odd K/N are zero-padded to 16; the result must equal the same math on an aligned copy."""
    t, _, b, _ = make("float8_e4m3fn", 37, 53)
    x = torch.randn(7, 53, generator=torch.Generator().manual_seed(6))
    y = linear_fp8_scaled_mm(x, t["weight"], t["weight_scale"], b)
    q, sa = quantize_activation_fp8(x)
    expect = (q.double() @ t["weight"].double().T) * float(sa) * float(t["weight_scale"]) + b.double()
    torch.testing.assert_close(y.double(), expect, rtol=1e-6, atol=1e-6)


def test_zero_input_gives_bias_without_nan():
    t, _, b, _ = make("float8_e4m3fn", 16, 32)
    x = torch.zeros(3, 32)
    assert float(activation_scale_fp8(x)) > 0
    y = linear_fp8_scaled_mm(x, t["weight"], t["weight_scale"], b)
    torch.testing.assert_close(y, b.expand(3, 16), rtol=0, atol=0)


def test_padded_dequant_linear_and_errors():
    t, conf, b, w64 = make("nvfp4", 37, 40)
    x = torch.randn(2, 3, 40)
    assert rel_err(linear_dequant(x, "nvfp4", t, b, conf), reference(x, w64, b)) <= 2e-6
    with pytest.raises(WanquantError):
        linear_fp8_scaled_mm(torch.randn(2, 41), make("float8_e4m3fn", 8, 40)[0]["weight"], torch.tensor(1.0))
    with pytest.raises(WanquantError):
        linear_fp8_scaled_mm(torch.randn(2, 40), torch.zeros(8, 40), torch.tensor(1.0))


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "nvfp4", "fp4_g32"])
def test_dequant_path_refuses_a_weight_wider_than_the_input(fmt):
    """Silently cropping the weight's extra columns would compute with a different layer."""
    t, conf, b, _ = make(fmt, 8, 64)
    with pytest.raises(WanquantError, match="input features do not match"):
        linear_dequant(torch.randn(3, 32, dtype=torch.bfloat16), fmt, t, b, conf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_quantization_rounds_once_like_kitchens_cuda_kernel(dtype):
    """x / scale rounded once to e4m3 (fp64 reference), as kitchen's CUDA kernel does: the torch path
    (CPU, torch.compile) must not round through x's 16-bit dtype first."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(256, 512, generator=g) * 3).to(dtype)
    scale = torch.tensor(0.0123, dtype=torch.float32)
    q, s = quantize_activation_fp8(x, scale)
    ref = (x.double() * (1.0 / scale.double())).clamp(-448, 448).to(torch.float8_e4m3fn)
    mismatch = (q.view(torch.uint8) != ref.view(torch.uint8)).sum().item()
    assert s is not None and mismatch == 0, f"{mismatch} of {x.numel()} activations rounded differently"
