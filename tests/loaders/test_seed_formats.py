"""Every seed format, built with its producer's recipe, is detected per layer and reaches the
canonical form bit-exactly (fp8 payloads) with values equal to the producer's reload formula."""

import json

import pytest
import torch
from fixtures import bits, ref_fp4_g32, ref_fp8, ref_mxfp8, ref_nvfp4, syn, tiny_wan

from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.synthetic import quantizable_linears


def _cq(model, layer):
    return json.loads(model.entries[f"{layer}.comfy_quant"].load().numpy().tobytes())


def _check_fp8_layers(model, src_sd, scale_key_of, fmt="float8_e4m3fn"):
    """Canonical payload is the source's bytes; canonical scale is the source scale as fp32."""
    checked = 0
    for layer, info in model.layers.items():
        if info.format != fmt:
            continue
        w = model.entries[f"{layer}.weight"].load()
        s = model.entries[f"{layer}.weight_scale"].load()
        src_w = src_sd[f"{layer}.weight"]
        src_s = src_sd[scale_key_of(layer)]
        assert torch.equal(bits(w), bits(src_w)), layer
        assert s.dtype == torch.float32 and s.shape == ()
        assert s.item() == src_s.float().item(), layer
        assert torch.equal(w.to(torch.float64) * s.double(), ref_fp8(src_w, src_s.float())), layer
        assert _cq(model, layer)["format"] == fmt
        checked += 1
    return checked


def test_vista4d_sharded_sibling_scale(tmp_path):
    """Seed 000: sharded index, '<key>.weight.scale_weight' fp32, no marker, only block Linears."""
    sd = syn.vista4d_extras(tiny_wan(), 256, 2)
    q = syn.vista4d_fp8(sd)
    idx = syn.save_sharded(q, tmp_path / "384p49_step=30000-fp8", shards=2)
    (tmp_path / "384p49_step=30000-fp8" / "config.yaml").write_text("dit:\n  positional_embedding_offset: 31\n")
    m = load_canonical(idx.parent)  # the folder works as well as the index
    assert m.report.container == "sharded"
    expected_fp8 = [k[:-7] for k, t in q.items() if t.dtype == torch.float8_e4m3fn]
    assert m.report.formats["float8_e4m3fn"] == len(expected_fp8) == 2 * (8 + 2 + 1)
    assert _check_fp8_layers(m, q, lambda l: f"{l}.weight.scale_weight") == len(expected_fp8)
    assert "weight.scale_weight (sibling scale, Vista4D)" in m.report.spellings
    assert "vista4d" in m.report.extras
    assert "blocks.0.cam_encoder" in m.report.extras["vista4d"]
    assert m.entries["blocks.0.cam_encoder.weight"].shape == (256, 6)


def test_vista4d_layer_level_scale_spelling(tmp_path):
    q = syn.vista4d_fp8(tiny_wan(), layer_level=True)
    p = syn.save(q, tmp_path / "dit.safetensors")
    m = load_canonical(p)
    assert _check_fp8_layers(m, q, lambda l: f"{l}.scale_weight") == 2 * 10


@pytest.mark.parametrize("keys", ["native", "diffusers"])
def test_kijai_scaled_fp8_with_marker(tmp_path, keys):
    """Seed 001 / kijai: '.scale_weight' (bf16 for WorldStereo), 'scaled_fp8' marker; diffusers keys."""
    native = tiny_wan(i2v=True, in_dim=36)
    q_native = syn.kijai_scaled_fp8(native, scale_dtype=torch.bfloat16)
    src = syn.kijai_scaled_fp8(syn.to_diffusers(native), scale_dtype=torch.bfloat16) if keys == "diffusers" else q_native
    p = syn.save(src, tmp_path / "ws.safetensors")
    m = load_canonical(p)
    assert m.report.key_style == keys
    assert "scaled_fp8" not in m.entries
    if keys == "diffusers":
        # text_embedder is not excluded by the recipe's keywords in diffusers spelling: it is fp8
        assert m.layers["text_embedding.0"].format == "float8_e4m3fn"
        assert m.layers["img_emb.proj.1"].format == "float8_e4m3fn"  # image_embedder.ff.net.0.proj
        assert m.layers["blocks.0.cross_attn.k_img"].format == "bf16"  # add_k_proj: "add" excluded
        from wanquant.loaders.keymap import diffusers_to_native
        mapped = {diffusers_to_native(k)[0]: v for k, v in src.items()}
        n = _check_fp8_layers(m, mapped, lambda l: f"{l}.scale_weight")
    else:
        assert m.layers["text_embedding.0"].format == "bf16"
        n = _check_fp8_layers(m, q_native, lambda l: f"{l}.scale_weight")
    assert n == m.report.formats["float8_e4m3fn"] > 0
    assert m.report.scale_dtypes["float8_e4m3fn: bfloat16"] == n


