"""Per-row / block fp8 and int8 files in a real ComfyUI (in-process, CPU): the loader builds the
model, the denoiser matches the model built from the producer's dequantized weights, the path
each Linear really ran is the planned one (kernel calls counted), and option ``int8_matmul``
re-quantizes a per-tensor fp8 file with its added error reported per layer."""

from __future__ import annotations

import os

import pytest
import torch
from fixtures import denoise, ref_scale_grid, syn, tiny_wan

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

RECIPES = {  # name -> (builder, format, path on CPU under auto)
    "ctq_fp8_row": (lambda sd: syn_grid().ctq(sd, "fp8_row"), "float8_e4m3fn_rowwise", "dequant"),
    "ctq_fp8_block": (lambda sd: syn_grid().ctq(sd, "fp8_block", block=64), "float8_e4m3fn_blockwise", "dequant"),
    "ctq_fp8_block3d": (lambda sd: syn_grid().ctq(sd, "fp8_block3d", block=64), "float8_e4m3fn_block3d", "dequant"),
    "ctq_int8_tensor": (lambda sd: syn_grid().ctq(sd, "int8_tensor"), "int8_tensorwise", "int8_matmul"),
    "ctq_int8_block": (lambda sd: syn_grid().ctq(sd, "int8_block", block=64), "int8_blockwise", "dequant"),
    "lightx2v_int8": (lambda sd: syn_grid().lightx2v(sd, "int8"), "int8_tensorwise", "int8_matmul"),
    "lightx2v_fp8": (lambda sd: syn_grid().lightx2v(sd, "fp8"), "float8_e4m3fn_rowwise", "dequant"),
}


def syn_grid():
    from wanquant.loaders import synthetic_grid

    return synthetic_grid


def _ref_model(q):
    """fp32 ComfyUI model from the producer's formula (fp64 q * s[cell], by index arithmetic)."""
    import comfy.sd

    out = {}
    for k, t in q.items():
        if k.endswith((".weight_scale", ".weight.__fp8_scale", ".comfy_quant", ".input_scale")):
            continue
        if k.endswith(".weight") and t.dtype in (torch.int8, torch.float8_e4m3fn):
            out[k] = ref_scale_grid(t, q.get(k + "_scale", q.get(k + ".__fp8_scale"))).float()
        else:
            out[k] = t.float()
    return comfy.sd.load_diffusion_model_state_dict(out, model_options={"dtype": torch.float32})


