"""LoRA key mapping, the match report and bad input (lora/keys.py).

One logical LoRA is written in every spelling seen in the field and must resolve to the same
patches on native Wan keys; the expected native names are written out by hand here, not derived
from the code under test.
"""

import math

import pytest
import torch
from safetensors.torch import save_file

from wanquant.errors import WanquantError
from wanquant.lora.keys import (STYLES, match_lora, parse_lora, read_lora, render_lora, split_key,
                                   underscore_to_native)

DIM, FFN = 32, 64


def _model_shapes(i2v=False, blocks=2, dim=DIM):
    """The native parameter shapes of a tiny Wan model (hand-written names)."""
    s = {}
    for b in range(blocks):
        for a in ("self_attn", "cross_attn"):
            for m in "qkvo":
                s[f"blocks.{b}.{a}.{m}.weight"] = (dim, dim)
                s[f"blocks.{b}.{a}.{m}.bias"] = (dim,)
            s[f"blocks.{b}.{a}.norm_q.weight"] = (dim,)
            s[f"blocks.{b}.{a}.norm_k.weight"] = (dim,)
        if i2v:
            for m in ("k_img", "v_img"):
                s[f"blocks.{b}.cross_attn.{m}.weight"] = (dim, dim)
                s[f"blocks.{b}.cross_attn.{m}.bias"] = (dim,)
        s[f"blocks.{b}.norm3.weight"] = (dim,)
        s[f"blocks.{b}.norm3.bias"] = (dim,)
        s[f"blocks.{b}.ffn.0.weight"] = (FFN, dim)
        s[f"blocks.{b}.ffn.0.bias"] = (FFN,)
        s[f"blocks.{b}.ffn.2.weight"] = (dim, FFN)
        s[f"blocks.{b}.ffn.2.bias"] = (dim,)
        s[f"blocks.{b}.modulation"] = (1, 6, dim)
    s["head.head.weight"] = (64, dim)
    s["head.head.bias"] = (64,)
    s["head.modulation"] = (1, 2, dim)
    s["patch_embedding.weight"] = (dim, 16, 1, 2, 2)
    return s


def _definition(alpha=2.0, seed=0, i2v=False, rank=4, dim=DIM):
    g = torch.Generator().manual_seed(seed)

    def lo(o, i):
        return {"up": torch.randn(o, rank, generator=g), "down": torch.randn(rank, i, generator=g), "alpha": alpha}

    d = {
        "blocks.0.self_attn.q": {**lo(dim, dim), "diff_b": torch.randn(dim, generator=g)},
        "blocks.1.cross_attn.o": lo(dim, dim),
        "blocks.0.ffn.0": lo(FFN, dim),
        "blocks.1.ffn.2": lo(dim, FFN),
        "head.head": lo(64, dim),
        "blocks.0.norm3": {"diff": torch.randn(dim, generator=g), "diff_b": torch.randn(dim, generator=g)},
        "blocks.1.modulation": {"diff": torch.randn(1, 6, dim, generator=g)},
    }
    if i2v:
        d["blocks.0.cross_attn.k_img"] = lo(dim, dim)
        d["blocks.1.cross_attn.v_img"] = lo(dim, dim)
    return d


# The targets every spelling of _definition() must produce (written by hand).
EXPECTED = {
    ("blocks.0.self_attn.q.weight", "lora"), ("blocks.0.self_attn.q.bias", "diff"),
    ("blocks.1.cross_attn.o.weight", "lora"), ("blocks.0.ffn.0.weight", "lora"), ("blocks.1.ffn.2.weight", "lora"),
    ("head.head.weight", "lora"), ("blocks.0.norm3.weight", "diff"), ("blocks.0.norm3.bias", "diff"),
    ("blocks.1.modulation", "diff"),
}


