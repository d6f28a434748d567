"""Canonical state dict → ComfyUI ModelPatcher.

ComfyUI already does the hard parts well once it sees its own native representation: Wan
detection, dtype choice, the patcher, offloading, LoRA dequant→patch→requant. So this bridge
only (1) builds the canonical form (loaders/), (2) refuses incomplete models with a message a
user can act on, (3) plugs in wanquant's operations (nodes/comfy_ops.py: capability policy,
dynamic fp8 activation scaling, FP4 group-32) unless the user asked for ComfyUI's own ops, and
(4) sets ``cached_patcher_init`` so ComfyUI can rebuild the model from scratch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ..errors import WanquantError
from ..loaders.canonical import CanonicalModel, load_canonical, overlay
from ..loaders.keymap import is_extra

log = logging.getLogger(__name__)

NATIVE = "comfy_native"
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadResult:
    patcher: object
    canonical: CanonicalModel
    report_lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.report_lines)


def policy_options() -> list[str]:
    try:
        from ..ops.policy import OPTIONS
    except ImportError:  # pragma: no cover
        OPTIONS = ("auto",)
    return [*OPTIONS, NATIVE]


def build_canonical(path: str, base: str | None = None, nibble_order: str = "auto",
                    nvfp4_scale_layout: str = "auto") -> CanonicalModel:
    model = load_canonical(path, nibble_order=nibble_order, nvfp4_scale_layout=nvfp4_scale_layout)
    if base:
        model = overlay(model, load_canonical(base, nibble_order=nibble_order, nvfp4_scale_layout=nvfp4_scale_layout))
    rep = model.report
    if rep.errors:
        raise WanquantError(rep.errors[0])
    if rep.family != "wan":
        raise WanquantError(f"not a Wan DiT ({rep.variant}); ComfyUI has no architecture for it. "
                            f"Use 'Inspect checkpoint' or `wanquant convert` for its formats", file=path)
    if rep.missing:
        note = next((n for n in rep.notes if "block weights missing" in n), None)
        what = note or f"missing {', '.join(rep.missing[:4])}"
        hint = (f"connect its base model ({rep.needs_base}) to `base`" if not base else
                "the base given does not complete it; check that it is the right base model")
        kind = "partial Vista4D finetune" if "vista4d" in rep.extras else "incomplete Wan checkpoint"
        raise WanquantError(f"{kind}: {what}; {hint}", file=path)
    return model


def split_extras(model: CanonicalModel) -> tuple[list[str], list[str]]:
    """Keys ComfyUI's Wan has no place for (kept aside, listed), and the rest."""
    unrecognised = set(model.report.unrecognised)
    extras = [k for k in model.entries if is_extra(k) or k in unrecognised]
    aside = set(extras)
    keep = [k for k in model.entries if k not in aside]
    return keep, extras