@pytest.mark.parametrize("policy", ["auto", "dequant"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_loads_samples_and_runs_the_planned_path(comfy_inprocess, tmp_path, recipe, policy):
    from wanquant.nodes.bridge import load_wan_model
    from wanquant.ops import linear_grid

    build, fmt, auto_path = RECIPES[recipe]
    q = build(tiny_wan(seed=4))
    path = syn.save(q, tmp_path / f"{recipe}.safetensors")
    layers = [k[: -len(".weight")] for k, t in q.items() if k.endswith(".weight") and t.dtype in
              (torch.int8, torch.float8_e4m3fn) and not k.startswith("patch_embedding")]
    with torch.inference_mode():
        res = load_wan_model(str(path), policy=policy)
    plan = res.patcher.model.wanquant_plan
    before = dict(linear_grid.CALLS)
    out = denoise(res.patcher)
    want_out = denoise(_ref_model(q))
    want = auto_path if policy == "auto" else "dequant"
    for layer in layers:
        assert plan.layers[layer].fmt == fmt
        assert set(plan.executed.get(layer, {})) == {want}, (layer, plan.executed.get(layer))
    assert not plan.divergences()
    calls = linear_grid.CALLS["int8"] - before["int8"]
    assert calls >= len(layers) if want == "int8_matmul" else calls == 0
    rel = float((out - want_out).norm() / want_out.norm())
    # dequant: the same fp32 weights, only summation order differs; int8 W8A8 adds per-token
    # activation rounding (<= half an int8 step per element, ~1/254 relative per token)
    assert torch.isfinite(out).all() and rel < (2e-2 if want == "int8_matmul" else 1e-3), rel
    ops_line = next(l for l in res.report_lines if l.startswith("ops: "))
    assert ("int8 matmul" in ops_line) == (want == "int8_matmul"), ops_line


def test_fp8_rowwise_forced_scaled_mm_runs_on_cpu(comfy_inprocess, tmp_path):
    from wanquant.nodes.bridge import load_wan_model
    from wanquant.ops import linear_grid

    q = syn_grid().ctq(tiny_wan(seed=4), "fp8_row")
    path = syn.save(q, tmp_path / "row.safetensors")
    res = load_wan_model(str(path), policy="fp8_matmul")
    before = linear_grid.CALLS["fp8_rowwise"]
    out = denoise(res.patcher)
    want = denoise(_ref_model(q))
    plan = res.patcher.model.wanquant_plan
    rows = [n for n, lc in plan.layers.items() if lc.fmt == "float8_e4m3fn_rowwise"]
    assert rows and all(set(plan.executed[n]) == {"fp8_matmul"} for n in rows)
    assert linear_grid.CALLS["fp8_rowwise"] - before >= len(rows)
    # fp8 per-token activations: 3 mantissa bits, ~2^-5 relative per element, averaged down
    assert float((out - want).norm() / want.norm()) < 5e-2


def test_int8_matmul_option_requantizes_fp8_and_reports_the_error(comfy_inprocess, tmp_path):
    from wanquant.nodes.bridge import load_wan_model

    q, _ = syn.comfy_native(tiny_wan(seed=4), "float8_e4m3fn")
    path = syn.save(q, tmp_path / "fp8.safetensors")
    res = load_wan_model(str(path), policy="int8_matmul")
    plan = res.patcher.model.wanquant_plan
    fp8 = [n for n, lc in plan.layers.items() if lc.fmt == "float8_e4m3fn"]
    assert fp8 and set(plan.requantized) == set(fp8)
    # per-channel int8 of an fp8 weight: at most half an int8 step per element -> well under 1 %
    assert all(0 < e < 1e-2 for e in plan.requantized.values()), plan.requantized
    out = denoise(res.patcher)
    assert all(set(plan.executed[n]) == {"int8_matmul"} for n in fp8)
    ref = _ref_model({k: v for k, v in q.items()})
    want = denoise(ref)
    assert float((out - want).norm() / want.norm()) < 2e-2
    assert any("re-quantized" in l for l in res.report_lines), res.report_lines


@pytest.mark.parametrize("recipe,policy", [("lightx2v_int8", "auto"), ("ctq_fp8_row", "auto"),
                                           ("ctq_int8_block", "auto"), ("ctq_fp8_block3d", "int8_matmul")])
def test_loader_node_samples_in_a_running_comfyui(comfy_server, recipe, policy):
    """The loader node in a real ComfyUI server: load -> KSampler (2 steps) -> finite latent."""
    import json
    import shutil

    from fixtures import loader_node, sampler_prompt

    folder = comfy_server.models / "diffusion_models" / f"grid_{recipe}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    build, _, _ = RECIPES[recipe]
    q = build(tiny_wan(seed=6))
    if policy == "int8_matmul":  # int8_matmul needs per-tensor fp8 or int8 layers: add one fp8 layer
        fp8, _ = syn.comfy_native(tiny_wan(seed=6), {"blocks.0.ffn.0": "float8_e4m3fn"})
        q = {k: v for k, v in q.items() if not k.startswith("blocks.0.ffn.0.")}
        q.update({k: v for k, v in fp8.items() if k.startswith("blocks.0.ffn.0.")})
    syn.save(q, folder / "model.safetensors")
    hist = comfy_server.run_prompt(sampler_prompt(loader_node(f"grid_{recipe}/model.safetensors", policy=policy)))
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
    stats = hist["outputs"]["5"]["stats"][0]
    assert stats["finite"] and stats["shape"] == [1, 16, 1, 8, 8]


@pytest.mark.parametrize("recipe", ["ctq_int8_tensor", "lightx2v_int8", "ctq_fp8_block"])
def test_comfy_requantizes_a_patched_weight_in_the_same_grid(comfy_inprocess, tmp_path, recipe):
    """ComfyUI's LoRA merge path (set_weight -> requantize_from_float) keeps the layer's format,
    grid and per-tensor-ness; the stored result is the patched weight within its quantization step."""
    from wanquant.nodes.bridge import load_wan_model
    from wanquant.ops.formats import get_format

    build, fmt, _ = RECIPES[recipe]
    q = build(tiny_wan(seed=4))
    res = load_wan_model(str(syn.save(q, tmp_path / "m.safetensors")))
    layer = res.patcher.model.diffusion_model.get_submodule("blocks.0.ffn.0")
    before = layer.weight._params
    dense = layer.weight.dequantize().float()
    target = dense * 1.05 + 1e-3
    layer.set_weight(target, seed=0)
    after = layer.weight._params
    assert (after.fmt, after.block, tuple(after.scale.shape)) == (before.fmt, before.block, tuple(before.scale.shape))
    got = get_format(fmt).dequantize({"weight": layer.weight._qdata, "weight_scale": after.scale},
                                     conf={"group_size": after.block} if after.block else None)
    step = after.scale.float().max() * (1.0 if fmt.startswith("int8") else 32.0)  # int8: 1 step; e4m3: ulp <= 32 s
    assert float((got - target).abs().max()) <= float(step)
