"""Seeded fuzzing of safetensors headers (issue 12): a few hundred mutations of real quantized files
(comfy_quant NVFP4/MXFP8/fp8, header ``_quantization_metadata``, FP4 group-32, kijai scaled fp8, and
the producer-made LightX2V NVFP4 / int8 / fp8 and convert_to_quant grid files of issue 14).
Every one must end in success or exactly one WanquantError: never another exception, never a hang,
never a large allocation (the inputs are tiny, so time and memory stay bounded)."""

import json
import os
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from fixtures import LIGHTX2V_BLOCKS, mutation_outcome, syn


MUTATIONS = int(os.environ.get("WANQUANT_FUZZ_N", "480"))
DATA = Path(__file__).resolve().parent / "data"
PRODUCER_FILES = [DATA / "lightx2v" / f"lightx2v_{k}.safetensors" for k in ("int8", "fp8")] + \
    [DATA / "convert_to_quant" / f"ctq_{k}.safetensors" for k in ("fp8_row", "fp8_block", "int8_block", "hybrid_mxfp8")]
HOSTILE = [None, True, -1, 2**70, 1.5, "", "F32", [], [[]], {}, {"a": 1}, [-4, -2], [1, 2, 3], ["1"],
           [2**63], [0, 2**64], "x" * 300, [[[[[[[[]]]]]]]]]


def _small():
    return syn.wan_state_dict(dim=64, ffn_dim=128, num_blocks=1, text_dim=64, freq_dim=32, seed=5)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_bases")
    sd = _small()
    layers = syn.quantizable_linears(sd)
    mixed = {l: ("nvfp4", "mxfp8", "float8_e4m3fn")[i % 3] for i, l in enumerate(layers)}
    q1, m1 = syn.comfy_native(sd, mixed)
    q2, m2 = syn.comfy_native(sd, "nvfp4", header_metadata=True)
    return [syn.save(q1, root / "comfy.safetensors", m1), syn.save(q2, root / "hdr.safetensors", m2),
            syn.save(syn.fp4_g32(sd), root / "fp4.safetensors"),
            syn.save(syn.kijai_scaled_fp8(sd, scale_dtype=torch.float32), root / "kijai.safetensors"),
            LIGHTX2V_BLOCKS, *PRODUCER_FILES]


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + body


def _mutate(rng: random.Random, data: bytes) -> bytes:
    header, body = _split(data)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    kind = rng.randrange(14)
    if kind == 0:  # one field gets a hostile value
        header[key][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE)
    elif kind == 1:  # the whole entry is hostile
        header[key] = rng.choice(HOSTILE)
    elif kind == 2:  # odd key spellings
        header[key + rng.choice(["@part0", ".comfy_quant", ".weight_scale", ".scale_weight", "\u00e9", " "])] = \
            header.pop(key)
    elif kind == 3:  # comfy_quant (or any byte tensor) re-typed as bf16 / fp8 with the same bytes
        e = header[key]
        n = (e["data_offsets"][1] - e["data_offsets"][0])
        e["dtype"], e["shape"] = rng.choice([("BF16", [n // 2]), ("F8_E4M3", [n]), ("I8", [n]), ("BOOL", [n])])
        if n % 2 and e["dtype"] == "BF16":
            e["dtype"], e["shape"] = "U8", [n]
    elif kind == 4:  # flatten to 1-D (1-D NVFP4/MXFP8 weights), or add unit dims
        e = header[key]
        prod = 1
        for s in e["shape"]:
            prod *= s
        e["shape"] = rng.choice([[prod], [1, prod], [prod, 1], [1] + e["shape"], []] if prod == 1 else
                                [[prod], [1, prod], [prod, 1], [1] + e["shape"]])
    elif kind == 5:  # metadata mischief
        header["__metadata__"] = rng.choice([
            {"_quantization_metadata": rng.choice(["[" * 5000 + "]" * 5000, '{"layers": 5}', '{"layers": {"a": 1}}',
                                                   '{"layers": {"blocks.0.ffn.0": {"format": []}}}', "nope", "1e999"])},
            {"format": "pt", "x": "y"}, rng.choice(HOSTILE)])
    elif kind == 6:  # two entries swap byte ranges (same sizes: structurally valid, semantically wrong)
        other = rng.choice(keys)
        if header[other]["data_offsets"][1] - header[other]["data_offsets"][0] == \
                header[key]["data_offsets"][1] - header[key]["data_offsets"][0]:
            header[key]["data_offsets"], header[other]["data_offsets"] = \
                header[other]["data_offsets"], header[key]["data_offsets"]
        else:
            header[key]["data_offsets"] = list(header[other]["data_offsets"])  # overlap
    elif kind == 7:  # delete an entry (its bytes become a gap, or it is the last one)
        del header[key]
    elif kind == 8:  # random bytes in the data region
        b = bytearray(body)
        for _ in range(rng.randrange(1, 64)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        body = bytes(b)
    elif kind == 9:  # random bytes in the header text
        raw = bytearray(json.dumps(header).encode())
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return _join(bytes(raw), body)
    elif kind == 10:  # truncation anywhere
        full = _join(header, body)
        return full[: rng.randrange(len(full))]
    elif kind == 11:  # a comfy_quant whose JSON is replaced by something else of the same length
        cq = [k for k in keys if k.endswith(".comfy_quant")]
        if cq:
            e = header[rng.choice(cq)]
            a, z = e["data_offsets"]
            junk = rng.choice([b"[" * (z - a), b"\xff" * (z - a), b'{"format": "nvfp4", "x": 1}'.ljust(z - a),
                               b"0" * (z - a), b"\x00" * (z - a)])[: z - a].ljust(z - a)
            body = body[:a] + junk + body[z:]
    elif kind == 12:  # scales: NaN / Inf / huge / zero / negative, in the data
        sc = [k for k in keys if "scale" in k and header[k]["dtype"] in ("F32", "BF16")]
        if sc:
            e = header[rng.choice(sc)]
            a, z = e["data_offsets"]
            v = rng.choice([float("nan"), float("inf"), 3e38, 0.0, -1.0])
            raw = struct.pack("<f", v) if e["dtype"] == "F32" else struct.pack("<f", v)[2:]
            pos = a + rng.randrange(max(1, (z - a) // len(raw))) * len(raw)
            body = body[:pos] + raw + body[pos + len(raw):]
    else:  # trailing bytes or a grown header length field
        body = body + bytes(rng.randrange(1, 17))
    return _join(header, body)


def test_header_mutations_end_in_one_error_or_success(tmp_path, bases):
    rng = random.Random(20261130)
    failures = []
    outcomes = {"ok": 0, "error": 0}
    t0 = time.perf_counter()
    for i in range(MUTATIONS):
        base = bases[i % len(bases)]
        p = tmp_path / f"m{i % 4}.safetensors"
        p.write_bytes(_mutate(rng, base.read_bytes()))
        outcome = mutation_outcome(p, tmp_path / "out.safetensors")
        if outcome in outcomes:
            outcomes[outcome] += 1
        else:
            failures.append(f"mutation {i} of {base.name}: {outcome}")
    elapsed = time.perf_counter() - t0
    assert not failures, f"{len(failures)} tracebacks; first:\n" + "\n".join(failures[:5])
    assert outcomes["error"] > MUTATIONS // 3 and outcomes["ok"] > 0  # the mutations do bite, and not all
    assert elapsed < 60