def test_kijai_two_element_marker_disables_fp8_matmul(tmp_path):
    q = syn.kijai_scaled_fp8(tiny_wan(), scale_dtype=torch.float32, marker="two")
    m = load_canonical(syn.save(q, tmp_path / "a.safetensors"))
    assert _cq(m, "blocks.0.self_attn.q") == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}


def test_scale_input_kept_unless_placeholder(tmp_path):
    q = syn.kijai_scaled_fp8(tiny_wan(), scale_dtype=torch.float32, marker="empty", with_input_scale=True)
    q["blocks.1.ffn.0.scale_input"] = torch.tensor(0.25)
    m = load_canonical(syn.save(q, tmp_path / "a.safetensors"))
    assert "blocks.0.ffn.0.input_scale" not in m.entries  # 1.0 placeholder dropped (as ComfyUI does)
    assert m.entries["blocks.1.ffn.0.input_scale"].load().item() == 0.25


def test_magihuman_fp8_scale_sharded_index_metadata(tmp_path):
    """Seed 002: '<param>.__fp8_scale' fp32 0-d; index metadata names the quantization."""
    sd = tiny_wan()
    q = syn.magihuman_fp8(sd, min_numel=100_000)
    idx = syn.save_sharded(q, tmp_path / "distill_fp8", name="model", shards=3,
                           index_metadata={"quantization": "fp8_e4m3fn_per_tensor"})
    m = load_canonical(idx)
    quantized = [k for k, t in q.items() if t.dtype == torch.float8_e4m3fn]
    assert {k[:-7] for k in quantized} == {l for l, i in m.layers.items() if i.format == "float8_e4m3fn"}
    assert _check_fp8_layers(m, q, lambda l: f"{l}.weight.__fp8_scale") == len(quantized)
    assert any("fp8_e4m3fn_per_tensor" in n for n in m.report.notes)


def test_weight_scale_without_comfy_quant_and_unscaled_fp8(tmp_path):
    sd = tiny_wan()
    q = dict(sd)
    w, s = syn.fp8_quantize(sd["blocks.0.ffn.0.weight"])
    q["blocks.0.ffn.0.weight"], q["blocks.0.ffn.0.weight_scale"] = w, s
    q["blocks.0.ffn.2.weight"] = sd["blocks.0.ffn.2.weight"].to(torch.float8_e5m2)  # unscaled e5m2
    q["blocks.1.ffn.2.weight"] = sd["blocks.1.ffn.2.weight"].to(torch.float8_e4m3fn)  # unscaled e4m3
    m = load_canonical(syn.save(q, tmp_path / "a.safetensors"))
    assert m.layers["blocks.0.ffn.0"].spelling.startswith("weight_scale without comfy_quant")
    assert m.entries["blocks.0.ffn.0.weight_scale"].load().item() == s.item()
    assert m.layers["blocks.0.ffn.2"].format == "float8_e5m2"
    assert _cq(m, "blocks.0.ffn.2") == {"format": "float8_e5m2"}
    assert m.entries["blocks.0.ffn.2.weight_scale"].load().item() == 1.0
    assert torch.equal(bits(m.entries["blocks.0.ffn.2.weight"].load()), bits(q["blocks.0.ffn.2.weight"]))
    assert m.report.formats == {**m.report.formats, "float8_e5m2": 1, "float8_e4m3fn": 2}


