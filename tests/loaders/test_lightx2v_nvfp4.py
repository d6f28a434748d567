"""LightX2V NVFP4 files (made by LightX2V's own reference quantizer: tests/data/lightx2v/) reach
ComfyUI's NVFP4 canonical form exactly, against an fp64 reference of LightX2V's formula written
here from its code (f8aee98b): low-nibble-first E2M1, block scales at the kernel's swizzled offsets,
weight = E2M1 * block_scale / weight_global_scale with 1 / weight_global_scale = alpha * input_global_scale."""

import pytest
import torch
from fixtures import LIGHTX2V_BLOCKS, ref_lightx2v_nvfp4, syn
from safetensors.torch import load_file

from wanquant.errors import WanquantError
from wanquant.loaders.canonical import load_canonical, load_with_base
from wanquant.loaders.convert import convert
from wanquant.ops.formats import get_format

BLOCKS = LIGHTX2V_BLOCKS
ABSMAX = BLOCKS.parent / "lightx2v_nvfp4_absmax.safetensors"


def _canon(model, layer):
    ents = {e.rsplit(".", 1)[1]: model.entries[e].load() for e in model.entries
            if e.rsplit(".", 1)[0] == layer and not e.endswith((".bias", ".comfy_quant"))}
    return ents


def test_published_spelling_dequantizes_to_lightx2v_formula():
    src = load_file(str(BLOCKS))
    orig = syn.wan_state_dict(dim=128, ffn_dim=256, num_blocks=2, seed=7)  # the recipe's input weights
    with load_canonical(BLOCKS) as m:
        layers = [n for n, l in m.layers.items() if l.format == "nvfp4"]
        assert len(layers) == 20 and m.report.spellings["LightX2V NVFP4 (input_global_scale + alpha)"] == 20
        for layer in layers:
            t = _canon(m, layer)
            igs, alpha = src[f"{layer}.input_global_scale"].double(), src[f"{layer}.alpha"].double()
            want = ref_lightx2v_nvfp4(src[f"{layer}.weight"], src[f"{layer}.weight_scale"], float(alpha * igs))
            got = get_format("nvfp4").dequantize(t, torch.float32)
            assert float(((got.double() - want).abs() / want.abs().clamp(min=1e-30)).max()) < 2e-7, layer
            # canonical storage: nibbles swapped (lossless), block scales byte-identical, scalars fp32
            p = src[f"{layer}.weight"]
            assert torch.equal(t["weight"], (p << 4) | (p >> 4))
            assert torch.equal(t["weight_scale"].view(torch.uint8), src[f"{layer}.weight_scale"].view(torch.uint8))
            assert t["weight_scale_2"].dtype == torch.float32 and t["weight_scale_2"].shape == ()
            assert float(t["input_scale"]) == float(torch.tensor(1.0 / float(igs), dtype=torch.float64).float())
            # ComfyUI's GEMM multiplier input_scale * weight_scale_2 is LightX2V's alpha (to fp32 rounding)
            assert abs(float(t["input_scale"].double() * t["weight_scale_2"].double()) / float(alpha) - 1) < 2.5e-7
            # and the weights are the producer's quantization of the recipe's bf16 weights (a wrong
            # nibble order or scale layout gives relative errors near 1)
            w = orig[f"{layer}.weight"].double()
            assert float((want - w).norm() / w.norm()) < 0.15, layer


