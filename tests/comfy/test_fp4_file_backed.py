"""A low-nibble-first FP4 group-32 file (the Animate FP4 release's packing) loads without a
swapped private copy: ComfyUI's layers hold the file's own memory-mapped bytes and decode that
order, while everything handed out (state dict, outputs) equals the canonical high-first model.

In-process ComfyUI (``$COMFY_PY -m pytest``; skips without ``COMFYUI_PATH``)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from fixtures import denoise, syn, tiny_wan

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")


def _build(folder, order):
    sd = tiny_wan(seed=21)
    layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]
    q = syn.fp4_g32(sd, layers, order=order)
    folder.mkdir()
    (folder / "quantize_config.json").write_text(json.dumps({"packing": order}))
    return syn.save(q, folder / "model.safetensors"), q, layers


def _mapped_files(ptr: int) -> list[str]:
    """Files whose mapping in this process contains address ``ptr``."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi and len(parts) >= 6:
                out.append(parts[5])
    return out


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
        sd = mod.state_dict()
        assert torch.equal(sd["weight"], high_q[f"{name}.weight"]), name  # handed out canonical
    assert torch.equal(denoise(low.patcher), denoise(high.patcher))
