"""``wanquant convert``: any supported checkpoint → ComfyUI's native file, streamed.

fp8 payloads and NVFP4/MXFP8/int8 tensors are copied bit for bit (only scales are re-typed to
fp32); layers stock ComfyUI cannot load (FP4 group-32, per-row / block fp8, block int8, GGUF) are
re-encoded one layer at a time to the chosen target (``int8`` is per-channel ``int8_tensorwise``,
ComfyUI 0.33's own layout) and the error that adds is measured and reported. Memory stays at
about one layer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import WanquantError
from ..ops.formats import comfy_quant_tensor, get_format
from ..ops.formats.gguf import is_gguf
from .canonical import CanonicalModel, Entry, Report, load_with_base
from .lora_sniff import lora_key_example
from .report_text import report_lines
from .writer import check_destination, write_safetensors

log = logging.getLogger(__name__)
FP4_TARGETS = ("bf16", "float8_e4m3fn", "nvfp4", "int8", "float8_e4m3fn_rowwise")
#: layer formats stock ComfyUI cannot load: re-encoded to ``--to`` (int8_tensorwise is ComfyUI 0.33's own)
REENCODE = ("fp4_g32", "float8_e4m3fn_rowwise", "float8_e4m3fn_blockwise", "float8_e4m3fn_block3d", "int8_blockwise")
#: ``--to`` name -> registry format (``int8`` is per-channel ``int8_tensorwise``, ComfyUI's own layout)
TARGET_FORMAT = {"int8": "int8_tensorwise"}
#: targets stock ComfyUI has no layout for (the file then loads through wanquant's loader only)
WANQUANT_ONLY = ("float8_e4m3fn_rowwise",)


def _reencoded(fmt: str, to: str) -> bool:
    """Whether a layer of ``fmt`` is re-encoded to ``to`` (stock ComfyUI cannot load it as it is)."""
    return (fmt in REENCODE or is_gguf(fmt)) and fmt != to


@dataclass
class ConvertResult:
    dst: str
    report: Report
    bytes_written: int
    tensors: int
    fp4_errors: dict[str, float] = field(default_factory=dict)  # layer → relative L2 error added
    to: str | None = None
    sources: list[str] = field(default_factory=list)  # formats that were re-encoded
    text: list[str] = field(default_factory=list)  # report + summary, rendered before DST is replaced

    def lines(self) -> list[str]:
        out = [f"wrote {self.dst}: {self.tensors} tensors, {self.bytes_written / 2**20:.1f} MiB of tensor data",
               "changed: " + changes(self.report)]
        if self.fp4_errors:
            errs = list(self.fp4_errors.values())
            what = "FP4 group-32" if self.sources == ["fp4_g32"] else " / ".join(self.sources)
            out.append(f"{what} → {self.to}: {len(errs)} layers re-encoded; relative error added "
                       f"mean {sum(errs) / len(errs):.2e}, max {max(errs):.2e}")
            worst = sorted(self.fp4_errors.items(), key=lambda kv: -kv[1])[:5]
            out.append("largest added error per layer: " + ", ".join(f"{n} {e:.2e}" for n, e in worst)
                       + (" (every layer: wanquant -v convert ...)" if len(errs) > 5 else ""))
            if self.to in WANQUANT_ONLY:
                out.append(f"note: stock ComfyUI has no {self.to} layout; this file loads through wanquant's loader")
        extras = self.report.extras
        if extras:
            out.append("kept extra modules: " + ", ".join(f"{g} ({len(m)})" for g, m in extras.items()))
        return out


def changes(rep: Report) -> str:
    """One line on what the conversion changed, from the report (fp8 payloads are never touched)."""
    parts = []
    if rep.remapped:
        parts.append(f"{rep.remapped} keys renamed to native Wan names")
    if rep.prefix:
        parts.append(f"prefix '{rep.prefix}' removed")
    if any("scaled_fp8" in n for n in rep.notes):
        parts.append("legacy 'scaled_fp8' marker dropped")
    legacy = sum(n for s, n in rep.spellings.items() if "scale" in s and "comfy_quant" not in s)
    if legacy:
        parts.append(f"{legacy} per-tensor scales written as fp32 weight_scale with a comfy_quant entry")
    gg = sum(n for f, n in rep.formats.items() if is_gguf(f))
    if gg:
        parts.append(f"GGUF container rewritten as safetensors ({gg} block-quantized layers re-encoded)")
    if rep.dequantized:
        parts.append(f"{len(rep.dequantized)} layers ComfyUI cannot run quantized written dequantized")
    return "; ".join(parts) or "keys and scales were already native (only comfy_quant entries written where missing)"


def _fp4_to_target(name: str, entries: dict[str, Entry], to: str, errors: dict[str, float],
                   src_fmt: str = "fp4_g32", src_conf: dict | None = None) -> list[Entry]:
    """Plan the replacement entries of one layer stock ComfyUI cannot load (FP4 group-32, per-row /
    block fp8, block int8); the work happens when the writer loads them."""
    w_e, s_e = entries[f"{name}.weight"], entries[f"{name}.weight_scale"]

    def dequant():
        ref = get_format(src_fmt).dequantize({"weight": w_e.load(), "weight_scale": s_e.load()}, torch.float32,
                                             src_conf)
        if not bool(torch.isfinite(ref).all()):
            raise WanquantError(f"{src_fmt} scales give NaN/Inf weights (corrupt or out-of-range scale)",
                                layer=name, expected="finite group scales", found=f"{s_e.key}")
        return ref

    shape = (w_e.shape[0], w_e.shape[1] * 2) if src_fmt == "fp4_g32" else (w_e.shape[0], w_e.shape[1])
    return _to_target(name, shape, dequant, to, errors)


def _gguf_to_target(name: str, conf: dict, entries: dict[str, Entry], to: str, errors: dict[str, float]) -> list[Entry]:
    """Plan one GGUF layer's re-encoding (dequantized exactly in fp32 first, as gguf-py decodes it)."""
    w_e = entries[f"{name}.weight"]
    fmt = get_format(conf["format"])

    def dequant():
        ref = fmt.dequantize({"weight": w_e.load()}, torch.float32, conf)
        if not bool(torch.isfinite(ref).all()):
            raise WanquantError("GGUF block scales give NaN/Inf weights (corrupt file)", layer=name,
                                expected="finite fp16 block scales", found=conf["format"])
        return ref

    return _to_target(name, fmt.orig_shape({}, conf), dequant, to, errors)


