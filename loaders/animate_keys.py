"""Wan2.2-Animate's extra modules: diffusers names ↔ ComfyUI native names.

diffusers (``WanAnimateTransformer3DModel``, diffusers ≥ 0.36) and ComfyUI (``AnimateWanModel`` in
``comfy/ldm/wan/model_animate.py``, detected as ``WAN22_Animate`` by
``face_adapter.fuser_blocks.0.k_norm.weight``) spell the Animate-only modules differently. The plain
Wan part of the model is mapped by :mod:`keymap`; this module maps the rest:

====================================================  ==================================================
diffusers                                             native
====================================================  ==================================================
``pose_patch_embedding``                              ``pose_patch_embedding``
``motion_encoder.conv_in``                            ``motion_encoder.enc.net_app.convs.0.0``
``motion_encoder.conv_in.act_fn.bias`` ``[C]``        ``motion_encoder.enc.net_app.convs.0.1.bias`` ``[1,C,1,1]``
``motion_encoder.res_blocks.I.conv1``                 ``motion_encoder.enc.net_app.convs.{I+1}.conv1.0``
``motion_encoder.res_blocks.I.conv1.act_fn.bias``     ``motion_encoder.enc.net_app.convs.{I+1}.conv1.1.bias`` (reshape)
``motion_encoder.res_blocks.I.conv2``                 ``motion_encoder.enc.net_app.convs.{I+1}.conv2.1``
``motion_encoder.res_blocks.I.conv2.act_fn.bias``     ``motion_encoder.enc.net_app.convs.{I+1}.conv2.2.bias`` (reshape)
``motion_encoder.res_blocks.I.conv_skip``             ``motion_encoder.enc.net_app.convs.{I+1}.skip.1``
``motion_encoder.conv_out``                           ``motion_encoder.enc.net_app.convs.8``
``motion_encoder.motion_network``                     ``motion_encoder.enc.fc``
``motion_encoder.motion_synthesis_weight``            ``motion_encoder.dec.direction.weight``
``face_encoder.conv1_local / conv2 / conv3``          ``face_encoder.conv1_local.conv / conv2.conv / conv3.conv``
``face_encoder.out_proj / padding_tokens``            same
``face_adapter.N.to_q / to_out``                      ``face_adapter.fuser_blocks.N.linear1_q / linear2``
``face_adapter.N.norm_q / norm_k``                    ``face_adapter.fuser_blocks.N.q_norm / k_norm``
``face_adapter.N.to_k`` + ``face_adapter.N.to_v``     ``face_adapter.fuser_blocks.N.linear1_kv`` (rows: k then v)
(none: non-persistent in diffusers)                   ``motion_encoder.enc.net_app.convs.{1..7}.{conv2,skip}.0.kernel``
====================================================  ==================================================

Three things are **not** plain renames (see :func:`layout_change` and :func:`native_only_buffers`):

* ``to_k`` / ``to_v`` of each face-adapter block are two tensors in diffusers and one fused
  ``linear1_kv`` in native (``cat([k, v], dim=0)``; native splits it as ``(K H D)`` with K=2 outer).
  Both diffusers keys therefore map to the *same* native key; a loader must concatenate them (and
  their side keys) along dim 0 instead of renaming.
* The fused-leaky-ReLU biases of the motion encoder are ``[C]`` in diffusers and ``[1, C, 1, 1]`` in
  native (same values, reshape only).
* Native keeps the motion encoder's anti-alias blur kernels as persistent ``[4, 4]`` buffers
  (``outer([1,3,3,1], [1,3,3,1]) / 64``); diffusers does not store them. ComfyUI builds them in
  ``__init__``, so a native file without them loads with the right values (and a "unet missing"
  warning); a converter may write them with :func:`native_only_buffers`.

Every other tensor has the same shape and the same values on both sides (the motion encoder's
equalized-lr ``weight * 1/sqrt(fan_in)`` scaling is applied at run time by both implementations).

Rules as in :mod:`keymap`: one table lookup per key, matched from the start of the key or of the
part after ``motion_encoder.res_blocks.I.`` / ``face_adapter.N.`` on whole dotted components, the
longest entry first; the rest of the key (``.weight``, ``.weight_scale``, ``.comfy_quant``...) is
carried over unchanged, so quantization side keys move with their layer. No torch, no comfy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The native motion encoder is fixed (ComfyUI hard-codes 512 px, style 512, motion 20): seven
# ResBlocks between convs.0 (ConvLayer 3→32) and convs.8 (the final EqualConv2d).
MOTION_RES_BLOCKS = 7
_CONV_OUT_INDEX = MOTION_RES_BLOCKS + 1

TOP_DIFFUSERS_TO_NATIVE = {
    "pose_patch_embedding": "pose_patch_embedding",
    "motion_encoder.conv_in": "motion_encoder.enc.net_app.convs.0.0",
    "motion_encoder.conv_in.act_fn": "motion_encoder.enc.net_app.convs.0.1",
    "motion_encoder.conv_out": f"motion_encoder.enc.net_app.convs.{_CONV_OUT_INDEX}",
    "motion_encoder.motion_network": "motion_encoder.enc.fc",
    "motion_encoder.motion_synthesis_weight": "motion_encoder.dec.direction.weight",
    "face_encoder.conv1_local": "face_encoder.conv1_local.conv",
    "face_encoder.conv2": "face_encoder.conv2.conv",
    "face_encoder.conv3": "face_encoder.conv3.conv",
    "face_encoder.out_proj": "face_encoder.out_proj",
    "face_encoder.padding_tokens": "face_encoder.padding_tokens",
}

# Inside motion_encoder.res_blocks.I. ↔ motion_encoder.enc.net_app.convs.{I+1}.
RES_DIFFUSERS_TO_NATIVE = {
    "conv1": "conv1.0", "conv1.act_fn": "conv1.1",
    "conv2": "conv2.1", "conv2.act_fn": "conv2.2",
    "conv_skip": "skip.1",
}

# Inside face_adapter.N. ↔ face_adapter.fuser_blocks.N.  (to_k / to_v are fused: see KV_PARTS)
FACE_DIFFUSERS_TO_NATIVE = {
    "to_q": "linear1_q", "to_out": "linear2",
    "norm_q": "q_norm", "norm_k": "k_norm",
    "to_k": "linear1_kv", "to_v": "linear1_kv",
}
KV_PARTS = {"to_k": 0, "to_v": 1}  # row block of the native linear1_kv, out of len(KV_PARTS)

TOP_NATIVE_TO_DIFFUSERS = {v: k for k, v in TOP_DIFFUSERS_TO_NATIVE.items()}
RES_NATIVE_TO_DIFFUSERS = {v: k for k, v in RES_DIFFUSERS_TO_NATIVE.items()}
FACE_NATIVE_TO_DIFFUSERS = {v: k for k, v in FACE_DIFFUSERS_TO_NATIVE.items() if k not in KV_PARTS}

_D_RES = re.compile(r"^motion_encoder\.res_blocks\.(\d+)\.(.*)$")
_D_FACE = re.compile(r"^face_adapter\.(\d+)\.(.*)$")
_N_CONVS = re.compile(r"^motion_encoder\.enc\.net_app\.convs\.(\d+)\.(.*)$")
_N_FACE = re.compile(r"^face_adapter\.fuser_blocks\.(\d+)\.(.*)$")
_D_BIAS_RESHAPE = re.compile(r"^motion_encoder\.(conv_in|res_blocks\.\d+\.conv[12])\.act_fn\.bias$")
_N_BIAS_RESHAPE = re.compile(r"^motion_encoder\.enc\.net_app\.convs\.(0\.1|\d+\.conv1\.1|\d+\.conv2\.2)\.bias$")

BLUR_KERNEL_1D = (1, 3, 3, 1)


def _lookup(rest: str, table: dict[str, str]) -> tuple[str, str] | None:
    """Longest whole-component table entry that prefixes ``rest``: (entry, mapped rest)."""
    parts = rest.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return head, ".".join([table[head], *parts[n:]])
    return None


def animate_diffusers_to_native(key: str) -> tuple[str, bool]:
    """Map one diffusers-style Animate-only key; returns (native key, whether a table entry matched).

    ``face_adapter.N.to_k.*`` and ``face_adapter.N.to_v.*`` both map to
    ``face_adapter.fuser_blocks.N.linear1_kv.*``: the two tensors must be concatenated (see
    :func:`layout_change`), never one renamed over the other.
    """
    m = _D_RES.match(key)
    if m:
        idx = int(m.group(1))
        hit = _lookup(m.group(2), RES_DIFFUSERS_TO_NATIVE) if idx < MOTION_RES_BLOCKS else None
        if hit is None:  # an unknown layer, or a ResBlock the fixed-size native encoder does not have
            return key, False
        return f"motion_encoder.enc.net_app.convs.{idx + 1}.{hit[1]}", True
    m = _D_FACE.match(key)
    if m:
        hit = _lookup(m.group(2), FACE_DIFFUSERS_TO_NATIVE)
        if hit is None:
            return key, False
        return f"face_adapter.fuser_blocks.{m.group(1)}.{hit[1]}", True
    hit = _lookup(key, TOP_DIFFUSERS_TO_NATIVE)
    return (hit[1], True) if hit is not None else (key, False)


def native_to_diffusers_animate(key: str) -> tuple[str, bool]:
    """The inverse map for one native Animate-only key; returns (diffusers key, matched).

    The fused ``face_adapter.fuser_blocks.N.linear1_kv.*`` has two diffusers counterparts; use
    :func:`native_to_diffusers_animate_all` for it (this returns it unchanged, unmatched). The blur
    kernel buffers have none (unchanged, unmatched).
    """
    out = native_to_diffusers_animate_all(key)
    return (out[0], True) if len(out) == 1 else (key, False)


def native_to_diffusers_animate_all(key: str) -> list[str]:
    """Every diffusers key that a native Animate-only key comes from: one for a rename, two (to_k,
    to_v, in row order) for the fused ``linear1_kv``, none when there is no counterpart."""
    m = _N_CONVS.match(key)
    if m:
        idx, rest = int(m.group(1)), m.group(2)
        if 1 <= idx <= MOTION_RES_BLOCKS:
            hit = _lookup(rest, RES_NATIVE_TO_DIFFUSERS)
            return [f"motion_encoder.res_blocks.{idx - 1}.{hit[1]}"] if hit is not None else []
    m = _N_FACE.match(key)
    if m:
        n, rest = m.group(1), m.group(2)
        parts = rest.split(".")
        if parts[0] == "linear1_kv":
            tail = ".".join(parts[1:])
            return [".".join(filter(None, (f"face_adapter.{n}.{d}", tail)))
                    for d in sorted(KV_PARTS, key=KV_PARTS.get)]
        hit = _lookup(rest, FACE_NATIVE_TO_DIFFUSERS)
        return [f"face_adapter.{n}.{hit[1]}"] if hit is not None else []
    hit = _lookup(key, TOP_NATIVE_TO_DIFFUSERS)
    return [hit[1]] if hit is not None else []


@dataclass(frozen=True)
class LayoutChange:
    """How a diffusers tensor becomes (part of) its native tensor when a rename is not enough.

    kind ``"concat_rows"``: the native tensor is ``cat(parts, dim=0)`` in ``part`` order (applies to
    the weight, bias and any row-wise quantization side tensor of the layer); ``"unsqueeze_bias"``:
    ``[C]`` → ``[1, C, 1, 1]``.
    """

    kind: str
    part: int = 0
    parts: int = 1


def layout_change(diffusers_key: str) -> LayoutChange | None:
    """The non-rename step for a diffusers Animate key, or None when a rename is all it needs."""
    if _D_BIAS_RESHAPE.match(diffusers_key):
        return LayoutChange("unsqueeze_bias")
    m = _D_FACE.match(diffusers_key)
    if m:
        head = m.group(2).split(".", 1)[0]
        if head in KV_PARTS:
            return LayoutChange("concat_rows", KV_PARTS[head], len(KV_PARTS))
    return None


def native_layout_change(native_key: str) -> str | None:
    """``"split_rows"`` (fused kv), ``"squeeze_bias"`` ([1,C,1,1] → [C]) or None, for native → diffusers."""
    if _N_BIAS_RESHAPE.match(native_key):
        return "squeeze_bias"
    m = _N_FACE.match(native_key)
    if m and m.group(2).split(".", 1)[0] == "linear1_kv":
        return "split_rows"
    return None


def native_shape(diffusers_key: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the native tensor made from ``diffusers_key`` (``shapes``: diffusers key → shape;
    for a fused kv part the other parts are looked up in ``shapes`` too)."""
    shape = tuple(shapes[diffusers_key])
    change = layout_change(diffusers_key)
    if change is None:
        return shape
    if change.kind == "unsqueeze_bias":
        return (1, shape[0], 1, 1)
    siblings = native_to_diffusers_animate_all(animate_diffusers_to_native(diffusers_key)[0])
    return (sum(shapes[s][0] for s in siblings), *shape[1:])


def native_only_keys() -> list[str]:
    """Native state-dict entries with no diffusers counterpart: the persistent blur-kernel buffers."""
    keys = []
    for i in range(1, MOTION_RES_BLOCKS + 1):
        keys += [f"motion_encoder.enc.net_app.convs.{i}.conv2.0.kernel",
                 f"motion_encoder.enc.net_app.convs.{i}.skip.0.kernel"]
    return keys


def blur_kernel() -> list[list[float]]:
    """The constant native blur kernel, ``outer(k, k) / sum(outer(k, k))`` with k = (1, 3, 3, 1)."""
    k = BLUR_KERNEL_1D
    total = float(sum(k)) ** 2
    return [[a * b / total for b in k] for a in k]


def native_only_buffers() -> dict[str, list[list[float]]]:
    """Each native-only key with its constant value (a converter may write these; ComfyUI also
    rebuilds them itself when they are absent)."""
    return {k: blur_kernel() for k in native_only_keys()}


def is_animate_native(key: str) -> bool:
    """Whether a native key belongs to an Animate-only module."""
    return key.startswith(("pose_patch_embedding.", "motion_encoder.", "face_encoder.", "face_adapter."))
