"""GGUF Wan files: inspect, canonical form, convert and bad input, on files the producer's code
(gguf-py's GGUFWriter + quantizers; recipe tests/data/gguf/make_gguf.py) wrote.

References are gguf-py's own decode (``gguf.quants.dequantize`` of the bytes its reader maps),
never our decoder; the type each layer should have comes from the recipe's assignment.
"""

import importlib.util
import json
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import mutation_outcome
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from wanquant.errors import WanquantError  # noqa: E402
from wanquant.loaders.canonical import load_canonical  # noqa: E402
from wanquant.loaders.convert import convert  # noqa: E402
from wanquant.ops.formats import get_format  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "gguf"
MIX = DATA / "wan_tiny_mix.gguf"
_spec = importlib.util.spec_from_file_location("make_gguf", DATA / "make_gguf.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)


def reference(path) -> dict[str, np.ndarray]:
    """name -> fp32 values in torch shape, decoded by gguf-py."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        f = r.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if f is not None:
            shape = tuple(int(v) for v in f.contents())
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    return out


def test_committed_file_is_small_and_what_the_recipe_says():
    assert MIX.stat().st_size < 300_000
    types = recipe.mix_types(recipe.tiny_wan())
    with load_canonical(MIX) as m:
        rep = m.report
        assert rep.container == "gguf" and rep.family == "wan" and not rep.errors
        for name, qtype in types.items():
            layer = m.layers[name[: -len(".weight")]]
            want = qtype.lower() if qtype in ("BF16",) else f"gguf_{qtype.lower()}"
            assert layer.format == want, name
        assert {f"gguf_{q.lower()}" for q in recipe.ALL_TYPES} <= set(rep.formats)


def test_every_tensor_reaches_canonical_form_exactly():
    ref = reference(MIX)
    with load_canonical(MIX) as m:
        seen = set()
        for name, layer in m.layers.items():
            key = f"{name}.weight"
            if layer.quantized:
                conf = json.loads(bytes(m.entries[f"{name}.comfy_quant"].load().tolist()))
                got = get_format(layer.format).dequantize({"weight": m.entries[key].load()}, torch.float32, conf)
            else:
                got = m.entries[key].load().float()
            assert np.array_equal(got.numpy(), ref[key]), key
            seen.add(key)
        for key, e in m.entries.items():
            if key in ref and key not in seen:
                assert np.array_equal(e.load().float().numpy(), ref[key]), key
                seen.add(key)
        assert seen == set(ref)


def test_weights_stay_memory_mapped():
    with load_canonical(MIX) as m:
        a = m.entries["blocks.0.self_attn.q.weight"].load()
        b = m.entries["blocks.0.self_attn.q.weight"].load()
        assert a.dtype == torch.uint8 and a.data_ptr() == b.data_ptr()  # views of one mapping, no copies


def test_reshaped_weight_and_5d_conv():
    """city96's shape_fix (orig_shape metadata) and the F16 5-D patch embedding keep their shapes."""
    r = gguf.GGUFReader(str(MIX))
    reshaped = [f.name.split("orig_shape.", 1)[1] for f in r.fields.values() if "orig_shape" in f.name]
    assert reshaped, "the recipe stores K-quant 64-wide weights reshaped"
    with load_canonical(MIX) as m:
        assert m.entries["patch_embedding.weight"].shape == (64, 16, 1, 2, 2)
        for key in reshaped:
            assert m.layers[key[: -len(".weight")]].conf["orig_shape"] == [64, 64] or key.startswith("blocks")


@pytest.mark.parametrize("to", ["bf16", "float8_e4m3fn"])
def test_convert_to_comfy_native(tmp_path, to):
    ref = reference(MIX)
    dst = tmp_path / "out.safetensors"
    res = convert(MIX, dst, to=to)
    sd = load_file(dst)
    gg = {k[: -len(".weight")] for k, q in recipe.mix_types(recipe.tiny_wan()).items() if q != "BF16"}
    assert set(res.fp4_errors) == gg
    for layer in gg:
        w = ref[f"{layer}.weight"].astype(np.float64)
        if to == "bf16":
            assert torch.equal(sd[f"{layer}.weight"], torch.from_numpy(ref[f"{layer}.weight"]).to(torch.bfloat16))
            got = sd[f"{layer}.weight"].double().numpy()
        else:
            assert sd[f"{layer}.weight"].dtype == torch.float8_e4m3fn
            got = (sd[f"{layer}.weight"].double() * sd[f"{layer}.weight_scale"].double()).numpy()
        rel = np.linalg.norm(got - w) / np.linalg.norm(w)
        assert abs(rel - res.fp4_errors[layer]) < 1e-4  # the reported error is the real one
        assert rel < (4e-3 if to == "bf16" else 6e-2)
    assert not any(k.endswith(".comfy_quant") and b"gguf" in bytes(v.tolist()) for k, v in sd.items())


# ------------------------------------------------------------------------------ bad input

def _small(tmp_path, name="m.gguf", **kw):
    sd = recipe.tiny_wan(num_blocks=1)
    path = tmp_path / name
    recipe.write_wan_gguf(path, sd, {"blocks.0.self_attn.q.weight": "Q8_0", "blocks.0.ffn.0.weight": "Q4_K"}, **kw)
    return path


def _tensor_info(path, name):
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == name)
    return t, r


