"""Apply LoRA (quantized Wan) inside a real ComfyUI (skips without COMFYUI_PATH).

In-process (run with ComfyUI's python): a tiny quantized Wan loaded by ComfyUI itself gets a
LoRA in diffusers/PEFT names plus lightx2v's diff_m; the denoiser output is compared with the
same model built by ComfyUI from fp64 ``deq(W) + strength·(alpha/rank)·up@down`` weights in
fp32. "on the fly" must match it to fp32 rounding; "merge" within twice the output error of the
same reference requantized round-to-nearest in the same format (stochastic rounding has √2 the
RMS error of RTN). Server: loader → Apply LoRA → KSampler succeeds and differs from no LoRA.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from wanquant.loaders import synthetic as syn
from wanquant.lora.keys import render_lora
from fixtures import loader_node, sampler_prompt  # noqa: E402

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

STRENGTH = 0.9


def _base_sd(seed=3):
    return syn.wan_state_dict(seed=seed)  # dim 256 (ComfyUI derives 2 heads), 2 blocks


def _lora_def(sd, seed=1, rank=8, i2v=False):
    g = torch.Generator().manual_seed(seed)
    d = {}
    for layer in syn.quantizable_linears(sd):
        if layer.startswith("blocks.") or layer == "head.head":
            o, i = sd[f"{layer}.weight"].shape
            d[layer] = {"up": torch.randn(o, rank, generator=g) * 0.3 / i ** 0.5,
                        "down": torch.randn(rank, i, generator=g), "alpha": rank / 2}
    d["blocks.0.self_attn.q"]["diff_b"] = torch.randn(256, generator=g) * 0.02
    d["blocks.1.norm3"] = {"diff": torch.randn(256, generator=g) * 0.05}
    d["blocks.0.modulation"] = {"diff": torch.randn(1, 6, 256, generator=g) * 0.05}  # lightx2v diff_m
    d["blocks.1.modulation"] = {"diff": torch.randn(1, 6, 256, generator=g) * 0.05}
    if i2v:
        d["blocks.0.cross_attn.k_img"] = {"up": torch.randn(256, rank, generator=g), "down": torch.randn(rank, 256, generator=g)}
    return d


def _ref_state(base_sd_deq, lora_defs):
    """fp64 reference weights: dequantized W plus Σ strength·scale·up@down (+ diffs), as fp32."""
    out = {k: v.double().clone() for k, v in base_sd_deq.items()}
    for d, strength in lora_defs:
        for module, parts in d.items():
            if "up" in parts:
                scale = parts["alpha"] / parts["down"].shape[0] if parts.get("alpha") else 1.0
                out[f"{module}.weight"] += strength * scale * (parts["up"].double() @ parts["down"].double())
            if "diff" in parts:
                key = module if module.endswith("modulation") else f"{module}.weight"
                out[key] += strength * parts["diff"].double()
            if "diff_b" in parts:
                out[f"{module}.bias"] += strength * parts["diff_b"].double()
    return {k: v.float() for k, v in out.items()}


def _dequantized(path):
    """Canonical dequantized weights of a quantized file (fp64 math in the formats module)."""
    from wanquant.loaders.canonical import load_canonical
    from wanquant.ops.formats import get_format

    can = load_canonical(path)
    out = {}
    for k, e in can.entries.items():
        layer = can.layers.get(e.layer) if e.layer else None
        if layer is not None and layer.quantized:
            if k == f"{layer.name}.weight":
                t = {s: can.entries[f"{layer.name}.{s}"].load() for s in ("weight", "weight_scale", "weight_scale_2")
                     if f"{layer.name}.{s}" in can.entries}
                out[k] = get_format(layer.format).dequantize(t, torch.float32, layer.conf).double()
            elif k == f"{layer.name}.bias":
                out[k] = e.load().double()
            continue
        out[k] = e.load().double()
    return out


def _denoise(patcher, seed=0):
    import comfy.model_management as mm

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 1, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    with torch.inference_mode():
        mm.load_models_gpu([patcher])  # applies patches / weight functions / object patches
        return patcher.model.apply_model(x, torch.tensor([0.6]), c_crossattn=ctx).float()


def _load_native(sd, meta=None):
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_diffusion_model_state_dict(dict(sd), metadata=meta)


def _fp32_model(sd):
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _apply(model, path, strength=STRENGTH, mode="merge"):
    from wanquant.nodes.lora_nodes import apply_lora

    with torch.inference_mode():
        return apply_lora(model, str(path), strength, mode)


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "nvfp4", "mxfp8", "fp4_g32"])
def test_merge_and_on_the_fly_against_fp64_reference(comfy_inprocess, tmp_path, fmt):
    import comfy.utils

    sd = _base_sd()
    if fmt == "fp4_g32":
        from wanquant.nodes.bridge import load_wan_model

        path = syn.save(syn.fp4_g32(sd), tmp_path / "m.safetensors")
        with torch.inference_mode():
            base = load_wan_model(str(path)).patcher
        rtn_fmt = "nvfp4"  # a 4-bit format ComfyUI can build for the RTN yardstick (same E2M1 grid, finer scales)
    else:
        q, meta = syn.comfy_native(sd, fmt)
        path = syn.save(q, tmp_path / "m.safetensors", meta)
        base = _load_native(q, meta)
        rtn_fmt = fmt
    d = _lora_def(sd)
    lora = syn.save(render_lora(d, "diffusers"), tmp_path / "lora.safetensors")
    deq = _dequantized(path)
    ref_sd = _ref_state(deq, [(d, STRENGTH)])
    ref = _denoise(_fp32_model(ref_sd))
    rtn_sd, rtn_meta = syn.comfy_native(ref_sd, rtn_fmt)  # the format's own RTN requantization
    rtn_err = _rel(_denoise(_load_native(rtn_sd, rtn_meta)), ref)

    w_key = "diffusion_model.blocks.0.self_attn.q.weight"
    stored = comfy.utils.get_attr(base.model, w_key).dequantize().clone()
    merged, text = _apply(base, lora, mode="merge")
    fly, text_fly = _apply(base, lora, mode="on the fly")
    assert "diffusers/PEFT" in text and "rank 8" in text and "merge:" in text and "on the fly:" in text_fly
    assert "modulation" in text  # diff_m-style parameters reported as set directly
    assert base.patches == {} and base.object_patches == {}  # the input MODEL is untouched

    no_lora = _denoise(base)
    out_fly = _denoise(fly)
    assert torch.equal(comfy.utils.get_attr(fly.model, w_key).dequantize(), stored)  # never requantized
    out_merge = _denoise(merged)
    w_merged = comfy.utils.get_attr(merged.model, w_key)
    assert type(w_merged).__name__ == "QuantizedTensor" or fmt == "fp4_g32"  # still quantized after the merge
    assert _rel(no_lora, ref) > 0.2  # the LoRA matters
    assert _rel(out_fly, ref) < 1e-5, _rel(out_fly, ref)  # exact up to fp32
    assert _rel(out_merge, ref) < 2.0 * rtn_err, (_rel(out_merge, ref), rtn_err)
    assert _rel(_denoise(base), ref) == pytest.approx(_rel(no_lora, ref), rel=1e-6)  # unpatched again


def test_chain_composes_with_comfyuis_own_lora_loader(comfy_inprocess, tmp_path):
    """Our node + ComfyUI's LoraLoader on the same weights: both land once, they add up."""
    import comfy.sd
    import comfy.utils

    sd = _base_sd(seed=5)
    q, meta = syn.comfy_native(sd, "float8_e4m3fn")
    path = syn.save(q, tmp_path / "m.safetensors", meta)
    base = _load_native(q, meta)
    a, b = _lora_def(sd, seed=11), _lora_def(sd, seed=12)
    for d in (a, b):
        for m in [m for m in d if m.endswith("modulation")]:
            del d[m]  # ComfyUI's own loader cannot apply modulation patches (see the report)
    la = syn.save(render_lora(a, "peft"), tmp_path / "a.safetensors")
    lb = render_lora(b, "comfy")  # ComfyUI's native naming, loaded by ComfyUI itself
    deq = _dequantized(path)
    ref = _denoise(_fp32_model(_ref_state(deq, [(a, 0.7), (b, 0.5)])))
    twice = _denoise(_fp32_model(_ref_state(deq, [(a, 1.4), (b, 0.5)])))  # what double-applying a would give
    with torch.inference_mode():  # yardstick: ComfyUI's own loader with both LoRAs (it merges: requant error)
        c1, _ = comfy.sd.load_lora_for_models(base, None, render_lora(a, "comfy"), 0.7, 0.0)
        comfy_only, _ = comfy.sd.load_lora_for_models(c1, None, dict(lb), 0.5, 0.0)
    yard = _rel(_denoise(comfy_only), ref)
    assert yard < 0.1
    for mode in ("on the fly", "merge"):
        ours, _ = _apply(base, la, 0.7, mode)
        with torch.inference_mode():
            both, _ = comfy.sd.load_lora_for_models(ours, None, dict(lb), 0.5, 0.0)
            again, _ = comfy.sd.load_lora_for_models(base, None, dict(lb), 0.5, 0.0)
            ours_after, text = _apply(again, la, 0.7, mode)  # the other order
        assert "already carry other LoRA patches" in text
        for out in (_denoise(both), _denoise(ours_after)):
            assert _rel(out, ref) < 1.5 * yard, (mode, _rel(out, ref), yard)
            assert _rel(out, twice) > 3 * _rel(out, ref)  # a applied once, not twice


