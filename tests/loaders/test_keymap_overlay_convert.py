"""Key maps (hand-checked pairs and round trips), partial-finetune overlay, conversion to
ComfyUI's native file, and the CLI's inspect JSON contract."""

import json

import pytest
import torch
from fixtures import bits, ref_fp4_g32, syn, tiny_wan

from wanquant.cli import main as cli_main
from wanquant.loaders import keymap
from wanquant.loaders.canonical import load_canonical, overlay
from wanquant.loaders.containers import read_safetensors_header
from wanquant.loaders.convert import convert

# Written from FORMATS.md's table, not from keymap.py
HAND_PAIRS = [
    ("blocks.3.attn1.to_q.weight", "blocks.3.self_attn.q.weight"),
    ("blocks.3.attn1.to_out.0.bias", "blocks.3.self_attn.o.bias"),
    ("blocks.3.attn2.norm_k.weight", "blocks.3.cross_attn.norm_k.weight"),
    ("blocks.3.attn2.add_k_proj.scale_weight", "blocks.3.cross_attn.k_img.scale_weight"),
    ("blocks.3.attn2.norm_added_k.weight", "blocks.3.cross_attn.norm_k_img.weight"),
    ("blocks.3.ffn.net.0.proj.weight_scale", "blocks.3.ffn.0.weight_scale"),
    ("blocks.3.ffn.net.2.comfy_quant", "blocks.3.ffn.2.comfy_quant"),
    ("blocks.3.norm2.weight", "blocks.3.norm3.weight"),
    ("blocks.3.norm3.weight", "blocks.3.norm2.weight"),
    ("blocks.3.scale_shift_table", "blocks.3.modulation"),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.weight", "head.head.weight"),
    ("condition_embedder.time_proj.weight", "time_projection.1.weight"),
    ("condition_embedder.text_embedder.linear_2.bias", "text_embedding.2.bias"),
    ("condition_embedder.image_embedder.norm2.weight", "img_emb.proj.4.weight"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("controlnet.proj_out.0.weight", "controlnet.proj_out.0.weight"),
    ("controlnet.controlnet_blocks.0.norm2.weight", "controlnet.controlnet_blocks.0.norm2.weight"),
]


@pytest.mark.parametrize("diffusers,native", HAND_PAIRS)
def test_diffusers_native_pairs(diffusers, native):
    assert keymap.map_diffusers_key(diffusers)[0] == native
    assert keymap.native_to_diffusers(native)[0] == diffusers


def test_round_trip_every_tiny_key():
    for kw in ({}, {"i2v": True, "in_dim": 36}):
        sd = tiny_wan(**kw)
        d = syn.to_diffusers(sd)
        assert len(d) == len(sd)
        assert {keymap.map_diffusers_key(k)[0] for k in d} == set(sd)


def test_worldstereo_controlnet_branch_kept(tmp_path):
    native = tiny_wan(i2v=True, in_dim=36)
    d = syn.to_diffusers(native)
    g = torch.Generator().manual_seed(3)
    d["controlnet.controlnet_patch_embedding.weight"] = torch.randn(256, 36, 1, 2, 2, generator=g).bfloat16()
    for i in range(2):
        d[f"controlnet.controlnet_blocks.{i}.self_attn.to_q.weight"] = torch.randn(256, 256, generator=g).bfloat16()
        d[f"controlnet.proj_out.{i}.weight"] = torch.randn(256, 256, generator=g).bfloat16()
    q = syn.kijai_scaled_fp8(d)
    m = load_canonical(syn.save(q, tmp_path / "worldstereo.safetensors"))
    assert m.report.key_style == "diffusers"
    assert "WorldStereo" in m.report.variant
    assert "controlnet.proj_out.0" in m.report.extras["worldstereo_controlnet"]
    assert m.layers["controlnet.proj_out.0"].format == "float8_e4m3fn"  # branch Linears are fp8 too
    assert "head.head.weight" in m.entries and "controlnet.proj_out.0.weight" in m.entries
    assert not m.report.unrecognised


def test_recammaster_cam_encoder_told_apart(tmp_path):
    sd = syn.vista4d_extras(tiny_wan(), 256, 2, cam_in=12)
    m = load_canonical(syn.save(sd, tmp_path / "a.safetensors"))
    assert "recammaster_cam_encoder" in m.report.extras and "vista4d" in m.report.extras
    assert "blocks.0.cam_encoder" not in m.report.extras["vista4d"]


def _partial_vista4d(tmp_path):
    """Vista4D-style partial finetune: self-attention + new modules only, fp8 sibling scales."""
    ft = syn.vista4d_extras(tiny_wan(seed=7), 256, 2)
    keep = {k: v for k, v in ft.items() if ".self_attn." in k or "cam_encoder" in k or "projector" in k
            or k.startswith("latent_encoder.")}
    idx = syn.save_sharded(syn.vista4d_fp8(keep), tmp_path / "vista4d-fp8", shards=1)
    base = syn.save(syn.kijai_scaled_fp8(tiny_wan(seed=1), scale_dtype=torch.float32), tmp_path / "wan_t2v.safetensors")
    return idx, base, keep


def test_partial_reports_missing_and_overlay_completes(tmp_path):
    idx, base, keep = _partial_vista4d(tmp_path)
    part = load_canonical(idx)
    assert part.report.missing and part.report.needs_base
    assert any(m.startswith("blocks.*.cross_attn.q") for m in part.report.missing)
    assert "needs its base model" in part.report.verdict()
    full = overlay(part, load_canonical(base))
    assert not full.report.missing
    # finetune wins per layer: weights and scales of self_attn come from the finetune
    w = full.entries["blocks.0.self_attn.q.weight"].load()
    assert torch.equal(bits(w), bits(part.entries["blocks.0.self_attn.q.weight"].load()))
    s = full.entries["blocks.0.self_attn.q.weight_scale"].load()
    assert s.item() == part.entries["blocks.0.self_attn.q.weight_scale"].load().item()
    # the base fills the rest
    b = load_canonical(base)
    assert torch.equal(bits(full.entries["blocks.1.ffn.0.weight"].load()), bits(b.entries["blocks.1.ffn.0.weight"].load()))
    assert "blocks.0.cam_encoder.weight" in full.entries


def test_overlay_drops_stale_side_tensors_when_formats_differ(tmp_path):
    base_sd, meta = syn.comfy_native(tiny_wan(seed=1), "nvfp4")
    base = syn.save(base_sd, tmp_path / "base.safetensors")
    ft = {k: v for k, v in tiny_wan(seed=2).items() if k.startswith("blocks.0.self_attn.q.")}  # bf16 finetune
    part = syn.save(ft, tmp_path / "ft.safetensors")
    full = overlay(load_canonical(part), load_canonical(base))
    assert full.entries["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    assert "blocks.0.self_attn.q.weight_scale_2" not in full.entries
    assert "blocks.0.self_attn.q.comfy_quant" not in full.entries
    assert "blocks.0.self_attn.k.comfy_quant" in full.entries


def test_convert_overlay_writes_native_file(tmp_path):
    idx, base, _ = _partial_vista4d(tmp_path)
    dst = tmp_path / "out" / "vista4d_full.safetensors"
    dst.parent.mkdir()
    res = convert(idx, dst, base=base)
    header, meta, _ = read_safetensors_header(dst)
    assert "blocks.0.self_attn.q.comfy_quant" in header and "scaled_fp8" not in header
    assert not any(k.endswith((".scale_weight", ".__fp8_scale")) for k in header)
    assert "latent_encoder.source_patch_embedding.rgb_patchify.patch_embedding.weight" in header
    back = load_canonical(dst)
    assert not back.report.missing and back.report.formats["float8_e4m3fn"] == res.report.formats["float8_e4m3fn"]
    assert "wanquant" in meta


@pytest.mark.parametrize("to,tol", [("bf16", 0.01), ("float8_e4m3fn", 0.08), ("nvfp4", 0.2)])
def test_convert_fp4_to_stock_formats(tmp_path, to, tol):
    pytest.importorskip("wanquant.ops.formats.fp4_g32")
    sd = tiny_wan()
    layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]
    q = syn.fp4_g32(sd, layers, order="low_first")
    src = syn.save(syn.to_diffusers(q), tmp_path / "fp4" / "quantized_transformer.safetensors")
    dst = tmp_path / f"to_{to}.safetensors"
    res = convert(src, dst, to=to)
    assert set(res.fp4_errors) == set(layers)
    back = load_canonical(dst)
    assert back.report.formats.get("fp4_g32", 0) == 0
    assert back.report.formats[to] >= len(layers)
    l = layers[0]
    want = ref_fp4_g32(q[f"{l}.weight"], q[f"{l}.weight_scale"], "low_first")
    from wanquant.ops.formats import get_format, parse_comfy_quant
    ent = {s.rsplit(".", 1)[1]: e.load() for s, e in back.entries.items() if s.rsplit(".", 1)[0] == l}
    if to == "bf16":
        got = ent["weight"].double()
    else:
        got = get_format(to).dequantize(ent, torch.float64 if to != "nvfp4" else torch.float32,
                                        parse_comfy_quant(ent["comfy_quant"])).double()
    rel = float((got - want).norm() / want.norm())
    assert rel < tol
    assert abs(rel - res.fp4_errors[l]) < 1e-3  # the reported error is the real one


def test_inspect_json_contract(tmp_path, capsys):
    p = syn.save(syn.kijai_scaled_fp8(syn.to_diffusers(tiny_wan())), tmp_path / "a.safetensors")
    assert cli_main(["inspect", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("container", "key_style", "family", "formats", "missing", "warnings"):
        assert key in out
    assert out["container"] == "safetensors" and out["key_style"] == "diffusers" and out["family"] == "wan"
    # diffusers spelling: text_embedder.linear_1/2 escape the recipe's "text_embedding" keyword, so
    # 2 x 10 block Linears + proj_out + 2 text Linears are fp8; bf16: patch, 2 time, time_proj,
    # and per block norm_q/norm_k x 2 attentions + norm3
    assert out["formats"] == {"float8_e4m3fn": 23, "bf16": 4 + 2 * 5}
    assert out["missing"] == [] and out["warnings"] == []


def test_cli_without_arguments_runs_the_example(capsys):
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    assert "verdict: loadable" in out and "wrote" in out and "diffusers" in out


def test_inspect_text_lists_unrecognised_keys(tmp_path, capsys):
    d = syn.to_diffusers(tiny_wan())
    d["condition_embedder.mystery_embedder.linear_1.weight"] = torch.zeros(4, 4)
    p = syn.save(d, tmp_path / "a.safetensors")
    assert cli_main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "unrecognised keys (kept under their own names): condition_embedder.mystery_embedder.linear_1.weight" in out


@pytest.mark.parametrize("to", ["float8_e4m3fn", "nvfp4"])
@pytest.mark.parametrize("n,k", [(256, 512), (40, 96), (130, 32)])
def test_planned_fp4_target_layout_matches_the_encoder(to, n, k):
    """convert plans header shapes without quantizing; they must be what the encoder produces."""
    from wanquant.loaders.convert import _target_layout
    from wanquant.ops.formats import get_format

    layout, conf = _target_layout(to, n, k)
    tensors, got_conf = get_format(to).quantize(torch.randn(n, k))
    assert got_conf == conf
    assert {s: (tuple(t.shape), t.dtype) for s, t in tensors.items()} == layout