def load_wan_model(path: str, base: str | None = None, policy: str = "auto", compute_dtype: str = "auto",
                   nibble_order: str = "auto", progress=None, disable_dynamic: bool = False,
                   nvfp4_scale_layout: str = "auto") -> LoadResult:
    """Build a ComfyUI ModelPatcher for any supported Wan checkpoint (raises WanquantError)."""
    import comfy.model_management as mm
    import comfy.sd

    if policy not in policy_options():
        raise WanquantError("unknown op policy", expected=" / ".join(policy_options()), found=policy)
    if compute_dtype not in COMPUTE_DTYPES:
        raise WanquantError("unknown compute dtype", expected=" / ".join(COMPUTE_DTYPES), found=compute_dtype)
    model = build_canonical(path, base, nibble_order, nvfp4_scale_layout)
    keep, extras = split_extras(model)
    has_fp4 = any(l.format == "fp4_g32" for l in model.layers.values())
    load_device = mm.get_torch_device()

    model_options: dict = {}
    plan = None
    if policy != NATIVE:
        from .comfy_ops import build_operations

        ops, plan = build_operations(policy, COMPUTE_DTYPES[compute_dtype], load_device)
        model_options["custom_operations"] = ops
    elif has_fp4:
        raise WanquantError("FP4 group-32 layers need wanquant's ops; choose an op policy other than "
                            f"'{NATIVE}' (or convert the file with `wanquant convert --to ...`)", file=path)

    total = len(keep)
    sd = {}
    for i, k in enumerate(keep):
        sd[k] = model.entries[k].load()
        if progress:
            progress(i + 1, total)
    extra_tensors = {k: model.entries[k].load() for k in extras}

    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options, metadata=model.metadata or None,
                                                       disable_dynamic=disable_dynamic)
    if patcher is None:
        raise WanquantError("ComfyUI could not detect the model type from the normalised keys "
                            f"({model.report.variant})", file=path)
    if compute_dtype != "auto" and policy == NATIVE:
        patcher.set_model_compute_dtype(COMPUTE_DTYPES[compute_dtype])
    patcher.cached_patcher_init = (reload_patcher, (path, base, policy, compute_dtype, nibble_order, nvfp4_scale_layout))
    patcher.model.wanquant_extras = extra_tensors  # Vista4D / WorldStereo modules, for nodes that use them
    patcher.model.wanquant_report = model.report

    lines = _report_lines(model, extras, policy, plan, patcher)
    for line in lines:
        log.info("%s", line)
    return LoadResult(patcher, model, lines)


def reload_patcher(path, base, policy, compute_dtype, nibble_order, nvfp4_scale_layout="auto", disable_dynamic=False):
    """``cached_patcher_init`` factory: rebuild the model from the files, from scratch."""
    return load_wan_model(path, base, policy, compute_dtype, nibble_order, disable_dynamic=disable_dynamic,
                          nvfp4_scale_layout=nvfp4_scale_layout).patcher


def _report_lines(model: CanonicalModel, extras: list[str], policy: str, plan, patcher) -> list[str]:
    rep = model.report
    q = ", ".join(f"{n} {f}" for f, n in sorted(rep.formats.items(), key=lambda kv: -kv[1]))
    lines = [
        f"{os.path.basename(rep.path)}: {rep.variant}",
        f"key style: {rep.key_style}" + (f" ({rep.remapped} keys remapped to native)" if rep.remapped else "")
        + (f", prefix '{rep.prefix}' removed" if rep.prefix else ""),
        f"layers: {q}",
        "source spellings: " + ", ".join(f"{n}x {s}" for s, n in rep.spellings.most_common()),
    ]
    if rep.base:
        lines.append(f"base model: {os.path.basename(rep.base.path)} ({rep.base.variant})")
    try:
        dtype = patcher.model.get_dtype_inference() if hasattr(patcher.model, "get_dtype_inference") else None
    except Exception:  # noqa: BLE001 - purely informative
        dtype = None
    dev = str(patcher.load_device)
    if policy == NATIVE:
        lines.append(f"ops: ComfyUI's own mixed-precision ops on {dev} (policy '{NATIVE}')")
    elif plan is not None:
        plan.finalize()
        lines.append(plan.report().splitlines()[0])
        lines.append(f"ops: {plan.summary()}")
        log.info("per-layer op plan:\n%s", plan.report())
    if dtype is not None and plan is None:
        lines.append(f"compute dtype: {str(dtype).replace('torch.', '')}")
    if rep.nibble_order:
        lines.append(f"FP4 nibble order: {rep.nibble_order}")
    for group, mods in rep.extras.items():
        lines.append(f"extra modules ({group}): {len(mods)} kept beside the model (not used by ComfyUI's Wan): "
                     + ", ".join(mods[:3]) + (" ..." if len(mods) > 3 else ""))
    if extras and not rep.extras:
        lines.append(f"unrecognised tensors kept beside the model: {len(extras)}")
    lines += [f"note: {n}" for n in rep.notes]
    lines += [f"warning: {w}" for w in rep.warnings]
    return lines
