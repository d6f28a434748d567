"""Merging LoRAs into quantized weights (lora/merge.py) and the merge-lora command.

Every target format × every LoRA spelling: the merged file is read back and each patched weight
is compared with an fp64 reference ``W + strength·(alpha/rank)·up@down`` (+ diff / diff_b / diff_m)
computed here from the raw LoRA tensors. The tolerance is the target format's own requantization
error, measured on the same reference with the format's round-to-nearest quantizer: stochastic
rounding has at most one grid step of error per element (RTN: half a step) and, for uniformly
spread fractional positions, √2 times RTN's RMS error.
"""

import hashlib
import json

import pytest
import torch

from wanquant.cli import main as cli_main
from wanquant.errors import WanquantError
from wanquant.loaders import synthetic
from wanquant.loaders.canonical import load_canonical
from wanquant.lora.keys import STYLES, match_lora, parse_lora, render_lora
from wanquant.lora.merge import (LoraWeightFunction, canonical_shapes, comfy_seed, group_patches,
                                         merge_lora_file, merge_quantized, parse_lora_arg, total_delta)
from wanquant.ops.formats import comfy_quant_tensor, get_format

FORMATS = ["bf16", "float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "fp4_g32"]
STRENGTH = 0.8
ALPHA, RANK = 2.0, 4
PATCHED = ["blocks.0.self_attn.q", "blocks.0.cross_attn.v", "blocks.0.ffn.0", "blocks.0.ffn.2", "head.head",
           "time_projection.1"]
SR_RMS_FACTOR = 1.6  # √2 expected, plus sampling slack
SR_MAX_FACTOR = 2.5  # one step vs half a step, plus slack


def _base_sd():
    return synthetic.wan_state_dict(dim=64, ffn_dim=128, num_blocks=1, text_dim=64, freq_dim=32, seed=11)


def _quantized_sd(sd, fmt):
    if fmt == "bf16":
        return dict(sd)
    if fmt == "fp4_g32":
        return synthetic.fp4_g32(sd)  # the FP4 release's own spelling (low nibble first, bf16 scales)
    out = {}
    layers = set(synthetic.quantizable_linears(sd))
    for k, t in sd.items():
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and layer in layers:
            tensors, conf = get_format(fmt).quantize(t.float())
            for s, v in tensors.items():
                out[f"{layer}.{s}"] = v
            out[f"{layer}.comfy_quant"] = comfy_quant_tensor(conf)
        else:
            out[k] = t
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_models")
    sd = _base_sd()
    return {fmt: synthetic.save(_quantized_sd(sd, fmt), root / f"{fmt}.safetensors") for fmt in FORMATS}


def _definition(sd, alpha=ALPHA):
    g = torch.Generator().manual_seed(7)
    d = {}
    for layer in PATCHED:
        o, i = sd[f"{layer}.weight"].shape
        c = 0.5 / (i * RANK) ** 0.5 / (alpha / RANK if alpha else 1.0)  # ‖ΔW‖ ≈ 0.5‖W‖ at strength 1
        d[layer] = {"up": torch.randn(o, RANK, generator=g) * c, "down": torch.randn(RANK, i, generator=g),
                    "alpha": alpha}
    d["blocks.0.self_attn.q"]["diff_b"] = torch.randn(64, generator=g) * 0.01
    d["blocks.0.norm3"] = {"diff": torch.randn(64, generator=g) * 0.05, "diff_b": torch.randn(64, generator=g) * 0.05}
    d["blocks.0.modulation"] = {"diff": torch.randn(1, 6, 64, generator=g) * 0.05}
    return d


def _reference(model, d):
    """fp64 W + strength·(alpha/rank)·up@down per patched parameter, from the raw LoRA tensors."""
    ref = {}
    for module, parts in d.items():
        if "up" in parts:
            w = _dequant(model, module)
            scale = parts["alpha"] / RANK if parts["alpha"] else 1.0
            ref[f"{module}.weight"] = w + STRENGTH * scale * (parts["up"].double() @ parts["down"].double())
        if "diff" in parts:
            key = module if module.endswith("modulation") else f"{module}.weight"
            ref[key] = model.entries[key].load().double() + STRENGTH * parts["diff"].double()
        if "diff_b" in parts:
            ref[f"{module}.bias"] = model.entries[f"{module}.bias"].load().double() + STRENGTH * parts["diff_b"].double()
    return ref


def _dequant(model, module):
    layer = model.layers.get(module)
    if layer is None or not layer.quantized:
        return model.entries[f"{module}.weight"].load().double()
    tensors = {s: model.entries[f"{module}.{s}"].load() for s in ("weight", "weight_scale", "weight_scale_2")
               if f"{module}.{s}" in model.entries}
    return get_format(layer.format).dequantize(tensors, torch.float32, layer.conf).double()


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def _rtn_error(fmt, ref):
    """The format's own round-to-nearest requantization error of the reference."""
    f = get_format(fmt)
    t, conf = f.quantize(ref.float())
    return f.dequantize(t, torch.float32, conf).double() - ref


def _check_merged(out, src, ref, d):
    num, rtn_num, den, delta_sq = 0.0, 0.0, 0.0, 0.0
    for key, r in ref.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else key
        layer = out.layers.get(module)
        if key.endswith(".weight") and layer is not None and layer.quantized:
            got = _dequant(out, module)
            err = got - r
            rtn = _rtn_error(layer.format, r)
            assert err.abs().max() <= SR_MAX_FACTOR * rtn.abs().max() + 1e-12, key
            num += float(err.pow(2).sum())
            rtn_num += float(rtn.pow(2).sum())
            den += float(r.pow(2).sum())
            delta_sq += float((r - _dequant(src, module)).pow(2).sum())
        else:  # high precision: added in fp32, rounded once (bf16: 2^-8 relative)
            got = out.entries[key].load()
            tol = 2.0 ** -8 if got.dtype == torch.bfloat16 else 1e-6
            assert torch.all((got.double() - r).abs() <= r.abs() * tol + 1e-7), key
    if den:
        assert num ** 0.5 <= SR_RMS_FACTOR * rtn_num ** 0.5 + 1e-12
        assert num < 0.25 * delta_sq  # the LoRA is clearly there (error < half its size)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_matches_fp64_reference_for_every_format_and_spelling(models, tmp_path, fmt, style):
    src = load_canonical(models[fmt])
    d = _definition(_base_sd(), alpha=None if style == "error_comp" else ALPHA)
    lora = synthetic.save(render_lora(d, style), tmp_path / f"lora_{style}.safetensors")
    res = merge_lora_file(models[fmt], [(str(lora), STRENGTH)], tmp_path / "out.safetensors")
    assert res.matches[0].unmatched == [] and len(res.matches[0].patches) == len(PATCHED) + 4
    out = load_canonical(tmp_path / "out.safetensors")
    assert not out.report.errors
    expect_fmt = {"bf16": "bf16", "fp4_g32": "float8_e4m3fn"}.get(fmt, fmt)  # FP4 g32 → convert's default target
    assert {l.format for n, l in out.layers.items() if n in PATCHED} == {expect_fmt}
    ref = _reference(src, d)
    _check_merged(out, src, ref, d)
    if fmt != "bf16":  # the per-layer requantization error the report names, recomputed here in fp64
        line = next(l for l in res.lines() if l.startswith("  largest added error per layer: "))
        name, value = line.split(": ", 1)[1].split(", ")[0].split(" ")
        errs = {m: float((_dequant(out, m) - ref[f"{m}.weight"]).norm() / ref[f"{m}.weight"].norm())
                for m in PATCHED if out.layers[m].quantized}
        assert name == max(errs, key=errs.get) and float(value) == pytest.approx(errs[name], rel=2e-3)
    # layers the LoRA does not touch are copied bit for bit (FP4 g32 ones are re-encoded like convert)
    if fmt != "fp4_g32":
        for key in ("blocks.0.self_attn.k.weight", "text_embedding.0.weight"):
            assert torch.equal(_bits(out.entries[key].load()), _bits(src.entries[key].load()))


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "fp4_g32"])
def test_merge_quantized_keeps_format_and_is_seeded(fmt):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=g) / 128 ** 0.5
    f = get_format(fmt)
    tensors, conf = f.quantize(w)
    delta = (torch.randn(96, 4, generator=g) @ torch.randn(4, 128, generator=g)).mul_(0.02)
    ref = f.dequantize(tensors, torch.float32, conf).double() + delta.double()
    new, new_conf, _ = merge_quantized(fmt, tensors, conf, delta, key="blocks.3.ffn.0.weight")
    assert new_conf["format"] == fmt and set(new) == set(tensors)
    got = f.dequantize(new, torch.float32, new_conf).double()
    rtn = _rtn_error(fmt, ref)
    err = got - ref
    assert err.norm() <= SR_RMS_FACTOR * rtn.norm()
    assert err.abs().max() <= SR_MAX_FACTOR * rtn.abs().max()
    # stochastic rounding is unbiased: the mean error is within 4 standard errors of zero
    assert abs(float(err.mean())) <= 4 * float(err.std()) / err.numel() ** 0.5
    again, _, _ = merge_quantized(fmt, tensors, conf, delta, key="blocks.3.ffn.0.weight")
    assert all(torch.equal(_bits(again[k]), _bits(new[k])) for k in new)  # same seed, same bits
    other, _, _ = merge_quantized(fmt, tensors, conf, delta, key="blocks.4.ffn.0.weight")
    assert not torch.equal(_bits(other["weight"]), _bits(new["weight"]))


