"""No file descriptor outlives the operation that opened it (issue: every load leaked one per
shard; on Windows an open handle also locks the checkpoint against deletion or replacement).

Counts this process's open descriptors (``/proc/self/fd``) around repeated inspects, converts,
merges, source opens with data reads, and lazy-extra reads; any growth fails.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from fixtures import syn, tiny_wan

from wanquant.cli import main as cli_main
from wanquant.loaders.canonical import LazyTensors, load_canonical, load_with_base
from wanquant.loaders.containers import open_source
from wanquant.loaders.convert import convert
from wanquant.lora.keys import render_lora
from wanquant.lora.merge import merge_lora_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fd")
    sd = syn.kijai_scaled_fp8(tiny_wan(seed=5))
    return syn.save_sharded(sd, folder / "model", shards=4), folder


def test_repeated_inspect_convert_merge_leave_no_descriptor(sharded, capsys):
    idx, folder = sharded
    lora = syn.save(render_lora({"blocks.0.self_attn.q": {"up": torch.randn(256, 4), "down": torch.randn(4, 256)}}),
                    folder / "lora.safetensors")
    before = open_fds()
    for i in range(3):
        assert cli_main(["inspect", str(idx)]) == 0
        convert(idx, folder / f"out{i}.safetensors")
        assert cli_main(["convert", str(idx), str(folder / f"cli{i}.safetensors")]) == 0
        merge_lora_file(idx, [(str(lora), 1.0)], folder / f"merged{i}.safetensors")
    capsys.readouterr()
    assert open_fds() == before


def test_reading_every_tensor_then_closing_releases_every_shard(sharded):
    idx, _ = sharded
    before = open_fds()
    for _ in range(5):
        with open_source(idx) as src:
            for ref in src.tensors.values():
                ref.load()
            assert open_fds() > before  # positioned reads hold one descriptor per shard while open
    assert open_fds() == before


def test_canonical_model_and_overlay_close_every_file(sharded, tmp_path):
    idx, _ = sharded
    ft = syn.save(syn.kijai_scaled_fp8({k: v for k, v in tiny_wan(seed=6).items() if ".self_attn." in k}),
                  tmp_path / "partial.safetensors")
    before = open_fds()
    for _ in range(3):
        with load_with_base(ft, idx) as model:
            for e in model.entries.values():
                e.load()
    assert open_fds() == before


def test_lazy_extras_hold_no_descriptor_between_reads(sharded):
    idx, _ = sharded
    model = load_canonical(idx)
    lazy = LazyTensors({k: model.entries[k] for k in list(model.entries)[:3]}, model.sources())
    model.close()  # what the loader does once ComfyUI has the model; the extras stay readable
    before = open_fds()
    for key in lazy:
        assert lazy[key].shape == lazy.shapes()[key]
    assert open_fds() == before


def test_failed_overlay_closes_what_it_opened(tmp_path):
    """A base that does not exist: the finetune opened first must be closed again."""
    from wanquant.errors import WanquantError

    ft = syn.save(syn.kijai_scaled_fp8(tiny_wan(seed=7)), tmp_path / "ft.safetensors")
    before = open_fds()
    for _ in range(3):
        with pytest.raises(WanquantError):
            load_with_base(ft, tmp_path / "missing.safetensors")
    assert open_fds() == before
