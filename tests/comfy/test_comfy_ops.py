"""The ComfyUI bridge on a real ComfyUI (CPU): a tiny Wan built from canonical quantized state
dicts with wanquant's custom operations, compared with the same model built from the
dequantized fp32 weights; LoRA patches (classic merge and lowvram) still change the output on
every path, and the per-layer report says which path each layer took.

Run with the ComfyUI venv: ``COMFYUI_PATH=... $COMFY_PY -m pytest tests/comfy/test_comfy_ops.py``.
"""

import json
import logging

import pytest
import torch

DIM, FFN, IN, OUT, TEXT, LAYERS = 256, 512, 16, 16, 256, 2
META = {"config": json.dumps({"transformer": {"text_dim": TEXT}})}
QUANT_SUFFIXES = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                  "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@pytest.fixture(scope="module")
def comfy(comfy_inprocess):
    import comfy.ldm.wan.model
    import comfy.lora
    import comfy.model_management
    import comfy.ops
    import comfy.sd
    return comfy


@pytest.fixture(scope="module")
def base_sd(comfy):
    """Random fp32 weights for every parameter a tiny WanModel has (shapes read off the model)."""
    from comfy.ldm.wan.model import WanModel
    with torch.device("meta"):
        m = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=IN, dim=DIM, ffn_dim=FFN,
                     freq_dim=256, text_dim=TEXT, out_dim=OUT, num_heads=DIM // 128, num_layers=LAYERS,
                     operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in m.state_dict().items():
        if k.endswith("norm.weight") or ".norm" in k and k.endswith(".weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = torch.randn(v.shape, generator=g) * (0.05 if v.ndim >= 2 else 0.02)
    return sd


def quantized(base_sd, fmt_for):
    """Canonical state dict: chosen Linears quantized, plus the matching dequantized fp32 dict."""
    from wanquant.ops.formats import comfy_quant_tensor, get_format
    q, ref = {}, {}
    for k, v in base_sd.items():
        layer = k[:-len(".weight")] if k.endswith(".weight") else None
        fmt = fmt_for(layer) if layer and layer.startswith("blocks.") and layer.split(".", 2)[2] in QUANT_SUFFIXES else None
        if fmt is None:
            q[k] = v.clone()
            ref[k] = v.clone()
            continue
        t, conf = get_format(fmt).quantize(v)
        for suffix, tensor in t.items():
            q[f"{layer}.{suffix}"] = tensor
        q[f"{layer}.comfy_quant"] = comfy_quant_tensor(conf)
        ref[k] = get_format(fmt).dequantize(t, conf=conf)
    return q, ref


def load(comfy, sd, ops=None):
    opts = {"custom_operations": ops} if ops is not None else {}
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=opts, metadata=dict(META))
    assert patcher is not None
    return patcher