def test_absmax_and_weight_only_spellings():
    src = load_file(str(ABSMAX))
    with load_canonical(ABSMAX) as m:
        assert m.layers["blocks.0.ffn.0"].spelling == "LightX2V NVFP4 (input_absmax + weight_global_scale)"
        assert m.layers["blocks.0.ffn.2"].spelling == "LightX2V NVFP4 (weight_global_scale only, no input scale)"
        for layer in ("blocks.0.ffn.0", "blocks.0.ffn.2"):
            t = _canon(m, layer)
            wgs = src[f"{layer}.weight_global_scale"].double()
            want = ref_lightx2v_nvfp4(src[f"{layer}.weight"], src[f"{layer}.weight_scale"], float(1.0 / wgs))
            got = get_format("nvfp4").dequantize(t, torch.float32)
            assert got.shape == want.shape
            assert float(((got.double() - want).abs() / want.abs().clamp(min=1e-30)).max()) < 2e-7, layer
        a = _canon(m, "blocks.0.ffn.0")
        igs = (2688.0 / src["blocks.0.ffn.0.input_absmax"]).to(torch.float32)  # mm_weight.py's own op
        assert float(a["input_scale"]) == float(torch.tensor(1.0 / float(igs), dtype=torch.float64).float())
        assert a["weight_scale"].shape == (128, 8)  # 80 rows / 6 scale columns padded as the kernel does
        assert "input_scale" not in _canon(m, "blocks.0.ffn.2")
        assert not any(k.endswith(("alpha", "global_scale", "absmax")) for k in m.entries)


def test_partial_distill_needs_base_and_overlays(tmp_path):
    with load_canonical(BLOCKS) as m:
        assert m.report.needs_base and "patch_embedding" in m.report.missing
        assert "needs its base model" in m.report.verdict()
    base = syn.save(syn.wan_state_dict(dim=128, ffn_dim=256, num_blocks=2, seed=3), tmp_path / "base.safetensors")
    with load_with_base(BLOCKS, base) as m:
        assert not m.report.missing and m.report.formats["nvfp4"] == 20
        assert m.layers["blocks.1.ffn.2"].spelling.startswith("LightX2V NVFP4")
        assert "patch_embedding.weight" in m.entries


def test_converts_to_comfyui_native_file_with_equal_weights(tmp_path):
    dst = tmp_path / "out.safetensors"
    convert(BLOCKS, dst)
    with load_canonical(BLOCKS) as a, load_canonical(dst) as b:
        assert b.report.spellings["comfy_quant (ComfyUI native)"] == 20
        for layer in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
            ta, tb = _canon(a, layer), _canon(b, layer)
            assert set(ta) == set(tb)
            for k in ta:
                assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].reshape(-1).view(torch.uint8),
                                                                  tb[k].reshape(-1).view(torch.uint8)), (layer, k)


def _broken(tmp_path, edit):
    sd = load_file(str(BLOCKS))
    edit(sd)
    return syn.save(sd, tmp_path / "broken.safetensors")


@pytest.mark.parametrize("edit, words", [
    (lambda sd: [sd.pop("blocks.0.self_attn.q.alpha"), sd.pop("blocks.0.self_attn.q.input_global_scale")],
     "without its global scales"),
    (lambda sd: sd.pop("blocks.1.ffn.0.alpha"), "input_global_scale without its partner"),
    (lambda sd: sd.__setitem__("blocks.0.ffn.2.alpha", torch.tensor(float("nan"))), "invalid LightX2V alpha"),
    (lambda sd: sd.__setitem__("blocks.0.ffn.2.input_global_scale", torch.tensor(0.0)), "invalid LightX2V input_global_scale"),
    (lambda sd: sd.__setitem__("blocks.0.ffn.2.alpha", torch.ones(2)), "must be a per-tensor scalar"),
    (lambda sd: sd.__setitem__("blocks.0.self_attn.k.weight_scale",
                               sd["blocks.0.self_attn.k.weight_scale"][:, :4].contiguous()), "block scales do not fit"),
])
def test_bad_lightx2v_files_are_one_clear_error_and_write_nothing(tmp_path, edit, words):
    bad = _broken(tmp_path, edit)
    dst = tmp_path / "never.safetensors"
    with pytest.raises(WanquantError) as e:
        convert(bad, dst)
    assert words in str(e.value) and str(bad) in str(e.value) and e.value.layer
    assert not dst.exists()
    with load_canonical(bad, collect_errors=True) as m:  # inspect reports instead of raising
        assert any(words in err for err in m.report.errors)
