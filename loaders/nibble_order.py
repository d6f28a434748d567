"""The one place that decides how an FP4 group-32 file packs its nibbles.

Seed 004's producer script is not public, so the order of the two E2M1 codes in a byte cannot be
read from any spec. It is decided, in this order of precedence:

0. a layer with a ``comfy_quant`` is tagged: its JSON's ``nibble_order`` (wanquant's canonical form
   writes none, meaning high-first) decides that layer, and nothing below touches it;
1. an explicit override (node ``fp4_nibble_order``, CLI ``--nibble-order``);
2. ``quantize_config.json`` beside the file (``packing`` / ``nibble_order`` / ``pack_order``);
3. the weights themselves (:func:`detect_from_weights`);
4. when the weights cannot tell: the documented default ``low_first`` with a loud report warning
   that names the override.

Evidence from the weights: a wrong order swaps every pair of neighbouring *input* columns of a
packed matrix. For a producer/consumer pair of Linears joined channel by channel (``ffn.0`` rows →
``ffn.2`` columns through the GELU; ``v`` rows → ``o`` columns through the attention mix), training
keeps the norm of a hidden channel's input weights and of its output weights tied (under gradient
flow ``‖w_in‖² − ‖w_out‖²`` is conserved per channel for linear/ReLU-like links, and weight decay
pulls both together). Row norms of the producer do not depend on the order; column norms of the
consumer do. Per byte pair (2i, 2i+1) take ``dr = log r_2i − log r_2i+1`` and the same ``dc`` of the
consumer's columns decoded high-nibble-first: their rank correlation is positive when the file is
high-first, negative when it is low-first (the swap flips the sign of every ``dc``) and zero on
untrained weights. ``z = ρ·√(n−1)`` per layer pair is standard normal under "no evidence"; the
layer pairs are pooled by Stouffer's rule (weights √n). Verified on a small model trained in the test setup (tests/loaders/test_nibble_order.py).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from ..errors import WanquantError
from ..ops.formats import get_format

log = logging.getLogger(__name__)

NIBBLE_ORDERS = ("low_first", "high_first")
DEFAULT = "low_first"  # FORMATS.md: the compressed-tensors convention `weight_packed` comes from
OVERRIDE_HINT = ("set the loader node's fp4_nibble_order, `wanquant ... --nibble-order`, or "
                 '"packing": "high_nibble_first"/"low_nibble_first" in quantize_config.json')
Z_DECIDE = 4.0  # |z| below this: undecided (a false decision on untrained weights: p < 1e-4)
Z_STRONG = 8.0  # |z| below this but above Z_DECIDE: decided, with a weak-evidence warning
MAX_PAIRS = 6  # layer pairs read at most (~1.7 s each for a 14B FFN pair on 2 CPU cores)
STOP_Z = 3 * Z_STRONG  # enough: stop reading once the pooled |z| is past this (after 2 pairs)
MAX_ROWS = 2048  # consumer rows sampled for column norms (norm estimates, not exact values)

_ALIASES = {"high_first": "high_first", "hi_first": "high_first", "high_nibble_first": "high_first",
            "low_first": "low_first", "lo_first": "low_first", "low_nibble_first": "low_first"}

# producer (rows = hidden channels) → consumer (columns = the same channels), native names
_LINKS = (
    (re.compile(r"^(.*\.)?ffn\.0$"), "2", "ffn.0 rows vs ffn.2 columns"),
    (re.compile(r"^(.*\.)?(self_attn|cross_attn)\.v$"), "o", "attention v rows vs o columns"),
    (re.compile(r"^(.*\.)?(time_embedding|text_embedding)\.0$"), "2", "embedding MLP rows vs columns"),
    (re.compile(r"^(.*\.)?img_emb\.proj\.1$"), "3", "image-embedding MLP rows vs columns"),
)


def parse(value, where: str, file: str | None = None, layer: str | None = None) -> str:
    """A nibble-order spelling → ``low_first`` / ``high_first``; anything else is an error."""
    order = _ALIASES.get(str(value).strip().lower())
    if order is None:
        raise WanquantError(f"unknown FP4 nibble order in {where}", file=file, layer=layer,
                            expected=" / ".join(NIBBLE_ORDERS), found=repr(value)[:80])
    return order


def from_quantize_config(qc) -> str | None:
    """The order a producer's ``quantize_config.json`` states, or None when it says nothing."""
    if not isinstance(qc, dict):
        return None
    for key in ("packing", "nibble_order", "pack_order"):
        val = str(qc.get(key, "")).lower()
        if "high" in val or "hi_" in val:
            return "high_first"
        if "low" in val or "lo_" in val:
            return "low_first"
    return None