def test_two_of_our_nodes_chain_and_modulation_adds_up(comfy_inprocess, tmp_path):
    sd = _base_sd(seed=6)
    q, meta = syn.comfy_native(sd, "mxfp8")
    path = syn.save(q, tmp_path / "m.safetensors", meta)
    base = _load_native(q, meta)
    a, b = _lora_def(sd, seed=21), _lora_def(sd, seed=22)
    la = syn.save(render_lora(a, "comfy"), tmp_path / "a.safetensors")
    lb = syn.save(render_lora(b, "kohya"), tmp_path / "b.safetensors")
    ref = _denoise(_fp32_model(_ref_state(_dequantized(path), [(a, 1.0), (b, -0.5)])))
    first, _ = _apply(base, la, 1.0, "on the fly")
    second, _ = _apply(first, lb, -0.5, "on the fly")
    assert _rel(_denoise(second), ref) < 1e-5
    assert first.object_patches.keys() == second.object_patches.keys()  # b's modulation on top of a's


def test_bad_lora_leaves_the_model_unchanged(comfy_inprocess, tmp_path):
    from wanquant.errors import WanquantError

    sd = _base_sd()
    q, meta = syn.comfy_native(sd, "float8_e4m3fn")
    base = _load_native(q, meta)
    d = _lora_def(sd)
    d["blocks.1.ffn.0"]["down"] = torch.randn(8, 300)  # does not fit ffn.0 [512, 256]
    bad = syn.save(render_lora(d, "comfy"), tmp_path / "bad.safetensors")
    with pytest.raises(WanquantError) as e:
        _apply(base, bad)
    assert e.value.layer == "diffusion_model.blocks.1.ffn.0.lora_up.weight" and "does not fit" in str(e.value)
    nan = render_lora(_lora_def(sd), "comfy")
    nan["diffusion_model.blocks.0.ffn.2.lora_down.weight"][0, 0] = float("nan")
    with pytest.raises(WanquantError, match="NaN") as e:
        _apply(base, syn.save(nan, tmp_path / "nan.safetensors"))
    assert "blocks.0.ffn.2.lora_down" in e.value.layer
    assert base.patches == {} and base.object_patches == {} and base.weight_wrapper_patches == {}