def run(comfy, patcher):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, IN, 1, 8, 8, generator=g)
    ctx = torch.randn(1, 8, TEXT, generator=g)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return patcher.model.diffusion_model(x, torch.tensor([500.0]), ctx).float()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def lora_sd(base_sd, layers, rank=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        n, k = base_sd[f"{layer}.weight"].shape
        out[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(n, rank, generator=g) * 0.3
        out[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(rank, k, generator=g) * 0.3
    return out


MIXED = {"self_attn": "float8_e4m3fn", "cross_attn": "nvfp4", "ffn": "fp4_g32"}


def mixed_fmt(layer):
    if layer.startswith("blocks.1.cross_attn"):
        return "mxfp8"
    if layer.startswith("blocks.1.self_attn"):
        return "float8_e5m2"
    return MIXED[layer.split(".")[2]]


@pytest.mark.parametrize("option,tol", [("auto", 2e-5), ("fp8_matmul", 5e-2)])
def test_quantized_model_matches_dequantized_reference(comfy, base_sd, option, tol):
    from wanquant.nodes.comfy_ops import build_operations
    from comfy.quant_ops import QuantizedTensor
    qsd, ref_sd = quantized(base_sd, mixed_fmt)
    with torch.inference_mode():
        ref_out = run(comfy, load(comfy, ref_sd))
        ops, plan = build_operations(option, torch.float32, torch.device("cpu"))
        patcher = load(comfy, qsd, ops)
        plan.finalize()
        out = run(comfy, patcher)
    assert not torch.isnan(out).any()
    assert rel(out, ref_out) <= tol
    dm = patcher.model.diffusion_model
    assert isinstance(dm.blocks[0].ffn[0].weight, QuantizedTensor)
    assert dm.blocks[0].ffn[0].weight._layout_cls == "WanquantFP4G32Layout"
    counts = plan.counts()
    expect_fp8 = 8 if option == "fp8_matmul" else 0  # 2 blocks x 4 self-attention layers
    assert counts.get("fp8_matmul", 0) == expect_fp8
    assert counts["dequant"] == 2 * len(QUANT_SUFFIXES) - expect_fp8
    assert "blocks.0.ffn.0 512x256 [fp4_g32] -> dequant" in plan.report()
    assert "kitchen_matmul" not in counts  # never on CPU
    if option == "auto":
        assert plan.summary().startswith("2×4 self-attention layers:") or "self-attention" in plan.summary()


def test_model_runs_ops_paths_and_not_comfy_fallbacks(comfy, base_sd):
    """Forced fp8 matmul really runs our dynamic-scaling kernel (the output differs from the
    exact dequant path by an fp8-activation-sized amount, not by zero)."""
    from wanquant.nodes.comfy_ops import build_operations
    qsd, _ = quantized(base_sd, lambda layer: "float8_e4m3fn")
    with torch.inference_mode():
        a = run(comfy, load(comfy, qsd, build_operations("dequant", torch.float32, torch.device("cpu"))[0]))
        b = run(comfy, load(comfy, qsd, build_operations("fp8_matmul", torch.float32, torch.device("cpu"))[0]))
    assert 1e-4 < rel(b, a) < 5e-2


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "nvfp4", "fp4_g32"])
def test_lora_patches_change_output_on_quantized_layers(comfy, base_sd, fmt):
    from wanquant.nodes.comfy_ops import build_operations
    from comfy.quant_ops import QuantizedTensor
    qsd, ref_sd = quantized(base_sd, lambda layer: fmt)
    targets = ["blocks.0.ffn.0", "blocks.1.self_attn.q", "blocks.0.cross_attn.o"]
    lora = lora_sd(base_sd, targets)
    with torch.inference_mode():
        ops, plan = build_operations("auto", torch.float32, torch.device("cpu"))
        patcher = load(comfy, qsd, ops)
        plain = run(comfy, patcher)
        lpatched, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), 1.0, 0)
        with_lora = run(comfy, lpatched)
        assert isinstance(lpatched.model.diffusion_model.blocks[0].ffn[0].weight, QuantizedTensor)
        ref = load(comfy, ref_sd)
        ref_plain = run(comfy, ref)
        ref_lora_p, _ = comfy.sd.load_lora_for_models(ref, None, dict(lora), 1.0, 0)
        ref_lora = run(comfy, ref_lora_p)
    change = rel(with_lora, plain)
    assert change > 0.02  # the LoRA did something
    # ... and the right thing: closer to the LoRA'd reference than to either un-LoRA'd model
    assert rel(with_lora, ref_lora) < 0.5 * rel(ref_plain, ref_lora)
    assert rel(with_lora, ref_lora) < 0.5 * change