def _to_target(name: str, shape: tuple[int, int], dequant: Callable[[], torch.Tensor], to: str,
               errors: dict[str, float]) -> list[Entry]:
    """Replacement entries of one layer ComfyUI cannot load as it is: ``dequant()`` gives its exact
    fp32 weight, re-encoded to ``to`` when the writer asks; the relative error added is recorded."""
    n, k = shape
    cache: dict[str, torch.Tensor] = {}
    pending: set[str] = set()

    def produce() -> dict[str, torch.Tensor]:
        if not cache:
            ref = dequant()
            if to == "bf16":
                cache["weight"] = ref.to(torch.bfloat16)
                got = cache["weight"].float()
            else:
                fmt = get_format(TARGET_FORMAT.get(to, to))
                tensors, conf = fmt.quantize(ref)
                cache.update(tensors)
                cache["comfy_quant"] = comfy_quant_tensor(conf)
                got = fmt.dequantize(tensors, torch.float32, conf)
            errors[name] = float(torch.linalg.vector_norm(got - ref, dtype=torch.float64)
                                 / torch.linalg.vector_norm(ref, dtype=torch.float64).clamp_min(1e-30))
            pending.update(cache)
        return cache

    def take(suffix):
        def load():
            t = produce()[suffix]
            pending.discard(suffix)
            if not pending:
                cache.clear()  # every piece of this layer is written: free it
            return t
        return load

    if to == "bf16":
        return [Entry(f"{name}.weight", (n, k), torch.bfloat16, take("weight"), name)]
    layout, conf = _target_layout(to, n, k)
    out = [Entry(f"{name}.{s}", shape, dtype, take(s), name) for s, (shape, dtype) in layout.items()]
    out.append(Entry(f"{name}.comfy_quant", tuple(comfy_quant_tensor(conf).shape), torch.uint8, take("comfy_quant"), name))
    return out


