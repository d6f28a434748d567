"""Tiny files in ComfyUI's newer comfy_quant algorithms, made by the producer: comfy-kitchen's own
layouts (``quantize`` + ``state_dict_tensors``, what ComfyUI 0.33's ``_quantized_weight_state_dict``
writes under ``<layer>.weight``) with the comfy_quant keys ComfyUI 0.33 writes for them
(comfy/ops.py: ``convrot``/``convrot_groupsize`` for int8, ``convrot_groupsize`` for
convrot_w4a4, ``group_size``/``convrot_groupsize`` for asym_w4a8_int8)."""

from __future__ import annotations

import pytest
import torch
from fixtures import syn

CONVROT = "int8_tensorwise+convrot"
#: table key -> (kitchen layout class name, comfy_quant written by ComfyUI 0.33)
RECIPES = {
    CONVROT: ("TensorWiseINT8Layout", {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}),
    "convrot_w4a4": ("TensorCoreConvRotW4A4Layout", {"format": "convrot_w4a4", "convrot_groupsize": 256}),
    "asym_w4a8_int8": ("AsymW4A8Int8Layout", {"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 256}),
}


def native(sd: dict[str, torch.Tensor], key: str, layers) -> dict[str, torch.Tensor]:
    """``sd`` with ``layers`` quantized by comfy-kitchen's layout for ``key``, as ComfyUI saves them."""
    kt = pytest.importorskip("comfy_kitchen.tensor")
    name, conf = RECIPES[key]
    layout = getattr(kt, name, None)
    if layout is None:
        pytest.skip(f"this comfy-kitchen has no {name}")
    kwargs = {"is_weight": True, "per_channel": True, "convrot": True, "convrot_groupsize": 256} if key == CONVROT else {}
    out = dict(sd)
    for l in layers:
        q, p = layout.quantize(out.pop(f"{l}.weight").float(), **kwargs)
        for suffix, t in layout.state_dict_tensors(q, p).items():
            if t is not None:
                out[f"{l}.weight{suffix}"] = t
        out[f"{l}.comfy_quant"] = syn.comfy_quant_bytes(conf)
    return out


def nvfp4_pre_quant(sd: dict[str, torch.Tensor], layers, seed: int = 5) -> dict[str, torch.Tensor]:
    """NVFP4 layers (comfy-kitchen's quantizer, ComfyUI's layout) with ModelOpt AWQ's
    ``pre_quant_scale`` [in] beside them (ComfyUI >= 0.30.0 multiplies the input by it)."""
    q, _ = syn.comfy_native(sd, {l: "nvfp4" for l in layers})
    g = torch.Generator().manual_seed(seed)
    for l in layers:
        q[f"{l}.pre_quant_scale"] = (0.5 + torch.rand(sd[f"{l}.weight"].shape[1], generator=g)).to(torch.bfloat16)
    return q