@pytest.mark.parametrize("style", STYLES)
def test_every_spelling_resolves_to_the_same_native_patches(style):
    d = _definition(alpha=None if style == "error_comp" else 2.0)
    lf = parse_lora(render_lora(d, style))
    assert {(p.target, p.kind) for p in lf.patches} == EXPECTED
    assert lf.unmatched == []
    by = {p.target: p for p in lf.patches}
    q = by["blocks.0.self_attn.q.weight"]
    assert q.rank == 4 and q.scale == (1.0 if style == "error_comp" else 0.5)  # alpha 2 / rank 4; none → 1
    assert torch.equal(q.up, d["blocks.0.self_attn.q"]["up"]) and torch.equal(q.down, d["blocks.0.self_attn.q"]["down"])
    assert torch.equal(by["blocks.1.modulation"].diff, d["blocks.1.modulation"]["diff"])
    assert torch.equal(by["blocks.0.norm3.weight"].diff, d["blocks.0.norm3"]["diff"])  # never swapped to norm2
    assert torch.equal(by["blocks.0.self_attn.q.bias"].diff, d["blocks.0.self_attn.q"]["diff_b"])
    m = match_lora(lf, _model_shapes())
    assert len(m.patches) == len(EXPECTED) and m.unmatched == [] and m.warnings == []


def test_lightx2v_spelling_diff_m_alpha_and_scale():
    """The distill LoRA's own keys: diffusion_model. prefix, lora_up/down + alpha, diff, diff_b, diff_m."""
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(DIM, 8, generator=g), torch.randn(8, DIM, generator=g)
    sd = {
        "diffusion_model.blocks.0.self_attn.k.lora_up.weight": up,
        "diffusion_model.blocks.0.self_attn.k.lora_down.weight": down,
        "diffusion_model.blocks.0.self_attn.k.alpha": torch.tensor(2.0),
        "diffusion_model.blocks.0.self_attn.k.diff_b": torch.randn(DIM, generator=g),
        "diffusion_model.blocks.0.cross_attn.norm_k.diff": torch.randn(DIM, generator=g),
        "diffusion_model.blocks.0.diff_m": torch.randn(1, 6, DIM, generator=g),
        "diffusion_model.head.head.diff_b": torch.randn(64, generator=g),
    }
    lf = parse_lora(sd)
    got = {p.target: p for p in lf.patches}
    assert set(got) == {"blocks.0.self_attn.k.weight", "blocks.0.self_attn.k.bias", "blocks.0.cross_attn.norm_k.weight",
                        "blocks.0.modulation", "head.head.bias"}
    k = got["blocks.0.self_attn.k.weight"]
    assert k.scale == 2.0 / 8 and k.alpha == 2.0
    ref = (up.double() @ down.double()) * 0.25
    torch.testing.assert_close(k.delta((DIM, DIM), torch.float64), ref, rtol=1e-12, atol=0)
    assert "ComfyUI native" in lf.style()


def test_peft_lora_b_bias_is_scaled_like_the_product_and_other_suffixes():
    g = torch.Generator().manual_seed(4)
    a, b, bias = torch.randn(2, DIM, generator=g), torch.randn(DIM, 2, generator=g), torch.randn(DIM, generator=g)
    sd = {"transformer.blocks.0.attn1.to_out.0.lora_A.weight": a, "transformer.blocks.0.attn1.to_out.0.lora_B.weight": b,
          "transformer.blocks.0.attn1.to_out.0.lora_B.bias": bias, "transformer.blocks.0.attn1.to_out.0.alpha": torch.tensor(1.0),
          # other suffix spellings ComfyUI knows, on other modules
          "transformer.blocks.1.attn2.to_q.lora_A.default.weight": a, "transformer.blocks.1.attn2.to_q.lora_B.default.weight": b,
          "transformer.blocks.1.attn2.to_k.lora.down.weight": a, "transformer.blocks.1.attn2.to_k.lora.up.weight": b,
          "transformer.blocks.1.ffn.net.2.lora_A": torch.randn(2, FFN, generator=g), "transformer.blocks.1.ffn.net.2.lora_B": b,
          "transformer.proj_out.lora_linear_layer.down.weight": a,
          "transformer.proj_out.lora_linear_layer.up.weight": torch.randn(64, 2, generator=g)}
    lf = parse_lora(sd)
    got = {p.target: p for p in lf.patches}
    assert set(got) == {"blocks.0.self_attn.o.weight", "blocks.0.self_attn.o.bias", "blocks.1.cross_attn.q.weight",
                        "blocks.1.cross_attn.k.weight", "blocks.1.ffn.2.weight", "head.head.weight"}
    torch.testing.assert_close(got["blocks.0.self_attn.o.bias"].delta((DIM,), torch.float64), bias.double() * 0.5)
    assert got["blocks.1.cross_attn.q.weight"].scale == 1.0  # no alpha → 1