@pytest.mark.parametrize("header", [False, True])
def test_comfy_native_nvfp4_mxfp8_bf16_mix(tmp_path, header):
    """Seed 003: per-layer mix of nvfp4, mxfp8, fp8 and bf16 (comfy_quant tensors or header)."""
    sd = tiny_wan(i2v=True, in_dim=36)
    layers = quantizable_linears(sd)
    fmts = {}
    for i, l in enumerate(layers):
        if l.startswith("blocks."):
            fmts[l] = ("nvfp4", "mxfp8", "float8_e4m3fn", None)[i % 4]
    q, meta = syn.comfy_native(sd, {k: v for k, v in fmts.items() if v}, header_metadata=header)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in q.items()}
    m = load_canonical(syn.save(prefixed, tmp_path / "mix.safetensors", metadata=meta))
    assert m.report.prefix == "model.diffusion_model."
    for l, f in fmts.items():
        assert m.layers[l].format == (f or "bf16"), l
        if not f:
            continue
        assert _cq(m, l)["format"] == f
        t = {s: m.entries[f"{l}.{s}"].load() for s in ("weight", "weight_scale", "weight_scale_2")
             if f"{l}.{s}" in m.entries}
        orig = tuple(sd[f"{l}.weight"].shape)
        if f == "nvfp4":
            assert torch.equal(bits(t["weight"]), bits(q[f"{l}.weight"]))
            got = ref_nvfp4(t["weight"], t["weight_scale"], t["weight_scale_2"], orig)
            want = ref_nvfp4(q[f"{l}.weight"], q[f"{l}.weight_scale"], q[f"{l}.weight_scale_2"], orig)
            assert torch.equal(got, want)
            # and the producer's quantization is faithful (sanity of the fixture itself)
            ref = sd[f"{l}.weight"].double()
            assert (got - ref).norm() / ref.norm() < 0.15
        elif f == "mxfp8":
            assert torch.equal(bits(t["weight"]), bits(q[f"{l}.weight"]))
            got = ref_mxfp8(t["weight"], t["weight_scale"], orig)
            ref = sd[f"{l}.weight"].double()
            assert (got - ref).norm() / ref.norm() < 0.05
    assert m.report.formats["nvfp4"] > 0 and m.report.formats["mxfp8"] > 0


@pytest.mark.parametrize("order,config", [("low_first", None), ("high_first", "high_nibble_first"),
                                          ("low_first", "low_nibble_first")])
def test_fp4_g32_diffusers_with_quantize_config(tmp_path, order, config):
    """Seed 004: uint8 [out, in/2] + float scale [out, in/32], diffusers keys, quantize_config.json."""
    sd = tiny_wan()
    layers = [l for l in quantizable_linears(sd) if l.startswith("blocks.")]
    q = syn.fp4_g32(sd, layers, order=order)
    folder = tmp_path / "Wan2.2-Animate-14B-FP4"
    syn.save(syn.to_diffusers(q), folder / "quantized_transformer.safetensors")
    if config:
        (folder / "quantize_config.json").write_text(json.dumps({"group_size": 32, "packing": config}))
    m = load_canonical(folder)
    assert m.report.key_style == "diffusers"
    assert m.report.formats["fp4_g32"] == len(layers)
    assert m.report.nibble_order.startswith(order)
    for l in layers:
        w = m.entries[f"{l}.weight"].load()
        s = m.entries[f"{l}.weight_scale"].load()
        # the release's bf16 group scales are kept as they are (an fp32 copy costs ~1 GB at 14B)
        assert s.dtype == q[f"{l}.weight_scale"].dtype == torch.bfloat16
        assert torch.equal(s, q[f"{l}.weight_scale"])
        # canonical is high-nibble-first: decode it that way, compare with the producer's order
        got = ref_fp4_g32(w, s, "high_first")
        want = ref_fp4_g32(q[f"{l}.weight"], q[f"{l}.weight_scale"], order)
        assert torch.equal(got, want), l
        assert _cq(m, l) == {"format": "fp4_g32", "group_size": 32}


def test_fp4_g32_weight_packed_spelling_and_override(tmp_path):
    sd = tiny_wan()
    q = syn.fp4_g32(sd, ["blocks.0.ffn.0"], order="high_first", key_suffix="weight_packed")
    p = syn.save(q, tmp_path / "a.safetensors")
    m = load_canonical(p, nibble_order="high_first")
    w = m.entries["blocks.0.ffn.0.weight"].load()
    assert torch.equal(w, q["blocks.0.ffn.0.weight_packed"])
    assert "override" in m.report.nibble_order


