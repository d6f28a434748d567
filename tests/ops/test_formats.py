"""Every format's dequant against an fp64 reference of the producer's formula, kitchen vs pure
torch identity, quantize round trips, stochastic rounding, and the error cases.

The references below are written independently of the code under test: element-wise index
arithmetic for the blocked layout (the offset formula from COMFYUI.md §2), Python-level E2M1
decoding, and fp64 products.
"""

import math

import pytest
import torch

from wanquant.errors import WanquantError
from wanquant.ops.formats import (FORMAT_NAMES, comfy_quant_tensor, from_blocked, get_format,
                                  parse_comfy_quant, swap_nibbles, to_blocked)
from wanquant.ops.formats import _common
from wq_ops_refs import E2M1, ref_dequant, ref_e2m1_unpack, ref_unblock

ck = _common._import_kitchen()
needs_kitchen = pytest.mark.skipif(ck is None, reason="comfy_kitchen not importable")


# ---------------------------------------------------------------------------------- fp8

@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("shape", [(64, 64), (37, 53)])
def test_fp8_dequant_matches_fp64_reference(name, shape):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * 0.05
    t, conf = fmt.quantize(w)
    assert conf == {"format": name} and t["weight"].dtype == fmt.storage_dtype
    assert t["weight_scale"].dtype == torch.float32 and t["weight_scale"].ndim == 0
    ref = t["weight"].to(torch.float64) * t["weight_scale"].double()
    # the producer's own reload formula (fp8.to(fp32) * scale) is reproduced exactly in fp32
    assert torch.equal(fmt.dequantize(t), t["weight"].to(torch.float32) * t["weight_scale"])
    torch.testing.assert_close(fmt.dequantize(t).double(), ref, rtol=1e-6, atol=0)
    bf = fmt.dequantize(t, out_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), ref, rtol=2 ** -8, atol=0)
    # quantization error: per-element at most half an fp8 step at the element's magnitude
    mbits = 3 if name == "float8_e4m3fn" else 2
    err = (ref - w.double()).abs()
    assert bool((err <= w.double().abs() * 2.0 ** -(mbits + 1) * 1.0001 + t["weight_scale"].double() * 2 ** -9 * 4).all())


def test_fp8_accepts_uint8_payload_and_one_element_scale():
    fmt = get_format("float8_e4m3fn")
    t, _ = fmt.quantize(torch.randn(16, 32))
    alt = {"weight": t["weight"].view(torch.uint8), "weight_scale": t["weight_scale"].reshape(1)}
    assert torch.equal(fmt.dequantize(alt), fmt.dequantize(t))


def test_fp8_zero_weight_quantizes_without_nan():
    t, _ = get_format("float8_e4m3fn").quantize(torch.zeros(8, 16))
    assert torch.equal(get_format("float8_e4m3fn").dequantize(t), torch.zeros(8, 16))


# -------------------------------------------------------------------------------- nvfp4

