"""Recipe for the GGUF test files: tiny Wan-shaped models written by the producer's own code.

Run ``python tests/data/gguf/make_gguf.py`` to regenerate ``wan_tiny_mix.gguf`` (made with gguf
0.19.0, the version pinned in this recipe's check below). Written with ``gguf.GGUFWriter`` as
city96's ``tools/convert.py`` does: ``general.architecture = "wan"``, native Wan tensor names,
1-D tensors and ``.modulation`` in F32, the 5-D ``patch_embedding`` in F16 (city96's
``fix_5d_tensors``), and a weight whose innermost dim is not a whole number of 256-blocks stored
reshaped to [n/256, 256] with ``comfy.gguf.orig_shape.<name>`` (city96's ``shape_fix``).

Block data: ``gguf.quants.quantize`` where gguf-py implements it (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0,
BF16); gguf-py only *decodes* the K-quants (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K), so those are random
valid blocks (random codes, finite fp16 super-block scales): their reference values are
``gguf.quants.dequantize`` of the same bytes. The tests import this module to build bigger
(ComfyUI-loadable) files at test time with the same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

GGUF_VERSION = "0.19.0"
HERE = Path(__file__).resolve().parent
QUANTIZABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # gguf-py has a quantizer
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")     # gguf-py decodes only
ALL_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")
F16_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _k_blocks(gguf, qtype: str, shape: tuple[int, ...], rng) -> np.ndarray:
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[qtype])
    raw = rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
    ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    blocks = raw.reshape(-1, ts)
    for off in F16_OFFSETS[qtype]:
        scale = (rng.standard_normal(blocks.shape[0]) * 0.004).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw


def write_wan_gguf(path, sd: dict, types: dict[str, str], *, arch: str = "wan", seed: int = 0) -> dict:
    """Write ``sd`` (name -> torch tensor) as GGUF; ``types`` maps a weight name to its GGML type
    (default F32 for 1-D / modulation, F16 otherwise). Returns name -> (type, torch shape)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    out = {}
    for name, t in sd.items():
        arr = t.float().numpy()
        qtype = types.get(name) or ("F32" if arr.ndim == 1 or "modulation" in name else "F16")
        shape = tuple(arr.shape)
        if qtype == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            gt = gguf.GGMLQuantizationType[qtype]
            bs = gguf.GGML_QUANT_SIZES[gt][0]
            data = arr
            if arr.shape[-1] % bs:  # city96's shape_fix: stored as [n/256, 256] + the real shape
                data = arr.reshape(-1, 256)
                w.add_array(f"comfy.gguf.orig_shape.{name}", [int(d) for d in shape])
            if qtype in K_QUANTS:
                q = _k_blocks(gguf, qtype, data.shape, rng)
            else:
                q = gguf.quants.quantize(data, gt)
            w.add_tensor(name, q, raw_dtype=gt)
        out[name] = (qtype, shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def mix_types(sd: dict) -> dict[str, str]:
    """Every listed block type at least once over the 2-D Linear weights, plus one BF16 Linear."""
    linears = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]
    types = {k: ALL_TYPES[i % len(ALL_TYPES)] for i, k in enumerate(linears)}
    types["head.head.weight"] = "BF16"
    return types


def tiny_wan(dim=64, ffn_dim=128, num_blocks=2, text_dim=256, seed=5):
    from wanquant.loaders.synthetic import wan_state_dict

    return wan_state_dict(dim=dim, ffn_dim=ffn_dim, num_blocks=num_blocks, text_dim=text_dim, seed=seed)


def main() -> int:
    import gguf

    if getattr(gguf, "__version__", GGUF_VERSION) != GGUF_VERSION:
        print(f"warning: made with gguf {GGUF_VERSION}, running {gguf.__version__}", file=sys.stderr)
    sd = tiny_wan()
    path = HERE / "wan_tiny_mix.gguf"
    types = write_wan_gguf(path, sd, mix_types(sd), seed=1)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(types)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
