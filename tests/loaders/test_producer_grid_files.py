"""Files made by convert_to_quant itself (tests/loaders/data/convert_to_quant, RECIPE.md there):
inspect names each format, the canonical form equals an fp64 reference of the producer's reload
formula, and the fp8 payload is the producer's quantization formula applied to the regenerated
source weights (448 / amax per tensor, row or 64x64 tile, clamp, round to e4m3; int8: 127 / amax per
tensor or row, clamp to +-127, round half to even)."""

import json
from pathlib import Path

import pytest
import torch

from wanquant.cli import main as cli_main
from wanquant.loaders.canonical import load_canonical
from wanquant.ops.formats import get_format, parse_comfy_quant

DATA = Path(__file__).parent / "data" / "convert_to_quant"
FILES = {"ctq_fp8_row": "float8_e4m3fn_rowwise", "ctq_fp8_block": "float8_e4m3fn_blockwise",
         "ctq_int8_block": "int8_blockwise", "ctq_fp8_tensor": "float8_e4m3fn",
         "ctq_int8_tensor": "int8_tensorwise", "ctq_int8_row": "int8_tensorwise"}
# + ctq_hybrid_mxfp8 (read as mxfp8), tested below
LAYERS = {"blocks.0.self_attn.q": (128, 128), "blocks.0.ffn.0": (256, 128)}


def source_weights():
    """The recipe's bf16 weights, regenerated (CPU torch.randn with a seeded generator)."""
    g = torch.Generator().manual_seed(14)
    out = {}
    for name, (n, k) in LAYERS.items():
        out[name] = (torch.randn(n, k, generator=g) * 0.02 * torch.logspace(-1, 0, n).unsqueeze(1)).bfloat16()
        torch.randn(n, generator=g)
    return out


def raw(name):
    from safetensors.torch import load_file

    return load_file(str(DATA / f"{name}.safetensors"))