def test_zero_strength_leaves_fp8_weights_identical(models, tmp_path):
    """A fresh scale of an unchanged layer is the old scale, and on-grid values never round away
    (values compared: a stored -0 comes back as +0)."""
    src = load_canonical(models["float8_e4m3fn"])
    lora = synthetic.save(render_lora(_definition(_base_sd()), "comfy"), tmp_path / "l.safetensors")
    merge_lora_file(models["float8_e4m3fn"], [(str(lora), 0.0)], tmp_path / "o.safetensors")
    out = load_canonical(tmp_path / "o.safetensors")
    for layer in PATCHED:
        for s in ("weight", "weight_scale"):
            a, b = out.entries[f"{layer}.{s}"].load(), src.entries[f"{layer}.{s}"].load()
            assert a.dtype == b.dtype and torch.equal(a.float(), b.float()), layer


def test_two_loras_are_summed_before_one_rounding(models, tmp_path):
    src = load_canonical(models["float8_e4m3fn"])
    d = _definition(_base_sd())
    a = synthetic.save(render_lora(d, "comfy"), tmp_path / "a.safetensors")
    b = synthetic.save(render_lora(d, "diffusers"), tmp_path / "b.safetensors")
    merge_lora_file(models["float8_e4m3fn"], [(str(a), 0.5), (str(b), 0.3)], tmp_path / "ab.safetensors")
    merge_lora_file(models["float8_e4m3fn"], [(str(a), STRENGTH)], tmp_path / "one.safetensors")
    ab, one = load_canonical(tmp_path / "ab.safetensors"), load_canonical(tmp_path / "one.safetensors")
    _check_merged(ab, src, _reference(src, d), d)  # 0.5 + 0.3 == STRENGTH
    for layer in PATCHED:  # same sum, same seed → the same bits as one LoRA at 0.8
        assert torch.equal(_bits(ab.entries[f"{layer}.weight"].load()), _bits(one.entries[f"{layer}.weight"].load()))