@pytest.mark.parametrize("shape", [(128, 64), (70, 96), (33, 40), (256, 144)])
def test_nvfp4_dequant_matches_fp64_reference(shape):
    fmt = get_format("nvfp4")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=g)
    t, conf = fmt.quantize(w)
    n, k = shape
    pn, pk = -(-n // 16) * 16, -(-k // 16) * 16
    assert t["weight"].shape == (pn, pk // 2) and t["weight"].dtype == torch.uint8
    assert t["weight_scale"].shape == (-(-pn // 128) * 128, -(-(pk // 16) // 4) * 4)
    assert conf.get("orig_shape", [n, k]) == [n, k]
    ref = ref_dequant("nvfp4", t, n, k)
    out = fmt.dequantize(t, conf=conf)
    assert out.shape == (n, k)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    # 4-bit values with fp8 block scales: bounded relative error of the whole tensor
    assert float((out - w).norm() / w.norm()) < 0.15


@needs_kitchen
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4_kitchen_and_torch_dequant_identical(out_dtype):
    fmt = get_format("nvfp4")
    t, conf = fmt.quantize(torch.randn(200, 176, generator=torch.Generator().manual_seed(3)))
    a = fmt.dequantize_kitchen(t, out_dtype, conf)
    b = fmt.dequantize_torch(t, out_dtype, conf)
    assert a.dtype == b.dtype == out_dtype and torch.equal(a, b)


@needs_kitchen
def test_nvfp4_quantizers_identical_and_default_uses_kitchen(monkeypatch):
    fmt = get_format("nvfp4")
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(4))
    t_ck, _ = fmt.quantize(w)
    monkeypatch.setattr(_common, "kitchen", lambda: None)
    import wanquant.ops.formats.nvfp4 as nv
    monkeypatch.setattr(nv, "kitchen", lambda: None)
    t_pt, _ = fmt.quantize(w)
    assert torch.equal(t_ck["weight"], t_pt["weight"])
    assert torch.equal(t_ck["weight_scale"].view(torch.uint8), t_pt["weight_scale"].view(torch.uint8))
    assert torch.equal(fmt.dequantize(t_pt), fmt.dequantize_torch(t_ck))


def test_nvfp4_uint8_block_scales_accepted():
    fmt = get_format("nvfp4")
    t, _ = fmt.quantize(torch.randn(32, 32))
    alt = dict(t, weight_scale=t["weight_scale"].view(torch.uint8), weight_scale_2=t["weight_scale_2"].reshape(1))
    assert torch.equal(fmt.dequantize(alt), fmt.dequantize(t))


# -------------------------------------------------------------------------------- mxfp8

@pytest.mark.parametrize("shape", [(128, 64), (70, 96), (40, 200)])
def test_mxfp8_dequant_matches_fp64_reference(shape):
    fmt = get_format("mxfp8")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    w[0, :32] = 0  # an all-zero block gets code 0, which decodes to 0.0
    t, conf = fmt.quantize(w)
    n, k = shape
    q, bs = t["weight"], t["weight_scale"]
    assert q.dtype == torch.float8_e4m3fn and bs.dtype == torch.uint8
    rows, cols = q.shape
    codes = ref_unblock(bs.to(torch.float64), rows, cols // 32)
    scales = torch.where(codes == 0, torch.zeros_like(codes), torch.pow(2.0, codes - 127))
    ref = (q.to(torch.float64) * scales.repeat_interleave(32, dim=1))[:n, :k]
    out = fmt.dequantize(t, conf=conf)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    assert float((out - w).norm() / w.norm()) < 0.05
    assert bool((out[0, :32] == 0).all())


@needs_kitchen
def test_mxfp8_kitchen_and_torch_identical_and_quantizer_matches_kitchen():
    fmt = get_format("mxfp8")
    w = torch.randn(160, 96, generator=torch.Generator().manual_seed(6)) * 3
    t, conf = fmt.quantize(w)
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(fmt.dequantize_kitchen(t, dt, conf), fmt.dequantize_torch(t, dt, conf))
    q_ck, bs_ck = ck.quantize_mxfp8(w)
    assert torch.equal(q_ck.view(torch.uint8), t["weight"].view(torch.uint8))
    assert torch.equal(bs_ck.view(torch.uint8), t["weight_scale"])


# ------------------------------------------------------------------------------ fp4_g32

@pytest.mark.parametrize("shape", [(64, 64), (33, 96)])
def test_fp4_g32_dequant_matches_fp64_reference_high_first_only(shape):
    fmt = get_format("fp4_g32")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    t, conf = fmt.quantize(w)
    assert conf == {"format": "fp4_g32", "group_size": 32}
    n, k = shape
    assert t["weight"].shape == (n, k // 2) and t["weight_scale"].shape == (n, k // 32)
    ref = ref_e2m1_unpack(t["weight"], hi_first=True) * t["weight_scale"].double().repeat_interleave(32, dim=1)
    torch.testing.assert_close(fmt.dequantize(t).double(), ref, rtol=1e-6, atol=0)
    low = {"weight": swap_nibbles(t["weight"]), "weight_scale": t["weight_scale"]}
    torch.testing.assert_close(fmt.dequantize({"weight": swap_nibbles(low["weight"]), "weight_scale": t["weight_scale"]}).double(),
                               ref, rtol=1e-6, atol=0)
    with pytest.raises(WanquantError, match="canonical"):  # one owner of the order: the loader
        fmt.dequantize(low, conf={"nibble_order": "low_first"})
    # the order matters: reading low-first data as high-first gives a different weight
    assert not torch.equal(fmt.dequantize(low), fmt.dequantize(t))
    # bf16 / fp16 scales (as in the naive FP4 release) are accepted
    half = dict(t, weight_scale=t["weight_scale"].to(torch.bfloat16))
    torch.testing.assert_close(fmt.dequantize(half).double(),
                               ref_e2m1_unpack(t["weight"], True) * half["weight_scale"].double().repeat_interleave(32, 1),
                               rtol=1e-6, atol=0)


def test_fp4_g32_scale_is_group_amax_over_6():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    t, _ = get_format("fp4_g32").quantize(w)
    expect = w.reshape(4, 2, 32).abs().amax(-1) / 6
    torch.testing.assert_close(t["weight_scale"], expect, rtol=0, atol=0)


def test_swap_nibbles_bytes():
    x = torch.tensor([0xAB, 0x01, 0xF0], dtype=torch.uint8)
    assert swap_nibbles(x).tolist() == [0xBA, 0x10, 0x0F]
    with pytest.raises(WanquantError):
        swap_nibbles(torch.zeros(2, dtype=torch.int16))


# ------------------------------------------------------------------------- shared parts

def test_e2m1_round_to_nearest_even_matches_brute_force():
    xs = torch.linspace(-7, 7, 2801, dtype=torch.float64)
    grid = torch.tensor(E2M1, dtype=torch.float64)
    expect = []
    for x in xs.tolist():
        a = min(abs(x), 6.0)
        d = [abs(a - g) for g in E2M1]
        best = min(d)
        cands = [i for i, v in enumerate(d) if math.isclose(v, best, abs_tol=1e-12)]
        code = cands[0] if len(cands) == 1 else [c for c in cands if c % 2 == 0][0]
        expect.append(code | (8 if x < 0 else 0))
    got = _common.encode_e2m1(xs.float())
    assert got.tolist() == expect
    assert grid.numel() == 8


def test_pack_unpack_and_blocked_layout_round_trip():
    codes = torch.randint(0, 16, (5, 12), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    for hi in (True, False):
        assert torch.equal(_common.unpack_codes(_common.pack_codes(codes, hi), hi), codes)
    m = torch.randint(0, 255, (130, 7), generator=torch.Generator().manual_seed(10), dtype=torch.uint8)
    b = to_blocked(m)
    assert b.shape == (256, 8)
    assert torch.equal(from_blocked(b, 130, 7), m)
    assert torch.equal(ref_unblock(b, 130, 7), m)
    if ck is not None:
        assert torch.equal(ck.to_blocked(m, flatten=False), b)
        assert torch.equal(ck.from_blocked(b, 130, 7), m)


@pytest.mark.parametrize("name", ["float8_e4m3fn", "nvfp4", "mxfp8", "fp4_g32"])
def test_stochastic_rounding_is_seeded_and_unbiased(name):
    fmt = get_format(name)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(11))
    t1, _ = fmt.quantize(w, generator=torch.Generator().manual_seed(5), stochastic=True)
    t2, _ = fmt.quantize(w, generator=torch.Generator().manual_seed(5), stochastic=True)
    t3, _ = fmt.quantize(w, generator=torch.Generator().manual_seed(6), stochastic=True)
    assert torch.equal(t1["weight"].view(torch.uint8), t2["weight"].view(torch.uint8))
    assert not torch.equal(t1["weight"].view(torch.uint8), t3["weight"].view(torch.uint8))
    # averaged over draws the stochastic result approaches w; round-to-nearest has a fixed bias
    g = torch.Generator().manual_seed(7)
    mean = sum(fmt.dequantize(fmt.quantize(w, generator=g, stochastic=True)[0]).double() for _ in range(64)) / 64
    rne = fmt.dequantize(fmt.quantize(w)[0]).double()
    bias_sr = float((mean - w.double()).abs().mean())
    bias_rne = float((rne - w.double()).abs().mean())
    assert bias_sr < 0.5 * bias_rne


def test_stochastic_fp8_keeps_representable_values_and_picks_neighbours():
    x = torch.tensor([1.0, 1.125, -448.0, 0.0, 2.0 ** -9, 1.06])
    r = _common.stochastic_round_fp8(x, torch.float8_e4m3fn, torch.Generator().manual_seed(0)).float()
    assert r[:5].tolist() == [1.0, 1.125, -448.0, 0.0, 2.0 ** -9]
    assert r[5].item() in (1.0, 1.125)


def test_comfy_quant_round_trip_and_errors():
    conf = {"format": "nvfp4", "orig_shape": [70, 96]}
    t = comfy_quant_tensor(conf)
    assert t.dtype == torch.uint8 and t.ndim == 1
    assert parse_comfy_quant(t) == conf
    import json
    assert json.loads(t.numpy().tobytes()) == conf  # how ComfyUI reads it
    with pytest.raises(WanquantError):
        parse_comfy_quant(torch.tensor([0xFF, 0x00], dtype=torch.uint8))
    with pytest.raises(WanquantError):
        parse_comfy_quant(comfy_quant_tensor({"group_size": 32}))


def test_registry_and_input_errors():
    gguf = {f"gguf_{q}" for q in ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k")}
    assert set(FORMAT_NAMES) == {"float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "fp4_g32", "float8_e4m3fn_rowwise",
                                 "float8_e4m3fn_blockwise", "float8_e4m3fn_block3d", "int8_tensorwise",
                                 "int8_blockwise"} | gguf
    with pytest.raises(WanquantError) as e:
        get_format("int4")
    assert "int4" in str(e.value)
    with pytest.raises(WanquantError):
        get_format("float8_e4m3fn").dequantize({"weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)})
    with pytest.raises(WanquantError):
        get_format("float8_e4m3fn").dequantize({"weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
                                                "weight_scale": torch.ones(4)})
    with pytest.raises(WanquantError):
        get_format("fp4_g32").dequantize({"weight": torch.zeros(4, 16, dtype=torch.uint8),
                                          "weight_scale": torch.ones(4, 2)})
    with pytest.raises(WanquantError):
        get_format("fp4_g32").quantize(torch.randn(4, 40))
    with pytest.raises(WanquantError):
        get_format("fp4_g32").dequantize({"weight": torch.zeros(4, 16, dtype=torch.uint8),
                                          "weight_scale": torch.ones(4, 1)}, conf={"nibble_order": "middle"})
    t, _ = get_format("nvfp4").quantize(torch.randn(32, 32))
    with pytest.raises(WanquantError):
        get_format("nvfp4").dequantize(dict(t, weight_scale=t["weight_scale"][:64]))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fast_cpu_fp8_upcast_is_exact_for_every_byte(dtype):
    """All 256 bit patterns (except NaN) decode exactly as torch's own cast, incl. subnormals."""
    u8 = torch.arange(256, dtype=torch.uint8).repeat(3, 1)
    w = u8.view(dtype)
    ref = w.to(torch.float32)
    ok = ~torch.isnan(ref)
    assert bool(ok.sum() >= 3 * 250)
    for out in (torch.float32, torch.bfloat16, torch.float16):  # every fp8 value is exact in all three
        got = _common.fp8_decode(w, out)
        assert got.dtype == out
        assert torch.equal(got.float()[ok], ref[ok]), out
        assert bool(torch.isnan(got.float()[~ok]).all())


# 16-bit compute dtypes dequantize without an fp32 temporary of the weight's size. Tolerances
# per element against the fp64 producer formula, in units of the dtype's relative spacing
# (ULP_REL: 2**-7 bf16, 2**-10 fp16): fp8, and mxfp8 in bf16, are one exact product rounded
# once (1/2 unit); nvfp4 rounds s2, s2*block and the product (kitchen's own order) and fp4_g32
# the scale and the product (<= 2 units); plus fp16's subnormal spacing as an absolute floor.
ULP_REL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "fp4_g32"])
def test_16bit_dequant_matches_fp64_reference(fmt, out):
    from wq_ops_refs import ref_dequant

    g = torch.Generator().manual_seed(7)
    n, k = 96, 128
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n).unsqueeze(1)  # rows over 3 decades
    t, conf = get_format(fmt).quantize(w)
    ref = ref_dequant(fmt, t, n, k)
    got = get_format(fmt).dequantize(t, out_dtype=out, conf=conf)
    assert got.dtype == out and tuple(got.shape) == (n, k)
    exact = fmt.startswith("float8") or (fmt == "mxfp8" and out == torch.bfloat16)
    rel = ULP_REL[out] / 2 if exact else 2 * ULP_REL[out]
    err = (got.double() - ref).abs()
    assert bool((err <= rel * ref.abs() + 2.0 ** -24).all()), float((err / ref.abs().clamp_min(1e-30)).max())
    # and it is the fp32 dequant rounded to out, to within the stated extra unit
    f32 = get_format(fmt).dequantize(t, out_dtype=torch.float32, conf=conf)
    assert bool(((got.double() - f32.double()).abs() <= rel * f32.abs().double() + 2.0 ** -24).all())


@pytest.mark.parametrize("view", ["contiguous", "column_slice", "transposed"])
def test_swap_nibbles_on_weight_sized_tensors_matches_the_bytewise_definition(view):
    """Above 1 MiB the swap runs in chunks through a reused buffer (a LightX2V NVFP4 load swaps every
    weight); each byte must still be (low << 4) | high, whatever the layout and a ragged last chunk."""
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 256, (1031, 2053), dtype=torch.uint8, generator=g)
    t = {"contiguous": base, "column_slice": base[:, 3:2000], "transposed": base.t()}[view]
    assert t.numel() > 2**20
    expected = torch.tensor([((b & 0x0F) << 4) | (b >> 4) for b in range(256)], dtype=torch.uint8)[t.long()]
    got = swap_nibbles(t)
    assert got.shape == t.shape and got.dtype == torch.uint8
    assert torch.equal(got, expected)
    assert torch.equal(swap_nibbles(got), t)
