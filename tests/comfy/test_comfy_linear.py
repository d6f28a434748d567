"""wanquant's "ComfyUI runs this layer quantized" rule against ComfyUI's own module types, and the
Animate blur kernels the canonical form adds against the buffers ComfyUI's module registers.

In-process (``$COMFY_PY -m pytest tests/comfy/test_comfy_linear.py``): builds ComfyUI's WanModel and
AnimateWanModel on the meta device with ``mixed_precision_ops`` (the class whose ``Linear`` is the
only thing that honours ``comfy_quant`` in these models).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "loaders" / "data" / "comfy_animate_params.json"


@pytest.fixture(scope="module")
def comfy(comfy_inprocess):
    import comfy.ops
    return comfy


def _models(comfy):
    from comfy.ldm.wan.model import WanModel
    from comfy.ldm.wan.model_animate import AnimateWanModel
    ops = comfy.ops.mixed_precision_ops({}, torch.float32, full_precision_mm=False, disabled=[])
    cfg = json.loads(DATA.read_text())["native_config"]
    with torch.device("meta"):
        yield "animate", AnimateWanModel(**cfg, device="meta", dtype=torch.float32, operations=ops), ops
        yield "i2v", WanModel(model_type="i2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36,
                              out_dim=16, text_dim=64, device="meta", dtype=torch.float32, operations=ops), ops


def test_runs_quantized_matches_comfyui_module_types(comfy):
    from wanquant.loaders.comfy_linear import runs_quantized
    checked = {True: 0, False: 0}
    for kind, model, ops in _models(comfy):
        for name, module in model.named_modules():
            is_linear = isinstance(module, ops.Linear)  # its weight only appears when loaded
            weight = getattr(module, "weight", None)
            if is_linear:
                rank = 2
            elif isinstance(weight, torch.nn.Parameter) and weight.ndim >= 2:
                rank = weight.ndim
            else:
                continue  # norms and the like: never quantized by anyone
            assert runs_quantized(name, rank) == is_linear, f"{kind}: {name} ({type(module).__name__})"
            checked[is_linear] += 1
    assert checked[True] > 50 and checked[False] >= 32 + 2


def test_added_blur_kernels_equal_comfyui_buffers(comfy, tmp_path):
    from wanquant.loaders import synthetic as syn
    from wanquant.loaders.canonical import load_canonical
    from comfy.ldm.wan.model_animate import AnimateWanModel
    data = json.loads(DATA.read_text())
    g = torch.Generator().manual_seed(4)
    sd = {k: (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16) for k, shape in data["diffusers"].items()}
    m = load_canonical(syn.save(sd, tmp_path / "animate_diffusers.safetensors"))
    model = AnimateWanModel(**data["native_config"], device="cpu", dtype=torch.bfloat16,
                            operations=comfy.ops.disable_weight_init)
    buffers = {k: v for k, v in model.state_dict().items() if k.endswith(".kernel")}
    assert len(buffers) == 14
    for k, v in buffers.items():
        got = m.entries[k].load()
        assert got.dtype == v.dtype and torch.equal(got, v), k