def test_i2v_lora_on_t2v_model_warns_in_the_report(comfy_inprocess, tmp_path):
    sd = _base_sd()
    q, meta = syn.comfy_native(sd, "float8_e4m3fn")
    base = _load_native(q, meta)
    lora = syn.save(render_lora(_lora_def(sd, i2v=True), "comfy"), tmp_path / "i2v.safetensors")
    _, text = _apply(base, lora)
    assert "image-to-video" in text and "WARNING" in text and "model has no blocks.0.cross_attn.k_img.weight" in text


# ----------------------------------------------------------------------------------- server

def _prompt(model_name, lora_name=None, mode="merge", strength=1.0, seed=0, loader="UNETLoader"):
    load = ({"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}}
            if loader == "UNETLoader" else loader_node(model_name))
    p = sampler_prompt(load, seed)
    if lora_name:
        p["6"] = {"class_type": "WanQuantApplyLoRA", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                                "strength": strength, "mode": mode}}
        p["4"]["inputs"]["model"] = ["6", 0]
    return p


def test_node_registered_with_tooltips(comfy_server):
    info = comfy_server.get_json("/object_info")
    spec = info["WanQuantApplyLoRA"]
    assert spec["category"] == "wanquant/lora" and spec["display_name"] == "Apply LoRA (quantized Wan)"
    assert spec["output"] == ["MODEL", "STRING"]
    for name, value in spec["input"]["required"].items():
        assert value[1].get("tooltip"), name
    assert spec["input"]["required"]["mode"][1]["options"] == ["merge", "on the fly"] or \
        spec["input"]["required"]["mode"][0] == ["merge", "on the fly"]


