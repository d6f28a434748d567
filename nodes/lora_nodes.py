"""Apply LoRA (quantized Wan): any Wan LoRA spelling onto a quantized MODEL, merged or on the fly.

What ComfyUI already does well is used as is: the MODEL is cloned and the LoRA goes in as
ordinary patches (``add_patches``), so ComfyUI dequantizes, adds every patch on that weight
(its own LoRA loaders' too: they compose, each applied once, from the stored original) and
requantizes with a fresh scale and seeded stochastic rounding when the model loads; lowvram and
dynamic VRAM keep working. What it lacks is added here: the key mapping for diffusers/PEFT/
ai-toolkit names and lightx2v's ``diff_m``, shape and variant checks *before* anything is touched
(a bad LoRA leaves the model as it was), and a report.

``on the fly`` never changes the stored quantized weights (no requantization error). On layers of
a model from wanquant's loader (``nodes.comfy_ops``' Linear, which has a ``wanquant_lora``
attribute) low-rank patches and bias diffs go on the low-rank side path (``lora.side``), set as an
object patch per MODEL clone (applied at patch time, restored on unpatch; stacked on an earlier
node's), so the layer keeps its fast kernel. Other patches (full-rank diffs, stock-loaded models)
get a ``weight_function`` (ComfyUI's hook, run after the weight is cast and dequantized on every
forward): those layers run the dequantize path. The report lists where each target ran. ComfyUI's
bypass injection was not used: every bypass LoRA registers under the one injection key
"bypass_lora", so chaining two replaces the first (seen in ComfyUI 0.33), and it applies no
diff/bias patches of its own.

Parameters of non-leaf modules (Wan's ``blocks.N.modulation``, ``head.modulation``, the target of
lightx2v's ``diff_m``) are never patched by ComfyUI's loader (``_load_list`` skips modules that
have children with parameters), so they are set as object patches: small, exact, and stacked on
any earlier object patch so chained LoRAs add up.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..errors import WanquantError
from ..lora.keys import LoraMatch, match_lora, read_lora
from ..lora.merge import QUANT_SIDE_SUFFIXES, LoraWeightFunction, group_patches, total_delta
from ..lora.side import LoraSide
from ..ops.policy import COMFY_LAYOUT

log = logging.getLogger(__name__)

PREFIX = "diffusion_model."
MODES = ("merge", "on the fly")
SIDE_ATTR = "wanquant_lora"  # the attribute nodes.comfy_ops' Linear reads its side path from


_CACHE: dict[str, tuple[tuple, object]] = {}


def _read_cached(path: str):
    """The last LoRA read, reused while the file is unchanged (a LoraFile is never mutated)."""
    st = os.stat(path)
    sig = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == sig:
        return hit[1]
    lora = read_lora(path)
    _CACHE.clear()
    _CACHE[path] = (sig, lora)
    return lora


def model_shapes(patcher) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(native key → logical shape, native key → quantized format) of a ComfyUI MODEL's diffusion model."""
    import comfy.utils

    shapes: dict[str, tuple[int, ...]] = {}
    formats: dict[str, str] = {}
    sd = patcher.model_state_dict()
    for k, t in sd.items():
        if not k.startswith(PREFIX):
            continue
        name = k[len(PREFIX):]
        if "." in name and name.rsplit(".", 1)[1] in QUANT_SIDE_SUFFIXES:
            continue
        try:
            param = comfy.utils.get_attr(patcher.model, k)
        except AttributeError:
            param = t
        shapes[name] = tuple(param.shape)  # a QuantizedTensor reports its logical [N, K]
        if type(param).__name__ == "QuantizedTensor" or hasattr(param, "params"):
            owner = comfy.utils.get_attr(patcher.model, k.rsplit(".", 1)[0])
            formats[name] = str(getattr(owner, "quant_format", None) or "quantized")
    return shapes, formats