def _one_error(path):
    with pytest.raises(WanquantError) as ei:
        with load_canonical(path):
            pass
    return ei.value


def test_architecture_not_wan(tmp_path):
    err = _one_error(_small(tmp_path, arch="flux"))
    assert "not a Wan model" in str(err) and err.file and "'flux'" in err.found


def test_truncated_file_names_the_tensor(tmp_path):
    path = _small(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])
    err = _one_error(path)
    assert "past the end of the file" in str(err) and err.layer and err.file == str(path)


def test_unknown_quant_type_names_the_tensor(tmp_path):
    path = _small(tmp_path)
    t, r = _tensor_info(path, "blocks.0.self_attn.q.weight")
    type_part = t.field.parts[4]  # [name_len, name, n_dims, dims, type, offset]
    off = int(t.field.offset) + sum(int(p.nbytes) for p in t.field.parts[:4])
    del r
    raw = bytearray(path.read_bytes())
    assert int.from_bytes(raw[off:off + 4], "little") == int(type_part[0])
    raw[off:off + 4] = (16).to_bytes(4, "little")  # IQ2_XXS: gguf-py knows it, wanquant does not decode it
    path.write_bytes(bytes(raw))
    err = _one_error(path)
    assert err.layer == "blocks.0.self_attn.q.weight" and "type id 16" in err.found
    raw[off:off + 4] = (99).to_bytes(4, "little")  # no GGML type at all
    path.write_bytes(bytes(raw))
    assert _one_error(path).layer == "blocks.0.self_attn.q.weight"


