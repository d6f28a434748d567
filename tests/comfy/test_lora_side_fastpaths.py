"""The LoRA side path on the int8 W8A8, row-wise fp8, block-grid and GGUF layers (real ComfyUI, CPU).

Each format is loaded by wanquant's loader into a real ComfyUI model, a LoRA goes on "on the fly",
and one Linear is checked against an fp64 reference built here, independently of the pack: the
weight dequantized by the producer's own formula (``q * scale[cell]`` by index arithmetic; gguf-py's
decoder for GGUF) plus the exact low-rank delta ``s·(alpha/rank)·x·(up@down)ᵀ + s·diff_b``.

* int8_tensorwise (policy auto -> int8_matmul) and float8_e4m3fn_rowwise (forced fp8_matmul, as
  tests/comfy/test_grid_formats_comfy.py forces it): exactly one ``aten._int_mm`` / ``aten._scaled_mm``
  per forward with 1 and 3 LoRAs (counted by a dispatch mode, not by the pack's own counters); the
  side path's addition equals the fp64 delta to 1e-5 (it runs in fp32); the whole output equals the
  fp64 ``x·(deq W + ΔW)ᵀ + b`` within the kernels' per-token activation rounding (int8: 2e-2,
  fp8 e4m3: 5e-2 relative); ``plan.executed`` still names the fast path for every layer.
* GGUF and block grids (dequant path): the output equals the fp64 reference to 1e-5.
* strength 0 (node strength and ``set_strength``) is bit-identical to no LoRA.
* ComfyUI lowvram partial loading (a budget that leaves some block layers resident, some
  offloaded) gives bit-identical outputs for int8 and GGUF.
* The report names the path each LoRA'd layer keeps (int8_matmul / fp8_matmul row-wise / dequant).
* ComfyUI's own LoraLoader on GGUF layers (kept dense, exact) composes with the side path.
* ``merge`` mode: int8 / row-wise / grid layers are requantized in their own format by ComfyUI
  (checked against the fp64 reference within the requantization error); GGUF is refused up front
  with one WanquantError naming the layer, the format and what to do.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import denoise, ref_scale_grid, syn, tiny_wan
from lora_side_helpers import (LAYER, CountKernels, apply as _apply, core_lora, layer_out as _layer_out,
                               lora_def as _lora_def, ours_and_theirs)
from wanquant.lora.keys import render_lora

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

DATA = Path(__file__).resolve().parents[1] / "data" / "gguf"
GGUF_TYPES = ("Q8_0", "Q4_K", "Q5_0", "Q6_K")
# name -> (policy, path every quantized block Linear must run, kernel op counted, whole-output tolerance)
KINDS = {
    "int8": ("auto", "int8_matmul", "_int_mm", 2e-2),
    "rowwise": ("fp8_matmul", "fp8_matmul", "_scaled_mm", 5e-2),
    "fp8_block": ("auto", "dequant", None, 1e-5),
    "int8_block": ("auto", "dequant", None, 1e-5),
    "gguf": ("auto", "dequant", None, 1e-5),
}
FORMAT_OF = {"int8": "int8_tensorwise", "rowwise": "float8_e4m3fn_rowwise", "fp8_block": "float8_e4m3fn_blockwise",
             "int8_block": "int8_blockwise", "gguf": "gguf_q8_0"}


def _gguf_recipe():
    spec = importlib.util.spec_from_file_location("make_gguf", DATA / "make_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _gguf_deq64(path, name):
    import gguf

    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == name:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape))
    raise KeyError(name)


def _model(tmp_path, kind, seed=3):
    """(fp32 state dict, {block Linear: fp64 dequantized weight}, ComfyUI patcher) for ``kind``."""
    from wanquant.loaders import synthetic_grid
    from wanquant.nodes.bridge import load_wan_model

    sd = tiny_wan(seed=seed)
    layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]
    if kind == "gguf":
        pytest.importorskip("gguf")
        types = {f"{l}.weight": GGUF_TYPES[i % len(GGUF_TYPES)] for i, l in enumerate(layers)}
        types[f"{LAYER}.weight"] = "Q8_0"
        path = tmp_path / f"{kind}.gguf"
        _gguf_recipe().write_wan_gguf(path, sd, types, seed=seed)
        deq = {l: _gguf_deq64(path, f"{l}.weight") for l in layers}
    else:
        mode = {"int8": "int8_tensor", "rowwise": "fp8_row", "fp8_block": "fp8_block", "int8_block": "int8_block"}[kind]
        q = synthetic_grid.ctq(sd, mode, block=64, layers=layers)
        path = syn.save(q, tmp_path / f"{kind}.safetensors")
        deq = {l: ref_scale_grid(q[f"{l}.weight"], q[f"{l}.weight_scale"]) for l in layers}
    with torch.inference_mode():
        patcher = load_wan_model(str(path), policy=KINDS[kind][0], compute_dtype="fp32").patcher
    module = patcher.model.diffusion_model.get_submodule(LAYER)
    assert module.quant_format == FORMAT_OF[kind]
    return sd, deq, patcher


def _delta_w64(used, layer):
    return sum(s * (d[layer]["alpha"] / d[layer]["down"].shape[0]) * (d[layer]["up"].double() @ d[layer]["down"].double())
               for d, s in used)


def _delta64(used, layer, x):
    """fp64 Σ s·(alpha/rank)·x·(up@down)ᵀ + s·diff_b for one layer."""
    out = x.double() @ _delta_w64(used, layer).T
    for d, s in used:
        if "diff_b" in d[layer]:
            out = out + s * d[layer]["diff_b"].double()
    return out


def _full64(sd, deq, used, layer, x):
    """fp64 ``x·(deq W)ᵀ + b`` plus the LoRA delta: the whole layer's reference output."""
    return x.double() @ deq[layer].T + sd[f"{layer}.bias"].double() + (_delta64(used, layer, x) if used else 0.0)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _loras(tmp_path, sd, n):
    specs = [(11, 8, 0.9, "comfy"), (12, 4, -0.6, "diffusers"), (13, 16, 1.7, "kohya")][:n]
    out = []
    for seed, rank, s, style in specs:
        d = _lora_def(sd, seed, rank)
        out.append((d, s, syn.save(render_lora(d, style), tmp_path / f"l{seed}.safetensors")))
    return out