def apply_lora(model, lora_path: str, strength: float, mode: str = "merge"):
    """Clone ``model`` and add the LoRA; returns (new MODEL, report text).

    Everything that can be wrong with the LoRA raises :class:`WanquantError` before the clone is
    made, so the input MODEL is never changed."""
    import comfy.utils

    if mode not in MODES:
        raise WanquantError("unknown LoRA mode", expected=" / ".join(MODES), found=mode)
    lora = _read_cached(lora_path)
    shapes, formats = model_shapes(model)
    match = match_lora(lora, shapes, strength=strength, mode=mode)
    grouped = group_patches([match])
    if mode == "merge" and strength != 0.0:
        _refuse_unmergeable(grouped, formats, lora_path)
    composed = sum(1 for t in grouped if PREFIX + t in model.patches or PREFIX + t in model.object_patches
                   or PREFIX + t in getattr(model, "weight_wrapper_patches", {})
                   or f"{PREFIX}{t.rsplit('.', 1)[0]}.{SIDE_ATTR}" in model.object_patches)
    new = model.clone()
    wrapped = objects = 0
    routes: dict[str, list[str]] = {"side path": [], "weight function": [], "merge (ComfyUI patch)": [], "object patch": []}
    sides: dict[str, list] = {}  # module → side terms (on the fly, our Linear layers)
    beside: Counter = Counter()  # the planned path of each layer given a side path (the report names it)
    rounds: list[dict[str, object]] = []  # one dict per patch index, so two patches on one key both land
    for target, items in grouped.items() if strength != 0.0 else ():
        key = PREFIX + target
        if _owned_by_container(new.model, key):  # see the module docstring
            current = new.get_model_object(key)
            value = total_delta(items, tuple(current.shape), torch.float32, current.device)
            value = torch.nn.Parameter((current.detach().float() + value).to(current.dtype), requires_grad=False)
            new.add_object_patch(key, value)
            objects += 1
            routes["object patch"].append(target)
            continue
        module = None
        if mode == "on the fly" and target.rsplit(".", 1)[-1] in ("weight", "bias") and "." in target:
            try:
                module = comfy.utils.get_attr(new.model, key.rsplit(".", 1)[0])
            except AttributeError:
                module = None
        terms = _side_terms(module, target, items, lora.name) if module is not None else None
        if terms is not None:
            name = target.rsplit(".", 1)[0]
            if name not in sides:
                beside[module._wq_planned_path()] += 1
            sides.setdefault(name, []).extend(terms)
            routes["side path"].append(target)
            continue
        if module is not None and hasattr(module, "weight_function"):
            new.add_weight_wrapper(key, LoraWeightFunction(target, items))
            wrapped += 1
            routes["weight function"].append(target)
            continue
        routes["merge (ComfyUI patch)"].append(target)
        for i, (patch, _) in enumerate(items):
            if len(rounds) <= i:
                rounds.append({})
            rounds[i][key] = _comfy_patch(patch, shapes[target])
    for name, terms in sides.items():
        key = f"{PREFIX}{name}.{SIDE_ATTR}"
        current = new.get_model_object(key)  # an earlier LoRA node's side path: stack on it
        new.add_object_patch(key, (current if current is not None else LoraSide()).plus(terms))
    for r in rounds:
        added = set(new.add_patches(r, strength))
        missing = [k for k in r if k not in added]
        if missing:  # cannot happen for keys taken from the model's own state dict; never silent
            raise WanquantError("ComfyUI did not accept every mapped LoRA key", layer=missing[0],
                                found=f"{len(missing)} keys not in the model's state dict")
    return new, report_text(match, formats, wrapped, composed, objects, routes, beside)


#: GGUF layers have no requantizer in wanquant (nodes.gguf_layout), so ComfyUI's merge would fail at load
_UNMERGEABLE = ("gguf_",)


def _refuse_unmergeable(grouped, formats: dict[str, str], lora_path: str) -> None:
    """``merge`` on a layer whose format cannot be re-encoded: one clear error now, not a failure
    inside ComfyUI's model load later (which would name neither the layer nor the way out)."""
    for target in sorted(grouped):
        fmt = formats.get(target, "")
        if fmt.startswith(_UNMERGEABLE):
            raise WanquantError(f"cannot merge a LoRA into a {fmt} layer: wanquant reads GGUF but cannot "
                                f"re-quantize it", file=lora_path, layer=target,
                                expected="mode 'on the fly' (the LoRA runs beside the layer, no re-quantization), "
                                         "or convert the model first (wanquant convert MODEL OUT.safetensors "
                                         "--to float8_e4m3fn)",
                                found=f"mode 'merge' on {fmt}")


def _side_terms(module, target: str, items, name: str):
    """Side-path terms for ``target`` on one of our Linear layers, or None when it must take another
    route: only low-rank patches on the weight and bias diffs fit ``y += s·(x·Aᵀ)·Bᵀ + s·diff_b``."""
    if not hasattr(type(module), SIDE_ATTR):
        return None
    if getattr(getattr(module, "_wq_choice", None), "path", None) == COMFY_LAYOUT:
        return None  # ComfyUI's own layout: ComfyUI may call it past our forward (Wan FFN int8), so its route
    role = target.rsplit(".", 1)[-1]
    if role == "weight" and all(p.kind == "lora" for p, _ in items):
        return [LoraSide.term(name, s, up=p.up, down=p.down, scale=p.scale) for p, s in items]
    if role == "bias" and all(p.kind == "diff" for p, _ in items):
        return [LoraSide.term(name, s, diff_b=p.diff * p.scale if p.scale != 1.0 else p.diff) for p, s in items]
    return None


def _comfy_patch(patch, shape):
    """One of our patches as the value ComfyUI's ``add_patches`` expects."""
    from comfy.weight_adapter import LoRAAdapter

    if patch.kind == "lora":  # ComfyUI computes alpha/rank · up@down itself, in its compute dtype
        return LoRAAdapter(set(patch.keys), (patch.up, patch.down, patch.alpha, None, None, None))
    diff = patch.diff.reshape(shape)  # ComfyUI skips a diff whose shape differs from the parameter
    return ("diff", (diff * patch.scale if patch.scale != 1.0 else diff,))