def test_split_key_and_underscore_names():
    assert split_key("lora_unet__blocks_3_cross_attn_k.lora_down.weight") == ("blocks_3_cross_attn_k", "down", "lora_unet__")
    assert split_key("model.diffusion_model.blocks.0.ffn.0.alpha") == ("blocks.0.ffn.0", "alpha", "model.diffusion_model.")
    assert split_key("diffusion_model.blocks.7.diff_m") == ("blocks.7", "diff_m", "diffusion_model.")
    assert underscore_to_native("blocks_12_cross_attn_norm_k_img") == "blocks.12.cross_attn.norm_k_img"
    assert underscore_to_native("blocks_0_attn1_to_out_0") == "blocks.0.self_attn.o"
    assert underscore_to_native("time_projection_1") == "time_projection.1"
    assert underscore_to_native("blocks_0_no_such_thing") is None


def test_kohya_name_outside_wan_table_resolves_against_the_models_own_modules():
    """Extra modules (Vista4D projector) have no table entry: the model's names decide."""
    g = torch.Generator().manual_seed(5)
    sd = {"lora_unet_blocks_0_projector.lora_down.weight": torch.randn(2, DIM, generator=g),
          "lora_unet_blocks_0_projector.lora_up.weight": torch.randn(DIM, 2, generator=g),
          "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(2, DIM, generator=g),
          "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(DIM, 2, generator=g)}
    shapes = {**_model_shapes(), "blocks.0.projector.weight": (DIM, DIM)}
    m = match_lora(parse_lora(sd), shapes)
    assert {p.target for p in m.patches} == {"blocks.0.projector.weight", "blocks.0.self_attn.q.weight"}
    m2 = match_lora(parse_lora(sd), _model_shapes())  # no projector in this model
    assert sorted(u[0] for u in m2.unmatched) == ["lora_unet_blocks_0_projector.lora_down.weight",
                                                  "lora_unet_blocks_0_projector.lora_up.weight"]


def test_report_lists_matched_unmatched_and_ranks():
    sd = render_lora(_definition(), "comfy")
    sd["diffusion_model.blocks.0.self_attn.q.hada_w1_a"] = torch.zeros(2, 2)  # LoHa: not applied
    sd["some_trainer_step"] = torch.tensor(5.0)
    sd["diffusion_model.blocks.0.cross_attn.q.alpha"] = torch.tensor(1.0)  # orphan alpha
    m = match_lora(parse_lora(sd, file="x.safetensors"), _model_shapes(), strength=0.8, mode="merge")
    assert len(m.patches) == len(EXPECTED)
    reasons = dict(m.unmatched)
    assert "unsupported adapter" in reasons["diffusion_model.blocks.0.self_attn.q.hada_w1_a"]
    assert "unknown suffix" in reasons["some_trainer_step"]
    assert "alpha without" in reasons["diffusion_model.blocks.0.cross_attn.q.alpha"]
    assert m.ranks == {"blocks.0.self_attn.q": 4, "blocks.1.cross_attn.o": 4, "blocks.0.ffn.0": 4,
                       "blocks.1.ffn.2": 4, "head.head": 4}
    text = m.text()
    assert "x.safetensors" in text and "strength 0.8" in text and "rank 4 × 5 modules" in text
    assert "unmatched: 3 keys" in text and "hada_w1_a" in text
    assert m.used_keys == sum(len(p.keys) for p in m.patches) and f"{m.used_keys} of {len(sd)} keys" in text
    summary = m.summary()
    assert summary["rank_counts"] == {4: 5} and len(summary["unmatched"]) == 3


def test_i2v_lora_on_t2v_model_warns_loudly_and_applies_the_rest(caplog):
    lf = parse_lora(render_lora(_definition(i2v=True), "comfy"))
    with caplog.at_level("WARNING"):
        m = match_lora(lf, _model_shapes(i2v=False))
    assert len(m.patches) == len(EXPECTED)
    assert {u[1] for u in m.unmatched} == {"model has no blocks.0.cross_attn.k_img.weight",
                                          "model has no blocks.1.cross_attn.v_img.weight"}
    assert any("image-to-video" in w for w in m.warnings)
    assert "image-to-video" in caplog.text and "WARNING" in m.text()
    # the same LoRA on an I2V model: everything applies, no warning
    m2 = match_lora(lf, _model_shapes(i2v=True))
    assert len(m2.patches) == len(EXPECTED) + 2 and m2.warnings == []


def test_lora_for_a_deeper_model_is_warned():
    lf = parse_lora(render_lora(_definition(), "comfy"))
    m = match_lora(lf, _model_shapes(blocks=1))
    assert any("deeper" in w for w in m.warnings)
    assert {p.target for p in m.patches} == {t for t, _ in EXPECTED if not t.startswith("blocks.1.")}


def test_lora_for_another_model_size_is_refused_naming_the_key():
    lf = parse_lora(render_lora(_definition(dim=48), "comfy"), file="wan13b.safetensors")
    with pytest.raises(WanquantError) as e:
        match_lora(lf, _model_shapes(dim=DIM))
    assert e.value.file == "wan13b.safetensors" and e.value.layer.startswith("diffusion_model.")
    assert "does not fit" in str(e.value) and "more modules" in str(e.value)


def test_lora_matching_nothing_is_refused():
    sd = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)}
    with pytest.raises(WanquantError, match="matches none"):
        match_lora(parse_lora(sd), _model_shapes())
    assert match_lora(parse_lora(sd), _model_shapes(), allow_empty=True).patches == []


