"""Low-nibble-first FP4 files load without a swapped private copy: ComfyUI's layers hold the
file's own memory-mapped bytes and decode that order, while everything handed out (state dict,
outputs, a LoRA merge) equals the canonical high-first model. Two packings: FP4 group-32 (the
Animate FP4 release) and LightX2V NVFP4 (its kernel packs the even element low), the latter
swapped once at load only where kitchen's NVFP4 matmul will read the bytes (SM >= 10, faked).

In-process ComfyUI (``$COMFY_PY -m pytest``; skips without ``COMFYUI_PATH``)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from fixtures import build_seed, denoise, mapped_files as _mapped_files, syn, tiny_wan

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")


def _build(folder, order):
    sd = tiny_wan(seed=21)
    layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]
    q = syn.fp4_g32(sd, layers, order=order)
    folder.mkdir()
    (folder / "quantize_config.json").write_text(json.dumps({"packing": order}))
    return syn.save(q, folder / "model.safetensors"), q, layers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_low_first_fp4_stays_file_backed_and_equals_canonical(comfy_inprocess, tmp_path):
    from wanquant.nodes.bridge import load_wan_model
    from wanquant.ops.formats import swap_nibbles

    low_path, low_q, layers = _build(tmp_path / "low", "low_first")
    high_path, high_q, _ = _build(tmp_path / "high", "high_first")
    # the two files hold the same codes in the two byte orders
    assert torch.equal(swap_nibbles(low_q[f"{layers[0]}.weight"]), high_q[f"{layers[0]}.weight"])

    low = load_wan_model(str(low_path))
    high = load_wan_model(str(high_path))
    for name in layers:
        mod = low.patcher.model.diffusion_model.get_submodule(name)
        qdata = mod.weight._qdata
        assert torch.equal(qdata, low_q[f"{name}.weight"]), name  # the file's bytes, not swapped
        assert str(low_path) in _mapped_files(qdata.data_ptr()), name  # backed by the file itself
        assert str(low_path) in _mapped_files(mod.weight._params.scale.data_ptr()), name  # group scales too
        sd = mod.state_dict()
        assert torch.equal(sd["weight"], high_q[f"{name}.weight"]), name  # handed out canonical
    assert torch.equal(denoise(low.patcher), denoise(high.patcher))


def _bytewise_swap(u8: torch.Tensor) -> torch.Tensor:
    """The two nibbles of every byte exchanged, one byte at a time (independent of the pack)."""
    return torch.tensor([((b & 0x0F) << 4) | (b >> 4) for b in u8.reshape(-1).tolist()],
                        dtype=torch.uint8).reshape(u8.shape)


def _lightx2v(tmp_path):
    from safetensors.torch import load_file

    path, base, _ = build_seed("lightx2v_nvfp4_partial_over_base", tmp_path)
    q = load_file(str(path))
    layers = sorted(k[:-len(".alpha")] for k in q if k.endswith(".alpha"))
    return path, base, q, layers


def _merge_lora(patcher, layers, q):
    """ComfyUI's own LoRA loader merged into the weights (dequantize, patch, requantize)."""
    import comfy.model_management
    import comfy.sd

    g = torch.Generator().manual_seed(5)
    lora = {}
    for layer in layers:
        n, half = q[f"{layer}.weight"].shape
        lora[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(n, 4, generator=g) * 0.05
        lora[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(4, half * 2, generator=g) * 0.05
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    return denoise(patched)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_lightx2v_nvfp4_stays_file_backed_and_equals_the_comfy_order_model(comfy_inprocess, tmp_path):
    from wanquant.loaders.convert import convert
    from wanquant.nodes.bridge import load_wan_model
    from wanquant.nodes.nvfp4_file_layout import COMFY_NVFP4_LAYOUT, NVFP4_FILE_LAYOUT

    path, base, q, layers = _lightx2v(tmp_path)
    comfy_order = tmp_path / "comfy_order.safetensors"
    convert(path, comfy_order)  # the same layers written in ComfyUI's own (high-first) NVFP4
    low = load_wan_model(str(path), base=str(base))
    high = load_wan_model(str(comfy_order), base=str(base))
    assert len(layers) == 20
    for name in layers:
        mod = low.patcher.model.diffusion_model.get_submodule(name)
        ref = high.patcher.model.diffusion_model.get_submodule(name)
        assert mod.weight._layout_cls == NVFP4_FILE_LAYOUT and ref.weight._layout_cls == COMFY_NVFP4_LAYOUT, name
        qdata = mod.weight._qdata
        assert torch.equal(qdata, q[f"{name}.weight"]), name  # the file's bytes, not swapped
        assert str(path) in _mapped_files(qdata.data_ptr()), name  # backed by the file itself
        assert str(path) in _mapped_files(mod.weight._params.block_scale.data_ptr()), name  # block scales too
        assert str(comfy_order) in _mapped_files(ref.weight._params.block_scale.data_ptr()), name  # ComfyUI-loaded
        sd = mod.state_dict()
        assert torch.equal(sd["weight"], _bytewise_swap(q[f"{name}.weight"])), name  # handed out in ComfyUI's order
        assert torch.equal(sd["weight"], ref.state_dict()["weight"]), name
        assert torch.equal(mod.weight.dequantize(), ref.weight.dequantize()), name
    plain = denoise(high.patcher)
    assert torch.equal(denoise(low.patcher), plain)
    executed = {layer: paths for layer, paths in low.patcher.model.wanquant_plan.executed.items() if layer in layers}
    assert executed and all("dequant" in p for p in executed.values()), executed
    merged_low, merged_high = _merge_lora(low.patcher, layers, q), _merge_lora(high.patcher, layers, q)
    assert torch.equal(merged_low, merged_high)
    assert not torch.equal(merged_low, plain)  # the LoRA did change the output


def test_lightx2v_nvfp4_is_swapped_once_where_kitchen_runs_it(comfy_inprocess, tmp_path, monkeypatch):
    from wanquant.nodes.bridge import load_wan_model
    from wanquant.nodes.nvfp4_file_layout import COMFY_NVFP4_LAYOUT
    from wanquant.ops import policy

    path, base, q, layers = _lightx2v(tmp_path)
    blackwell = policy.DeviceCaps("cuda", (10, 0), "faked SM 10.0", (2, 10), (12, 8), False, True,
                                  frozenset({"scaled_mm_nvfp4", "scaled_mm_mxfp8"}))
    monkeypatch.setattr(policy, "probe_device", lambda device=None: blackwell)
    low = load_wan_model(str(path), base=str(base), compute_dtype="bf16")
    plan = low.patcher.model.wanquant_plan
    for name in layers:
        mod = low.patcher.model.diffusion_model.get_submodule(name)
        assert plan.layers[name].choice.path == "kitchen_matmul", name
        assert mod.weight._layout_cls == COMFY_NVFP4_LAYOUT, name  # kitchen's NVFP4 handlers read it
        assert torch.equal(mod.weight._qdata, _bytewise_swap(q[f"{name}.weight"])), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_block_scales_of_comfyui_loaded_layers_stay_the_files_pages(comfy_inprocess, tmp_path):
    """ComfyUI builds NVFP4 / MXFP8 params through nn.Parameter, whose detach clones them (a private
    copy of every block scale); the bridge puts the file's own bytes back, equal to the clone."""
    from safetensors.torch import load_file

    from wanquant.nodes.bridge import load_wan_model

    path, _, _ = build_seed("comfy_nvfp4_mxfp8_mix", tmp_path)
    q = load_file(str(path))
    fmts = {k[:-len(".comfy_quant")]: json.loads(bytes(v.tolist()))["format"] for k, v in q.items()
            if k.endswith(".comfy_quant")}
    block = {layer: f for layer, f in fmts.items() if f in ("nvfp4", "mxfp8")}
    assert set(block.values()) == {"nvfp4", "mxfp8"}
    model = load_wan_model(str(path)).patcher.model.diffusion_model
    for layer, f in block.items():
        params = model.get_submodule(layer).weight._params
        scales = params.block_scale if f == "nvfp4" else params.scale
        assert str(path) in _mapped_files(scales.data_ptr()), layer
        assert torch.equal(scales.reshape(-1).view(torch.uint8), q[f"{layer}.weight_scale"].reshape(-1).view(torch.uint8)), layer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("file_dtype,compute,kept", [(torch.bfloat16, "fp32", True), (torch.float16, "bf16", True),
                                                      (torch.float32, "bf16", False)])
def test_unquantized_linears_stay_the_files_pages_unless_wider_than_the_model(comfy_inprocess, tmp_path,
                                                                              file_dtype, compute, kept):
    """ComfyUI casts plain Linear weights to the model dtype at load (a private copy of each: on the
    CPU bf16 -> fp32 doubles them); the bridge keeps the file's tensor when its dtype is no wider,
    since every weight is cast to the activations' dtype per forward anyway. Same output."""
    import comfy.sd

    from wanquant.nodes.bridge import load_wan_model
    from wanquant.ops.policy import dtype_name

    sd = {k: v.to(file_dtype) if v.is_floating_point() else v for k, v in tiny_wan(seed=9).items()}
    path = syn.save(sd, tmp_path / "dense.safetensors")
    res = load_wan_model(str(path), compute_dtype=compute)
    layer = res.patcher.model.diffusion_model.get_submodule("text_embedding.0")
    model_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute]
    assert layer.weight.dtype == (file_dtype if kept else model_dtype)
    assert (str(path) in _mapped_files(layer.weight.data_ptr())) == kept
    held = file_dtype if kept else model_dtype  # the report names the dtype the layer really holds
    assert res.patcher.model.wanquant_plan.layers["text_embedding.0"].dtype == held
    assert res.patcher.model.wanquant_plan.summary().endswith(f"head and embeddings: {dtype_name(held)}")
    stock = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": model_dtype})
    stock_layer = stock.model.diffusion_model.get_submodule("text_embedding.0")
    assert stock_layer.weight.dtype == model_dtype  # what stock ComfyUI holds instead
    x = torch.randn(3, stock_layer.in_features, generator=torch.Generator().manual_seed(0)).to(model_dtype)
    with torch.inference_mode():
        assert torch.equal(layer(x), stock_layer(x))
