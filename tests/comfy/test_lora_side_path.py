"""Apply LoRA "on the fly" on wanquant-loaded models keeps the quantized kernel (real ComfyUI, CPU).

The LoRA runs as a low-rank side path beside each Linear. Checked against fp64 references built
independently (dequantized weight from the formats module + the exact low-rank delta): per layer,
the side path's addition equals ``s·(x·Aᵀ)·Bᵀ + s·diff_b``; ``_scaled_mm`` still runs (counted);
``plan.executed`` still says fp8_matmul; chains add; the input MODEL is left as it was; lowvram
partial loading gives the same output; and on NVFP4 an error-compensation LoRA on the side path
lands closer to the bf16 model than the same LoRA merged (requantized).
"""

from __future__ import annotations

import os

import pytest
import torch

from fixtures import syn, tiny_wan
from lora_side_helpers import LAYER, apply as _apply, core_lora, layer_out, lora_def as _lora_def, ours_and_theirs
from wanquant.lora.keys import render_lora

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")


def _delta64(d, strength, layer, x):
    """fp64 s·(alpha/rank)·x·(up@down)ᵀ + s·diff_b for one layer."""
    p = d[layer]
    w = (p["alpha"] / p["down"].shape[0]) * (p["up"].double() @ p["down"].double())
    out = strength * (x.double() @ w.T)
    return out + strength * p["diff_b"].double() if "diff_b" in p else out


def _fp8_model(tmp_path, seed=3):
    from wanquant.nodes.bridge import load_wan_model

    sd = tiny_wan(seed=seed)
    layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]
    q, _ = syn.comfy_native(sd, {l: "float8_e4m3fn" for l in layers})
    path = syn.save(q, tmp_path / "fp8.safetensors")
    with torch.inference_mode():
        return sd, layers, load_wan_model(str(path), policy="fp8_matmul", compute_dtype="fp32").patcher


def _denoise(patcher):
    import comfy.model_management as mm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    with torch.inference_mode():
        mm.load_models_gpu([patcher])
        return patcher.model.apply_model(x, torch.tensor([0.6]), c_crossattn=ctx).float()


def test_fp8_one_and_three_loras_keep_scaled_mm_and_match_fp64(comfy_inprocess, tmp_path):
    sd, layers, base = _fp8_model(tmp_path)
    defs = [(_lora_def(sd, 11), 0.9), (_lora_def(sd, 12, rank=4), -0.6), (_lora_def(sd, 13, rank=16), 1.7)]
    files = [syn.save(render_lora(d, style), tmp_path / f"l{i}.safetensors")
             for i, (d, style) in enumerate(zip([d for d, _ in defs], ["comfy", "diffusers", "kohya"]))]
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    before = _denoise(base)
    y0, n0 = layer_out(base, x)
    assert n0 == {"_int_mm": 0, "_scaled_mm": 1}  # the fp8 kernel ran without a LoRA

    one, text = _apply(base, files[0], defs[0][1])
    assert "ran as side path" in text and f"{LAYER}.weight" in text and f"{LAYER}.bias" in text
    assert "0 as weight functions" in text
    chain, three = one, None
    for (d, s), f in zip(defs[1:], files[1:]):
        chain, _ = _apply(chain, f, s)
    three = chain
    for model, used in ((one, defs[:1]), (three, defs)):
        y, n = layer_out(model, x)
        assert n == {"_int_mm": 0, "_scaled_mm": 1}  # still exactly one _scaled_mm: the LoRA did not turn the fp8 path off
        want = sum(_delta64(d, s, LAYER, x) for d, s in used)
        got = y.double() - y0.double()
        assert float((got - want).norm() / want.norm()) < 1e-5
        out = _denoise(model)
        plan = model.model.wanquant_plan
        for layer in layers:
            assert set(plan.executed[layer]) == {"fp8_matmul"}, (layer, plan.executed[layer])
        assert not plan.divergences()
        assert float((out - before).norm() / before.norm()) > 0.05  # the LoRA matters
    # every LoRA layer of three chained nodes carries three terms; the first clone still one
    side3 = three.object_patches[f"diffusion_model.{LAYER}.wanquant_lora"]
    side1 = one.object_patches[f"diffusion_model.{LAYER}.wanquant_lora"]
    assert len(side3.terms) == 6 and len(side1.terms) == 2  # weight + bias term per LoRA
    # the input MODEL is unchanged after running the LoRA'd clones
    assert base.object_patches == {} and base.patches == {}
    assert torch.equal(_denoise(base), before)
    assert torch.equal(layer_out(base, x)[0], y0)


def test_strength_zero_is_bit_identical(comfy_inprocess, tmp_path):
    sd, _, base = _fp8_model(tmp_path, seed=4)
    f = syn.save(render_lora(_lora_def(sd, 21), "comfy"), tmp_path / "a.safetensors")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    y0, _ = layer_out(base, x)
    zero, text = _apply(base, f, 0.0)
    assert "strength 0" in text and torch.equal(layer_out(zero, x)[0], y0)
    fly, _ = _apply(base, f, 1.0)
    side = fly.object_patches[f"diffusion_model.{LAYER}.wanquant_lora"]
    assert not torch.equal(layer_out(fly, x)[0], y0)
    for i in range(len(side.terms)):
        side.set_strength(i, 0.0)  # strength change without a reload
    assert torch.equal(layer_out(fly, x)[0], y0)


