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
from ..loaders.canonical import CanonicalModel, LazyTensors, load_with_base
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
    from ..ops.policy import OPTIONS

    return [*OPTIONS, NATIVE]


def comfy_mmap_reader(path: str):
    """ComfyUI's own safetensors reader: tensors backed by the memory-mapped file, exactly as
    stock *Load Diffusion Model* gets them (with DynamicVRAM, its file-slice hints too), so the
    pages stay file-backed and reclaimable instead of becoming private copies."""
    import comfy.utils

    if path.lower().endswith((".safetensors", ".sft")):
        return comfy.utils.load_torch_file(path)
    from safetensors import safe_open  # a safetensors file under another name

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def build_canonical(path: str, base: str | None = None, nibble_order: str = "auto",
                    nvfp4_scale_layout: str = "auto", tensor_reader=None) -> CanonicalModel:
    """The canonical model, checked to be a complete Wan; the caller closes it."""
    model = load_with_base(path, base, nibble_order=nibble_order, nvfp4_scale_layout=nvfp4_scale_layout,
                           tensor_reader=tensor_reader)
    try:
        _check_runnable(model, path, base)
    except BaseException:
        model.close()
        raise
    return model


def _check_runnable(model: CanonicalModel, path: str, base: str | None) -> None:
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
    if policy not in policy_options():
        raise WanquantError("unknown op policy", expected=" / ".join(policy_options()), found=policy)
    if compute_dtype not in COMPUTE_DTYPES:
        raise WanquantError("unknown compute dtype", expected=" / ".join(COMPUTE_DTYPES), found=compute_dtype)
    from .comfy_native import publish

    publish()  # comfy_quant algorithms newer than wanquant's table that this ComfyUI runs are kept
    with build_canonical(path, base, nibble_order, nvfp4_scale_layout, tensor_reader=comfy_mmap_reader) as model:
        return _build_patcher(model, path, base, policy, compute_dtype, nibble_order, nvfp4_scale_layout,
                              progress, disable_dynamic)


def _build_patcher(model: CanonicalModel, path, base, policy, compute_dtype, nibble_order, nvfp4_scale_layout,
                   progress, disable_dynamic) -> LoadResult:
    import comfy.model_management as mm
    import comfy.sd

    from .comfy_native import gate_model, gate_own_ops

    gate_model(model.layers, path)  # ComfyUI-only algorithms this ComfyUI lacks: one error, before loading
    if policy == NATIVE:
        gate_own_ops(model.layers, path, NATIVE)
    keep, extras = split_extras(model)
    load_device = mm.get_torch_device()

    model_options: dict = {}
    plan = None
    if policy != NATIVE:
        from .comfy_ops import build_operations

        ops, plan = build_operations(policy, COMPUTE_DTYPES[compute_dtype], load_device)
        model_options["custom_operations"] = ops

    # Tensors that need no change are the file's own mapped pages (nothing is read here); only
    # layers that change (fused k/v, nibble swaps, re-typed scales) are materialised, one by one.
    total = len(keep)
    sd = {}
    low_first = set()
    for i, k in enumerate(keep):
        e = model.entries[k]
        if e.unswapped is not None and policy != NATIVE:  # our layouts read the file's order in place
            sd[k] = e.unswapped()
            low_first.add(e.layer)
        else:
            sd[k] = e.load()
        if progress:
            progress(i + 1, total)
    if low_first:
        model_options["custom_operations"].wanquant_low_first = frozenset(low_first)

    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options, metadata=model.metadata or None,
                                                       disable_dynamic=disable_dynamic)
    if patcher is None:
        raise WanquantError("ComfyUI could not detect the model type from the normalised keys "
                            f"({model.report.variant})", file=path)
    if policy == NATIVE:
        if compute_dtype != "auto":  # ComfyUI's own override (it also forces weight casts)
            patcher.set_model_compute_dtype(COMPUTE_DTYPES[compute_dtype])
    else:
        # Activations must arrive in the dtype our layers were built for; otherwise ComfyUI's cast
        # turns every quantized weight dense and the planned fp8/kitchen path never runs. Set on
        # the model itself (this load owns it), so every clone and direct call sees it.
        patcher.model.manual_cast_dtype = plan.compute_dtype
        patcher.model.wanquant_plan = plan
    patcher.cached_patcher_init = (reload_patcher, (path, base, policy, compute_dtype, nibble_order, nvfp4_scale_layout))
    # Vista4D / WorldStereo modules: references into the file, read only when a node asks
    patcher.model.wanquant_extras = LazyTensors({k: model.entries[k] for k in extras}, model.sources())
    patcher.model.wanquant_report = model.report
    vista = _vista4d(patcher, model, extras)

    lines = _report_lines(model, extras, policy, plan, patcher, COMPUTE_DTYPES[compute_dtype], vista)
    for line in lines:
        log.info("%s", line)
    return LoadResult(patcher, model, lines)


def _vista4d(patcher, model: CanonicalModel, extras: list[str]) -> list[str]:
    """With every Vista4D module present, the model becomes Vista4D (nodes/vista4d_model.py)."""
    if "vista4d" not in model.report.extras:
        return []
    from .vista4d_model import make_vista4d, vista4d_layout

    layout = vista4d_layout(extras)
    if layout is None:
        return []
    return make_vista4d(patcher, {k: model.entries[k].load() for k in extras}, layout)


def reload_patcher(path, base, policy, compute_dtype, nibble_order, nvfp4_scale_layout="auto", disable_dynamic=False):
    """``cached_patcher_init`` factory: rebuild the model from the files, from scratch."""
    return load_wan_model(path, base, policy, compute_dtype, nibble_order, disable_dynamic=disable_dynamic,
                          nvfp4_scale_layout=nvfp4_scale_layout).patcher


def _report_lines(model: CanonicalModel, extras: list[str], policy: str, plan, patcher, forced_dtype,
                  vista: list[str] = ()) -> list[str]:
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
        if plan.requantized:
            errs = list(plan.requantized.values())
            lines.append(f"int8_matmul: {len(errs)} fp8 layers re-quantized to per-channel int8 at load; relative "
                         f"weight error added mean {sum(errs) / len(errs):.2e}, max {max(errs):.2e} (per layer in the log)")
        log.info("per-layer op plan:\n%s", plan.report())
    if plan is None and (forced_dtype or dtype) is not None:
        note = " (set by option: ComfyUI then casts every weight, quantized layers included, to it)" \
            if forced_dtype is not None else ""
        lines.append(f"compute dtype: {str(forced_dtype or dtype).replace('torch.', '')}{note}")
    if rep.nibble_order:
        lines.append(f"FP4 nibble order: {rep.nibble_order}")
    lines += vista
    for group, mods in rep.extras.items():
        if vista and group == "vista4d":
            continue
        lines.append(f"extra modules ({group}): {len(mods)} kept beside the model (not used by ComfyUI's Wan): "
                     + ", ".join(mods[:3]) + (" ..." if len(mods) > 3 else ""))
    if extras and not rep.extras:
        lines.append(f"unrecognised tensors kept beside the model: {len(extras)}")
    lines += [f"note: {n}" for n in rep.notes]
    lines += [f"warning: {w}" for w in rep.warnings]
    return lines