def test_pth_weights_only(tmp_path):
    sd = syn.vista4d_extras(tiny_wan(dtype=torch.float16), 256, 2, dtype=torch.float16)
    torch.save(sd, tmp_path / "dit.pth")
    m = load_canonical(tmp_path / "dit.pth")
    assert m.report.container == "pth"
    assert m.report.formats["fp16"] > 0
    assert torch.equal(m.entries["blocks.1.projector.weight"].load(), sd["blocks.1.projector.weight"])


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model.", "model.", "transformer."])
def test_prefixes_stripped(tmp_path, prefix):
    sd = {prefix + k: v for k, v in syn.kijai_scaled_fp8(tiny_wan(), scale_dtype=torch.float32).items()}
    m = load_canonical(syn.save(sd, tmp_path / "a.safetensors"))
    assert "head.modulation" in m.entries and "blocks.0.self_attn.q.weight" in m.entries
    assert m.report.prefix == prefix
    # recipe: block q/k/v/o x2 + ffn.0/ffn.2 (10 per block) and head.head; embeddings/time excluded
    assert m.report.formats["float8_e4m3fn"] == 2 * 10 + 1


def test_canonical_fp4_g32_file_reloads_without_double_swap(tmp_path):
    """A file written in canonical form (comfy_quant fp4_g32, high-nibble-first) reads back as is,
    even though the default order for *unmarked* FP4 files is low-nibble-first."""
    from wanquant.loaders.writer import write_safetensors

    sd = tiny_wan()
    q = syn.fp4_g32(sd, ["blocks.0.ffn.0", "blocks.1.self_attn.q"], order="low_first")
    first = load_canonical(syn.save(q, tmp_path / "src.safetensors"))
    out = tmp_path / "canonical.safetensors"
    write_safetensors(out, [(e.key, e.shape, e.dtype, e.load) for e in first.entries.values()])
    again = load_canonical(out)
    assert again.layers["blocks.0.ffn.0"].format == "fp4_g32"
    assert again.layers["blocks.0.ffn.0"].spelling.startswith("comfy_quant")
    for l in ("blocks.0.ffn.0", "blocks.1.self_attn.q"):
        assert torch.equal(again.entries[f"{l}.weight"].load(), first.entries[f"{l}.weight"].load())
        got = ref_fp4_g32(again.entries[f"{l}.weight"].load(), again.entries[f"{l}.weight_scale"].load(), "high_first")
        assert torch.equal(got, ref_fp4_g32(q[f"{l}.weight"], q[f"{l}.weight_scale"], "low_first"))


def test_magihuman_non_wan_keys_inspect_and_convert(tmp_path, capsys):
    """MagiHuman is not a Wan architecture: its __fp8_scale format is still read, reported and
    converted (bit-exact payload), and the verdict says it will not run as Wan."""
    from wanquant.cli import main as cli_main
    from wanquant.loaders.convert import convert

    g = torch.Generator().manual_seed(2)
    sd = {}
    for i in range(2):
        sd[f"block.layers.{i}.attention.linear_qkv.weight"] = torch.randn(1536, 512, generator=g).bfloat16()
        sd[f"block.layers.{i}.mlp.up_gate_proj.weight"] = torch.randn(2048, 512, generator=g).bfloat16()
        sd[f"block.layers.{i}.attention.pre_norm.weight"] = torch.ones(512).bfloat16()
    sd["adapter.video_embedder.weight"] = torch.randn(512, 192, generator=g).bfloat16()
    q = syn.magihuman_fp8(sd, min_numel=500_000)
    p = syn.save(q, tmp_path / "magi.safetensors")
    assert cli_main(["inspect", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "non-wan" and out["formats"]["float8_e4m3fn"] == 4
    assert "not a Wan DiT" in out["verdict"]
    res = convert(p, tmp_path / "magi_native.safetensors")
    back = load_canonical(res.dst)
    k = "block.layers.1.mlp.up_gate_proj"
    assert torch.equal(bits(back.entries[f"{k}.weight"].load()), bits(q[f"{k}.weight"]))
    assert back.entries[f"{k}.weight_scale"].load().item() == q[f"{k}.weight.__fp8_scale"].item()
