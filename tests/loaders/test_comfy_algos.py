"""ComfyUI's own newer comfy_quant algorithms (int8 + ConvRot, convrot_w4a4, asym_w4a8_int8) outside
ComfyUI: kept untouched in the canonical form (every tensor bit for bit), named with the ComfyUI
version that loads them; algorithms no release has, bad confs and missing tensors are one
WanquantError naming file, layer, expected and found.

The files are made by the producer: comfy-kitchen's own layouts (``quantize`` + ``state_dict_tensors``,
the tensors ComfyUI 0.33 ``_quantized_weight_state_dict`` writes) with the comfy_quant keys ComfyUI
0.33 writes (comfy/ops.py ``_quantized_weight_state_dict``: ``convrot``/``convrot_groupsize``,
``group_size``). Shapes, from comfy-kitchen 0.2.31 and ComfyUI 0.33 ``_load_quantized_module``:
int8+ConvRot weight int8 [N, K] + weight_scale fp32 [N, 1]; convrot_w4a4 weight int8 [N, K/2] +
weight_scale fp32 [N]; asym_w4a8_int8 weight int8 [N, K/2] + weight_s_rel fp8 [N, K/16] +
weight_s_channel fp32 [N] + weight_codebook fp32 [16]."""

import json

import pytest
import torch
import comfy_algo_files
from fixtures import bits, syn, tiny_wan

from wanquant.cli import main as cli_main
from wanquant.errors import WanquantError
from wanquant.loaders import comfy_algos
from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.convert import convert
from wanquant.ops.formats import parse_comfy_quant

LAYERS = ("blocks.1.ffn.0", "blocks.1.ffn.2")
CONVROT = comfy_algos.CONVROT


def _native(sd, key, layers=LAYERS):
    return comfy_algo_files.native(sd, key, layers)


@pytest.mark.parametrize("key,since", [(CONVROT, "0.27.0"), ("convrot_w4a4", "0.28.0"), ("asym_w4a8_int8", "0.31.0")])
def test_kept_untouched_and_named_with_its_comfyui(tmp_path, key, since):
    src = _native(tiny_wan(), key)
    p = syn.save(src, tmp_path / "m.safetensors")
    with load_canonical(p) as m:
        for l in LAYERS:
            layer = m.layers[l]
            assert f"ComfyUI >= {since}" in layer.spelling
            want = {k[len(l) + 1:] for k in src if k.startswith(l + ".") and k != f"{l}.comfy_quant"}
            got = {k[len(l) + 1:] for k in m.entries if k.startswith(l + ".") and k != f"{l}.comfy_quant"}
            assert got == want  # every tensor beside the weight kept, nothing added
            for s in want:
                t = m.entries[f"{l}.{s}"].load()
                assert t.dtype == src[f"{l}.{s}"].dtype and torch.equal(bits(t), bits(src[f"{l}.{s}"]))
            assert parse_comfy_quant(m.entries[f"{l}.comfy_quant"].load()) == json.loads(
                bytes(src[f"{l}.comfy_quant"].tolist()))
        assert any(key in n and f"ComfyUI >= {since}" in n and "untouched" in n for n in m.report.notes)
        assert not m.report.errors