@pytest.mark.parametrize("case, key_part, message", [
    ("rank", "self_attn.q.lora_up", "rank mismatch"),
    ("orphan_up", "self_attn.q.lora_up", "no down"),
    ("nan", "ffn.0.lora_down", "NaN or Inf"),
    ("inf_diff", "norm3.diff", "NaN or Inf"),
    ("alpha_shape", "self_attn.q.alpha", "alpha must be a scalar"),
    ("dora", "dora_scale", "DoRA"),
    ("int", "ffn.0.lora_down", "not floating point"),
])
def test_bad_lora_gives_an_error_naming_the_key(case, key_part, message):
    sd = render_lora(_definition(), "comfy")
    p = "diffusion_model.blocks.0."
    if case == "rank":
        sd[p + "self_attn.q.lora_up.weight"] = torch.zeros(DIM, 3)
    elif case == "orphan_up":
        del sd[p + "self_attn.q.lora_down.weight"]
    elif case == "nan":
        sd[p + "ffn.0.lora_down.weight"][1, 2] = float("nan")
    elif case == "inf_diff":
        sd[p + "norm3.diff"][0] = float("inf")
    elif case == "alpha_shape":
        sd[p + "self_attn.q.alpha"] = torch.ones(2)
    elif case == "dora":
        sd[p + "self_attn.q.dora_scale"] = torch.ones(DIM, 1)
    elif case == "int":
        sd[p + "ffn.0.lora_down.weight"] = torch.zeros(4, DIM, dtype=torch.int32)
    with pytest.raises(WanquantError, match=message) as e:
        parse_lora(sd, file="bad.safetensors")
    assert key_part in e.value.layer and e.value.file == "bad.safetensors"


def test_two_spellings_of_one_role_are_refused():
    sd = render_lora(_definition(), "comfy")
    sd["diffusion_model.blocks.0.ffn.0.lora_A.weight"] = sd["diffusion_model.blocks.0.ffn.0.lora_down.weight"]
    with pytest.raises(WanquantError, match="same role") as e:
        parse_lora(sd)
    assert "ffn.0" in e.value.layer


def test_corrupt_and_missing_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(render_lora(_definition(), "comfy"), str(good))
    lf = read_lora(good)
    assert lf.path == str(good) and len(lf.patches) == len(EXPECTED)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(WanquantError) as e:
        read_lora(cut)
    assert str(cut) in str(e.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WanquantError):
        read_lora(junk)
    with pytest.raises(WanquantError, match="no such file"):
        read_lora(tmp_path / "absent.safetensors")


def test_conv_lora_on_patch_embedding_reshapes_like_comfyui():
    g = torch.Generator().manual_seed(9)
    up = torch.randn(DIM, 2, 1, 1, 1, generator=g)
    down = torch.randn(2, 16, 1, 2, 2, generator=g)
    lf = parse_lora({"diffusion_model.patch_embedding.lora_up.weight": up,
                     "diffusion_model.patch_embedding.lora_down.weight": down})
    m = match_lora(lf, _model_shapes())
    (p,) = m.patches
    ref = (up.double().reshape(DIM, 2) @ down.double().reshape(2, -1)).reshape(DIM, 16, 1, 2, 2)
    torch.testing.assert_close(p.delta((DIM, 16, 1, 2, 2), torch.float64), ref, rtol=1e-12, atol=0)
    assert math.prod(p.delta((DIM, 16, 1, 2, 2)).shape) == DIM * 64