@pytest.mark.parametrize("loader", ["UNETLoader", "WanQuantLoadDiT"])
def test_loader_apply_lora_ksampler(comfy_server, loader):
    """Stock loader with a native fp8 file; wanquant's loader with the FP4 group-32 release format."""
    models = comfy_server.models
    folder = models / "diffusion_models" / f"lora_test_{loader}"
    if folder.exists():
        shutil.rmtree(folder)
    sd = _base_sd()
    if loader == "UNETLoader":
        q, meta = syn.comfy_native(sd, "float8_e4m3fn")
    else:
        q, meta = syn.fp4_g32(sd), None
    syn.save(q, folder / "wan_q.safetensors", meta)
    syn.save(render_lora(_lora_def(sd), "diffusers"), models / "loras" / "wq_test_lora.safetensors")
    d = _lora_def(sd)
    d["blocks.0.ffn.0"]["up"] = torch.randn(100, 8)
    syn.save(render_lora(d, "comfy"), models / "loras" / "wq_bad_lora.safetensors")
    name = f"lora_test_{loader}/wan_q.safetensors"

    def run(*a, **kw):
        hist = comfy_server.run_prompt(_prompt(name, *a, loader=loader, **kw))
        assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
        stats = hist["outputs"]["5"]["stats"][0]
        assert stats["finite"]
        return stats["checksum"]

    plain = run()
    merged = run("wq_test_lora.safetensors", "merge")
    fly = run("wq_test_lora.safetensors", "on the fly")
    assert abs(merged - plain) > 1e-3 * abs(plain) and abs(fly - plain) > 1e-3 * abs(plain)
    # both modes apply the same LoRA; merging into 4 bits adds visible requantization noise
    assert abs(merged - fly) < (0.25 if loader == "UNETLoader" else 0.75) * abs(merged - plain)
    if loader != "UNETLoader":
        return  # the error and restore paths are the node's own, checked once below
    assert run() == pytest.approx(plain, rel=1e-6)  # the loaded model was restored
    hist = comfy_server.run_prompt(_prompt(name, "wq_bad_lora.safetensors", loader=loader))
    assert hist["status"]["status_str"] == "error"
    err = [m for m in hist["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert "blocks.0.ffn.0.lora_up.weight" in err["exception_message"]
    assert run() == pytest.approx(plain, rel=1e-6)