def test_inspect_names_the_algorithm_and_convert_copies_it(tmp_path, capsys):
    src = _native(tiny_wan(), "convrot_w4a4")
    p = syn.save(src, tmp_path / "m.safetensors")
    assert cli_main(["inspect", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["formats"]["convrot_w4a4"] == len(LAYERS)
    assert any("convrot_w4a4" in n and "ComfyUI >= 0.28.0" in n for n in out["notes"])
    dst = tmp_path / "out.safetensors"
    convert(p, dst)
    from safetensors.torch import load_file

    written = load_file(str(dst))
    for l in LAYERS:
        for s in ("weight", "weight_scale"):
            assert torch.equal(bits(written[f"{l}.{s}"]), bits(src[f"{l}.{s}"]))


@pytest.mark.parametrize("fmt,needs", [("int3_magic", "not in any ComfyUI release we know"),
                                       ("svdquant_w4a4", "not in any ComfyUI release we know")])
def test_unknown_algorithm_is_one_error_naming_it(tmp_path, fmt, needs):
    q = tiny_wan()
    q["blocks.1.ffn.0.weight"] = torch.zeros(512, 128, dtype=torch.int8)
    q["blocks.1.ffn.0.weight_scale"] = torch.ones(512)
    q["blocks.1.ffn.0.comfy_quant"] = syn.comfy_quant_bytes({"format": fmt})
    p = syn.save(q, tmp_path / "u.safetensors")
    with pytest.raises(WanquantError, match=needs) as e:
        load_canonical(p)
    assert e.value.file == str(p) and e.value.layer == "blocks.1.ffn.0" and fmt in str(e.value)


def test_an_algorithm_the_running_comfyui_knows_is_kept(tmp_path):
    """A name newer than the table, known to the running ComfyUI (published by nodes/), is kept as is."""
    q = tiny_wan()
    q["blocks.1.ffn.0.weight"] = torch.zeros(512, 128, dtype=torch.int8)
    q["blocks.1.ffn.0.weight_zz"] = torch.ones(512)
    q["blocks.1.ffn.0.comfy_quant"] = syn.comfy_quant_bytes({"format": "int3_magic"})
    p = syn.save(q, tmp_path / "u.safetensors")
    comfy_algos.publish_running({"int3_magic"})
    try:
        with load_canonical(p) as m:
            assert "known to the running ComfyUI" in m.layers["blocks.1.ffn.0"].spelling
            assert torch.equal(m.entries["blocks.1.ffn.0.weight_zz"].load(), torch.ones(512))
    finally:
        comfy_algos.publish_running(())
    with pytest.raises(WanquantError, match="not in any ComfyUI release"):
        load_canonical(p)


def _asym_bad(q):
    del q["blocks.1.ffn.0.weight_s_channel"]


BAD = {  # mutation of a producer-made file -> message
    "w4a8 without weight_s_channel": ("asym_w4a8_int8", _asym_bad, "incomplete asym_w4a8_int8"),
    "w4a8 group scale shape": ("asym_w4a8_int8", lambda q: q.__setitem__("blocks.1.ffn.0.weight_s_rel",
                               q["blocks.1.ffn.0.weight_s_rel"][:, :5].contiguous()), "group scales do not fit"),
    "w4a4 without scale": ("convrot_w4a4", lambda q: q.pop("blocks.1.ffn.0.weight_scale"), "incomplete convrot_w4a4"),
    "w4a4 linear dtype": ("convrot_w4a4", lambda q: q.__setitem__("blocks.1.ffn.0.comfy_quant", syn.comfy_quant_bytes(
        {"format": "convrot_w4a4", "linear_dtype": "fp4"})), "linear_dtype"),
    "convrot group size": (CONVROT, lambda q: q.__setitem__("blocks.1.ffn.0.comfy_quant", syn.comfy_quant_bytes(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 100})), "power of 4"),
    "convrot scalar scale": (CONVROT, lambda q: q.__setitem__("blocks.1.ffn.0.weight_scale", torch.tensor(0.1)),
                             "per output row"),
    "extra tensor": ("convrot_w4a4", lambda q: q.__setitem__("blocks.1.ffn.0.input_scale", torch.tensor(1.0)),
                     "unexpected tensor"),
    "moe bank": (CONVROT, lambda q: q.__setitem__("blocks.1.ffn.0.comfy_quant", syn.comfy_quant_bytes(
        {"format": "int8_tensorwise", "num_experts": 4})), "MoE expert bank"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_layer_is_one_error_naming_file_layer_expected_found(tmp_path, case):
    key, mutate, match = BAD[case]
    q = _native(tiny_wan(), key, layers=("blocks.1.ffn.0",))
    mutate(q)
    p = syn.save(q, tmp_path / "bad.safetensors")
    with pytest.raises(WanquantError, match=match) as e:
        load_canonical(p)
    assert e.value.file == str(p) and e.value.layer == "blocks.1.ffn.0" and e.value.found and e.value.expected
    dst = tmp_path / "dst.safetensors"
    with pytest.raises(WanquantError):
        convert(p, dst)
    assert not dst.exists()


def test_a_module_comfyui_does_not_run_as_linear_is_refused(tmp_path):
    """No decoder outside ComfyUI: a layer ComfyUI builds without comfy_quant support (Animate's
    motion encoder linears, comfy_linear.py) would need its weights made dense, which is refused."""
    q = tiny_wan()
    l = "motion_encoder.enc.fc.0"
    q[f"{l}.weight"] = torch.ones(64, 128, dtype=torch.int8)
    q[f"{l}.weight_scale"] = torch.ones(64)
    q[f"{l}.comfy_quant"] = syn.comfy_quant_bytes({"format": "convrot_w4a4"})
    p = syn.save(q, tmp_path / "c.safetensors")
    with pytest.raises(WanquantError, match="ComfyUI's own layout") as e:
        load_canonical(p)
    assert e.value.layer == l


def test_readme_carries_the_version_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert comfy_algos.version_table() in readme


def test_lora_merge_into_a_comfyui_only_layer_is_refused(tmp_path):
    """Merging needs the weight decoded; int8 + ConvRot read as plain int8 would lose its rotation."""
    from wanquant.lora.keys import render_lora
    from wanquant.lora.merge import merge_lora_file

    src = _native(tiny_wan(), CONVROT)
    p = syn.save(src, tmp_path / "m.safetensors")
    lora = syn.save(render_lora({"blocks.1.ffn.0": {"up": torch.ones(512, 2), "down": torch.ones(2, 256),
                                                    "alpha": 2.0}}, "comfy"), tmp_path / "l.safetensors")
    dst = tmp_path / "merged.safetensors"
    with pytest.raises(WanquantError, match="LoRA cannot be merged.*ComfyUI >= 0.27.0") as e:
        merge_lora_file(str(p), [(str(lora), 1.0)], str(dst))
    assert e.value.layer == "blocks.1.ffn.0" and not dst.exists()


def test_nvfp4_with_pre_quant_scale_is_named_and_kept(tmp_path):
    """ModelOpt AWQ's pre_quant_scale changes the math (the input is multiplied by it): kept beside the
    NVFP4 layer, named with ComfyUI >= 0.30.0; a wrong shape is one error; a LoRA merge is refused."""
    from wanquant.lora.keys import render_lora
    from wanquant.lora.merge import merge_lora_file

    src = comfy_algo_files.nvfp4_pre_quant(tiny_wan(), LAYERS)
    p = syn.save(src, tmp_path / "awq.safetensors")
    with load_canonical(p) as m:
        for l in LAYERS:
            assert m.layers[l].format == "nvfp4" and "pre_quant_scale" in m.layers[l].spelling
            assert "ComfyUI >= 0.30.0" in m.layers[l].spelling
            assert torch.equal(bits(m.entries[f"{l}.pre_quant_scale"].load()), bits(src[f"{l}.pre_quant_scale"]))
        assert any("nvfp4+pre_quant_scale" in n and "0.30.0" in n for n in m.report.notes)
    lora = syn.save(render_lora({LAYERS[0]: {"up": torch.ones(512, 2), "down": torch.ones(2, 256), "alpha": 2.0}},
                                "comfy"), tmp_path / "l.safetensors")
    with pytest.raises(WanquantError, match="LoRA cannot be merged"):
        merge_lora_file(str(p), [(str(lora), 1.0)], str(tmp_path / "merged.safetensors"))
    src[f"{LAYERS[0]}.pre_quant_scale"] = torch.ones(7)
    bad = syn.save(src, tmp_path / "bad.safetensors")
    with pytest.raises(WanquantError, match="pre_quant_scale must be one float per input") as e:
        load_canonical(bad)
    assert e.value.file == str(bad) and e.value.layer == LAYERS[0]