@pytest.mark.parametrize("kind", ["int8", "rowwise"])
def test_fast_path_with_one_and_three_loras_keeps_its_kernel_and_matches_fp64(comfy_inprocess, tmp_path, kind):
    import comfy.model_management as mm

    _, path, op, tol = KINDS[kind]
    sd, deq, base = _model(tmp_path, kind)
    loras = _loras(tmp_path, sd, 3)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    y0, n0 = _layer_out(base, x)
    assert n0[op] == 1  # the fast kernel runs without a LoRA
    assert _rel(y0, _full64(sd, deq, [], LAYER, x)) < tol
    one, text = _apply(base, loras[0][2], loras[0][1])
    chain = one
    for _, s, f in loras[1:]:
        chain, _ = _apply(chain, f, s)
    for model, used in ((one, loras[:1]), (chain, loras)):
        used = [(d, s) for d, s, _ in used]
        y, n = _layer_out(model, x)
        assert n[op] == 1 and sum(n.values()) == 1  # still exactly one kernel call: the LoRA left it on
        assert _rel(y.double() - y0.double(), _delta64(used, LAYER, x)) < 1e-5
        assert _rel(y, _full64(sd, deq, used, LAYER, x)) < tol
        with torch.inference_mode():
            mm.load_models_gpu([model])
        out = denoise(model)
        plan = model.model.wanquant_plan
        for layer in deq:
            assert set(plan.executed[layer]) == {path}, (layer, plan.executed[layer])
        assert not plan.divergences() and torch.isfinite(out).all()
    side = chain.object_patches[f"diffusion_model.{LAYER}.wanquant_lora"]
    assert len(side.terms) == 6  # weight + bias term per LoRA, three chained nodes


@pytest.mark.parametrize("kind", ["fp8_block", "int8_block", "gguf"])
def test_dequant_layers_with_the_side_path_match_fp64(comfy_inprocess, tmp_path, kind):
    import comfy.model_management as mm

    sd, deq, base = _model(tmp_path, kind, seed=4)
    loras = _loras(tmp_path, sd, 2)
    x = torch.randn(2, 7, 256, generator=torch.Generator().manual_seed(2))
    y0, _ = _layer_out(base, x)
    assert _rel(y0, _full64(sd, deq, [], LAYER, x)) < 1e-5
    fly, text = _apply(base, loras[0][2], loras[0][1])
    fly, _ = _apply(fly, loras[1][2], loras[1][1])
    y, n = _layer_out(fly, x)
    used = [(d, s) for d, s, _ in loras]
    assert sum(n.values()) == 0  # no fast kernel on these layers, with or without LoRA
    assert _rel(y, _full64(sd, deq, used, LAYER, x)) < 1e-5
    assert _rel(y.double() - y0.double(), _delta64(used, LAYER, x)) < 1e-4
    with torch.inference_mode():
        mm.load_models_gpu([fly])
    denoise(fly)
    plan = fly.model.wanquant_plan
    for layer in deq:
        assert set(plan.executed[layer]) == {"dequant"}, (layer, plan.executed[layer])
    assert "0 as weight functions" in text


