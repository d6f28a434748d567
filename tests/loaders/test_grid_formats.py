"""Per-row / block fp8 and int8 files (convert_to_quant, LightX2V, __fp8_scale caches): detected
by the tensors beside the weight, canonical form equal to an fp64 reference of the producer's
reload formula, and the bad-input rules (one WanquantError; inspect reports; nothing written)."""

import json

import pytest
import torch
from fixtures import ref_scale_grid, syn, tiny_wan

from wanquant.cli import main as cli_main
from wanquant.errors import WanquantError
from wanquant.loaders import synthetic_grid as sg
from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.convert import convert
from wanquant.ops.formats import get_format, parse_comfy_quant

LAYER = "blocks.1.ffn.0"


CASES = {  # recipe -> (source state dict builder, expected format, scale key in the source, block)
    "ctq_fp8_row": (lambda sd: sg.ctq(sd, "fp8_row"), "float8_e4m3fn_rowwise", "weight_scale", 0),
    "ctq_fp8_block": (lambda sd: sg.ctq(sd, "fp8_block", block=64), "float8_e4m3fn_blockwise", "weight_scale", 64),
    "ctq_fp8_block3d": (lambda sd: sg.ctq(sd, "fp8_block3d", block=32), "float8_e4m3fn_block3d", "weight_scale", 32),
    "ctq_int8_tensor": (lambda sd: sg.ctq(sd, "int8_tensor"), "int8_tensorwise", "weight_scale", 0),
    "ctq_int8_row": (lambda sd: sg.ctq(sd, "int8_row"), "int8_tensorwise", "weight_scale", 0),
    "ctq_int8_block": (lambda sd: sg.ctq(sd, "int8_block", block=128), "int8_blockwise", "weight_scale", 128),
    "lightx2v_int8": (lambda sd: sg.lightx2v(sd, "int8"), "int8_tensorwise", "weight_scale", 0),
    "lightx2v_fp8": (lambda sd: sg.lightx2v(sd, "fp8"), "float8_e4m3fn_rowwise", "weight_scale", 0),
    "fp8_scale_cache": (lambda sd: sg.fp8_scale_rows(sd), "float8_e4m3fn_rowwise", "weight.__fp8_scale", 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_canonical_form_is_the_producers_formula(tmp_path, case):
    build, fmt, scale_key, block = CASES[case]
    src = build(tiny_wan(seed=5))
    p = syn.save(src, tmp_path / f"{case}.safetensors")
    with load_canonical(p) as m:
        assert m.report.formats[fmt] == sum(k.endswith(scale_key) for k in src) > 10
        assert not m.report.errors
        w = m.entries[f"{LAYER}.weight"].load()
        assert torch.equal(w.view(torch.uint8), src[f"{LAYER}.weight"].view(torch.uint8))  # payload bit for bit
        tensors = {s: m.entries[f"{LAYER}.{s}"].load() for s in ("weight", "weight_scale")}
        conf = parse_comfy_quant(m.entries[f"{LAYER}.comfy_quant"].load())
        assert conf["format"] == fmt and conf.get("group_size", 0) == block
        assert f"{LAYER}.input_scale" not in m.entries  # convert_to_quant's 1.0 placeholder is dropped
        got = get_format(fmt).dequantize(tensors, torch.float32, conf)
    ref = ref_scale_grid(src[f"{LAYER}.weight"], src[f"{LAYER}.{scale_key}"])
    assert bool(((got.double() - ref).abs() <= ref.abs() * 2.0 ** -24).all())


def _bad(tmp_path, mutate, recipe=lambda sd: sg.lightx2v(sd, "int8")):
    q = recipe(tiny_wan())
    mutate(q)
    return syn.save(q, tmp_path / "bad.safetensors")


BAD = {
    "scale shape fits nothing": (lambda q: q.__setitem__(f"{LAYER}.weight_scale", torch.ones(7, 3)), "fits no known layout"),
    "tagged grid does not fit": (lambda q: q.__setitem__(f"{LAYER}.weight_scale", torch.ones(4, 4)), "does not fit",
                                 lambda sd: sg.ctq(sd, "int8_block", block=128)),
    "nan scale": (lambda q: q[f"{LAYER}.weight_scale"].__setitem__((3, 0), float("nan")), "invalid weight scale"),
    "zero scale": (lambda q: q[f"{LAYER}.weight_scale"].__setitem__((0, 0), 0.0), "invalid weight scale"),
    "int8 without scale": (lambda q: q.pop(f"{LAYER}.weight_scale"), "int8 weight without a scale"),
    "calibrated input scale": (lambda q: q.__setitem__(f"{LAYER}.input_scale", torch.tensor(0.02)), "dynamic activation"),
    "convrot group size": (lambda q: q.__setitem__(f"{LAYER}.comfy_quant", syn.comfy_quant_bytes(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 48})), "power of 4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_error_naming_file_layer_expected_found(tmp_path, case):
    mutate, match, *recipe = BAD[case]
    p = _bad(tmp_path, mutate, *recipe)
    with pytest.raises(WanquantError, match=match) as e:
        load_canonical(p).close()
    assert e.value.file == str(p) and e.value.layer == LAYER and e.value.found


def test_inspect_reports_and_convert_writes_nothing(tmp_path, capsys):
    p = _bad(tmp_path, lambda q: q[f"{LAYER}.weight_scale"].__setitem__((3, 0), float("nan")))
    rc = cli_main(["inspect", str(p), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and len(out["errors"]) == 1 and LAYER in out["errors"][0]
    assert out["formats"]["int8_tensorwise"] == len(syn.quantizable_linears(tiny_wan())) - 1
    dst = tmp_path / "dst.safetensors"
    with pytest.raises(WanquantError, match=LAYER):
        convert(p, dst)
    assert not dst.exists()
