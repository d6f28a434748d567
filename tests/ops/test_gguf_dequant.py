"""GGUF block dequant (ops/formats/gguf.py) against the producer's reference, gguf-py's
``gguf.quants.dequantize``, on random valid blocks of every listed type.

Valid blocks: random bytes everywhere except the fp16 block/super-block scales, which are drawn as
finite fp16 values (random bytes there can be NaN/Inf, which no producer writes). Our decoder does
the reference's fp32 operations in the same order, so fp32 output must be bit-identical; bf16/fp16
output must be exactly one rounding of it.
"""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from wanquant.errors import WanquantError  # noqa: E402
from wanquant.ops.formats import FORMAT_NAMES, get_format  # noqa: E402
from wanquant.ops.formats.gguf import BLOCKS, GGML_TYPE_IDS, dequantize_bytes, format_name  # noqa: E402

#: byte offsets of the fp16 scales inside one block (ggml-quants.h block structs)
F16_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, ts = BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    for off in F16_OFFSETS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def test_block_table_and_type_ids_match_gguf():
    for q, (bs, ts) in BLOCKS.items():
        t = gguf.GGMLQuantizationType[q]
        assert gguf.GGML_QUANT_SIZES[t] == (bs, ts), q
        assert GGML_TYPE_IDS[q] == int(t)
    for q in ("F32", "F16", "BF16"):
        assert GGML_TYPE_IDS[q] == int(gguf.GGMLQuantizationType[q])


@pytest.mark.parametrize("qtype", sorted(BLOCKS))
def test_dequant_bit_exact_vs_gguf_reference(qtype):
    bs, ts = BLOCKS[qtype]
    rows, blocks_per_row = 6, 3
    raw = random_blocks(qtype, rows * blocks_per_row, seed=len(qtype) + ts)
    ref = gguf.quants.dequantize(raw.reshape(rows, blocks_per_row * ts), gguf.GGMLQuantizationType[qtype])
    assert ref.shape == (rows, blocks_per_row * bs) and np.isfinite(ref).all()
    fmt = get_format(format_name(qtype))
    conf = {"format": fmt.name, "orig_shape": [rows, blocks_per_row * bs]}
    ours = fmt.dequantize({"weight": torch.from_numpy(raw.reshape(rows, -1))}, torch.float32, conf)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
    assert np.array_equal(ours.numpy().view(np.uint32), ref.astype(np.float32).view(np.uint32)), qtype
    for dt in (torch.bfloat16, torch.float16):
        got = fmt.dequantize({"weight": torch.from_numpy(raw.reshape(rows, -1))}, dt, conf)
        assert got.dtype == dt and torch.equal(got, torch.from_numpy(ref).to(dt))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_chunked_decode_equals_reference(qtype, monkeypatch):
    """Layers larger than one chunk are decoded piecewise into the output: same values."""
    from wanquant.ops.formats import gguf as g

    monkeypatch.setattr(g, "_CHUNK_BLOCKS", 5)
    bs, ts = BLOCKS[qtype]
    raw = random_blocks(qtype, 4 * 7, seed=3)
    ref = gguf.quants.dequantize(raw.reshape(4, 7 * ts), gguf.GGMLQuantizationType[qtype])
    got = dequantize_bytes(torch.from_numpy(raw.reshape(4, -1)), qtype, (4, 7 * bs), torch.bfloat16)
    assert torch.equal(got, torch.from_numpy(ref).to(torch.bfloat16))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_producer_quantize_then_our_dequant_is_close_to_the_weight(qtype):
    """gguf-py's own quantizer output, decoded here, equals its decode and is near the fp64 weight
    (the stated tolerance is the block type's step: scale * 1 code)."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((8, 64)) * 0.05).astype(np.float32)
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    ours = dequantize_bytes(torch.from_numpy(q), qtype, (8, 64))
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype])
    assert torch.equal(ours, torch.from_numpy(ref))
    levels = {"Q8_0": 127, "Q4_0": 8, "Q4_1": 15, "Q5_0": 16, "Q5_1": 31}[qtype]
    step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / levels * (2 if qtype.endswith("_1") else 1)
    err = np.abs(ours.numpy().astype(np.float64).reshape(-1, 32) - w.astype(np.float64).reshape(-1, 32))
    assert (err <= step * 1.01).all()


def test_every_gguf_format_is_registered():
    assert {format_name(q) for q in BLOCKS} <= set(FORMAT_NAMES)


def test_wrong_byte_count_is_one_clear_error():
    fmt = get_format("gguf_q4_k")
    with pytest.raises(WanquantError) as ei:
        fmt.dequantize({"weight": torch.zeros(2, 100, dtype=torch.uint8)}, conf={"orig_shape": [2, 256]})
    assert "288 bytes" in str(ei.value) and "200 bytes" in str(ei.value)
    with pytest.raises(WanquantError, match="orig_shape"):
        fmt.dequantize({"weight": torch.zeros(2, 144, dtype=torch.uint8)}, conf={})
    with pytest.raises(WanquantError, match="read-only"):
        fmt.quantize(torch.zeros(2, 256))