@pytest.mark.parametrize("fp4_to", ["nvfp4", "bf16"])
def test_fp4_g32_model_is_merged_into_the_chosen_target(models, tmp_path, fp4_to):
    src = load_canonical(models["fp4_g32"])
    d = _definition(_base_sd())
    lora = synthetic.save(render_lora(d, "kohya"), tmp_path / "l.safetensors")
    res = merge_lora_file(models["fp4_g32"], [(str(lora), STRENGTH)], tmp_path / "o.safetensors", fp4_to=fp4_to)
    out = load_canonical(tmp_path / "o.safetensors")
    assert {l.format for l in out.layers.values() if l.name in PATCHED} == {fp4_to}
    assert set(res.stats.reencoded.values()) == {fp4_to}
    _check_merged(out, src, _reference(src, d), d)


def test_on_the_fly_equals_merge_then_dequant_within_rounding(models, tmp_path):
    for fmt in ("float8_e4m3fn", "nvfp4", "mxfp8", "fp4_g32"):
        src = load_canonical(models[fmt])
        d = _definition(_base_sd())
        m = match_lora(parse_lora(render_lora(d, "peft")), canonical_shapes(src), strength=STRENGTH)
        grouped = group_patches([m])
        ref = _reference(src, d)
        lora = synthetic.save(render_lora(d, "peft"), tmp_path / "l.safetensors")
        merge_lora_file(models[fmt], [(str(lora), STRENGTH)], tmp_path / "o.safetensors", fp4_to="nvfp4")
        out = load_canonical(tmp_path / "o.safetensors")
        for layer in PATCHED:
            key = f"{layer}.weight"
            w = _dequant(src, layer).float()
            fly = LoraWeightFunction(key, grouped[key])(w)
            assert fly.dtype == torch.float32
            torch.testing.assert_close(fly.double(), ref[key], rtol=1e-5, atol=1e-6)  # exact up to fp32
            merged = _dequant(out, layer)
            rtn = _rtn_error(out.layers[layer].format, ref[key])
            assert (merged - fly.double()).norm() <= SR_RMS_FACTOR * rtn.norm() + 1e-6 * ref[key].norm(), (fmt, layer)