def _owned_by_container(model, key: str) -> bool:
    """Whether the parameter's module has child modules with parameters (ComfyUI skips patching those)."""
    import comfy.utils

    if "." not in key:
        return False
    try:
        owner = comfy.utils.get_attr(model, key.rsplit(".", 1)[0])
    except AttributeError:
        return False
    return isinstance(owner, torch.nn.Module) and any(True for c in owner.children() for _ in c.parameters())


#: how the report names the path a layer keeps beside its side path (nodes.comfy_ops' _wq_planned_path)
PATH_LABELS = {"int8_matmul": "int8_matmul (W8A8, torch._int_mm)",
               "fp8_matmul": "fp8_matmul (per-tensor scale, torch._scaled_mm)",
               "fp8_matmul rowwise": "fp8_matmul (row-wise scales, torch._scaled_mm)",
               "kitchen_matmul": "kitchen_matmul (comfy-kitchen NVFP4/MXFP8 kernels)",
               "dequant": "dequant (weight decoded per forward)",
               "dense": "dense (high-precision weight)"}


def report_text(match: LoraMatch, formats: dict[str, str], wrapped: int, composed: int, objects: int = 0,
                routes: dict[str, list[str]] | None = None, beside: Counter | None = None) -> str:
    q = Counter(formats.get(t, "high precision") for t in {p.target for p in match.patches})
    lines = [match.text(), "  targets: " + ", ".join(f"{n} {f}" for f, n in sorted(q.items()))]
    if match.strength == 0.0:
        lines.append("  strength 0: model returned unchanged")
    elif match.mode == "merge":
        lines.append("  merge: patches handed to ComfyUI; each patched quantized weight is dequantized, summed with "
                     "every LoRA on it and requantized (fresh scale, seeded stochastic rounding) when the model loads")
        lines.append("  added error: ComfyUI requantizes at load, after this node, so it is not measured here; "
                     "`wanquant merge-lora --error-report` writes it per layer, 'on the fly' adds none")
        four_bit = sum(n for f, n in q.items() if f in ("nvfp4", "fp4_g32"))
        if four_bit:
            lines.append(f"  note: {four_bit} targets are 4-bit; requantizing them adds about as much error as the "
                         f"original quantization; 'on the fly' keeps the LoRA exact")
    else:
        side = len((routes or {}).get("side path", ()))
        lines.append(f"  on the fly: the quantized weights stay untouched; {side} parameters on the low-rank side path "
                     f"(y += s·(x·Aᵀ)·Bᵀ beside the layer, which keeps its own path), {wrapped} as weight "
                     f"functions (added after dequantization: those layers leave the quantized fast path)")
        if beside:
            lines.append("  side path beside (each layer's planned path; the loader's report says what ran): "
                         + ", ".join(f"{PATH_LABELS.get(p, p)} {n}" for p, n in sorted(beside.items())))
    for route, targets in (routes or {}).items():
        if targets:
            shown = sorted(targets)
            more = f", ... and {len(shown) - 12} more" if len(shown) > 12 else ""
            lines.append(f"  ran as {route} ({len(shown)}): " + ", ".join(shown[:12]) + more)
    if objects:
        lines.append(f"  {objects} raw parameters (modulation) set directly: ComfyUI's patcher would skip them")
    if composed:
        lines.append(f"  {composed} of these parameters already carry other LoRA patches; they add up")
    return "\n".join(lines)


def _lora_choices() -> list[str]:
    return folder_paths.get_filename_list("loras")


class WanQuantApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantApplyLoRA",
            display_name="Apply LoRA (quantized Wan)",
            category="wanquant/lora",
            description="Apply a Wan LoRA in any common spelling (ComfyUI/lightx2v incl. diff_m, kohya, Wan-Fun, "
                        "diffusers/PEFT/ai-toolkit, error-compensation) to a quantized or plain Wan MODEL. Chain "
                        "several; combines with ComfyUI's own LoRA loaders.",
            inputs=[
                io.Model.Input("model", tooltip="The Wan diffusion model (quantized or not) to apply the LoRA to."),
                io.Combo.Input("lora_name", options=_lora_choices(),
                               tooltip="LoRA file from the 'loras' model folder."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA changes the model (multiplies alpha/rank; may be "
                                       "negative). 0 returns the model unchanged."),
                io.Combo.Input("mode", options=list(MODES), default="merge",
                               tooltip="merge: ComfyUI dequantizes each patched weight, adds the LoRA and "
                                       "requantizes it with a fresh scale and seeded stochastic rounding (fast "
                                       "quantized matmuls stay on). on the fly: the stored quantized weights are "
                                       "never changed; on models from the wanquant loader low-rank LoRAs run "
                                       "beside each layer (fast quantized matmuls stay on, no requantization "
                                       "error); other patches are added after dequantization in every forward."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the LoRA applied (a clone)."),
                io.String.Output(display_name="report",
                                 tooltip="Matched and unmatched LoRA keys, per-module ranks, variant warnings."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name, strength=1.0, mode="merge") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        new, text = apply_lora(model, path, strength, mode)
        log.info("%s", text)
        return io.NodeOutput(new, text, ui=ui.PreviewText(text))


NODES = [WanQuantApplyLoRA]
