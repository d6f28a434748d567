"""ComfyUI's newer comfy_quant algorithms in a real ComfyUI (in-process, CPU): a layer the running
ComfyUI knows loads into ComfyUI's own layout untouched, is reported (and really runs) as ComfyUI's
own path, and the model computes exactly like stock ComfyUI loading the same file; int8 + ConvRot
weights equal an fp64 reference of the producer's formula (q * s, rotated back by the regular
Hadamard); one the running ComfyUI lacks is one WanquantError naming the ComfyUI that adds it; the
version table agrees with the running ComfyUI's QUANT_ALGOS."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from comfy_algo_files import CONVROT, RECIPES, native
from fixtures import denoise, syn, tiny_wan

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

LAYOUTS = {CONVROT: "TensorWiseINT8Layout", "convrot_w4a4": "TensorCoreConvRotW4A4Layout",
           "asym_w4a8_int8": "AsymW4A8Int8Layout"}


def _running_version() -> tuple[int, ...]:
    text = Path(os.environ["COMFYUI_PATH"], "comfyui_version.py").read_text()
    return tuple(int(x) for x in text.split('"')[1].split("."))


def _blocks(sd):
    return [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]


def _file(tmp_path, key):
    sd = tiny_wan(seed=4)
    q = native(sd, key, _blocks(sd))
    return q, syn.save(q, tmp_path / f"{key.replace('+', '_')}.safetensors")


def _stock(q):
    """Stock ComfyUI loading the same tensors with its own ops (its reference)."""
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(q), model_options={})


@pytest.mark.parametrize("key", sorted(RECIPES))
def test_known_algorithm_runs_in_comfyuis_own_layout(comfy_inprocess, tmp_path, key):
    from wanquant.loaders.comfy_algos import ALGOS
    from wanquant.nodes.bridge import load_wan_model

    if _running_version() < tuple(int(x) for x in ALGOS[key].since.split(".")):
        pytest.skip(f"{key} needs ComfyUI >= {ALGOS[key].since}")
    q, path = _file(tmp_path, key)
    res = load_wan_model(str(path), policy="auto")
    plan = res.patcher.model.wanquant_plan
    layers = _blocks(tiny_wan(seed=4))
    diffusion = res.patcher.model.diffusion_model
    for l in layers:
        w = diffusion.get_submodule(l).weight
        assert w.layout_cls.__name__ == LAYOUTS[key], (l, w.layout_cls)
        assert torch.equal(w._qdata.view(torch.uint8), q[f"{l}.weight"].view(torch.uint8))  # untouched
        assert plan.layers[l].choice.path == "comfy_layout"
    if key == CONVROT:
        assert all(diffusion.get_submodule(l).weight._params.convrot for l in layers)
    out = denoise(res.patcher)
    # ComfyUI 0.33's WanFeedForward hands a TensorWiseINT8Layout down-projection straight to its int8
    # kernel (comfy.ops.linear_input_act, GELU folded in), past the module's forward: nothing to record
    direct = {l for l in layers if l.endswith("ffn.2") and LAYOUTS[key] == "TensorWiseINT8Layout"
              and hasattr(__import__("comfy.ops").ops, "linear_input_act")}
    assert all(set(plan.executed.get(l, {})) == (set() if l in direct else {"comfy_layout"}) for l in layers), \
        plan.executed
    assert not plan.divergences()
    want = denoise(_stock(q))
    # the same ComfyUI layout and kernels on the same tensors: equal up to fp32 summation order
    assert torch.isfinite(out).all() and float((out - want).norm() / want.norm()) < 1e-5
    ops_line = next(l for l in res.report_lines if l.startswith("ops: "))
    assert "ComfyUI's own layout" in ops_line, ops_line


def _hadamard64(size):
    """Regular Hadamard (ConvRot's): Kronecker powers of the 4x4 regular one, normalised, fp64."""
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / math.sqrt(size)


def test_convrot_weights_equal_the_producers_formula(comfy_inprocess, tmp_path):
    """ComfyUI's layout holds exactly the file's ConvRot weight: W = (q * s) H^T per 256 inputs."""
    from wanquant.nodes.bridge import load_wan_model

    q, path = _file(tmp_path, CONVROT)
    res = load_wan_model(str(path), policy="auto")
    h = _hadamard64(256)
    for l in _blocks(tiny_wan(seed=4)):
        qw, s = q[f"{l}.weight"].double(), q[f"{l}.weight_scale"].double()
        n, k = qw.shape
        ref = ((qw * s.reshape(n, 1)).reshape(n, k // 256, 256) @ h.T).reshape(n, k)
        got = res.patcher.model.diffusion_model.get_submodule(l).weight.dequantize().double()
        assert bool(((got - ref).abs() <= 1e-6 * ref.abs().amax()).all()), l


def test_algorithm_the_running_comfyui_lacks_is_one_error(comfy_inprocess, tmp_path, monkeypatch):
    """A ComfyUI older than the algorithm (its QUANT_ALGOS without it): one error naming the version."""
    import comfy.quant_ops

    from wanquant.errors import WanquantError
    from wanquant.nodes.bridge import load_wan_model

    sd = tiny_wan(seed=4)
    q = dict(sd)
    for l in _blocks(sd):  # upstream shapes (values play no part before the gate): see comfy_algo_files
        n, k = q.pop(f"{l}.weight").shape
        q[f"{l}.weight"] = torch.zeros(n, k // 2, dtype=torch.int8)
        q[f"{l}.weight_s_rel"] = torch.ones(n, k // 16).to(torch.float8_e4m3fn)
        q[f"{l}.weight_s_channel"] = torch.ones(n)
        q[f"{l}.comfy_quant"] = syn.comfy_quant_bytes(RECIPES["asym_w4a8_int8"][1])
    path = syn.save(q, tmp_path / "w4a8.safetensors")
    older = {k: v for k, v in comfy.quant_ops.QUANT_ALGOS.items() if k != "asym_w4a8_int8"}
    monkeypatch.setattr(comfy.quant_ops, "QUANT_ALGOS", older)
    with pytest.raises(WanquantError, match=r"needs ComfyUI >= 0\.31\.0") as e:
        load_wan_model(str(path), policy="auto")
    assert e.value.file == str(path) and e.value.layer in _blocks(tiny_wan(seed=4))


def test_table_agrees_with_the_running_comfyui(comfy_inprocess):
    from wanquant.loaders.comfy_algos import ALGOS
    from wanquant.nodes.comfy_native import running_algos

    running = running_algos()
    version = _running_version()
    for key, a in ALGOS.items():
        released = a.since is not None and tuple(int(x) for x in a.since.split(".")) <= version
        assert (key in running) == released, (key, a.since, sorted(running))
    assert running <= set(ALGOS), sorted(running - set(ALGOS))


def test_lora_on_the_fly_takes_comfyuis_route_and_matches_fp64(comfy_inprocess, tmp_path):
    """ComfyUI-only layers get a LoRA through ComfyUI's weight function, not the side path (ComfyUI's
    Wan FFN may call their kernel past our forward): the model equals an fp64 dense reference
    (producer's ConvRot formula + the exact low-rank delta), the FFN down-projections included."""
    import comfy.model_management as mm

    from wanquant.lora.keys import render_lora
    from wanquant.nodes.bridge import load_wan_model
    from wanquant.nodes.lora_nodes import apply_lora

    q, path = _file(tmp_path, CONVROT)
    sd = tiny_wan(seed=4)
    layers = _blocks(sd)
    g = torch.Generator().manual_seed(7)
    d = {l: {"up": torch.randn(sd[f"{l}.weight"].shape[0], 4, generator=g) * 0.05,
             "down": torch.randn(4, sd[f"{l}.weight"].shape[1], generator=g), "alpha": 2.0} for l in layers}
    lora = syn.save(render_lora(d, "comfy"), tmp_path / "lora.safetensors")
    strength = 0.8
    with torch.inference_mode():
        base = load_wan_model(str(path), policy="auto").patcher
        model, text = apply_lora(base, str(lora), strength, "on the fly")
    assert "0 parameters on the low-rank side path" in text, text
    h = _hadamard64(256)
    ref = {}
    for k, t in q.items():
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and layer in d:
            qw, s = t.double(), q[f"{layer}.weight_scale"].double()
            n, kk = qw.shape
            w = ((qw * s.reshape(n, 1)).reshape(n, kk // 256, 256) @ h.T).reshape(n, kk)
            p = d[layer]
            w = w + strength * (p["alpha"] / 4) * (p["up"].double() @ p["down"].double())
            ref[k] = w.float()
        elif not k.endswith((".weight_scale", ".comfy_quant")):
            ref[k] = t.float()
    import comfy.sd

    want = denoise(comfy.sd.load_diffusion_model_state_dict(ref, model_options={"dtype": torch.float32}))
    with torch.inference_mode():
        mm.load_models_gpu([model])
    out = denoise(model)
    assert float((out - want).norm() / want.norm()) < 1e-4


def test_nvfp4_pre_quant_scale_runs_in_comfyuis_layout_or_is_one_error(comfy_inprocess, tmp_path, monkeypatch):
    """NVFP4 + ModelOpt's pre_quant_scale: ComfyUI >= 0.30.0 multiplies the input by it; our model
    equals stock ComfyUI's on the same file; a ComfyUI without it is one error, never a silent drop."""
    import comfy.quant_ops

    from comfy_algo_files import nvfp4_pre_quant
    from wanquant.errors import WanquantError
    from wanquant.nodes.bridge import load_wan_model

    sd = tiny_wan(seed=4)
    layers = _blocks(sd)
    q = nvfp4_pre_quant(sd, layers)
    path = syn.save(q, tmp_path / "awq.safetensors")
    if _running_version() >= (0, 30, 0):
        res = load_wan_model(str(path), policy="auto")
        plan = res.patcher.model.wanquant_plan
        assert all(plan.layers[l].choice.path == "comfy_layout" for l in layers)
        out = denoise(res.patcher)
        want = denoise(_stock(q))
        assert float((out - want).norm() / want.norm()) < 1e-5
        without = {k: v for k, v in q.items() if not k.endswith(".pre_quant_scale")}
        # the vector matters: dropping it changes the model (so the comparison above can fail)
        assert float((denoise(_stock(without)) - want).norm() / want.norm()) > 1e-2
    nv = dict(comfy.quant_ops.QUANT_ALGOS["nvfp4"])
    nv["parameters"] = set(nv["parameters"]) - {"pre_quant_scale"}
    monkeypatch.setitem(comfy.quant_ops.QUANT_ALGOS, "nvfp4", nv)
    with pytest.raises(WanquantError, match=r"nvfp4\+pre_quant_scale' needs ComfyUI >= 0\.30\.0") as e:
        load_wan_model(str(path), policy="auto")
    assert e.value.file == str(path) and e.value.layer in layers