def test_lowvram_lora_weight_function_path(comfy, base_sd):
    """Partially loaded (lowvram) layers keep LoRA as weight_function; our forward must apply it."""
    from wanquant.nodes.comfy_ops import build_operations
    qsd, _ = quantized(base_sd, lambda layer: "float8_e4m3fn")
    lora = lora_sd(base_sd, ["blocks.0.ffn.0", "blocks.1.ffn.2"])
    with torch.inference_mode():
        ops, _ = build_operations("fp8_matmul", torch.float32, torch.device("cpu"))
        patcher = load(comfy, qsd, ops)
        merged_p, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), 1.0, 0)
        merged = run(comfy, merged_p)
        merged_p.unpatch_model()
        low_p, _ = comfy.sd.load_lora_for_models(load(comfy, qsd, ops), None, dict(lora), 1.0, 0)
        low_p.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1, load_weights=True,
                          force_patch_weights=False)
        layer = low_p.model.diffusion_model.blocks[0].ffn[0]
        has_fn = len(layer.weight_function) > 0
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, IN, 1, 8, 8, generator=g)
        ctx = torch.randn(1, 8, TEXT, generator=g)
        low = low_p.model.diffusion_model(x, torch.tensor([500.0]), ctx).float()
    if not has_fn:
        pytest.skip("this ComfyUI merged the patch despite lowvram; weight_function path not reachable on CPU")
    assert rel(low, merged) < 5e-2


def test_fp4_g32_state_dict_round_trip_and_forced_errors(comfy, base_sd):
    from wanquant.errors import WanquantError
    from wanquant.nodes.comfy_ops import build_operations
    from wanquant.ops.formats import parse_comfy_quant
    qsd, _ = quantized(base_sd, lambda layer: "fp4_g32")
    with torch.inference_mode():
        ops, plan = build_operations("auto", torch.float32, torch.device("cpu"))
        patcher = load(comfy, qsd, ops)
        sd = patcher.model.diffusion_model.state_dict()
    assert parse_comfy_quant(sd["blocks.0.ffn.0.comfy_quant"]) == {"format": "fp4_g32", "group_size": 32}
    assert torch.equal(sd["blocks.0.ffn.0.weight"], qsd["blocks.0.ffn.0.weight"])
    assert torch.equal(sd["blocks.0.ffn.0.weight_scale"], qsd["blocks.0.ffn.0.weight_scale"])
    with pytest.raises(WanquantError):
        build_operations("kitchen_matmul", torch.float32, torch.device("cpu"))
    ops, plan = build_operations("fp8_matmul", torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        load(comfy, qsd, ops)
    with pytest.raises(WanquantError):
        plan.finalize()  # fp8_matmul forced on a model without fp8 layers


def test_fp4_g32_comfy_quant_nibble_order_applied_once(comfy, base_sd, tmp_path):
    """A ``nibble_order`` inside an fp4_g32 ``comfy_quant`` is honoured exactly once on the way
    from the file to ComfyUI (it used to be swapped at load and decoded low-first again:
    0.36 relative output error). Reference: the fp64 spec decoder in the file's own order."""
    from safetensors.torch import save_file

    from tests.fixtures import ref_fp4_g32
    from wanquant.nodes.bridge import build_canonical, split_extras
    from wanquant.nodes.comfy_ops import build_operations
    from wanquant.ops.formats import comfy_quant_tensor, swap_nibbles
    qsd, _ = quantized(base_sd, lambda layer: "fp4_g32")
    ref_sd = dict(base_sd)
    for k in [k for k in qsd if k.endswith(".comfy_quant")]:
        layer = k[: -len(".comfy_quant")]
        low = swap_nibbles(qsd[f"{layer}.weight"])  # the file stores the low nibble first ...
        qsd[f"{layer}.weight"] = low
        qsd[k] = comfy_quant_tensor({"format": "fp4_g32", "group_size": 32, "nibble_order": "low_first"})
        ref_sd[f"{layer}.weight"] = ref_fp4_g32(low, qsd[f"{layer}.weight_scale"], "low_first").float()
    path = tmp_path / "fp4_low_tagged.safetensors"
    save_file({k: v.contiguous() for k, v in qsd.items()}, str(path), metadata=dict(META))
    model = build_canonical(str(path))
    keep, _ = split_extras(model)
    sd = {k: model.entries[k].load() for k in keep}
    with torch.inference_mode():
        ref_out = run(comfy, load(comfy, ref_sd))
        out = run(comfy, load(comfy, sd, build_operations("dequant", torch.float32, torch.device("cpu"))[0]))
    assert rel(out, ref_out) <= 2e-5
