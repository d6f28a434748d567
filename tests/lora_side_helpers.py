"""What the two LoRA side-path test files share (tests/comfy/test_lora_side_path.py and
test_lora_side_fastpaths.py): the LoRA definition, applying it through the node's own function,
and one Linear's output with its kernel calls counted by a torch dispatch mode (torch's own
dispatcher, not the pack's counters)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fixtures import syn
from wanquant.lora.keys import render_lora

LAYER = "blocks.0.self_attn.q"


class CountKernels(TorchDispatchMode):
    """Calls of ``aten._int_mm`` and ``aten._scaled_mm`` while active."""

    def __init__(self):
        super().__init__()
        self.n = {"_int_mm": 0, "_scaled_mm": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._int_mm.default:
            self.n["_int_mm"] += 1
        elif func is torch.ops.aten._scaled_mm.default:
            self.n["_scaled_mm"] += 1
        return func(*args, **(kwargs or {}))


def lora_def(sd, seed, rank=8):
    """A LoRA on every block Linear (up, down, alpha), plus a ``diff_b`` on :data:`LAYER`."""
    g = torch.Generator().manual_seed(seed)
    d = {}
    for layer in syn.quantizable_linears(sd):
        if layer.startswith("blocks."):
            o, i = sd[f"{layer}.weight"].shape
            d[layer] = {"up": torch.randn(o, rank, generator=g) * 0.3 / i ** 0.5,
                        "down": torch.randn(rank, i, generator=g), "alpha": rank / 2}
    d[LAYER]["diff_b"] = torch.randn(sd[f"{LAYER}.weight"].shape[0], generator=g) * 0.02
    return d


def ours_and_theirs(sd, tmp_path, seeds, style):
    """Two LoRAs on every block Linear: ``ours`` saved as a ``style`` file for the node, ``theirs``
    (without ``diff_b``) for ComfyUI's own loader (:func:`core_lora`)."""
    ours, theirs = lora_def(sd, seeds[0]), lora_def(sd, seeds[1])
    del theirs[LAYER]["diff_b"]
    return ours, theirs, syn.save(render_lora(ours, style), tmp_path / "ours.safetensors")


def core_lora(model, lora, strength):
    """``model`` with ``lora`` (a :func:`lora_def`) through ComfyUI's own LoraLoader path."""
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_lora_for_models(model, None, render_lora(lora, "comfy"), strength, 0.0)[0]


def apply(model, path, strength, mode="on the fly"):
    from wanquant.nodes.lora_nodes import apply_lora

    with torch.inference_mode():
        return apply_lora(model, str(path), strength, mode)


def layer_out(patcher, x, layer=LAYER, **load):
    """Load ``patcher`` (object patches applied) and run one of its Linears: (y, kernel counts)."""
    import comfy.model_management as mm

    with torch.inference_mode():
        if load:
            patcher.patch_model(device_to=torch.device("cpu"), **load)
        else:
            mm.load_models_gpu([patcher])
        module = patcher.model.diffusion_model.get_submodule(layer)
        with CountKernels() as count:
            y = module(x)
    return y, count.n