def test_weight_function_in_bf16_and_move_to():
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(32, 2, generator=g), torch.randn(2, 48, generator=g)
    lf = parse_lora({"diffusion_model.blocks.0.ffn.0.lora_up.weight": up,
                     "diffusion_model.blocks.0.ffn.0.lora_down.weight": down,
                     "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(1.0)})
    m = match_lora(lf, {"blocks.0.ffn.0.weight": (32, 48)}, strength=-1.5)
    fn = LoraWeightFunction("blocks.0.ffn.0.weight", group_patches([m])["blocks.0.ffn.0.weight"])
    assert fn.move_to(None) == 0 and fn.move_to("cpu") == (32 * 2 + 2 * 48) * 4
    w = torch.randn(32, 48, generator=g).to(torch.bfloat16)
    out = fn(w)
    ref = w.double() - 1.5 * 0.5 * (up.double() @ down.double())
    assert out.dtype == torch.bfloat16 and torch.equal(w, w.clone())  # input untouched
    # three bf16 roundings (scaled up, product, sum) of terms up to ~|w| + |ΔW| ≈ 6
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -7, atol=6 * 3 * 2 ** -8)
    assert (out.double() - ref).abs().mean() < 0.01


def test_total_delta_never_writes_into_the_lora():
    diff = torch.ones(4, 8)
    lf = parse_lora({"diffusion_model.blocks.0.norm3.diff": diff, "diffusion_model.blocks.0.norm3.diff_b": torch.ones(4)})
    m = match_lora(lf, {"blocks.0.norm3.weight": (4, 8), "blocks.0.norm3.bias": (4,)}, strength=3.0)
    grouped = group_patches([m])
    for _ in range(2):
        assert torch.equal(total_delta(grouped["blocks.0.norm3.weight"], (4, 8)), torch.full((4, 8), 3.0))
    assert torch.equal(diff, torch.ones(4, 8)) and torch.equal(lf.patches[0].diff, torch.ones(4, 8))


def test_comfy_seed_is_comfyuis_crc32():
    def string_to_seed(data):  # ComfyUI's comfy.utils.string_to_seed, spelled out
        crc = 0xFFFFFFFF
        for byte in data:
            crc ^= ord(byte)
            for _ in range(8):
                crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
        return crc ^ 0xFFFFFFFF

    for key in ("blocks.0.self_attn.q.weight", "head.head.weight"):
        assert comfy_seed(key) == string_to_seed("diffusion_model." + key)


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\a.safetensors:-1") == (r"C:\loras\a.safetensors", -1.0)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cli_merge_lora_writes_and_reports(models, tmp_path, capsys):
    lora = synthetic.save(render_lora(_definition(_base_sd()), "wan_fun"), tmp_path / "fun.safetensors")
    out = tmp_path / "merged.safetensors"
    rc = cli_main(["merge-lora", str(models["nvfp4"]), f"{lora}:0.75", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "Wan-Fun" in text and "strength 0.75" in text and "rank 4 × 6 modules" in text and "wrote" in text
    meta = json.loads(load_canonical(out).source.metadata["wanquant"])
    assert meta["merged_loras"] == [{"path": str(lora), "strength": 0.75}] and meta["rounding"] == "stochastic"


def test_cli_error_report_lists_every_merged_layers_added_error(models, tmp_path, capsys):
    """``--error-report``: every merged quantized layer, worst first, each number recomputed here in
    fp64 from the written file and the raw LoRA tensors; a bad report path is refused before merging."""
    d = _definition(_base_sd())
    lora = synthetic.save(render_lora(d, "comfy"), tmp_path / "l.safetensors")
    out, rep = tmp_path / "merged.safetensors", tmp_path / "errors.json"
    bad = tmp_path / "no_such_folder" / "e.json"
    assert cli_main(["merge-lora", str(models["mxfp8"]), f"{lora}:{STRENGTH}", "-o", str(out),
                     "--error-report", str(bad)]) == 2
    assert "output folder does not exist" in capsys.readouterr().err and not out.exists()
    assert cli_main(["merge-lora", str(models["mxfp8"]), f"{lora}:{STRENGTH}", "-o", str(out),
                     "--error-report", str(rep)]) == 0
    assert f"per-layer errors: {rep}" in capsys.readouterr().out
    data = json.loads(rep.read_text())
    src, merged = load_canonical(models["mxfp8"]), load_canonical(out)
    ref = _reference(src, d)
    want = {m: float((_dequant(merged, m) - ref[f"{m}.weight"]).norm() / ref[f"{m}.weight"].norm())
            for m in PATCHED if merged.layers[m].quantized}
    assert set(data["layers"]) == set(want) and data["output"] == str(out) and data["rounding"] == "stochastic"
    for m, v in data["layers"].items():
        assert v["requant_rel"] == pytest.approx(want[m], rel=2e-3), m
    values = [v["requant_rel"] for v in data["layers"].values()]
    assert values == sorted(values, reverse=True)


def test_bad_lora_leaves_model_and_output_untouched(models, tmp_path, capsys):
    d = _definition(_base_sd())
    d["blocks.0.ffn.0"]["up"] = torch.randn(100, RANK)  # does not fit ffn.0 [128, 64]
    lora = synthetic.save(render_lora(d, "comfy"), tmp_path / "bad.safetensors")
    before = _sha(models["float8_e4m3fn"])
    out = tmp_path / "never.safetensors"
    rc = cli_main(["merge-lora", str(models["float8_e4m3fn"]), str(lora), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "blocks.0.ffn.0.lora_up.weight" in err and "does not fit" in err
    assert not out.exists() and not list(tmp_path.glob(".wanquant-*"))
    assert _sha(models["float8_e4m3fn"]) == before
    # a LoRA that overflows the weight: refused mid-stream, still no output
    d2 = _definition(_base_sd())
    d2["head.head"]["up"] = d2["head.head"]["up"] * 1e30
    d2["head.head"]["down"] = d2["head.head"]["down"] * 1e30  # each finite, the product is not
    big = synthetic.save(render_lora(d2, "comfy"), tmp_path / "big.safetensors")
    with pytest.raises(WanquantError, match="not finite") as e:
        merge_lora_file(models["float8_e4m3fn"], [(str(big), 1.0)], out)
    assert e.value.layer == "head.head.weight" and not out.exists()


def test_strict_refuses_unmatched_keys(models, tmp_path, capsys):
    sd = render_lora(_definition(_base_sd()), "comfy")
    sd["diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight"] = torch.zeros(64, RANK)
    sd["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = torch.zeros(RANK, 64)
    lora = synthetic.save(sd, tmp_path / "i2v.safetensors")
    rc = cli_main(["merge-lora", str(models["bf16"]), str(lora), "--strict", "-o", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "k_img" in capsys.readouterr().err
    rc = cli_main(["merge-lora", str(models["bf16"]), str(lora), "-o", str(tmp_path / "x.safetensors")])
    text = capsys.readouterr().out
    assert rc == 0 and "image-to-video" in text and "unmatched: 2 keys" in text
