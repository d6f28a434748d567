"""FP4 group-32 nibble order decided from the weights (issue 12, item 1).

The evidence the detector uses (tied norms of a hidden channel's input and output weights) only
exists in *trained* weights, so the test trains a tiny seeded Wan-named transformer on CPU (a few
seconds, nothing cached), quantizes its Linears to FP4 group-32 with an independent recipe written
here (group amax / 6, round to the nearest E2M1 value, pack in the chosen order) and checks that the
loader picks the right order with strong evidence for both packings, and says "undecided" (with the
documented default and a warning naming the override) on untrained random weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures import ref_fp4_g32
from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.nibble_order import DEFAULT

DIM, FFN, HEADS, BLOCKS, SEQ = 64, 256, 4, 3, 8
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        heads = [t.view(b, n, HEADS, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x))]
        a = torch.nn.functional.scaled_dot_product_attention(*heads)
        return self.o(a.transpose(1, 2).reshape(b, n, DIM))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(DIM), torch.nn.LayerNorm(DIM)
        self.self_attn = _Attn()
        self.ffn = torch.nn.Sequential(torch.nn.Linear(DIM, FFN), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(FFN, DIM))

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(BLOCKS))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _trained(steps=250) -> dict[str, torch.Tensor]:
    """Student distilled from a random teacher of the same shape (AdamW, weight decay)."""
    torch.manual_seed(0)
    teacher, student = _Net(), _Net()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, SEQ, DIM, generator=g)
        with torch.no_grad():
            y = teacher(x) * 2
        loss = torch.nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def _untrained() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return {k: v.detach().clone() for k, v in _Net().state_dict().items()}


def quantize_fp4_g32(w: torch.Tensor, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent recipe: scale = group amax / 6, nearest E2M1 magnitude, sign bit 3, two codes a byte."""
    n, k = w.shape
    groups = w.double().reshape(n, k // 32, 32)
    scale = groups.abs().amax(-1) / 6
    x = (groups / torch.where(scale > 0, scale, 1).unsqueeze(-1)).reshape(n, k)
    mag = (x.abs().unsqueeze(-1) - E2M1.double()).abs().argmin(-1)
    codes = (mag | ((x < 0).long() << 3)).to(torch.uint8)
    even, odd = codes[:, 0::2], codes[:, 1::2]
    packed = (even << 4) | odd if order == "high_first" else (odd << 4) | even
    return packed, scale.to(torch.bfloat16)


def fp4_file(sd: dict[str, torch.Tensor], order: str, path) -> dict[str, torch.Tensor]:
    """Every Linear of the blocks as un-tagged FP4 group-32 (uint8 weight + bf16 weight_scale)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            out[k], out[k[: -len("weight")] + "weight_scale"] = quantize_fp4_g32(v, order)
        else:
            out[k] = v
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return out


@pytest.fixture(scope="module")
def trained():
    return _trained()


@pytest.mark.parametrize("order", ["low_first", "high_first"])
def test_trained_weights_decide_the_order_with_strong_evidence(trained, tmp_path, order):
    q = fp4_file(trained, order, tmp_path / "fp4.safetensors")
    m = load_canonical(tmp_path / "fp4.safetensors")
    assert m.report.nibble_order.startswith(f"{order} (detected from the weights, strong evidence")
    assert not [w for w in m.report.warnings if "nibble" in w]
    # and the canonical (high-first) weights decode to what the producer packed
    for layer in ("blocks.0.ffn.2", "blocks.2.self_attn.o"):
        got = ref_fp4_g32(m.entries[f"{layer}.weight"].load(), m.entries[f"{layer}.weight_scale"].load(), "high_first")
        assert torch.equal(got, ref_fp4_g32(q[f"{layer}.weight"], q[f"{layer}.weight_scale"], order))


def test_random_weights_are_undecided_with_a_loud_warning(tmp_path):
    fp4_file(_untrained(), "high_first", tmp_path / "fp4.safetensors")
    m = load_canonical(tmp_path / "fp4.safetensors")
    assert m.report.nibble_order.startswith(f"{DEFAULT} (UNDECIDED from the weights")
    warn = [w for w in m.report.warnings if "nibble order could not be decided" in w]
    assert len(warn) == 1 and "fp4_nibble_order" in warn[0] and "--nibble-order" in warn[0]


@pytest.mark.parametrize("how", ["override", "quantize_config"])
def test_explicit_order_beats_the_weights(trained, tmp_path, how):
    """The user's word (node option / CLI flag, or the producer's quantize_config.json) wins,
    even against strong evidence: here it is deliberately the wrong order."""
    fp4_file(trained, "high_first", tmp_path / "fp4.safetensors")
    if how == "override":
        m = load_canonical(tmp_path / "fp4.safetensors", nibble_order="low_first")
        assert m.report.nibble_order == "low_first (override)"
    else:
        (tmp_path / "quantize_config.json").write_text(json.dumps({"packing": "low_nibble_first"}))
        m = load_canonical(tmp_path)
        assert m.report.nibble_order == "low_first (quantize_config.json)"
