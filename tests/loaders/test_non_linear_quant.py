"""Quantized layers ComfyUI only runs unquantized (issue 12, item 2b).

Input: a kijai-style scaled-fp8 quantization of a Wan2.2-Animate state dict. Shapes are ComfyUI's
own ``AnimateWanModel`` parameter list (tests/loaders/data/comfy_animate_params.json); the recipe
quantizes every rank >= 2 weight outside kijai's exclusion keywords, so it also hits the motion
encoder (EqualConv2d / EqualLinear / Direction) and the face encoder's Conv1d layers, and stores
those scalar scales with shape [1]*(rank-1), as the fuzzing found in the producer's files. The issue
counted 26 conv and 6 more non-Linear layers there: 32 layers ComfyUI would load with raw fp8 values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import ref_fp8, syn

from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.convert import convert
from wanquant.ops.formats import parse_comfy_quant

DATA = Path(__file__).resolve().parent / "data" / "comfy_animate_params.json"


def _kijai_animate() -> tuple[dict[str, torch.Tensor], list[str]]:
    shapes = json.loads(DATA.read_text())["native"]
    g = torch.Generator().manual_seed(3)
    sd, quantized = {}, []
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.05
        if k.endswith(".weight") and len(shape) >= 2 and not any(x in k for x in syn.KIJAI_EXCLUDE):
            q, s = syn.fp8_quantize(t)
            layer = k[: -len(".weight")]
            sd[k] = q
            sd[f"{layer}.scale_weight"] = s.float().reshape([1] * (len(shape) - 1))
            quantized.append(layer)
        else:
            sd[k] = t.to(torch.bfloat16)
    sd["scaled_fp8"] = torch.zeros((), dtype=torch.bfloat16)
    return sd, quantized


@pytest.fixture(scope="module")
def kijai(tmp_path_factory):
    sd, quantized = _kijai_animate()
    return sd, quantized, syn.save(sd, tmp_path_factory.mktemp("kijai") / "animate_fp8.safetensors")


def test_non_linear_layers_dequantized_exactly_and_listed(kijai):
    sd, quantized, path = kijai
    m = load_canonical(path)
    assert not m.report.errors and m.report.variant.startswith("Wan2.2-Animate")
    non_linear = [l for l in quantized if l.startswith(("motion_encoder.", "face_encoder.conv"))]
    assert len(non_linear) == 32  # the count: 26 convolutions + 5 EqualLinear + Direction
    assert sorted(d.split(" ")[0] for d in m.report.dequantized) == sorted(non_linear)
    for layer in non_linear:
        assert m.layers[layer].format == "fp32"
        assert f"{layer}.comfy_quant" not in m.entries and f"{layer}.weight_scale" not in m.entries
        w = m.entries[f"{layer}.weight"]
        assert w.dtype == torch.float32 and w.shape == tuple(sd[f"{layer}.weight"].shape)
        q, s = sd[f"{layer}.weight"], sd[f"{layer}.scale_weight"]
        got = w.load()
        assert torch.equal(got, q.float() * s.reshape(()))  # the producer's reload formula, bit for bit
        torch.testing.assert_close(got.double(), ref_fp8(q, s.reshape(())), rtol=2**-23, atol=0)
    # Linear layers stay fp8 in ComfyUI's own representation
    for layer in ("face_encoder.out_proj", "blocks.0.self_attn.q", "blocks.9.ffn.2"):
        assert m.layers[layer].format == "float8_e4m3fn"
        assert parse_comfy_quant(m.entries[f"{layer}.comfy_quant"].load())["format"] == "float8_e4m3fn"


def test_convert_writes_no_comfy_quant_for_non_linear_layers(kijai, tmp_path):
    from safetensors import safe_open

    _, quantized, path = kijai
    out = tmp_path / "out.safetensors"
    res = convert(path, out)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        cq = [k for k in keys if k.endswith(".comfy_quant")]
        assert all(not k.startswith(("motion_encoder.", "face_encoder.conv")) for k in cq)
        assert f.get_tensor("motion_encoder.enc.net_app.convs.3.conv2.1.weight").dtype == torch.float32
    assert len(cq) == len(quantized) - 32
    assert len(res.report.dequantized) == 32


def test_animate_from_diffusers_keys_gets_the_blur_kernels(tmp_path):
    """Every native parameter and buffer of ComfyUI's AnimateWanModel is present after loading a
    diffusers-keyed Animate file, the 14 blur kernels included, with the upstream value
    (StyleGAN2 ``make_kernel``: outer([1,3,3,1], [1,3,3,1]) normalised to sum 1)."""
    data = json.loads(DATA.read_text())
    g = torch.Generator().manual_seed(4)
    sd = {k: (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16) for k, shape in data["diffusers"].items()}
    m = load_canonical(syn.save(sd, tmp_path / "animate_diffusers.safetensors"))
    assert m.report.key_style == "diffusers" and not m.report.errors
    assert set(m.entries) == set(data["native"])
    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    want = torch.outer(k1, k1) / torch.outer(k1, k1).sum()
    kernels = [k for k in data["native"] if k.endswith(".kernel")]
    assert len(kernels) == 14
    for k in kernels:
        t = m.entries[k].load()
        assert t.dtype == torch.float32 and torch.equal(t.double(), want)
    assert any("14 constant motion-encoder blur kernels" in n for n in m.report.notes)
