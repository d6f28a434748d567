"""Recipe for the LightX2V NVFP4 test files in this folder (run by hand, never by the tests).

    git --git-dir <mirror of github.com/ModelTC/LightX2V> show \
        f8aee98b5462cca8d7288888146ebd95592bf266:lightx2v_kernel/test/nvfp4_nvfp4/fake_quant.py > /tmp/fake_quant.py
    python tests/data/lightx2v/make_lightx2v_nvfp4.py /tmp/fake_quant.py

LightX2V's converter (tools/convert/quant/quant.py, QuantWeightNVFP4) calls the CUDA kernel
``scaled_nvfp4_quant`` (SM120 only). Its own torch reference of that kernel, ``ref_nvfp4_quant`` in
fake_quant.py, runs on CPU: it is imported from the fetched file and run here, on bf16 weights with
``weight_global_scale = (2688 / amax(W)).float()`` exactly as QuantWeightNVFP4 computes it. The
reference returns unpacked E2M1 values and row-major scales; the two storage steps of the kernel
(nvfp4_quant_kernels_sm120.cu) are reproduced from its code: ``cvt.rn.satfinite.e2m1x2.f32 byte,
a[1], a[0]`` (even element in the LOW nibble) and ``cvt_quant_to_fp4_get_sf_out_offset`` (scales in
``[mTiles, kTiles, 32, 4, 4]``, zero padded to ``[roundup(N,128), roundup(K/16,4)]``).
Activation scales follow tools/convert/add_scale_to_models.py: ``input_global_scale =
(2688 / input_absmax).float()``, ``alpha = 1 / (input_global_scale * weight_global_scale)``,
``weight_global_scale`` dropped.

Files:
- ``lightx2v_nvfp4_blocks.safetensors``: the 2 DiT blocks of a tiny Wan (dim 128, ffn 256; keys
  ``blocks.N...``, no patch_embedding/head: a partial distill that needs its base,
  ``wanquant.loaders.synthetic.wan_state_dict(dim=128, ffn_dim=256, num_blocks=2, seed=7)``), every
  block Linear in the published spelling (input_global_scale + alpha).
- ``lightx2v_nvfp4_absmax.safetensors``: one 80x96 layer (padded scales) in the input_absmax +
  weight_global_scale spelling and one 64x64 layer with weight_global_scale only.
"""

import importlib.util
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanquant.loaders.synthetic import wan_state_dict

HERE = Path(__file__).resolve().parent
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def producer(path):
    spec = importlib.util.spec_from_file_location("fake_quant", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ref_nvfp4_quant


def store(values, scales):
    """The kernel's storage: low-nibble-first bytes, swizzled zero-padded fp8 scales."""
    m, n = values.shape
    mag = values.abs().unsqueeze(-1) == torch.tensor(E2M1)
    assert bool((mag.sum(-1) == 1).all()), "reference produced a non-E2M1 value"
    codes = mag.float().argmax(-1).to(torch.uint8) | ((values < 0).to(torch.uint8) << 3)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    rows, cols = -(-m // 128) * 128, -(-(n // 16) // 4) * 4
    flat = torch.zeros(rows * cols, dtype=torch.uint8)
    sf = scales.to(torch.float8_e4m3fn).view(torch.uint8)
    n_ktiles = cols // 4
    for r in range(m):
        for k in range(n // 16):
            off = (r // 128) * n_ktiles * 512 + (k // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + k % 4
            flat[off] = sf[r, k]
    return packed, flat.view(torch.float8_e4m3fn).reshape(rows, cols)


def quantize(quant, w_bf16):
    wgs = (2688.0 / torch.max(torch.abs(w_bf16))).to(torch.float32)
    values, scales = quant(w_bf16, wgs)
    packed, sf = store(values, scales)
    return packed, sf, wgs


def main(fake_quant):
    quant = producer(fake_quant)
    g = torch.Generator().manual_seed(11)
    sd = wan_state_dict(dim=128, ffn_dim=256, num_blocks=2, seed=7)
    out = {}
    for k, t in sd.items():
        if not k.startswith("blocks."):
            continue
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and t.dim() == 2 and "norm" not in k:
            packed, sf, wgs = quantize(quant, t)
            absmax = (torch.rand((), generator=g) * 4 + 1).to(torch.float32)  # a calibration result
            igs = (2688.0 / absmax).to(torch.float32)
            out[k], out[f"{layer}.weight_scale"] = packed, sf
            out[f"{layer}.input_global_scale"] = igs
            out[f"{layer}.alpha"] = 1.0 / (igs * wgs)
        else:
            out[k] = t
    save_file(out, str(HERE / "lightx2v_nvfp4_blocks.safetensors"))

    small = {}
    for name, (n, kdim), spelling in (("blocks.0.ffn.0", (80, 96), "absmax"), ("blocks.0.ffn.2", (64, 64), "wgs")):
        w = (torch.randn(n, kdim, generator=g) / kdim ** 0.5).to(torch.bfloat16)
        packed, sf, wgs = quantize(quant, w)
        small[f"{name}.weight"], small[f"{name}.weight_scale"] = packed, sf
        small[f"{name}.weight_global_scale"] = wgs
        small[f"{name}.bias"] = torch.zeros(n, dtype=torch.bfloat16)
        if spelling == "absmax":
            small[f"{name}.input_absmax"] = torch.tensor(3.25, dtype=torch.float32)
    save_file(small, str(HERE / "lightx2v_nvfp4_absmax.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
