"""Key spellings: prefixes, key style (native / diffusers) and the diffusers → native Wan map.

Renames are a single table lookup per key, matched from the start of the key (or of the part
after ``blocks.N.``) on whole dotted components. That is what makes the block-level
``norm2`` ↔ ``norm3`` swap safe (two chained string replacements would undo each other) and keeps
``attn2.norm_k``, ``image_embedder.norm2`` and ``controlnet.proj_out.0`` out of the way.
Quantization side keys (``.weight_scale``, ``.scale_weight``, ``.comfy_quant``...) move with their
layer because only the module part of the key is looked up.
"""

from __future__ import annotations

import re
from collections import Counter

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")

# Modules that are not part of ComfyUI's Wan and keep their own names (never renamed, never
# used to decide the key style).
EXTRA_PATTERNS = (
    re.compile(r"^controlnet\."),
    re.compile(r"^latent_encoder\."),
    re.compile(r"^blocks\.\d+\.(cam_encoder|projector)\."),
)

BLOCK_DIFFUSERS_TO_NATIVE = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    # diffusers' affine cross-attention norm is norm2; native calls it norm3 (and the weightless
    # native norm2 is diffusers' norm3).
    "norm2": "norm3", "norm3": "norm2",
    "scale_shift_table": "modulation",
}

TOP_DIFFUSERS_TO_NATIVE = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}

BLOCK_NATIVE_TO_DIFFUSERS = {v: k for k, v in BLOCK_DIFFUSERS_TO_NATIVE.items()}
TOP_NATIVE_TO_DIFFUSERS = {v: k for k, v in TOP_DIFFUSERS_TO_NATIVE.items()}

_BLOCK = re.compile(r"^(blocks\.\d+\.)(.*)$")

DIFFUSERS_MARKERS = re.compile(r"(^condition_embedder\.|^proj_out\.|^scale_shift_table$|\.attn1\.|\.attn2\.|"
                               r"\.ffn\.net\.|^blocks\.\d+\.scale_shift_table$)")
NATIVE_MARKERS = re.compile(r"(^head\.head\.|^head\.modulation$|\.self_attn\.|\.cross_attn\.|^time_embedding\.|"
                            r"^text_embedding\.|^blocks\.\d+\.modulation$|\.ffn\.[02]\.)")


def is_extra(key: str) -> bool:
    return any(p.search(key) for p in EXTRA_PATTERNS)


def detect_prefix(keys) -> str:
    """The prefix carried by most keys (more than half), or '' when keys are bare."""
    keys = list(keys)
    if not keys:
        return ""
    counts = Counter()
    for k in keys:
        for p in PREFIXES:  # longest first, so model.diffusion_model. wins over model.
            if k.startswith(p):
                counts[p] += 1
                break
    if not counts:
        return ""
    prefix, n = counts.most_common(1)[0]
    return prefix if n * 2 > len(keys) else ""


def strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def detect_style(keys) -> tuple[str, int, int]:
    """'native' or 'diffusers', decided on the Wan part only; returns (style, native, diffusers) votes."""
    nat = dif = 0
    for k in keys:
        if is_extra(k):
            continue
        if DIFFUSERS_MARKERS.search(k):
            dif += 1
        elif NATIVE_MARKERS.search(k):
            nat += 1
    return ("diffusers" if dif > nat else "native"), nat, dif


def _lookup(rest: str, table: dict[str, str]) -> str | None:
    """Match the longest table entry that is a whole-component prefix of ``rest``."""
    parts = rest.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return None


def _map_key(key: str, block_table: dict[str, str], top_table: dict[str, str]) -> tuple[str, bool]:
    if is_extra(key):
        return key, False
    m = _BLOCK.match(key)
    if m:
        mapped = _lookup(m.group(2), block_table)
        return (m.group(1) + mapped, True) if mapped is not None else (key, False)
    mapped = _lookup(key, top_table)
    return (mapped, True) if mapped is not None else (key, False)


def diffusers_to_native(key: str) -> tuple[str, bool]:
    """Map one diffusers-style Wan key; returns (new key, whether a table entry matched)."""
    return _map_key(key, BLOCK_DIFFUSERS_TO_NATIVE, TOP_DIFFUSERS_TO_NATIVE)


def native_to_diffusers(key: str) -> tuple[str, bool]:
    """The inverse map (for round-trip tests and diffusers-named LoRAs)."""
    return _map_key(key, BLOCK_NATIVE_TO_DIFFUSERS, TOP_NATIVE_TO_DIFFUSERS)


def map_diffusers_key(key: str) -> tuple[str, bool]:
    """diffusers → native for every Wan family we know (plain Wan, then Animate's extra modules)."""
    new, ok = diffusers_to_native(key)
    if ok:
        return new, True
    from .animate_keys import animate_diffusers_to_native

    return animate_diffusers_to_native(key)