def test_lowvram_partial_load_same_output(comfy_inprocess, tmp_path):
    sd, _, base = _fp8_model(tmp_path, seed=5)
    d = _lora_def(sd, 31)
    f = syn.save(render_lora(d, "comfy"), tmp_path / "a.safetensors")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    y0, _ = layer_out(base, x)
    fly, _ = _apply(base, f, 0.8)
    full, _ = layer_out(fly, x)
    fly.unpatch_model()
    low = fly.clone()
    low_y, n = layer_out(low, x, lowvram_model_memory=1, load_weights=True, force_patch_weights=False)
    module = low.model.diffusion_model.get_submodule(LAYER)
    assert getattr(module, "comfy_cast_weights", False)  # really partially loaded (lowvram)
    assert n["_scaled_mm"] == 1 and torch.equal(low_y, full)
    want = _delta64(d, 0.8, LAYER, x)
    assert float(((low_y.double() - y0.double()) - want).norm() / want.norm()) < 1e-5
    low.unpatch_model()


def _dequantized(path):
    from wanquant.loaders.canonical import load_canonical
    from wanquant.ops.formats import get_format

    can = load_canonical(path)
    out = {}
    for name, layer in can.layers.items():
        if layer.quantized:
            t = {s: can.entries[f"{name}.{s}"].load() for s in ("weight", "weight_scale", "weight_scale_2")
                 if f"{name}.{s}" in can.entries}
            out[name] = get_format(layer.format).dequantize(t, torch.float32, layer.conf).double()
    return out


def test_nvfp4_error_compensation_side_path_beats_merge(comfy_inprocess, tmp_path):
    """Seed 003's case: an NVFP4 model plus a LoRA fitted to its quantization error (rank-32 SVD of
    W_bf16 - deq(W_nvfp4)); the side path keeps it exact, merging requantizes it into 4 bits."""
    from wanquant.nodes.bridge import load_wan_model

    sd = {k: v.bfloat16() if v.is_floating_point() else v for k, v in tiny_wan(seed=6).items()}
    layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]
    q, _ = syn.comfy_native(sd, {l: "nvfp4" for l in layers})
    qpath = syn.save(q, tmp_path / "nvfp4.safetensors")
    deq = _dequantized(str(qpath))
    d = {}
    for l in layers:
        u, s, vh = torch.linalg.svd(sd[f"{l}.weight"].double() - deq[l], full_matrices=False)
        d[l] = {"up": (u[:, :32] * s[:32]).float(), "down": vh[:32].float()}
    f = syn.save(render_lora(d, "comfy"), tmp_path / "ec.safetensors")
    bpath = syn.save(sd, tmp_path / "bf16.safetensors")
    with torch.inference_mode():
        ref_model = load_wan_model(str(bpath), compute_dtype="fp32").patcher
        base = load_wan_model(str(qpath), compute_dtype="fp32").patcher
    ref = _denoise(ref_model)
    fly, text = _apply(base, f, 1.0, "on the fly")
    merged, _ = _apply(base, f, 1.0, "merge")
    assert f"ran as side path ({len(layers)})" in text
    rel = {name: float((_denoise(m) - ref).norm() / ref.norm()) for name, m in
           (("none", base), ("side", fly), ("merge", merged))}
    print(f"NVFP4 + error-compensation LoRA, output error vs bf16: {rel}")
    assert rel["side"] < 0.5 * rel["merge"], rel
    assert rel["side"] < 0.9 * rel["none"], rel  # rank 32 of flat quantization noise: a part of it


def test_side_path_composes_with_comfyuis_own_lora_loader(comfy_inprocess, tmp_path):
    """Our side path + ComfyUI's LoraLoader (its own patches, merged into the fp8 weight at load) on
    one wanquant-loaded layer: the output is ComfyUI's patched layer plus exactly our delta."""
    sd, _, base = _fp8_model(tmp_path, seed=7)
    ours, theirs, f = ours_and_theirs(sd, tmp_path, (41, 42), "peft")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(4))
    comfy_only = core_lora(base, theirs, 0.5)
    y_comfy, _ = layer_out(comfy_only, x)
    comfy_only.unpatch_model()
    for order in ("ours first", "comfy first"):
        if order == "ours first":
            fly, _ = _apply(base, f, 0.7)
            both = core_lora(fly, theirs, 0.5)
        else:
            both, _ = _apply(comfy_only, f, 0.7)
        y, _ = layer_out(both, x)
        both.unpatch_model()
        want = _delta64(ours, 0.7, LAYER, x)
        assert float(((y.double() - y_comfy.double()) - want).norm() / want.norm()) < 1e-5, order


def test_side_path_survives_a_cached_patcher_init_rebuild(comfy_inprocess, tmp_path):
    """ComfyUI rebuilds a model from ``cached_patcher_init`` (``clone(force_deepcopy=True)``, the
    non-dynamic delegate, multi-GPU clones): the fresh model must get the LoRA side path back from the
    clone's object patches and still run the fp8 kernel with it."""
    sd, layers, base = _fp8_model(tmp_path, seed=7)
    d = _lora_def(sd, 41)
    f = syn.save(render_lora(d, "comfy"), tmp_path / "a.safetensors")
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(4))
    y0, _ = layer_out(base, x)
    fly, _ = _apply(base, f, 0.8)
    y_fly, _ = layer_out(fly, x)
    with torch.inference_mode():
        rebuilt = fly.clone(force_deepcopy=True)  # ComfyUI's own rebuild through cached_patcher_init
    assert rebuilt.model is not fly.model and rebuilt.model is not base.model
    y_re, n = layer_out(rebuilt, x)
    assert n["_scaled_mm"] == 1 and torch.equal(y_re, y_fly)
    got, want = y_re.double() - y0.double(), _delta64(d, 0.8, LAYER, x)
    assert float((got - want).norm() / want.norm()) < 1e-5
    _denoise(rebuilt)
    plan = rebuilt.model.wanquant_plan
    for layer in layers:
        assert set(plan.executed[layer]) == {"fp8_matmul"}, (layer, plan.executed[layer])