def _roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _target_layout(to: str, n: int, k: int) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict]:
    """Shapes, dtypes and comfy_quant of a re-encoded [n, k] layer, known before any data is read
    (the writer's header needs them up front; quantizing a dummy layer per layer to learn them
    would cost as much as the conversion). The writer checks every produced tensor against this."""
    if to == "float8_e4m3fn":
        return {"weight": ((n, k), torch.float8_e4m3fn), "weight_scale": ((), torch.float32)}, {"format": to}
    if to in ("int8", "float8_e4m3fn_rowwise"):  # per-channel: one fp32 scale per output row
        dtype = torch.int8 if to == "int8" else torch.float8_e4m3fn
        return {"weight": ((n, k), dtype), "weight_scale": ((n, 1), torch.float32)}, {"format": TARGET_FORMAT.get(to, to)}
    if to == "nvfp4":  # stored padded to 16 x 16, blocked 128x4 scales, one per 16 inputs
        pn, pk = _roundup(n, 16), _roundup(k, 16)
        conf = {"format": to} if (pn, pk) == (n, k) else {"format": to, "orig_shape": [n, k]}
        return {"weight": ((pn, pk // 2), torch.uint8),
                "weight_scale": ((_roundup(pn, 128), _roundup(pk // 16, 4)), torch.float8_e4m3fn),
                "weight_scale_2": ((), torch.float32)}, conf
    raise WanquantError("unknown --to target for FP4 group-32", expected=" / ".join(FP4_TARGETS), found=to)


def plan(model: CanonicalModel, to: str, errors: dict[str, float]) -> list[Entry]:
    """The list of output entries in order, FP4 layers replaced by their target encoding."""
    if to not in FP4_TARGETS:
        raise WanquantError("unknown --to target for FP4 group-32", expected=" / ".join(FP4_TARGETS), found=to)
    fp4 = {n for n, l in model.layers.items() if _reencoded(l.format, to)}
    out: list[Entry] = []
    done: set[str] = set()
    for key, e in model.entries.items():
        if e.layer in fp4:
            if e.layer not in done:
                layer = model.layers[e.layer]
                out.extend(_gguf_to_target(e.layer, dict(layer.conf), model.entries, to, errors)
                           if is_gguf(layer.format) else
                           _fp4_to_target(e.layer, model.entries, to, errors, layer.format, dict(layer.conf)))
                done.add(e.layer)
            if key.endswith((".weight", ".weight_scale", ".comfy_quant")) and key.rsplit(".", 1)[0] == e.layer:
                continue
        out.append(e)
    return out


def convert(src, dst, *, base=None, to: str = "float8_e4m3fn", nibble_order: str | None = None,
            nvfp4_scale_layout: str | None = None, progress: Callable[[int, int], None] | None = None,
            overwrite: bool = True) -> ConvertResult:
    """Write ``src`` (optionally overlaid on ``base``) to ``dst`` in ComfyUI's native format.

    DST is checked before any work; it is replaced only after every tensor is written and the
    report rendered (``result.text``), so any failure leaves it as it was."""
    check_destination(dst, overwrite=overwrite)
    with _load_model(src, base, nibble_order, nvfp4_scale_layout) as model:
        return _convert(model, src, dst, base, to, progress)


def _convert(model: CanonicalModel, src, dst, base, to: str, progress) -> ConvertResult:
    if model.report.errors:
        raise WanquantError(model.report.errors[0], file=str(src))
    errors: dict[str, float] = {}
    entries = plan(model, to, errors)
    meta = {"format": "pt", **model.metadata, "wanquant": json.dumps({"source": str(src), "base": str(base) if base else None,
                                                     "key_style": model.report.key_style,
                                                     "variant": model.report.variant})}
    result = ConvertResult(str(dst), model.report, 0, len(entries), errors)
    result.sources = sorted({l.format for l in model.layers.values() if _reencoded(l.format, to)})

    def render():
        result.to = to if errors else None
        result.bytes_written = sum(e.nbytes for e in entries)
        result.text = report_lines(model.report) + result.lines()

    write_safetensors(dst, [(e.key, e.shape, e.dtype, e.load) for e in entries], meta, progress,
                      before_commit=render)
    for name, err in errors.items():
        log.info("%s: %s → %s adds relative error %.3e", name, model.layers[name].format, to, err)
    return result


def _load_model(src, base, nibble_order, nvfp4_scale_layout) -> CanonicalModel:
    """The model (overlaid on its base) in canonical form."""
    return load_with_base(src, base, check=_not_a_lora, nibble_order=nibble_order,
                          nvfp4_scale_layout=nvfp4_scale_layout)


def _not_a_lora(model: CanonicalModel, path, role: str) -> None:
    """A LoRA given where a model belongs is refused (its factors would otherwise be copied into
    the output as unrecognised tensors)."""
    example = lora_key_example(model.source.tensors if model.source is not None else model.entries)
    if example:
        raise WanquantError(f"{role} is a LoRA, not a model (merge it with `wanquant merge-lora MODEL LORA -o OUT`)",
                            file=str(path), layer=example, expected="a model checkpoint", found="LoRA keys")
