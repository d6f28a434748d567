"""bench_loader's LightX2V rows measure what they claim: the synthesised files are read as
LightX2V NVFP4 (published input_global_scale + alpha spelling, nibbles swapped into ComfyUI's
order) and LightX2V per-channel int8, and the child that times them runs through both readers.
Tiny shapes here; the benchmark itself uses Wan-14B's."""

import re

import torch

from wanquant.benchmarks import bench_loader as bl
from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.containers import open_source
from wanquant.loaders.lightx2v import SPELL_ALPHA

TINY = [("self_attn.q", 128, 128), ("ffn.0", 256, 128)]


def test_lightx2v_files_are_read_as_lightx2v(tmp_path):
    nv = bl.build_lightx2v(tmp_path / "nv.safetensors", 1e-9, "nvfp4", TINY)
    i8 = bl.build_lightx2v(tmp_path / "i8.safetensors", 1e-9, "int8", TINY)
    with load_canonical(nv) as m, open_source(nv) as src:
        assert dict(m.report.formats) == {"nvfp4": 2} and not m.report.errors
        assert dict(m.report.spellings) == {SPELL_ALPHA: 2}
        raw = src.tensors["blocks.0.ffn.0.weight"].load()
        got = m.entries["blocks.0.ffn.0.weight"].load()
        assert got.shape == (256, 64) and torch.equal(got, (raw & 0x0F) * 16 + (raw >> 4))
        assert m.entries["blocks.0.ffn.0.weight_scale"].shape == (256, 8)
    with load_canonical(i8) as m:
        assert dict(m.report.formats) == {"int8_tensorwise": 2} and not m.report.errors
        assert m.entries["blocks.0.ffn.0.weight_scale"].shape == (256, 1)


def test_every_page_child_runs_through_both_readers(tmp_path, capsys):
    path = bl.build_lightx2v(tmp_path / "i8.safetensors", 1e-9, "int8", TINY)
    for reader in bl.READERS:
        bl._load_every_page(path, f"tiny {reader}", 1, "test", reader)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    for line, reader in zip(out, bl.READERS):
        assert re.match(rf"tiny {reader} 0\.00 GiB: canonical load \+ every page read [0-9.]+ s .*private memory added "
                        r"-?[0-9.]+ MiB", line), line