@pytest.mark.parametrize("name", sorted(FILES))
def test_inspect_names_the_format(name, capsys):
    assert cli_main(["inspect", str(DATA / f"{name}.safetensors"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["formats"] == {FILES[name]: 2} and not out["errors"]


@pytest.mark.parametrize("name", sorted(FILES))
def test_canonical_equals_fp64_reload_formula(name):
    src = raw(name)
    with load_canonical(DATA / f"{name}.safetensors") as m:
        for layer, (n, k) in LAYERS.items():
            conf = parse_comfy_quant(m.entries[f"{layer}.comfy_quant"].load())
            t = {s: m.entries[f"{layer}.{s}"].load() for s in ("weight", "weight_scale")}
            got = get_format(FILES[name]).dequantize(t, torch.float32, conf).double()
            q, s = src[f"{layer}.weight"].double(), src[f"{layer}.weight_scale"].double()
            i = torch.arange(n).unsqueeze(1).expand(n, k)
            j = torch.arange(k).unsqueeze(0).expand(n, k)
            if s.dim() == 0:  # per tensor
                cell = s
            elif s.shape == (n, 1) or s.dim() == 1:  # per row
                cell = s.reshape(n)[i]
            else:  # 64x64 tiles
                cell = s[i // 64, j // 64]
            ref = q * cell
            assert bool(((got - ref).abs() <= ref.abs() * 2.0 ** -24).all()), (name, layer)


def test_fp8_payload_is_the_producers_formula_on_the_source():
    src = source_weights()
    for name, kind in (("ctq_fp8_row", "row"), ("ctq_fp8_block", "block")):
        f = raw(name)
        for layer, (n, k) in LAYERS.items():
            w = src[layer].float()
            if kind == "row":
                qs = 448.0 / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
                want = (w * qs).clamp(-448, 448).to(torch.float8_e4m3fn)
            else:
                wb = w.reshape(n // 64, 64, k // 64, 64)
                qs = 448.0 / wb.abs().amax(dim=(1, 3)).clamp_min(1e-12)
                want = (wb * qs[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(n, k)
            got = f[f"{layer}.weight"]
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (name, layer)


def test_hybrid_mxfp8_reads_as_its_exact_mxfp8_part(tmp_path):
    from fixtures import ref_mxfp8

    from wanquant.errors import WanquantError
    from wanquant.loaders import synthetic as syn

    src = raw("ctq_hybrid_mxfp8")
    with load_canonical(DATA / "ctq_hybrid_mxfp8.safetensors") as m:
        assert dict(m.report.formats) == {"mxfp8": 2} and not m.report.errors
        assert all(not k.endswith("weight_scalar") for k in m.entries)  # the fallback scalar is not passed on
        for layer, (n, k) in LAYERS.items():
            conf = parse_comfy_quant(m.entries[f"{layer}.comfy_quant"].load())
            t = {s: m.entries[f"{layer}.{s}"].load() for s in ("weight", "weight_scale")}
            got = get_format("mxfp8").dequantize(t, torch.float32, conf).double()
            assert torch.equal(got, ref_mxfp8(src[f"{layer}.weight"], src[f"{layer}.weight_scale"], (n, k)))
    src.pop("blocks.0.ffn.0.weight_scalar")
    with pytest.raises(WanquantError, match="weight_scalar") as e:
        load_canonical(syn.save(src, tmp_path / "no_scalar.safetensors")).close()
    assert e.value.layer == "blocks.0.ffn.0"


def test_lightx2v_int8_per_channel_file():
    """LightX2V's own int8 quantizer output (tests/loaders/data/lightx2v/RECIPE.md): int8 + bf16 [out, 1]
    scales, no comfy_quant -> int8_tensorwise per channel; canonical = fp64 q * s[row]; the payload is
    LightX2V's formula on the regenerated source."""
    from safetensors.torch import load_file

    path = Path(__file__).parent / "data" / "lightx2v" / "lightx2v_int8.safetensors"
    f = load_file(str(path))
    src = source_weights()
    with load_canonical(path) as m:
        assert dict(m.report.formats) == {"int8_tensorwise": 2}
        for layer, (n, k) in LAYERS.items():
            t = {s: m.entries[f"{layer}.{s}"].load() for s in ("weight", "weight_scale")}
            assert t["weight_scale"].dtype == torch.float32 and t["weight_scale"].shape == (n, 1)
            got = get_format("int8_tensorwise").dequantize(t).double()
            ref = f[f"{layer}.weight"].double() * f[f"{layer}.weight_scale"].double().reshape(n, 1)
            assert bool(((got - ref).abs() <= ref.abs() * 2.0 ** -24).all())
            w = src[layer]
            s = (w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / 127)  # in bf16, as the producer computes it
            want = torch.clamp(torch.round(w / s), -128, 127).to(torch.int8)
            assert torch.equal(f[f"{layer}.weight"], want) and torch.equal(f[f"{layer}.weight_scale"], s)


def _e4m3_nearest_ties_away(x: torch.Tensor) -> torch.Tensor:
    """fp64 model of qtorch's ``float_quantize(x, 4, 3, rounding="nearest")`` (quant_cpu.cpp: add half
    an ulp to the magnitude's bits and truncate, i.e. ties away from zero; subnormal step 2**-9)."""
    x = x.double()
    a = x.abs()
    e = torch.floor(torch.log2(a.clamp_min(2.0 ** -30))).clamp_min(-6)
    step = torch.pow(2.0, e - 3)
    return torch.sign(x) * torch.floor(a / step + 0.5) * step


def test_lightx2v_fp8_per_channel_file():
    """LightX2V's own fp8 quantizer output (QuantWeightFP8 with the real qtorch; RECIPE.md there):
    fp8 + bf16 [out, 1] scales, no comfy_quant -> float8_e4m3fn_rowwise; canonical = fp64 q * s[row];
    the payload is LightX2V's formula (bf16 ``amax / 448``, bf16 divide, clip, round to nearest with
    ties away from zero) on the regenerated source."""
    from safetensors.torch import load_file

    path = Path(__file__).parent / "data" / "lightx2v" / "lightx2v_fp8.safetensors"
    f = load_file(str(path))
    src = source_weights()
    assert cli_main(["inspect", str(path), "--json"]) == 0
    with load_canonical(path) as m:
        assert dict(m.report.formats) == {"float8_e4m3fn_rowwise": 2} and not m.report.errors
        for layer, (n, k) in LAYERS.items():
            conf = parse_comfy_quant(m.entries[f"{layer}.comfy_quant"].load())
            t = {s: m.entries[f"{layer}.{s}"].load() for s in ("weight", "weight_scale")}
            assert t["weight_scale"].dtype == torch.float32 and t["weight_scale"].shape == (n, 1)
            got = get_format("float8_e4m3fn_rowwise").dequantize(t, torch.float32, conf).double()
            ref = f[f"{layer}.weight"].double() * f[f"{layer}.weight_scale"].double().reshape(n, 1)
            assert bool(((got - ref).abs() <= ref.abs() * 2.0 ** -24).all()), layer
            w = src[layer]
            s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / 448.0  # in bf16, as the producer computes it
            x = torch.clip(w / s, -448.0, 448.0).float()
            want = _e4m3_nearest_ties_away(x)
            assert torch.equal(f[f"{layer}.weight_scale"], s)
            assert torch.equal(f[f"{layer}.weight"].double(), want), layer
            # ties are common on bf16 inputs: torch's own cast (ties to even) would differ, so the
            # rounding rule above is what is being checked
            assert not torch.equal(x.to(torch.float8_e4m3fn).double(), want)


def test_tensor_and_row_payloads_are_the_producers_formula_on_the_source():
    """``--scaling_mode tensor`` (fp8, int8) and ``--int8 --scaling_mode row``: the stored scales and
    payloads are convert_to_quant's formulas (``_convert_fp8`` / ``TensorWiseINT8Layout.quantize``)
    on the regenerated fp32 source, and the comfy_quant tags are its own."""
    src = source_weights()
    for name in ("ctq_fp8_tensor", "ctq_int8_tensor", "ctq_int8_row"):
        f = raw(name)
        for layer, (n, k) in LAYERS.items():
            w = src[layer].float()
            conf = json.loads(bytes(f[f"{layer}.comfy_quant"].tolist()))
            if name == "ctq_fp8_tensor":
                qs = 448.0 / w.abs().max().clamp_min(1e-12)
                want = (w * qs).clamp(-448, 448).to(torch.float8_e4m3fn)
                scale, tag = 1.0 / qs, {"format": "float8_e4m3fn"}
            elif name == "ctq_int8_tensor":
                scale = w.abs().max().clamp_min(1e-12) / 127.0
                want = (w * (1.0 / scale)).clamp(-127, 127).round().to(torch.int8)
                tag = {"format": "int8_tensorwise"}
            else:
                qs = 127.0 / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
                want = (w * qs).clamp(-127, 127).round().to(torch.int8)
                scale, tag = 1.0 / qs, {"format": "int8_tensorwise", "per_row": True}
            got = f[f"{layer}.weight"]
            assert conf == tag, (name, layer)
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (name, layer)
            assert torch.equal(f[f"{layer}.weight_scale"], scale), (name, layer)