@dataclass
class Evidence:
    """The weights' verdict: ``order`` is None when undecided."""

    order: str | None
    z: float
    pairs: int  # byte pairs compared
    links: list[str]  # layer pairs read

    @property
    def strong(self) -> bool:
        return abs(self.z) >= Z_STRONG

    def describe(self) -> str:
        what = "; ".join(self.links[:3]) + (f" (+{len(self.links) - 3} more)" if len(self.links) > 3 else "")
        return f"rank test over {self.pairs} byte pairs, z = {self.z:+.1f} [{what or 'no linked layers'}]"


def _row_norms(layer, max_cols: int = 4096) -> torch.Tensor:
    """Log row norms of a producer layer (order-independent), from its first ``max_cols`` inputs."""
    return _dense(layer, rows=None, cols=max_cols).double().norm(dim=1).log()


def _dense(layer, rows: int | None, cols: int | None = None) -> torch.Tensor:
    """A layer's weight as fp32, FP4 group-32 decoded high-nibble-first whatever the file's order
    (the statistic compares against that reading); only the first ``rows`` rows / ``cols``
    columns when given (FP4 is sliced before decoding: a 14B FFN matrix is 280 MB in fp32)."""
    w = layer.weight.load()
    if layer.format == "fp4_g32":
        s = layer.sides["weight_scale"].load()
        if cols is not None:
            g = max(1, min(cols // 32, s.shape[1]))
            w, s = w[:, : g * 16], s[:, :g]
        return get_format("fp4_g32").dequantize({"weight": w[:rows], "weight_scale": s[:rows]})
    if layer.quantized:
        tensors = {"weight": w, **{k: r.load() for k, r in layer.sides.items()}}
        w = get_format(layer.format).dequantize(tensors, conf=dict(layer.conf))
    return w[:rows, :cols].float()


def detect_from_weights(layers: dict) -> Evidence:
    """Sign test on linked producer/consumer layers whose consumer is an *untagged* FP4 g32 layer."""
    weighted = 0.0
    total = 0
    read: list[str] = []
    for name, layer in layers.items():
        if len(read) >= MAX_PAIRS or (len(read) >= 2 and abs(weighted) / math.sqrt(total) >= STOP_Z):
            break
        for pattern, consumer_suffix, label in _LINKS:
            if not pattern.match(name):
                continue
            consumer = layers.get(f"{name.rsplit('.', 1)[0]}.{consumer_suffix}")
            if consumer is None or consumer.format != "fp4_g32" or consumer.nibble_order is not None:
                continue
            r = _row_norms(layer)
            c = _dense(consumer, MAX_ROWS).double().norm(dim=0).log()
            if r.numel() != c.numel() or r.numel() % 2 or r.numel() < 16:
                continue
            dr, dc = r[0::2] - r[1::2], c[0::2] - c[1::2]
            ok = torch.isfinite(dr) & torch.isfinite(dc)
            n = int(ok.sum())
            if n < 8:
                continue
            z = _spearman(dr[ok], dc[ok]) * math.sqrt(n - 1)  # ~N(0, 1) when unrelated
            weighted += z * math.sqrt(n)
            total += n
            read.append(f"{name} -> {consumer_suffix} ({label}, z {z:+.1f})")
    z = weighted / math.sqrt(total) if total else 0.0  # Stouffer, weighted by pairs per layer
    order = None if abs(z) < Z_DECIDE else ("high_first" if z > 0 else "low_first")
    return Evidence(order, z, total, read)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else 0.0


def resolve(layers: dict, override: str | None, side_files: dict) -> tuple[str, str, list[str]]:
    """Decide the order for every untagged FP4 group-32 layer and write it into those layers.

    Returns (order, where it came from, report warnings)."""
    warnings: list[str] = []
    untagged = [l for l in layers.values() if l.format == "fp4_g32" and l.nibble_order is None]
    if override and override != "auto":
        order, source = parse(override, "the override"), "override"
    elif (qc := from_quantize_config(side_files.get("quantize_config.json"))) is not None:
        order, source = qc, "quantize_config.json"
    elif not untagged:
        order, source = DEFAULT, "no untagged FP4 layers"
    else:
        ev = detect_from_weights(layers)
        if ev.order is None:
            order, source = DEFAULT, f"UNDECIDED from the weights ({ev.describe()}): documented default"
            warnings.append(f"FP4 nibble order could not be decided from the weights ({ev.describe()}); "
                            f"using the documented default {DEFAULT}. If the output is noise, {OVERRIDE_HINT}")
        else:
            strength = "strong" if ev.strong else "WEAK"
            order, source = ev.order, f"detected from the weights, {strength} evidence: {ev.describe()}"
            if not ev.strong:
                warnings.append(f"FP4 nibble order {ev.order} rests on weak evidence ({ev.describe()}); "
                                f"if the output is noise, {OVERRIDE_HINT}")
    for l in untagged:
        l.nibble_order = order
    for w in warnings:
        log.warning("%s", w)
    return order, source, warnings
