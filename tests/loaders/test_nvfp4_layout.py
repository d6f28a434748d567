"""Block-scale layout of NVFP4 files without comfy_quant (issue 12, item 1).

cuBLAS tiled 128x4 vs plain row-major [N, K/16] scales have the same shape at Wan sizes. The loader
decides from the scales (two-way additive structure of log block scales, which only the right
reading keeps), verified here on the weights of an MLP trained in the test setup (seeded, seconds)
on inputs with outlier channels, as DiT activations have, quantized with an independent NVFP4
recipe in both layouts; on untrained random weights it refuses, naming the override.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import ref_nvfp4
from safetensors.torch import save_file

from wanquant.errors import WanquantError
from wanquant.loaders.canonical import load_canonical

D_IN, HIDDEN = 512, 256
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, D_IN))


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    channel_scale = torch.exp(torch.randn(D_IN) * 0.8)
    teacher, student = _mlp(), _mlp()
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(120):
        x = torch.randn(64, D_IN, generator=g) * channel_scale
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = student.state_dict()
    return {"blocks.0.ffn.0": sd["0.weight"].detach().clone(), "blocks.0.ffn.2": sd["2.weight"].detach().clone()}


def _blocked(s: torch.Tensor) -> torch.Tensor:
    """Row-major [rows, cols] → cuBLAS tiled layout, by COMFYUI.md's offset formula
    offset(r,c) = ((r//128)*nColTiles + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4."""
    rows, cols = s.shape
    assert rows % 128 == 0 and cols % 4 == 0
    r = torch.arange(rows).unsqueeze(1)
    c = torch.arange(cols).unsqueeze(0)
    off = ((r // 128) * (cols // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    flat = torch.empty(rows * cols, dtype=s.dtype)
    flat[off.reshape(-1)] = s.reshape(-1)
    return flat.reshape(rows, cols)


def quantize_nvfp4(w: torch.Tensor):
    """Independent recipe: global scale amax/(448*6), fp8 block scale = block amax/6/global,
    nearest E2M1 code, high nibble first. Returns packed, row-major fp8 scales, global scale."""
    n, k = w.shape
    wd = w.double()
    s2 = wd.abs().max() / (448 * 6)
    blocks = wd.reshape(n, k // 16, 16)
    bs = (blocks.abs().amax(-1) / 6 / s2).to(torch.float8_e4m3fn)
    total = bs.double() * s2
    x = (blocks / torch.where(total > 0, total, 1).unsqueeze(-1)).reshape(n, k)
    mag = (x.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)
    codes = (mag | ((x < 0).long() << 3)).to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2], bs, s2.float()


def nvfp4_file(weights: dict[str, torch.Tensor], layout: str, path) -> dict[str, tuple]:
    sd, parts = {}, {}
    for layer, w in weights.items():
        packed, bs, s2 = quantize_nvfp4(w)
        parts[layer] = (packed, bs, s2)
        sd[f"{layer}.weight"] = packed
        sd[f"{layer}.weight_scale"] = _blocked(bs) if layout == "blocked" else bs
        sd[f"{layer}.weight_scale_2"] = s2.reshape(())
    save_file(sd, str(path))
    return parts


def _check_values(m, parts):
    for layer, (packed, bs, s2) in parts.items():
        n, k = packed.shape[0], packed.shape[1] * 2
        got = ref_nvfp4(m.entries[f"{layer}.weight"].load(), m.entries[f"{layer}.weight_scale"].load(), s2, (n, k))
        want = ref_nvfp4(packed, _blocked(bs), s2, (n, k))  # the producer's own values
        assert torch.equal(got, want), layer


@pytest.mark.parametrize("layout", ["blocked", "row_major"])
def test_trained_weights_decide_the_scale_layout(trained, tmp_path, layout):
    parts = nvfp4_file(trained, layout, tmp_path / "nv.safetensors")
    m = load_canonical(tmp_path / "nv.safetensors")
    note = [n for n in m.report.notes if n.startswith("NVFP4 without comfy_quant")]
    assert note and note[0].startswith(f"NVFP4 without comfy_quant: block scales read as {layout} (decided from the scales")
    assert m.entries["blocks.0.ffn.0.weight_scale"].shape == (256, 32)
    _check_values(m, parts)


def test_random_weights_are_refused_naming_the_override(tmp_path):
    torch.manual_seed(3)
    sd = _mlp().state_dict()
    weights = {"blocks.0.ffn.0": sd["0.weight"], "blocks.0.ffn.2": sd["2.weight"]}
    parts = nvfp4_file(weights, "row_major", tmp_path / "nv.safetensors")
    with pytest.raises(WanquantError, match="--nvfp4-scale-layout") as e:
        load_canonical(tmp_path / "nv.safetensors")
    assert "cannot tell the block-scale layout" in str(e.value)
    rep = load_canonical(tmp_path / "nv.safetensors", collect_errors=True).report
    assert rep.errors and rep.verdict().startswith("NOT LOADABLE")
    m = load_canonical(tmp_path / "nv.safetensors", nvfp4_scale_layout="row_major")
    assert "(override)" in " ".join(m.report.notes)
    _check_values(m, parts)


def test_a_shape_only_one_layout_fits_decides(trained, tmp_path):
    """96 rows: row-major scales are [96, K/16], blocked ones would be [128, K/16]."""
    torch.manual_seed(4)
    weights = {"blocks.0.ffn.0": trained["blocks.0.ffn.0"], "blocks.0.self_attn.q": torch.randn(96, 512) * 0.02}
    packed, bs, s2 = quantize_nvfp4(weights["blocks.0.self_attn.q"])
    sd = {"blocks.0.self_attn.q.weight": packed, "blocks.0.self_attn.q.weight_scale": bs,
          "blocks.0.self_attn.q.weight_scale_2": s2.reshape(())}
    p2, bs2, s22 = quantize_nvfp4(weights["blocks.0.ffn.0"])
    sd.update({"blocks.0.ffn.0.weight": p2, "blocks.0.ffn.0.weight_scale": bs2, "blocks.0.ffn.0.weight_scale_2": s22.reshape(())})
    save_file(sd, str(tmp_path / "nv.safetensors"))
    m = load_canonical(tmp_path / "nv.safetensors")
    assert any("read as row_major (scale shapes" in n for n in m.report.notes)
    assert m.entries["blocks.0.self_attn.q.weight_scale"].shape == (128, 32)
    got = ref_nvfp4(m.entries["blocks.0.self_attn.q.weight"].load(), m.entries["blocks.0.self_attn.q.weight_scale"].load(),
                    s2, (96, 512))
    padded = torch.zeros(128, 32, dtype=torch.float8_e4m3fn)
    padded[:96] = bs
    assert torch.equal(got, ref_nvfp4(packed, _blocked(padded), s2, (96, 512)))