def test_header_lies_about_tensor_count(tmp_path):
    path = _small(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[8:16] = (10_000).to_bytes(8, "little")  # n_tensors (GGUF v3 header: magic, version, n_tensors)
    path.write_bytes(bytes(raw))
    err = _one_error(path)
    assert err.file == str(path) and ("header" in str(err) or "past the end" in str(err))


def test_metadata_array_longer_than_the_file_is_one_error_not_a_hang(tmp_path):
    """gguf-py parses a metadata array item by item and, past the end of the file, never stops: a
    corrupt count hung the load with growing memory (found by fuzzing). Run in a child process so
    a regression fails on the timeout instead of hanging the suite."""
    path = _small(tmp_path)
    r = gguf.GGUFReader(str(path))
    name = next(k for k, f in r.fields.items() if f.types and f.types[0] == gguf.GGUFValueType.ARRAY)
    count_at = int(r.fields[name].offset) + 8 + len(name.encode()) + 4 + 4  # key len, key, value type, item type
    del r
    raw = bytearray(path.read_bytes())
    raw[count_at:count_at + 8] = (2**60).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    code = ("import sys\nfrom wanquant.errors import WanquantError\nfrom wanquant.loaders.canonical import load_canonical\n"
            "try:\n    load_canonical(sys.argv[1])\nexcept WanquantError as e:\n    print(e.found, '|', e.expected)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"{2**60} items" in out.stdout, out.stderr[-2000:]


def test_bad_magic(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(100))
    assert "GGUF" in str(_one_error(path))


def test_orig_shape_that_does_not_fit(tmp_path):
    import gguf as g

    sd = recipe.tiny_wan(num_blocks=1)
    path = tmp_path / "s.gguf"
    w = g.GGUFWriter(str(path), arch="wan")
    w.add_array("comfy.gguf.orig_shape.blocks.0.self_attn.q.weight", [64, 65])
    for k, t in sd.items():
        w.add_tensor(k, t.float().numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    err = _one_error(path)
    assert err.layer == "blocks.0.self_attn.q.weight" and "[64, 65]" in err.found


def test_cli_inspect_reports_one_line_instead_of_crashing(tmp_path):
    path = _small(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-300])
    p = subprocess.run([sys.executable, "-m", "wanquant.cli", "inspect", str(path)], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr + p.stdout
    assert "past the end of the file" in p.stderr + p.stdout
    ok = subprocess.run([sys.executable, "-m", "wanquant.cli", "inspect", str(MIX)], capture_output=True, text=True)
    assert ok.returncode == 0 and "gguf_q4_k" in ok.stdout and "gguf_q2_k" in ok.stdout


def test_failed_convert_leaves_destination_untouched(tmp_path):
    path = _small(tmp_path)
    path.write_bytes(path.read_bytes()[:-300])
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep")
    with pytest.raises(WanquantError):
        convert(path, dst, to="bf16")
    assert dst.read_bytes() == b"keep"


def _mutate_gguf(rng: random.Random, data: bytes, header_end: int) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # bytes flipped in the header (magic, counts, keys, value types, tensor infos)
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(header_end)] = rng.randrange(256)
    elif kind == 1:  # a hostile 64-bit count or offset somewhere in the header
        pos = rng.randrange(header_end - 8)
        b[pos:pos + 8] = struct.pack("<Q", rng.choice([0, 1, 7, 2**31, 2**40, 2**63 - 1, 2**64 - 1]))
    elif kind == 2:  # a hostile 32-bit type id or dimension count
        pos = rng.randrange(header_end - 4)
        b[pos:pos + 4] = struct.pack("<I", rng.choice([0, 1, 9, 12, 13, 30, 31, 255, 2**31, 2**32 - 1]))
    elif kind == 3:  # truncation anywhere
        b = b[: rng.randrange(len(b))]
    else:  # bytes flipped in the tensor data
        for _ in range(rng.randrange(1, 64)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def test_gguf_mutations_end_in_one_error_or_success(tmp_path):
    """Seeded fuzzing of a producer-written GGUF: every mutation ends in success or exactly one
    WanquantError, never another exception or a hang (one corrupt array count once hung gguf-py)."""
    base = _small(tmp_path, "base.gguf")
    data = base.read_bytes()
    r = gguf.GGUFReader(str(base))
    header_end = int(r.data_offset)
    del r
    rng = random.Random(20261201)
    failures, outcomes = [], {"ok": 0, "error": 0}
    t0 = time.perf_counter()
    for i in range(240):
        p = tmp_path / f"m{i % 4}.gguf"
        p.write_bytes(_mutate_gguf(rng, data, header_end))
        outcome = mutation_outcome(p, tmp_path / "out.safetensors", to="bf16")
        if outcome in outcomes:
            outcomes[outcome] += 1
        else:
            failures.append(f"mutation {i}: {outcome}")
    assert not failures, f"{len(failures)} tracebacks; first:\n" + "\n".join(failures[:5])
    assert outcomes["error"] > 40 and outcomes["ok"] > 40  # the mutations bite, and not all of them
    assert time.perf_counter() - t0 < 60