@pytest.mark.parametrize("kind", ["int8", "rowwise", "int8_block", "gguf"])
def test_strength_zero_is_bit_identical(comfy_inprocess, tmp_path, kind):
    sd, _, base = _model(tmp_path, kind, seed=5)
    f = syn.save(render_lora(_lora_def(sd, 21), "comfy"), tmp_path / "a.safetensors")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    y0, _ = _layer_out(base, x)
    zero, text = _apply(base, f, 0.0)
    assert "strength 0" in text and torch.equal(_layer_out(zero, x)[0], y0)
    fly, _ = _apply(base, f, 1.0)
    side = fly.object_patches[f"diffusion_model.{LAYER}.wanquant_lora"]
    assert not torch.equal(_layer_out(fly, x)[0], y0)
    for i in range(len(side.terms)):
        side.set_strength(i, 0.0)  # strength change without a reload
    assert torch.equal(_layer_out(fly, x)[0], y0)


@pytest.mark.parametrize("kind", ["int8", "gguf"])
def test_lowvram_partial_load_is_bit_identical(comfy_inprocess, tmp_path, kind):
    import comfy.model_management as mm

    _, path, op, _ = KINDS[kind]
    sd, deq, base = _model(tmp_path, kind, seed=6)
    loras = _loras(tmp_path, sd, 2)
    fly, _ = _apply(base, loras[0][2], loras[0][1])
    fly, _ = _apply(fly, loras[1][2], loras[1][1])
    used = [(d, s) for d, s, _ in loras]
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    y0, _ = _layer_out(base, x)
    with torch.inference_mode():
        mm.load_models_gpu([fly])
    full_out = denoise(fly)
    xs = {l: torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(i)) for i, (l, w) in enumerate(deq.items())}
    xs[LAYER] = x
    full = {l: _layer_out(fly, xs[l], l)[0] for l in deq}
    fly.unpatch_model()
    low = fly.clone()
    net = low.model.diffusion_model
    offloaded = set()
    # ComfyUI's lowvram: the first budget that splits the blocks (its budget also reserves room to cast
    # the next offloaded layers, so budgets above the model's size can still offload some)
    for frac in [i / 20 for i in range(60, 0, -1)]:
        with torch.inference_mode():
            low.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=int(low.model_size() * frac),
                            load_weights=True, force_patch_weights=False)
        offloaded = {l for l in deq if getattr(net.get_submodule(l), "comfy_cast_weights", False)}
        if offloaded and offloaded != set(deq):
            break
        low.unpatch_model()
    assert offloaded and offloaded != set(deq)  # really partial: some layers offloaded, some resident
    low_out = denoise(low)
    assert torch.equal(low_out, full_out)
    for layer, want in full.items():  # resident and offloaded layers alike
        with torch.inference_mode(), CountKernels() as count:
            y = net.get_submodule(layer)(xs[layer])
        assert torch.equal(y, want), (layer, layer in offloaded)
        if op:
            assert count.n[op] == 1, (layer, count.n)
    assert _rel(full[LAYER].double() - y0.double(), _delta64(used, LAYER, x)) < 1e-5
    plan = low.model.wanquant_plan
    for layer in deq:
        assert set(plan.executed[layer]) == {path}, (layer, plan.executed[layer])
    low.unpatch_model()


def test_report_names_the_path_each_side_path_layer_keeps(comfy_inprocess, tmp_path):
    reports = {}
    for kind in ("int8", "rowwise", "gguf"):
        sd, deq, base = _model(tmp_path, kind, seed=7)
        f = syn.save(render_lora(_lora_def(sd, 31), "comfy"), tmp_path / f"{kind}.safetensors")
        _, reports[kind] = _apply(base, f, 0.7)
        n = len(deq)
        line = next(l for l in reports[kind].splitlines() if "side path beside" in l)
        want = {"int8": f"int8_matmul (W8A8, torch._int_mm) {n}",
                "rowwise": f"fp8_matmul (row-wise scales, torch._scaled_mm) {n}",
                "gguf": f"dequant (weight decoded per forward) {n}"}[kind]
        assert want in line, line
        others = {"int8_matmul", "fp8_matmul", "dequant"} - {want.split(" ")[0]}
        assert not any(o in line for o in others), line
        assert f"ran as side path ({n + 1})" in reports[kind]  # every block weight + LAYER's bias
    assert "kernel stays on" not in reports["gguf"]


