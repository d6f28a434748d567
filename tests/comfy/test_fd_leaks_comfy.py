"""No descriptor outlives a model load inside ComfyUI: repeated loads of a 4-shard model, its
``cached_patcher_init`` rebuilds and an inspect leave the process's open-fd count unchanged
(the reviewer counted 20 leaked after 5 loads)."""

from __future__ import annotations

import os
import sys

import pytest
from fixtures import syn, tiny_wan

pytestmark = [pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                 reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_loads_and_reloads_leave_no_descriptor(comfy_inprocess, tmp_path):
    from wanquant.nodes.bridge import load_wan_model

    idx = syn.save_sharded(syn.kijai_scaled_fp8(tiny_wan(seed=8)), tmp_path / "m", shards=4)
    load_wan_model(str(idx))  # first load may open ComfyUI's own long-lived files; not ours
    before = open_fds()
    for _ in range(5):
        res = load_wan_model(str(idx))
        factory, args = res.patcher.cached_patcher_init
        factory(*args)
    assert open_fds() == before
