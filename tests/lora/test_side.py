"""The low-rank side path (lora/side.py) against an fp64 reference, and under torch.compile.

The compile test builds a tiny Wan-like block (attention-free: q/o projections and the FFN, the
shapes a Wan block's Linears have) whose every Linear carries a side path, compiles it with
``fullgraph=True`` (any graph break raises) and a counting backend, then changes one strength in
place: the output must follow the new strength with no second compilation.
"""

from __future__ import annotations

import pytest
import torch

from wanquant.lora.side import LoraSide


def _factors(n, k, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) * 0.1, torch.randn(r, k, generator=g), torch.randn(n, generator=g) * 0.01


def test_side_path_matches_fp64_reference_for_three_loras():
    n, k = 48, 64
    x = torch.randn(5, 7, k, generator=torch.Generator().manual_seed(0))
    y0 = torch.randn(5, 7, n, generator=torch.Generator().manual_seed(1))
    loras = [(_factors(n, k, r, seed), s, a) for seed, (r, s, a) in enumerate([(4, 0.8, 2.0), (8, -0.5, 8.0), (2, 1.3, 1.0)])]
    side = LoraSide()
    for i, ((up, down, db), s, alpha) in enumerate(loras):  # one node each: stacking
        side = side.plus([LoraSide.term(f"l{i}", s, up=up, down=down, scale=alpha / down.shape[0], diff_b=db * 0.5)])
    out = side.apply(x, y0)
    ref = y0.double()
    for (up, down, db), s, alpha in loras:
        ref = ref + s * (alpha / down.shape[0]) * (x.double() @ (up.double() @ down.double()).T) + s * 0.5 * db.double()
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    assert out.dtype == y0.dtype
    # bf16 compute: factors cached once per (device, dtype), result in bf16 within bf16 rounding
    out16 = side.apply(x.bfloat16(), y0.bfloat16())
    assert out16.dtype == torch.bfloat16 and float((out16.double() - ref).norm() / ref.norm()) < 2e-2
    assert set(side._cache) == {(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.bfloat16)}


def test_strength_zero_in_place_is_bit_identical():
    up, down, db = _factors(32, 16, 4, 3)
    side = LoraSide([LoraSide.term("a", 1.0, up=up, down=down, diff_b=db)])
    x, y0 = torch.randn(3, 16), torch.randn(3, 32)
    assert not torch.equal(side.apply(x, y0), y0)
    side.set_strength(0, 0.0)
    assert torch.equal(side.apply(x, y0), y0)


def test_stacking_leaves_the_earlier_side_unchanged():
    up, down, _ = _factors(8, 8, 2, 4)
    first = LoraSide([LoraSide.term("a", 1.0, up=up, down=down)])
    second = first.plus([LoraSide.term("b", 2.0, up=up, down=down)])
    assert len(first.terms) == 1 and len(second.terms) == 2
    x, y0 = torch.randn(2, 8), torch.zeros(2, 8)
    torch.testing.assert_close(second.apply(x, y0) - y0, 3 * (first.apply(x, y0) - y0))


class _Block(torch.nn.Module):
    """q → o projection and a GELU FFN (Wan block Linears), each with a side path."""

    def __init__(self, dim=64, ffn=128):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.lins = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim),
                                         torch.nn.Linear(dim, ffn), torch.nn.Linear(ffn, dim)])
        self.sides = []
        for lin in self.lins:
            n, k = lin.weight.shape
            up, down = torch.randn(n, 8, generator=g) * 0.1, torch.randn(8, k, generator=g)
            self.sides.append(LoraSide([LoraSide.term("distill", 1.0, up=up, down=down, scale=0.5)]))

    def _lin(self, i, x):
        return self.sides[i].apply(x, self.lins[i](x))

    def forward(self, x):
        h = x + self._lin(1, self._lin(0, x))
        return h + self._lin(3, torch.nn.functional.gelu(self._lin(2, h)))


def test_compile_no_graph_break_no_recompile_on_strength_change():
    torch._dynamo.reset()
    block = _Block().eval()
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, backend=counting_backend, fullgraph=True)  # a graph break raises
        out1 = compiled(x)
        for side in block.sides:
            side.set_strength(0, 0.0)  # in place: the same tensor object, a new value
        out0 = compiled(x)
        block.sides[2].set_strength(0, 2.5)
        out25 = compiled(x)
        eager25 = block(x)
        for side in block.sides:
            side.set_strength(0, 0.0)
        eager0 = block(x)
    assert len(frames) == 1, f"{len(frames)} compilations"
    torch.testing.assert_close(out1, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out0, eager0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out25, eager25, rtol=1e-5, atol=1e-5)
    assert float((out1 - out0).abs().max()) > 1e-2 and float((out25 - out0).abs().max()) > 1e-2


@pytest.mark.parametrize("bad", ["up", "down"])
def test_term_shapes_are_flattened_to_matrices(bad):
    """Conv-style [N, r, 1, 1] / [r, K, 1, 1] factors (some trainers save them) act as matrices."""
    up, down, _ = _factors(6, 10, 3, 5)
    kw = {"up": up, "down": down}
    kw[bad] = kw[bad][..., None, None]
    t = LoraSide.term("x", 1.0, **kw)
    assert t.up.shape == (6, 3) and t.down.shape == (3, 10)


def test_side_path_leaves_a_callers_output_alone_unless_it_owns_it():
    """``apply`` must not write into a ``y`` the caller still reads; ``owns_y=True`` (the layer's own
    fresh output) is updated in place, with the same values."""
    n, k = 48, 64
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(0))
    y0 = torch.randn(9, n, generator=torch.Generator().manual_seed(1))
    (up, down, _), = [_factors(n, k, 4, 3)]
    side = LoraSide([LoraSide.term("l", 0.7, up=up, down=down, scale=0.5)])
    keep = y0.clone()
    out = side.apply(x, y0)
    assert torch.equal(y0, keep) and out.data_ptr() != y0.data_ptr()
    ref = keep.double() + 0.7 * 0.5 * (x.double() @ (up.double() @ down.double()).T)
    mine = keep.clone()
    out2 = side.apply(x, mine, owns_y=True)
    assert out2.data_ptr() == mine.data_ptr()
    for o in (out, out2):
        assert float((o.double() - ref).abs().max() / ref.abs().max()) < 1e-6
