"""`wanquant convert` output loads in *stock* ComfyUI (its own load_diffusion_model, no wanquant
ops) and denoises like the dequantized reference — for every seed format (FP4 via --to)."""

import os

import pytest
import torch

from fixtures import SEEDS, build_seed, denoise as _denoise

from wanquant.loaders.convert import convert

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

# fp4 → fp8 re-encoding adds its own (reported) error on top of the FP4 values
TOL = {**{k: 1e-3 for k in SEEDS}, "fp4_g32_diffusers": 0.1}


@pytest.mark.parametrize("kind", SEEDS)
def test_stock_comfyui_loads_converted_file(comfy_inprocess, tmp_path, kind):
    import comfy.sd

    path, base, ref = build_seed(kind, tmp_path / "src")
    dst = tmp_path / "out" / f"{kind}.safetensors"
    dst.parent.mkdir(exist_ok=True)
    res = convert(path, dst, base=base, to="float8_e4m3fn")
    with torch.inference_mode():
        stock = comfy.sd.load_diffusion_model(str(dst))
        ref_patcher = comfy.sd.load_diffusion_model_state_dict({k: v.float() for k, v in ref.items()},
                                                               model_options={"dtype": torch.float32})
    out, want = _denoise(stock), _denoise(ref_patcher)
    rel = float((out - want).norm() / want.norm())
    assert rel < TOL[kind], (kind, rel, res.lines())


@pytest.mark.parametrize("mode", ["fp8_block", "fp8_row", "int8_block", "int8_row"])
def test_stock_comfyui_loads_int8_conversion_of_grid_formats(comfy_inprocess, tmp_path, mode):
    """Per-row / block formats ComfyUI has no layout for go --to int8 (per-channel int8_tensorwise,
    ComfyUI 0.33's own layout); an int8_tensorwise source is passed through bit for bit."""
    import comfy.sd

    from fixtures import syn, tiny_wan
    from wanquant.loaders import synthetic_grid as sg
    from wanquant.loaders.canonical import load_canonical

    sd = tiny_wan(seed=9)
    q = sg.ctq(sd, mode, block=64) if "block" in mode else sg.ctq(sd, mode)
    src = syn.save(q, tmp_path / f"{mode}.safetensors")
    dst = tmp_path / f"{mode}_int8.safetensors"
    res = convert(src, dst, to="int8")
    with load_canonical(src) as m:
        ref = {}
        from wanquant.ops.formats import get_format, parse_comfy_quant
        for name, layer in m.layers.items():
            if layer.quantized:
                conf = parse_comfy_quant(m.entries[f"{name}.comfy_quant"].load())
                t = {s: m.entries[f"{name}.{s}"].load() for s in ("weight", "weight_scale")}
                ref[f"{name}.weight"] = get_format(layer.format).dequantize(t, torch.float32, conf)
        for k, e in m.entries.items():
            if e.layer is None or not m.layers[e.layer].quantized or k.endswith(".bias"):
                ref.setdefault(k, e.load().float())
    with load_canonical(dst) as out_m:
        assert set(out_m.report.formats) <= {"int8_tensorwise", "bf16"}
        if mode == "int8_row":  # passed through: the source's own bytes
            assert not res.fp4_errors
    with torch.inference_mode():
        stock = comfy.sd.load_diffusion_model(str(dst))
        ref_patcher = comfy.sd.load_diffusion_model_state_dict(ref, model_options={"dtype": torch.float32})
    layer = stock.model.diffusion_model.get_submodule("blocks.0.ffn.0")
    assert type(layer.weight).__name__ == "QuantizedTensor" and layer.weight._layout_cls == "TensorWiseINT8Layout"
    out, want = _denoise(stock), _denoise(ref_patcher)
    rel = float((out - want).norm() / want.norm())
    # int8 weights (+ ComfyUI's own int8 path, if it quantizes activations) vs the source's values
    assert rel < 3e-2, (mode, rel, res.lines())
    if res.fp4_errors:
        assert max(res.fp4_errors.values()) < 1e-2
