"""Bad input: one WanquantError naming the file, the layer and what was expected; inspect reports
instead of crashing; convert never leaves a partial DST."""

import json
import os
import pickle

import pytest
import torch
from fixtures import syn, tiny_wan

from wanquant.cli import main as cli_main
from wanquant.errors import WanquantError
from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.convert import convert


def _fp8_file(tmp_path, mutate=None, name="m.safetensors"):
    q = syn.kijai_scaled_fp8(tiny_wan(), scale_dtype=torch.float32)
    if mutate:
        mutate(q)
    return syn.save(q, tmp_path / name)


def test_truncated_safetensors(tmp_path):
    p = _fp8_file(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WanquantError) as e:
        load_canonical(p)
    assert str(p) in str(e.value) and "truncated" in str(e.value)
    assert e.value.layer  # names the tensor that runs past the end


def test_corrupt_header(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 10)
    with pytest.raises(WanquantError, match="not valid JSON") as e:
        load_canonical(p)
    assert e.value.file == str(p)


def test_header_length_past_end(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(WanquantError, match="larger than the file"):
        load_canonical(p)


def _index(tmp_path, weight_map):
    folder = tmp_path / "sharded"
    folder.mkdir(exist_ok=True)
    syn.save({"head.modulation": torch.zeros(1, 2, 256)}, folder / "a.safetensors")
    idx = folder / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": weight_map}))
    return idx


def test_index_missing_shard(tmp_path):
    idx = _index(tmp_path, {"head.modulation": "a.safetensors", "head.head.weight": "b.safetensors"})
    with pytest.raises(WanquantError, match="does not exist") as e:
        load_canonical(idx)
    assert e.value.layer == "head.head.weight" and "b.safetensors" in str(e.value)


def test_index_key_absent_from_shard(tmp_path):
    idx = _index(tmp_path, {"head.modulation": "a.safetensors", "head.head.weight": "a.safetensors"})
    with pytest.raises(WanquantError, match="missing in its shard") as e:
        load_canonical(idx)
    assert e.value.layer == "head.head.weight"


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_shard_escaping_folder(tmp_path, name):
    idx = _index(tmp_path, {"head.modulation": name})
    with pytest.raises(WanquantError, match="outside its folder"):
        load_canonical(idx)


def test_index_shard_symlink_leaving_folder(tmp_path):
    outside = syn.save({"head.modulation": torch.zeros(1, 2, 256)}, tmp_path / "outside.safetensors")
    idx = _index(tmp_path, {"head.modulation": "link.safetensors"})
    os.symlink(outside, idx.parent / "link.safetensors")
    with pytest.raises(WanquantError, match="links outside"):
        load_canonical(idx)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_needing_code_is_refused(tmp_path):
    p = tmp_path / "dit.pth"
    torch.save({"w": torch.zeros(2), "evil": _Evil()}, p)
    with pytest.raises(WanquantError, match="refused") as e:
        load_canonical(p)
    assert e.value.file == str(p)
    # and a plain pickle (not torch zip) needing code is refused too
    p2 = tmp_path / "plain.pth"
    p2.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(WanquantError):
        load_canonical(p2)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_invalid_scale_values(tmp_path, value):
    def mutate(q):
        q["blocks.1.ffn.2.scale_weight"] = torch.tensor(value)
    p = _fp8_file(tmp_path, mutate)
    with pytest.raises(WanquantError, match="invalid weight scale") as e:
        load_canonical(p)
    assert e.value.layer == "blocks.1.ffn.2" and e.value.file == str(p)


def test_scale_of_wrong_shape(tmp_path):
    def mutate(q):
        # 255 scales for 256 rows: neither per-tensor nor per-row ([256] is valid per-row fp8) nor a block grid
        q["blocks.0.self_attn.q.scale_weight"] = torch.ones(255)
    with pytest.raises(WanquantError, match="fits no known layout") as e:
        load_canonical(_fp8_file(tmp_path, mutate))
    assert e.value.layer == "blocks.0.self_attn.q" and "[255]" in str(e.value)


def test_fp4_not_divisible_by_group(tmp_path):
    q = {"blocks.0.ffn.0.weight": torch.zeros(64, 24, dtype=torch.uint8),  # in = 48, not % 32
         "blocks.0.ffn.0.weight_scale": torch.ones(64, 1, dtype=torch.bfloat16)}
    with pytest.raises(WanquantError, match="divisible by the group size") as e:
        load_canonical(syn.save(q, tmp_path / "a.safetensors"))
    assert e.value.layer == "blocks.0.ffn.0"


def test_fp4_scale_shape_mismatch(tmp_path):
    q = {"blocks.0.ffn.0.weight": torch.zeros(64, 32, dtype=torch.uint8),
         "blocks.0.ffn.0.weight_scale": torch.ones(64, 3, dtype=torch.bfloat16)}
    with pytest.raises(WanquantError, match="does not fit") as e:
        load_canonical(syn.save(q, tmp_path / "a.safetensors"))
    assert "[64, 2]" in str(e.value)


def test_orphan_scale(tmp_path):
    def mutate(q):
        q["blocks.0.self_attn.zz.scale_weight"] = torch.tensor(0.1)
    with pytest.raises(WanquantError, match="orphan") as e:
        load_canonical(_fp8_file(tmp_path, mutate))
    assert e.value.layer == "blocks.0.self_attn.zz"


def test_scale_next_to_high_precision_weight(tmp_path):
    def mutate(q):
        q["blocks.0.norm3.scale_weight"] = torch.tensor(0.1)
    with pytest.raises(WanquantError, match="high-precision weight"):
        load_canonical(_fp8_file(tmp_path, mutate))


def test_conflicting_spellings(tmp_path):
    def mutate(q):
        q["blocks.0.self_attn.q.weight.scale_weight"] = q["blocks.0.self_attn.q.scale_weight"].clone()
    with pytest.raises(WanquantError, match="conflicting scale spellings") as e:
        load_canonical(_fp8_file(tmp_path, mutate))
    assert "blocks.0.self_attn.q.weight.scale_weight" in str(e.value)


def test_unknown_format(tmp_path):
    def mutate(q):
        q["blocks.0.ffn.0.weight"] = torch.zeros(512, 256, dtype=torch.int16)
        del q["blocks.0.ffn.0.scale_weight"]
    with pytest.raises(WanquantError, match="unknown weight format"):
        load_canonical(_fp8_file(tmp_path, mutate))
    q = syn.kijai_scaled_fp8(tiny_wan(), scale_dtype=torch.float32)
    q["blocks.0.ffn.0.comfy_quant"] = syn.comfy_quant_bytes({"format": "int3_magic"})
    with pytest.raises(WanquantError, match="'int3_magic' not in any ComfyUI release we know"):
        load_canonical(syn.save(q, tmp_path / "b.safetensors"))


def test_inspect_reports_instead_of_crashing(tmp_path, capsys):
    def mutate(q):
        q["blocks.1.ffn.2.scale_weight"] = torch.tensor(float("nan"))
        q["blocks.0.self_attn.zz.scale_weight"] = torch.tensor(0.1)
    p = _fp8_file(tmp_path, mutate)
    rc = cli_main(["inspect", str(p), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert len(out["errors"]) == 2
    assert any("blocks.1.ffn.2" in e for e in out["errors"]) and out["verdict"].startswith("NOT LOADABLE")


def test_convert_writes_nothing_on_failure(tmp_path):
    def mutate(q):
        q["blocks.1.ffn.2.scale_weight"] = torch.tensor(0.0)
    src = _fp8_file(tmp_path, mutate)
    dst = tmp_path / "out" / "dst.safetensors"
    dst.parent.mkdir()
    with pytest.raises(WanquantError, match="blocks.1.ffn.2"):
        convert(src, dst)
    assert not dst.exists()
    # a failure mid-write (the source disappears after planning) leaves no partial file either
    good = _fp8_file(tmp_path, name="good.safetensors")
    from wanquant.loaders import writer

    def boom():
        raise WanquantError("simulated read failure", layer="x")
    with pytest.raises(WanquantError, match="simulated"):
        writer.write_safetensors(dst, [("a", (2,), torch.float32, lambda: torch.zeros(2)),
                                       ("b", (2,), torch.float32, boom)])
    assert not dst.exists() and not [f for f in dst.parent.iterdir() if f.name.startswith(".wanquant")]
    assert good.exists()


def test_cli_error_is_one_line(tmp_path, capsys):
    rc = cli_main(["inspect", str(tmp_path / "nope.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no such file" in err


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1)])
def test_scalar_scale_of_any_all_ones_shape(tmp_path, shape):
    """kijai's scaled fp8 of Animate stores some scalar scales as [1, 1] / [1, 1, 1]."""
    scale = torch.tensor(0.0123, dtype=torch.float32).reshape(shape)

    def mutate(q):
        q["blocks.0.self_attn.q.scale_weight"] = scale
    p = _fp8_file(tmp_path, mutate)
    m = load_canonical(p)
    ws = m.entries["blocks.0.self_attn.q.weight_scale"].load()
    assert ws.shape == () and float(ws) == float(scale.reshape(()))
