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

import pytest
import torch
from fixtures import SEEDS, TOLERANCE, build_seed, denoise as _denoise, loader_node, sampler_prompt, syn, tiny_wan

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

OUR_NODES = ("WanQuantLoadDiT", "WanQuantInspect", "WanQuantRemap")


@pytest.mark.parametrize("kind", SEEDS)
@pytest.mark.parametrize("policy", ["auto", "comfy_native"])
def test_denoiser_matches_dequantized_reference(comfy_inprocess, tmp_path, kind, policy):
    import comfy.sd

    from wanquant.nodes.bridge import load_wan_model

    if policy == "comfy_native" and kind == "fp4_g32_diffusers":
        pytest.skip("FP4 group-32 needs wanquant's ops by design")
    path, base, ref = build_seed(kind, tmp_path)
    with torch.inference_mode():
        res = load_wan_model(str(path), str(base) if base else None, policy=policy)
        ref_patcher = comfy.sd.load_diffusion_model_state_dict({k: v.float() for k, v in ref.items()},
                                                               model_options={"dtype": torch.float32})
    out, want = _denoise(res.patcher), _denoise(ref_patcher)
    rel = float((out - want).norm() / want.norm())
    assert torch.isfinite(out).all()
    assert rel < TOLERANCE[kind], (kind, rel, res.text)
    assert "Wan" in res.text and "layers:" in res.text


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
    prompt = {"1": {"class_type": "WanQuantRemap", "inputs": {"model_name": rel(idx), "base_name": rel(base),
                                                              "save_as": out_name, "fp4_target": "float8_e4m3fn",
                                                              "op_policy": "auto"}}}
    hist = comfy_server.run_prompt(prompt)
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:2000]
    saved = models / f"{out_name}.safetensors"
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
