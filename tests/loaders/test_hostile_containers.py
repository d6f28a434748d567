"""Hostile or broken containers (issue 12): each ends in one WanquantError naming the file (and the
entry), fast, without materialising anything large — never a traceback, a hang or a memory bomb."""

import json
import os
import struct
import time

import pytest
import torch
from fixtures import syn

from wanquant.cli import main as cli_main
from wanquant.errors import WanquantError
from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.containers import open_source


def raw_safetensors(path, header: dict | bytes, data: bytes = b"", *, length: int | None = None):
    """A safetensors file with exactly this header and data (no library in between to fix it)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def refused(path, match, layer=None):
    with pytest.raises(WanquantError, match=match) as e:
        open_source(path)
    assert e.value.file and os.path.basename(str(path)) in e.value.file
    if layer is not None:
        assert e.value.layer == layer
    return e.value


# ---------------------------------------------------------------- safetensors header rules

def test_overlapping_offsets_refused(tmp_path):
    # 400 entries aliasing one region: the safetensors library refuses it, a conversion would grow 400x
    header = {f"t{i}": entry(shape=(256,), offsets=(0, 1024)) for i in range(400)}
    refused(raw_safetensors(tmp_path / "a.safetensors", header, bytes(1024)), "overlaps")


def test_gap_between_tensors_refused(tmp_path):
    header = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(16, 24))}
    refused(raw_safetensors(tmp_path / "a.safetensors", header, bytes(24)), "gap", layer="b")


def test_bytes_after_last_tensor_refused(tmp_path):
    refused(raw_safetensors(tmp_path / "a.safetensors", {"a": entry()}, bytes(12)), "bytes after the last tensor")


def test_truncated_data_names_the_tensor(tmp_path):
    header = {"a": entry(), "b": entry(offsets=(8, 16))}
    refused(raw_safetensors(tmp_path / "a.safetensors", header, bytes(12)), "truncated", layer="b")


def test_nul_padded_header_refused(tmp_path):
    raw = json.dumps({"a": entry()}).encode() + b"\x00" * 6
    refused(raw_safetensors(tmp_path / "a.safetensors", raw, bytes(8)), "not valid JSON")


@pytest.mark.parametrize("meta", [[1, 2], "x", {"k": 1}, {"k": None}, {"k": {"x": "y"}}])
def test_metadata_must_map_strings_to_strings(tmp_path, meta):
    refused(raw_safetensors(tmp_path / "a.safetensors", {"__metadata__": meta, "a": entry()}, bytes(8)),
            "__metadata__")


@pytest.mark.parametrize("bad", [
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": None, "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": "0,8"},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]},
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
    {"dtype": "F32", "shape": [2], "data_offsets": [None, 8]},
    {"dtype": "C64", "shape": [2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2]},
    [1, 2, 3],
])
def test_malformed_entries_refused(tmp_path, bad):
    refused(raw_safetensors(tmp_path / "a.safetensors", {"a": bad}, bytes(8)), "malformed|unsupported", layer="a")


def test_negative_dims_with_positive_product_refused(tmp_path):
    refused(raw_safetensors(tmp_path / "a.safetensors", {"a": entry(shape=(-2, -1))}, bytes(8)), "shape", layer="a")


@pytest.mark.parametrize("text", ['{"a": {"dtype": "F32", "shape": [1' + "0" * 5000 + '], "data_offsets": [0, 8]}}',
                                  '{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}',
                                  '{"a": ' + "[" * 100000 + "]" * 100000 + "}",
                                  '{"a": 1, "a": 2}'])
def test_hostile_json_is_one_error(tmp_path, text):
    refused(raw_safetensors(tmp_path / "a.safetensors", text.encode(), bytes(8)), "JSON|nested")


def test_header_size_capped_like_the_library(tmp_path):
    refused(raw_safetensors(tmp_path / "a.safetensors", b"{}", length=200_000_000), "too large")


def test_million_empty_tensors_refused_quickly(tmp_path):
    n = 1_200_000
    raw = ("{" + ",".join(f'"k{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n)) + "}")
    p = raw_safetensors(tmp_path / "a.safetensors", raw.encode())
    t0 = time.perf_counter()
    refused(p, "too many tensors")
    assert time.perf_counter() - t0 < 2.0


def test_empty_file_refused(tmp_path):
    refused(raw_safetensors(tmp_path / "a.safetensors", {}), "no tensors")
    refused(raw_safetensors(tmp_path / "b.safetensors", {"__metadata__": {"a": "b"}}), "no tensors")


def test_valid_header_with_empty_tensors_and_padding_reads(tmp_path):
    # what the library accepts must still work: zero-size tensors sharing an offset, space padding
    raw = json.dumps({"z": entry(shape=(0, 3), offsets=(8, 8)), "a": entry(), "y": entry(shape=(0,), offsets=(8, 8)),
                      "b": entry("BF16", (2,), (8, 12))}).encode() + b"    "
    src = open_source(raw_safetensors(tmp_path / "a.safetensors", raw, struct.pack("<2f", 1.5, -2.0) + bytes(4)))
    assert sorted(src.tensors) == ["a", "b", "y", "z"]
    assert src.tensors["a"].load().tolist() == [1.5, -2.0] and tuple(src.tensors["z"].shape) == (0, 3)


# ---------------------------------------------------------------- special files fail fast

@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_fifo_model_path_fails_fast(tmp_path, suffix, capsys):
    fifo = tmp_path / f"model{suffix}"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    assert cli_main(["inspect", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 5 and err.count("\n") == 1 and "FIFO" in err and str(fifo) in err


# ---------------------------------------------------------------- .pth

def test_expanded_pth_tensor_refused_before_allocation(tmp_path, capsys):
    p = tmp_path / "bomb.pth"
    torch.save({"blocks.0.ffn.0.weight": torch.zeros(1).expand(60000, 60000)}, p)
    assert p.stat().st_size < 10_000
    for argv in (["inspect", str(p)], ["convert", str(p), str(tmp_path / "o.safetensors")],
                 ["merge-lora", str(p), str(p), "-o", str(tmp_path / "m.safetensors")]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "expanded" in err and "blocks.0.ffn.0.weight" in err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_both_formats_read(tmp_path, legacy):
    p = tmp_path / "m.pth"
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    torch.save({"a": w, "b": w.T.clone().T}, p, _use_new_zipfile_serialization=not legacy)
    src = open_source(p)
    assert torch.equal(src.tensors["a"].load(), w) and torch.equal(src.tensors["b"].load(), w)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("case,match", [
    ("int_key", "not a string"), ("tuple_key", "not a string"), ("meta", "meta tensor"),
    ("sparse", "sparse"), ("empty", "no tensors"), ("shared", "share one storage"), ("expanded", "expanded"),
    ("surrogate", "lone surrogate"),
])
def test_pth_odd_contents_refused(tmp_path, legacy, case, match):
    x = torch.zeros(8)
    sd = {"int_key": {1: x}, "tuple_key": {("a", 1): x}, "meta": {"a": torch.zeros(3, device="meta")},
          "sparse": {"a": torch.eye(3).to_sparse()}, "empty": {}, "shared": {"a": x, "b": x[2:4]},
          "expanded": {"a": torch.zeros(4, 1).expand(4, 1000)}, "surrogate": {"a\ud800": x}}[case]
    p = tmp_path / "m.pth"
    torch.save(sd, p, _use_new_zipfile_serialization=not legacy)
    refused(p, match)


def test_text_pth_is_not_called_a_pickle_that_runs_code(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("these are not weights\n")
    e = refused(p, "not a torch.save file")
    assert "run code" not in str(e)


def test_corrupt_pickle_is_not_called_code(tmp_path):
    p = tmp_path / "m.pth"
    torch.save({"a": torch.zeros(2)}, p, _use_new_zipfile_serialization=False)
    data = p.read_bytes()
    p.write_bytes(data[:40])
    e = refused(p, "pth")
    assert "run code" not in str(e)


# ---------------------------------------------------------------- shard indexes

def _index(tmp_path, weight_map, extra=None):
    folder = tmp_path / "sharded"
    folder.mkdir(exist_ok=True)
    syn.save({"head.modulation": torch.zeros(1, 2, 256)}, folder / "a.safetensors")
    idx = folder / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": weight_map, **(extra or {})}))
    return idx


@pytest.mark.parametrize("name,match", [
    (5, "not a string"), (None, "not a string"), (["a.safetensors"], "not a string"),
    ("a\x00.safetensors", "NUL"), ("x" * 300 + ".safetensors", "too long"), ("", "empty"),
])
def test_index_bad_shard_names(tmp_path, name, match):
    idx = _index(tmp_path, {"head.modulation": name})
    e = refused(idx, match, layer="head.modulation")
    assert "absolute" not in str(e)


def test_index_shard_that_is_a_directory_or_fifo(tmp_path):
    idx = _index(tmp_path, {"head.modulation": "dir.safetensors"})
    (idx.parent / "dir.safetensors").mkdir()
    refused(idx, "not a regular file")
    idx = _index(tmp_path, {"head.modulation": "pipe.safetensors"})
    os.mkfifo(idx.parent / "pipe.safetensors")
    refused(idx, "not a regular file")


def test_index_symlink_loop(tmp_path):
    idx = _index(tmp_path, {"head.modulation": "loop.safetensors"})
    os.symlink("loop.safetensors", idx.parent / "loop.safetensors")
    refused(idx, "symlink loop|cannot be resolved|links outside")


def test_symlinked_shard_reported_by_the_index_name(tmp_path):
    outside = syn.save({"head.modulation": torch.zeros(1, 2, 256)}, tmp_path / "elsewhere.safetensors")
    idx = _index(tmp_path, {"head.modulation": "shard-00001.safetensors"})
    os.symlink(outside, idx.parent / "shard-00001.safetensors")
    e = refused(idx, "links outside")
    assert "shard-00001.safetensors" in str(e) and "elsewhere.safetensors" in str(e)


@pytest.mark.parametrize("extra,match", [({"metadata": [1]}, "metadata"), ({"metadata": "x"}, "metadata")])
def test_index_metadata_not_an_object(tmp_path, extra, match):
    refused(_index(tmp_path, {"head.modulation": "a.safetensors"}, extra), match)


def test_index_nested_and_oversized(tmp_path):
    idx = _index(tmp_path, {"head.modulation": "a.safetensors"})
    idx.write_text('{"weight_map": ' + "[" * 50000 + "]" * 50000 + "}")
    refused(idx, "nested|JSON")
    with open(idx, "wb") as f:
        f.truncate(30_000_000)
    refused(idx, "too large")


def test_nested_side_file_is_one_error(tmp_path):
    p = syn.save({"head.modulation": torch.zeros(1, 2, 256)}, tmp_path / "m.safetensors")
    side = tmp_path / "quantize_config.json"
    side.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(WanquantError, match="nested|JSON") as e:
        open_source(p)
    assert e.value.file == str(side)


@pytest.mark.parametrize("key", ["blocks.0.ffn.0@partx.weight", "blocks.0.ffn.0@part0@part1.weight",
                                 "face_adapter.fuser_blocks.0.linear1_kv@part1.weight"])
def test_keys_with_the_reserved_part_mark(tmp_path, key):
    p = syn.save({"head.modulation": torch.zeros(1, 2, 256), key: torch.zeros(4, 4)}, tmp_path / "m.safetensors")
    with pytest.raises(WanquantError, match="@part") as e:
        load_canonical(p, collect_errors=True)
    assert e.value.layer == key