@pytest.mark.parametrize("kind", ["int8", "rowwise", "fp8_block"])
def test_merge_mode_requantizes_in_the_layers_own_format(comfy_inprocess, tmp_path, kind):
    """ComfyUI merges at load (dequant -> add -> requant with a fresh scale, seeded stochastic
    rounding) through wanquant's layout: the layer keeps its format and its kernel, and the merged
    weight is the fp64 reference within a few requantization steps of that format."""
    from wanquant.ops.formats import get_format

    _, path, op, tol = KINDS[kind]
    sd, deq, base = _model(tmp_path, kind, seed=8)
    d = _lora_def(sd, 41)
    f = syn.save(render_lora(d, "comfy"), tmp_path / "m.safetensors")
    merged, text = _apply(base, f, 0.8, "merge")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    y, n = _layer_out(merged, x)
    module = merged.model.diffusion_model.get_submodule(LAYER)
    assert module.quant_format == FORMAT_OF[kind] and module.weight._params.fmt == FORMAT_OF[kind]
    if op:
        assert n[op] == 1
    ref_w = deq[LAYER] + _delta_w64([(d, 0.8)], LAYER)
    got_w = module.weight.dequantize().double()
    t, conf = get_format(FORMAT_OF[kind]).quantize(ref_w.float(), conf={"format": FORMAT_OF[kind], "group_size": 64})
    rtn = _rel(get_format(FORMAT_OF[kind]).dequantize(t, torch.float64, conf), ref_w)
    assert 0 < _rel(got_w, ref_w) < 2.5 * rtn + 1e-7, (_rel(got_w, ref_w), rtn)
    assert _rel(y, _full64(sd, deq, [(d, 0.8)], LAYER, x)) < tol + 3 * rtn
    merged.unpatch_model()
    assert "merge:" in text


def test_merge_mode_refuses_gguf_naming_layer_and_format(comfy_inprocess, tmp_path):
    from wanquant.errors import WanquantError

    sd, _, base = _model(tmp_path, "gguf", seed=9)
    f = syn.save(render_lora(_lora_def(sd, 51), "comfy"), tmp_path / "g.safetensors")
    with pytest.raises(WanquantError) as e:
        _apply(base, f, 1.0, "merge")
    msg = str(e.value)
    assert "blocks.0." in msg and "gguf_" in msg and "on the fly" in msg, msg
    assert base.patches == {} and base.object_patches == {}
    fly, _ = _apply(base, f, 1.0, "on the fly")  # the way it names works
    assert f"diffusion_model.{LAYER}.wanquant_lora" in fly.object_patches


def test_core_lora_loader_on_gguf_layers_plus_our_side_path(comfy_inprocess, tmp_path):
    """ComfyUI's own LoraLoader patches a GGUF layer (dequantize -> add; wanquant cannot re-quantize
    GGUF, so the patched weight stays dense) and our side path adds on top: exact to fp32."""
    sd, deq, base = _model(tmp_path, "gguf", seed=10)
    ours, theirs, f = ours_and_theirs(sd, tmp_path, (61, 62), "comfy")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(6))
    both, _ = _apply(core_lora(base, theirs, 0.5), f, 0.7)
    y, _ = _layer_out(both, x)
    with torch.inference_mode():  # as ComfyUI does it (unpatching outside inference mode breaks any QuantizedTensor)
        both.unpatch_model()
    want = _full64(sd, deq, [(ours, 0.7)], LAYER, x) + 0.5 * (x.double() @ _delta_w64([(theirs, 1.0)], LAYER).T)
    assert _rel(y, want) < 1e-5
    y0, _ = _layer_out(base, x)  # unpatched: the GGUF blocks are back
    assert _rel(y0, _full64(sd, deq, [], LAYER, x)) < 1e-5
    assert type(base.model.diffusion_model.get_submodule(LAYER).weight).__name__ == "QuantizedTensor"
