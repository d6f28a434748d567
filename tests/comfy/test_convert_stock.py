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
