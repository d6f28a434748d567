"""Animate's diffusers face_adapter to_k/to_v become native fused linear1_kv rows (k then v):
exact for plain and FP4 group-32 (row-wise scales), dequantized to fp32 for per-tensor fp8."""

import torch
from fixtures import ref_fp4_g32, ref_fp8, syn, tiny_wan

from wanquant.loaders.canonical import load_canonical

KV = "face_adapter.fuser_blocks.0.linear1_kv"


def _animate_like(dtype=torch.bfloat16):
    sd = syn.to_diffusers(tiny_wan())
    g = torch.Generator().manual_seed(5)
    for name in ("to_q", "to_k", "to_v", "to_out"):
        sd[f"face_adapter.0.{name}.weight"] = (torch.randn(256, 256, generator=g) / 16).to(dtype)
        sd[f"face_adapter.0.{name}.bias"] = (torch.randn(256, generator=g) / 16).to(dtype)
    sd["face_adapter.0.norm_k.weight"] = torch.ones(128, dtype=dtype)
    sd["motion_encoder.conv_in.act_fn.bias"] = torch.randn(32, generator=g).to(dtype)
    return sd


def test_plain_kv_fused_in_order_and_bias_reshaped(tmp_path):
    sd = _animate_like()
    m = load_canonical(syn.save(sd, tmp_path / "a.safetensors"))
    w = m.entries[f"{KV}.weight"].load()
    assert torch.equal(w, torch.cat([sd["face_adapter.0.to_k.weight"], sd["face_adapter.0.to_v.weight"]]))
    assert torch.equal(m.entries[f"{KV}.bias"].load(),
                       torch.cat([sd["face_adapter.0.to_k.bias"], sd["face_adapter.0.to_v.bias"]]))
    assert "face_adapter.fuser_blocks.0.linear1_q.weight" in m.entries
    b = m.entries["motion_encoder.enc.net_app.convs.0.1.bias"]
    assert b.shape == (1, 32, 1, 1) and torch.equal(b.load().reshape(-1), sd["motion_encoder.conv_in.act_fn.bias"])
    assert not m.report.unrecognised and not m.report.errors


def test_fp4_kv_fused_exactly(tmp_path):
    sd = _animate_like()
    q = syn.fp4_g32(sd, ["face_adapter.0.to_k", "face_adapter.0.to_v"], order="low_first")
    m = load_canonical(syn.save(q, tmp_path / "a.safetensors"))
    assert m.layers[KV].format == "fp4_g32"
    got = ref_fp4_g32(m.entries[f"{KV}.weight"].load(), m.entries[f"{KV}.weight_scale"].load(), "high_first")
    want = torch.cat([ref_fp4_g32(q[f"face_adapter.0.{p}.weight"], q[f"face_adapter.0.{p}.weight_scale"], "low_first")
                      for p in ("to_k", "to_v")])
    assert torch.equal(got, want)


def test_fp8_kv_with_separate_scales_dequantized(tmp_path):
    sd = _animate_like()
    q = dict(sd)
    for p in ("to_k", "to_v"):
        w, s = syn.fp8_quantize(sd[f"face_adapter.0.{p}.weight"] * (3.0 if p == "to_v" else 1.0))
        q[f"face_adapter.0.{p}.weight"], q[f"face_adapter.0.{p}.scale_weight"] = w, s
    m = load_canonical(syn.save(q, tmp_path / "a.safetensors"))
    assert m.layers[KV].format == "fp32"
    got = m.entries[f"{KV}.weight"].load().double()
    want = torch.cat([ref_fp8(q[f"face_adapter.0.{p}.weight"], q[f"face_adapter.0.{p}.scale_weight"])
                      for p in ("to_k", "to_v")])
    assert torch.allclose(got, want, rtol=1e-7, atol=0)
    assert any("linear1_kv in fp32" in n for n in m.report.notes)
