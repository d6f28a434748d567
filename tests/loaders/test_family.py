"""Family / variant recognition from shapes alone (real Wan dims, no tensors needed)."""

import pytest
from fixtures import tiny_wan

from wanquant.loaders.family import recognise


def shapes(**kw):
    return {k: tuple(v.shape) for k, v in tiny_wan(**kw).items()}


def scaled(dim, in_dim=16, out_dim=16, i2v=False, extra=None):
    """A header-like shape map with Wan's real dims (built from the tiny one by substitution)."""
    s = {}
    for k, shp in shapes(i2v=i2v, in_dim=in_dim, out_dim=out_dim).items():
        s[k] = tuple(dim if d == 256 else d for d in shp)
    s.update(extra or {})
    return s


@pytest.mark.parametrize("kw,expected", [
    (dict(dim=5120), "Wan2.1-T2V-14B"),
    (dict(dim=1536), "Wan2.1-T2V-1.3B"),
    (dict(dim=5120, in_dim=36, i2v=True), "Wan2.1-I2V-14B"),
    (dict(dim=5120, in_dim=36), "Wan2.2-I2V-A14B expert"),
    (dict(dim=3072, in_dim=48, out_dim=48), "Wan2.2-TI2V-5B"),
    (dict(dim=5120, extra={"face_adapter.fuser_blocks.0.k_norm.weight": (128,)}), "Wan2.2-Animate-14B"),
])
def test_variants(kw, expected):
    fam = recognise(scaled(**kw))
    assert fam.family == "wan" and fam.variant.startswith(expected), fam.variant
    assert fam.missing == []


def test_non_wan_is_reported_as_such():
    fam = recognise({"layers.0.attention.qkv.weight": (3 * 512, 512), "final.weight": (8, 512)})
    assert fam.family == "non-wan" and "not a Wan" in fam.variant


def test_missing_groups_are_counted_per_block():
    s = {k: v for k, v in scaled(5120).items() if ".cross_attn." not in k and not k.startswith("head.")}
    fam = recognise(s)
    assert "head.head" in fam.missing and "head.modulation" in fam.missing
    assert "blocks.*.cross_attn.q (2 of 2 blocks)" in fam.missing
    assert fam.needs_base == "Wan2.1-T2V-14B"
