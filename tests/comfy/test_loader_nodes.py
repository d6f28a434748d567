"""The loader inside a real ComfyUI (skips without COMFYUI_PATH).

In-process (run with ComfyUI's python): every seed format, built tiny (dim 256), becomes a MODEL
whose denoiser output matches the same model built by ComfyUI from the fp64-dequantized
reference weights in fp32. Server: the pack imports, /object_info lists the nodes, and an API
prompt loader → KSampler (2 steps) finishes with status success for every seed format.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from fixtures import SEEDS, TOLERANCE, build_seed, denoise as _denoise, loader_node, sampler_prompt, syn, tiny_wan

from wanquant.errors import WanquantError

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

OUR_NODES = ("WanQuantLoadDiT", "WanQuantInspect", "WanQuantRemap")


@pytest.mark.parametrize("kind", SEEDS)
@pytest.mark.parametrize("policy", ["auto", "comfy_native"])
def test_denoiser_matches_dequantized_reference(comfy_inprocess, tmp_path, kind, policy):
    import comfy.sd

    from wanquant.nodes.bridge import load_wan_model

    path, base, ref = build_seed(kind, tmp_path)
    if policy == "comfy_native" and kind == "fp4_g32_diffusers":  # ComfyUI has no FP4 group-32 layout
        with pytest.raises(WanquantError) as e:
            load_wan_model(str(path), str(base) if base else None, policy=policy)
        assert e.value.found == "fp4_g32" and e.value.layer and "op policy other than 'comfy_native'" in str(e.value)
        return
    with torch.inference_mode():
        res = load_wan_model(str(path), str(base) if base else None, policy=policy)
        ref_patcher = comfy.sd.load_diffusion_model_state_dict({k: v.float() for k, v in ref.items()},
                                                               model_options={"dtype": torch.float32})
    out, want = _denoise(res.patcher), _denoise(ref_patcher)
    rel = float((out - want).norm() / want.norm())
    assert torch.isfinite(out).all()
    assert rel < TOLERANCE[kind], (kind, rel, res.text)
    assert "Wan" in res.text and "layers:" in res.text


@pytest.mark.parametrize("kind", ["gguf", "fp8_row", "int8_block"])
def test_comfy_native_policy_refuses_formats_comfyui_lacks_in_one_error(comfy_inprocess, tmp_path, kind):
    """ComfyUI's own loader raises a bare KeyError on a comfy_quant format it does not know; with op
    policy comfy_native the bridge says so first, naming the layer and the format."""
    import importlib.util

    from wanquant.loaders import synthetic_grid
    from wanquant.nodes.bridge import load_wan_model

    sd = tiny_wan(seed=8)
    layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]
    if kind == "gguf":
        pytest.importorskip("gguf")
        recipe_path = Path(__file__).resolve().parents[1] / "data" / "gguf" / "make_gguf.py"
        spec = importlib.util.spec_from_file_location("make_gguf", recipe_path)
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
        path = tmp_path / "m.gguf"
        recipe.write_wan_gguf(path, sd, {f"{l}.weight": "Q8_0" for l in layers})
        want = "gguf_q8_0"
    else:
        path = syn.save(synthetic_grid.ctq(sd, kind, block=64, layers=layers), tmp_path / "m.safetensors")
        want = {"fp8_row": "float8_e4m3fn_rowwise", "int8_block": "int8_blockwise"}[kind]
    with pytest.raises(WanquantError) as e:
        load_wan_model(str(path), policy="comfy_native")
    assert e.value.found == want and e.value.layer in layers and e.value.file == str(path)
    assert "op policy other than 'comfy_native'" in str(e.value)
    assert load_wan_model(str(path)).patcher is not None  # the default policy loads the same file


def test_partial_without_base_is_one_clear_error(comfy_inprocess, tmp_path):
    from wanquant.errors import WanquantError
    from wanquant.nodes.bridge import load_wan_model

    idx, base, _ = build_seed("vista4d_partial_over_base", tmp_path)
    with pytest.raises(WanquantError) as e:
        load_wan_model(str(idx), None, policy="comfy_native")
    msg = str(e.value)
    assert "partial Vista4D finetune" in msg and "base" in msg and str(idx) in msg
    assert "of 28 Wan block weights missing" in msg


def test_cached_patcher_init_rebuilds(comfy_inprocess, tmp_path):
    from wanquant.nodes.bridge import load_wan_model

    path, _, _ = build_seed("kijai_scaled_fp8_diffusers", tmp_path)
    with torch.inference_mode():
        res = load_wan_model(str(path), policy="comfy_native")
        factory, args = res.patcher.cached_patcher_init
        again = factory(*args, disable_dynamic=True)
    assert again is not res.patcher and again.model is not res.patcher.model
    assert torch.equal(_denoise(again), _denoise(res.patcher))


def test_worldstereo_controlnet_branch_listed(comfy_inprocess, tmp_path):
    from wanquant.nodes.bridge import load_wan_model

    d = syn.to_diffusers(tiny_wan(i2v=True, in_dim=36))
    d["controlnet.proj_out.0.weight"] = torch.randn(256, 256).bfloat16()
    d["controlnet.controlnet_blocks.0.self_attn.to_q.weight"] = torch.randn(256, 256).bfloat16()
    path = syn.save(syn.kijai_scaled_fp8(d), tmp_path / "ws.safetensors")
    with torch.inference_mode():
        res = load_wan_model(str(path), policy="comfy_native")
    assert "worldstereo_controlnet" in res.text
    assert "controlnet.proj_out.0.weight" in res.patcher.model.wanquant_extras
    assert type(res.patcher.model).__name__ == "WAN21" and "I2V" in res.text


# ---------------------------------------------------------------- server

def test_model_list_survives_folder_link_loops(comfy_inprocess, tmp_path, monkeypatch):
    import folder_paths
    from wanquant.nodes import loader_nodes

    root = tmp_path / "diffusion_models"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "model.safetensors.index.json").write_text("{}")
    (root / "sub" / "other.safetensors").write_bytes(b"")
    for name in ("a", "b", "c"):  # three links back to the root: an unguarded walk grows as 3^depth
        os.symlink(root, root / "sub" / name)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(root)], {".safetensors"}))
    seen = []
    for dirpath, files in loader_nodes._walk_each_folder_once(str(root)):
        seen.append(dirpath)
    assert len(seen) == 2  # root and sub, each once
    t0 = time.perf_counter()
    assert loader_nodes.model_choices() == ["sub/model.safetensors.index.json", "sub/other.safetensors"]
    assert time.perf_counter() - t0 < 5


def test_pack_imports_and_lists_nodes(comfy_server):
    log = comfy_server.log()
    assert "IMPORT FAILED" not in log or "wanquant" not in log.split("IMPORT FAILED")[1][:300], log[-3000:]
    info = comfy_server.get_json("/object_info")
    for node in OUR_NODES:
        assert node in info, node
        spec = info[node]
        assert spec["category"].startswith("wanquant/")
        for name, value in spec["input"]["required"].items():
            assert value[1].get("tooltip"), (node, name)


def _prompt(model_name, base_name="(none)", policy="auto", seed=0):
    return sampler_prompt(loader_node(model_name, base_name, policy), seed)


@pytest.mark.parametrize("kind", SEEDS)
def test_prompt_runs_for_every_seed_format(comfy_server, tmp_path, kind):
    folder = comfy_server.models / "diffusion_models" / kind
    if folder.exists():
        shutil.rmtree(folder)
    path, base, _ = build_seed(kind, folder)
    rel = lambda p: str(p.relative_to(comfy_server.models / "diffusion_models"))  # noqa: E731
    prompt = _prompt(rel(path), rel(base) if base else "(none)")
    hist = comfy_server.run_prompt(prompt)
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
    stats = hist["outputs"]["5"]["stats"][0]
    assert stats["finite"] and stats["shape"] == [1, 16, 1, 8, 8]


def test_bad_file_ends_prompt_with_one_clear_message(comfy_server, tmp_path):
    folder = comfy_server.models / "diffusion_models" / "bad"
    folder.mkdir(parents=True, exist_ok=True)
    idx, _, _ = build_seed("vista4d_partial_over_base", folder)
    hist = comfy_server.run_prompt(_prompt(str(idx.relative_to(comfy_server.models / "diffusion_models"))))
    assert hist["status"]["status_str"] == "error"
    err = [m for m in hist["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert "partial Vista4D finetune" in err["exception_message"] and "base" in err["exception_message"]
    assert comfy_server.get_json("/system_stats")  # ComfyUI keeps running


def test_changed_file_or_policy_reloads_nothing_stale(comfy_server, tmp_path):
    folder = comfy_server.models / "diffusion_models" / "reload"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "wan_fp8.safetensors"
    rel = str(path.relative_to(comfy_server.models / "diffusion_models"))

    def write(seed):
        syn.save(syn.kijai_scaled_fp8(tiny_wan(seed=seed), scale_dtype=torch.float32), path)

    def run(policy="auto"):
        hist = comfy_server.run_prompt(_prompt(rel, policy=policy))
        assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:2000]
        return hist["outputs"]["5"]["stats"][0]["checksum"]

    write(1)
    first = run()
    assert run() == first  # same file, same inputs: same result
    write(2)  # same name, new content
    second = run()
    assert second != first
    write(1)
    assert run() == pytest.approx(first, rel=1e-6)
    assert run("comfy_native") == pytest.approx(first, rel=1e-3)  # policy change rebuilds; CPU paths agree


def test_inspect_and_remap_nodes(comfy_server, tmp_path):
    models = comfy_server.models / "diffusion_models"
    folder = models / "remap"
    if folder.exists():
        shutil.rmtree(folder)
    idx, base, _ = build_seed("vista4d_partial_over_base", folder)
    rel = lambda p: str(p.relative_to(models))  # noqa: E731
    hist = comfy_server.run_prompt({"1": {"class_type": "WanQuantInspect",
                                          "inputs": {"model_name": rel(idx), "fp4_nibble_order": "auto"}}})
    assert hist["status"]["status_str"] == "success"
    text = hist["outputs"]["1"]["text"][0]
    assert "partial checkpoint" in text and "vista4d" in text
    out_name = "remapped_vista4d_full"
    saved = models / f"{out_name}.safetensors"
    saved.write_bytes(b"the user's own model")  # an existing file of that name is never replaced silently

    def remap(overwrite):
        return comfy_server.run_prompt({"1": {"class_type": "WanQuantRemap", "inputs": {
            "model_name": rel(idx), "base_name": rel(base), "save_as": out_name, "overwrite": overwrite,
            "fp4_target": "float8_e4m3fn", "op_policy": "auto"}}})
    hist = remap(False)
    assert hist["status"]["status_str"] == "error"
    err = [m for m in hist["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert "already exists" in err["exception_message"] and "overwrite" in err["exception_message"]
    assert saved.read_bytes() == b"the user's own model"
    hist = remap(True)
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:2000]
    assert saved.is_file()
    from wanquant.loaders.canonical import load_canonical
    rep = load_canonical(saved).report
    assert not rep.missing and "vista4d" in rep.extras
    assert "kept extra modules: vista4d" in hist["outputs"]["1"]["text"][0]


def test_nvfp4_scale_layout_option_reaches_the_loader(comfy_inprocess, tmp_path):
    """Untagged NVFP4 with row-major scales on untrained weights: refused (naming the option) on
    auto; with ``nvfp4_scale_layout="row_major"`` it loads and equals the fp64 reference model,
    also when ComfyUI rebuilds it through cached_patcher_init."""
    from wanquant.errors import WanquantError
    from wanquant.nodes.bridge import load_wan_model
    from wanquant.ops.formats import from_blocked, get_format
    from fixtures import ref_nvfp4

    sd = tiny_wan()
    q, ref = dict(sd), dict(sd)
    for layer in ("blocks.0.ffn.0", "blocks.1.ffn.0", "blocks.0.ffn.2"):
        t, _ = get_format("nvfp4").quantize(sd[f"{layer}.weight"])
        n, k = sd[f"{layer}.weight"].shape
        q[f"{layer}.weight"] = t["weight"]
        q[f"{layer}.weight_scale"] = from_blocked(t["weight_scale"].view(torch.float8_e4m3fn), n, k // 16).contiguous()
        q[f"{layer}.weight_scale_2"] = t["weight_scale_2"]
        ref[f"{layer}.weight"] = ref_nvfp4(t["weight"], t["weight_scale"], t["weight_scale_2"], (n, k)).float()
    path = syn.save(q, tmp_path / "nvfp4_rowmajor.safetensors")
    with pytest.raises(WanquantError, match="nvfp4-scale-layout"):
        load_wan_model(str(path), policy="dequant", compute_dtype="fp32")
    import comfy.sd
    with torch.inference_mode():
        res = load_wan_model(str(path), policy="dequant", compute_dtype="fp32", nvfp4_scale_layout="row_major")
        factory, args = res.patcher.cached_patcher_init
        again = factory(*args, disable_dynamic=True)
        want = comfy.sd.load_diffusion_model_state_dict(ref)
        got, got2, expect = _denoise(res.patcher), _denoise(again), _denoise(want)
    rel = float((got.double() - expect.double()).norm() / expect.double().norm())
    assert rel < 1e-4 and torch.equal(got, got2)
