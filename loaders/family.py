"""Model family and variant recognition on native keys, and what a full model still lacks.

Works on shapes only (no data is read), so it is cheap enough for ``inspect`` on a 14B header.
Which Wan variant (and what it needs to run) is decided in :mod:`.wan_variants`, by ComfyUI's rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .wan_variants import classify

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
SIZES = {1536: "1.3B", 3072: "5B", 5120: "14B"}

# The modules every Wan block has, and the top-level groups a complete model has.
BLOCK_GROUPS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "self_attn.norm_q", "self_attn.norm_k",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "norm3", "ffn.0", "ffn.2",
                "modulation")
TOP_GROUPS = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "head.head",
              "head.modulation")


@dataclass
class Family:
    family: str  # "wan" | "non-wan"
    variant: str  # human-readable, e.g. "Wan2.1-T2V-14B (or Wan2.2-A14B T2V expert)"
    dim: int | None = None
    num_blocks: int = 0
    extras: dict[str, list[str]] = field(default_factory=dict)  # group name → module names
    missing: list[str] = field(default_factory=list)
    needs_base: str | None = None
    notes: list[str] = field(default_factory=list)
    needs: str = ""  # one plain-English line: the nodes / side models it takes to run (wan_variants)
    comfy_type: str = ""  # the model_type ComfyUI's model_detection gives it


def _has(shapes, prefix: str) -> bool:
    return any(k == prefix or k.startswith(prefix + ".") for k in shapes)


def _axis(shapes, key: str, axis: int):
    """``shapes[key][axis]``, or None when the key is absent or has too few dimensions (a
    malformed file reaches here before the layer checks that report it)."""
    shape = tuple(shapes.get(key, ()))
    return shape[axis] if -len(shape) <= axis < len(shape) else None


def recognise(shapes: dict[str, tuple[int, ...]], metadata: dict | None = None) -> Family:
    """``shapes``: canonical key → logical shape (a GGUF weight's real shape, not its block bytes);
    ``metadata``: the file's header metadata (only a ComfyUI ``config`` entry is read)."""
    blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    wanish = _has(shapes, "head.modulation") or any(".self_attn." in k or ".cross_attn." in k for k in shapes)
    if not wanish:
        return Family("non-wan", "not a Wan DiT (no Wan attention blocks or head); formats are still "
                                 "converted, but ComfyUI has no architecture to run it", None, len(blocks))
    dim = _axis(shapes, "head.modulation", -1) or _axis(shapes, "blocks.0.self_attn.q.weight", 0)
    in_dim = _axis(shapes, "patch_embedding.weight", 1)
    out_dim = _axis(shapes, "head.head.weight", 0)
    out_dim = out_dim // 4 if out_dim is not None else None
    size = f"-{SIZES[dim]}" if dim in SIZES else f" (dim {dim})"

    fam = Family("wan", "", dim, len(blocks))
    _extras(shapes, fam)
    v = classify(shapes, dim, in_dim, out_dim, size, metadata)
    variant, fam.needs, fam.comfy_type = v.name, v.needs, v.comfy_type
    if "vista4d" in fam.extras:
        variant = "Vista4D finetune of Wan2.1-T2V-14B"
        fam.needs = "its Wan2.1-T2V-14B base underneath and the Vista4D nodes (WanQuantVista4DCamera, WanQuantVista4DRender)"
    else:
        fam.notes.extend(v.notes)
    if "worldstereo_controlnet" in fam.extras:
        variant += " + WorldStereo ControlNet branch"
    fam.variant = variant
    _missing(shapes, blocks, fam)
    return fam


def _extras(shapes, fam: Family) -> None:
    v4d, recam = [], []
    for k, shape in shapes.items():
        m = re.match(r"^(blocks\.\d+\.cam_encoder)\.weight$", k)
        if m:
            (v4d if shape[-1:] == (6,) else recam if shape[-1:] == (12,) else v4d).append(m.group(1))
    mods = sorted({k.rsplit(".", 1)[0] for k in shapes if k.startswith("latent_encoder.")
                   or re.match(r"^blocks\.\d+\.projector\.", k)})
    if v4d or mods:
        fam.extras["vista4d"] = sorted(set(v4d) | set(mods))
    if recam:
        fam.extras["recammaster_cam_encoder"] = sorted(recam)
        fam.notes.append("cam_encoder is Linear(12, dim): ReCamMaster, not Vista4D (Linear(6, dim))")
    cn = sorted({k.rsplit(".", 1)[0] for k in shapes if k.startswith("controlnet.")})
    if cn:
        fam.extras["worldstereo_controlnet"] = cn


def _missing(shapes, blocks, fam: Family) -> None:
    present_modules = {k.rsplit(".", 1)[0] for k in shapes} | set(shapes)
    for g in TOP_GROUPS:
        if not _has(present_modules, g):
            fam.missing.append(g)
    n = len(blocks)
    if n:
        total = n * len(BLOCK_GROUPS)
        absent_by_group = {}
        for g in BLOCK_GROUPS:
            absent = [b for b in blocks if f"blocks.{b}.{g}" not in present_modules]
            if absent:
                absent_by_group[g] = len(absent)
        for g, cnt in absent_by_group.items():
            fam.missing.append(f"blocks.*.{g} ({cnt} of {n} blocks)")
        have = total - sum(absent_by_group.values())
        if absent_by_group:
            fam.notes.append(f"{total - have} of {total} Wan block weights missing")
    if fam.missing:
        base = "Wan2.1-T2V-14B" if ("vista4d" in fam.extras or fam.dim == 5120) else "the matching Wan base model"
        fam.needs_base = base
