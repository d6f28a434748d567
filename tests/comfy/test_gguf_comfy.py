"""A GGUF Wan file in a real ComfyUI: the loader builds the model with every GGUF Linear kept as
its file-backed blocks and decoded per forward (``plan.executed`` says dequant), and the denoiser
output equals that of ComfyUI's own fp32 model built from gguf-py's decode of the same file.

In-process ComfyUI (run with ComfyUI's python, ``COMFYUI_PATH`` set).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import denoise, mapped_files as _mapped_files, tiny_wan

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")
gguf = pytest.importorskip("gguf")

DATA = Path(__file__).resolve().parents[1] / "data" / "gguf"
_spec = importlib.util.spec_from_file_location("make_gguf", DATA / "make_gguf.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)


def _reference(path) -> dict[str, torch.Tensor]:
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
    return out


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_gguf_wan_loads_and_samples_with_dequant(comfy_inprocess, tmp_path, dtype):
    import comfy.sd

    from wanquant.nodes.bridge import load_wan_model

    sd = tiny_wan(seed=4)
    linears = [k for k, v in sd.items() if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2]
    types = {k: recipe.ALL_TYPES[i % len(recipe.ALL_TYPES)] for i, k in enumerate(linears)}
    path = tmp_path / "wan_tiny.gguf"
    recipe.write_wan_gguf(path, sd, types, seed=2)

    res = load_wan_model(str(path), compute_dtype=dtype)
    plan = res.patcher.model.wanquant_plan
    for key, qtype in types.items():
        name = key[: -len(".weight")]
        mod = res.patcher.model.diffusion_model.get_submodule(name)
        assert mod.quant_format == f"gguf_{qtype.lower()}"
        if sys.platform.startswith("linux"):
            assert str(path) in _mapped_files(mod.weight._qdata.data_ptr()), name  # the file's own pages
        assert plan.layers[name].choice.path == "dequant"
    out = denoise(res.patcher)
    for key in types:
        assert set(plan.executed[key[: -len(".weight")]]) == {"dequant"}
    assert not plan.divergences()

    ref_patcher = comfy.sd.load_diffusion_model_state_dict(_reference(path), model_options={"dtype": torch.float32})
    ref = denoise(ref_patcher)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (1e-4 if dtype == "auto" else 3e-2), rel


@pytest.mark.parametrize("to", ["bf16", "float8_e4m3fn"])
def test_converted_gguf_loads_in_stock_comfyui(comfy_inprocess, tmp_path, to):
    """``wanquant convert`` of a GGUF Wan file (every block type) gives a file *stock* ComfyUI loads
    (its own load_diffusion_model, no wanquant ops) and that denoises like ComfyUI's fp32 model of
    gguf-py's decode, within the re-encoding error convert reports."""
    import comfy.sd

    from wanquant.loaders.convert import convert

    sd = tiny_wan(seed=4)
    linears = [k for k, v in sd.items() if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2]
    types = {k: recipe.ALL_TYPES[i % len(recipe.ALL_TYPES)] for i, k in enumerate(linears)}
    src = tmp_path / "wan_tiny.gguf"
    recipe.write_wan_gguf(src, sd, types, seed=2)
    dst = tmp_path / f"wan_tiny_{to}.safetensors"
    res = convert(src, dst, to=to)
    assert set(res.fp4_errors) == {k[: -len(".weight")] for k in types}  # every GGUF layer re-encoded, reported
    worst = max(res.fp4_errors.values())
    with torch.inference_mode():
        stock = comfy.sd.load_diffusion_model(str(dst))
        ref_patcher = comfy.sd.load_diffusion_model_state_dict(_reference(src), model_options={"dtype": torch.float32})
    if to == "float8_e4m3fn":
        layer = stock.model.diffusion_model.get_submodule(linears[0][: -len(".weight")])
        assert type(layer.weight).__name__ == "QuantizedTensor"
    out, want = denoise(stock), denoise(ref_patcher)
    rel = float((out - want).norm() / want.norm())
    # the output error stays within twice the largest per-layer weight error convert reported
    # (bf16 ~2e-3, per-tensor fp8 ~3e-2 on these random weights)
    assert rel < 2 * worst, (to, rel, worst)
