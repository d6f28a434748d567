"""Apply LoRA patches to canonical (quantized or plain) weights, and the streaming ``merge-lora`` writer.

Merge: dequantize → add every LoRA's delta at once → requantize with a *fresh* scale (the
LoRA may move the layer's amax) and seeded stochastic rounding, so the rounding error is unbiased
instead of systematically snapping small LoRA changes back onto the old grid. The seed per
parameter is ComfyUI's own (``string_to_seed("diffusion_model." + key)``, a CRC-32), so a file
merged here and a model patched by ComfyUI draw from the same random stream.

On the fly: :class:`LoraWeightFunction` adds the same deltas to the dequantized weight each time
it is used and never touches the stored one (ComfyUI calls it as a ``weight_function``).

Both accumulate several LoRAs on a parameter before rounding once. Pure torch; no ComfyUI import.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from ..errors import WanquantError
from ..ops.formats import comfy_quant_tensor, get_format
from ..loaders import comfy_algos
from ..loaders.grid_detect import GRID_FORMATS
from ..ops.formats.gguf import is_gguf
from ..loaders.canonical import CanonicalModel, Entry, load_canonical
from .keys import LoraMatch, LoraPatch, lora_key_example, match_lora, read_lora
from ..loaders.writer import check_destination, write_safetensors

log = logging.getLogger(__name__)

QUANT_SIDE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "comfy_quant")

Applied = tuple[LoraPatch, float]  # a patch and the strength it is applied with


def comfy_seed(key: str) -> int:
    """ComfyUI's per-parameter rounding seed for native ``key`` (``comfy.utils.string_to_seed``)."""
    return zlib.crc32(("diffusion_model." + key).encode("utf-8"))


def total_delta(items: Sequence[Applied], shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                device=None) -> torch.Tensor:
    """Σ strength · delta over ``items`` for a parameter of ``shape`` (one full-size buffer)."""
    out = None
    for patch, strength in items:
        if strength == 0.0:
            continue
        if out is None:
            out = patch.delta(shape, dtype, device)
            if strength != 1.0:
                out.mul_(strength)
        else:
            out.add_(patch.delta(shape, dtype, device), alpha=strength)
    return out if out is not None else torch.zeros(shape, dtype=dtype, device=device)


def _finite_or_raise(t: torch.Tensor, key: str, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise WanquantError(f"{what} is not finite after adding the LoRA (strength too large?)", layer=key,
                            found=f"{int((~torch.isfinite(t)).sum())} NaN/Inf values")


def _norm(x: torch.Tensor) -> float:
    """L2 norm accumulated in float64 in chunks: fp32 ``norm()`` overflows to inf for large but finite
    weights (and turns the report into NaN), and a whole-layer fp64 copy would double peak memory."""
    acc = 0.0
    for chunk in x.reshape(-1).split(1 << 22):
        acc += float(torch.linalg.vector_norm(chunk, dtype=torch.float64)) ** 2
    return math.sqrt(acc)


def merge_quantized(fmt_name: str, tensors: dict[str, torch.Tensor], conf: dict, delta: torch.Tensor, *,
                    key: str, stochastic: bool = True) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor]:
    """Dequantize one layer, add ``delta``, requantize with a fresh scale.

    Returns (new canonical tensors, new comfy_quant conf, the fp32 merged weight before rounding)."""
    fmt = get_format(fmt_name)
    w = fmt.dequantize(tensors, torch.float32, conf)
    if tuple(w.shape) != tuple(delta.shape):
        raise WanquantError("LoRA delta does not fit the layer", layer=key, expected=str(tuple(w.shape)),
                            found=str(tuple(delta.shape)))
    merged = w.add_(delta.to(w.device, torch.float32))
    _finite_or_raise(merged, key, "merged weight")
    gen = torch.Generator(device=merged.device).manual_seed(comfy_seed(key))
    new, new_conf = fmt.quantize(merged, generator=gen, stochastic=stochastic, conf=conf)
    return new, {**conf, **new_conf}, merged


def merge_plain(t: torch.Tensor, delta: torch.Tensor, *, key: str) -> torch.Tensor:
    """A high-precision parameter plus its delta, added in fp32 and rounded once to its dtype."""
    out = t.to(torch.float32) + delta.to(t.device, torch.float32).reshape(t.shape)
    _finite_or_raise(out, key, "merged parameter")
    return out.to(t.dtype)


class LoraWeightFunction:
    """``W ↦ W + Σ strength·scale·up@down (+ diffs)`` on an already dequantized weight.

    ComfyUI runs a layer's ``weight_function`` list after it has cast (and dequantized) the weight
    for a forward, so this is the "on the fly" mode: the quantized weight stays untouched and the
    LoRA is exact up to the compute dtype. The low-rank factors are kept, never the full delta;
    ``move_to`` lets ComfyUI move them to the compute device once (its contract returns bytes)."""

    def __init__(self, key: str, items: Sequence[Applied]):
        self.key = key
        self.factors: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.diffs: list[tuple[torch.Tensor, float]] = []
        for patch, strength in items:
            c = float(strength) * patch.scale
            if c == 0.0:
                continue
            if patch.kind == "lora":
                self.factors.append((patch.up.reshape(patch.up.shape[0], -1),
                                     patch.down.reshape(patch.down.shape[0], -1), c))
            else:
                self.diffs.append((patch.diff, c))

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        dt, dev = weight.dtype, weight.device
        out = weight
        if self.factors and out.ndim == 2:
            for up, down, c in self.factors:
                out = torch.addmm(out, up.to(dev, dt) * c, down.to(dev, dt))
        else:
            for up, down, c in self.factors:
                out = out + ((up.to(dev, dt) * c) @ down.to(dev, dt)).reshape(weight.shape)
        for d, c in self.diffs:
            out = out + d.to(dev, dt).reshape(weight.shape) * c
        return out

    def move_to(self, device=None) -> int:
        if device is None:
            return 0
        moved = 0
        self.factors = [(u.to(device), d.to(device), c) for u, d, c in self.factors]
        self.diffs = [(d.to(device), c) for d, c in self.diffs]
        for u, d, _ in self.factors:
            moved += u.nbytes + d.nbytes
        for d, _ in self.diffs:
            moved += d.nbytes
        return moved


def group_patches(matches: Iterable[LoraMatch]) -> dict[str, list[Applied]]:
    """target key → [(patch, strength)] over several matched LoRAs (applied together)."""
    out: dict[str, list[Applied]] = {}
    for m in matches:
        for p in m.patches:
            out.setdefault(p.target, []).append((p, m.strength))
    return out


# ------------------------------------------------------------------------------ canonical models

def canonical_shapes(model: CanonicalModel) -> dict[str, tuple[int, ...]]:
    """native parameter key → logical shape (quantized weights report their [N, K], not storage)."""
    shapes: dict[str, tuple[int, ...]] = {}
    quant = {n: l for n, l in model.layers.items() if l.quantized}
    for k, e in model.entries.items():
        if e.layer in quant and k.rsplit(".", 1)[-1] in QUANT_SIDE_SUFFIXES and k.rsplit(".", 1)[0] == e.layer:
            continue
        shapes[k] = tuple(e.shape)
    for name, layer in quant.items():
        we = model.entries[f"{name}.weight"]
        probe = {"weight": torch.empty(we.shape, dtype=we.dtype, device="meta")}
        shapes[f"{name}.weight"] = (comfy_algos.logical_shape(layer) if comfy_algos.kept_as_is(layer)
                                    else tuple(get_format(layer.format).orig_shape(probe, layer.conf)))
    return shapes


@dataclass
class MergeStats:
    """Per merged quantized layer: how much the LoRA moved it and what requantizing added."""

    delta_rel: dict[str, float] = field(default_factory=dict)  # ‖ΔW‖ / ‖W‖
    requant_rel: dict[str, float] = field(default_factory=dict)  # ‖deq(new) − (W+ΔW)‖ / ‖W+ΔW‖
    reencoded: dict[str, str] = field(default_factory=dict)  # FP4 group-32 layer → format written
    plain: int = 0
    rounding: str = "stochastic"  # or "nearest" (merge-lora --nearest)

    def per_layer(self) -> dict[str, dict[str, float]]:
        """Every merged quantized layer's numbers (``merge-lora --error-report``), worst first."""
        order = sorted(self.requant_rel, key=lambda n: -self.requant_rel[n])
        return {n: {"requant_rel": self.requant_rel[n], "delta_rel": self.delta_rel.get(n, 0.0),
                    **({"written_as": self.reencoded[n]} if n in self.reencoded else {})} for n in order}

    def lines(self) -> list[str]:
        out = []
        if self.delta_rel:
            r = [self.requant_rel[n] for n in self.delta_rel]
            d = list(self.delta_rel.values())
            out.append(f"merged {len(r)} quantized layers: LoRA change ‖ΔW‖/‖W‖ mean {sum(d) / len(d):.2e}; "
                       f"requantization (fresh scale, {self.rounding} rounding) added relative error mean "
                       f"{sum(r) / len(r):.2e}, max {max(r):.2e}")
            worst = sorted(self.delta_rel, key=lambda n: -self.requant_rel[n])[:5]
            out.append("  largest added error per layer: "
                       + ", ".join(f"{n} {self.requant_rel[n]:.3e}" for n in worst))
        if self.reencoded:
            tos = sorted(set(self.reencoded.values()))
            out.append(f"{len(self.reencoded)} FP4 group-32 layers written as {', '.join(tos)} "
                       f"(stock ComfyUI cannot load FP4 group-32)")
        if self.plain:
            out.append(f"merged {self.plain} high-precision parameters (rounded once to their dtype)")
        return out


FP4_TARGETS = ("float8_e4m3fn", "nvfp4", "bf16")


def plan_merge(model: CanonicalModel, grouped: dict[str, list[Applied]], *, stochastic: bool = True,
               stats: MergeStats | None = None, measure: bool = True, fp4_to: str = "float8_e4m3fn") -> list[Entry]:
    """Output entries in order: patched layers replaced by lazily merged ones (one layer in memory).

    FP4 group-32 layers, which stock ComfyUI cannot load, are written in ``fp4_to`` (as ``convert``
    does): a patched one is merged and encoded there in one rounding, an unpatched one is re-encoded
    with round-to-nearest."""
    if fp4_to not in FP4_TARGETS:
        raise WanquantError("unknown target for FP4 group-32 layers", expected=" / ".join(FP4_TARGETS), found=fp4_to)
    stats = stats if stats is not None else MergeStats()
    shapes = canonical_shapes(model)
    rewrite = {n: l for n, l in model.layers.items()
               if l.quantized and (f"{n}.weight" in grouped or l.format == "fp4_g32")}
    for layer in rewrite.values():
        if comfy_algos.layer_native(layer):  # decoding it here would drop e.g. its ConvRot rotation
            raise comfy_algos.no_decoder_error(layer, "a LoRA cannot be merged into this layer")
    out: list[Entry] = []
    emitted: set[str] = set()
    for key, e in model.entries.items():
        layer = rewrite.get(e.layer) if e.layer else None
        suffix = key[len(e.layer) + 1:] if layer is not None and key.startswith(e.layer + ".") else None
        if layer is not None and suffix in ("weight", "weight_scale", "weight_scale_2", "comfy_quant"):
            if layer.name not in emitted:
                target = fp4_to if layer.format == "fp4_g32" else layer.format
                out.extend(_layer_entries(model, layer, grouped.get(f"{layer.name}.weight", []),
                                          shapes[f"{layer.name}.weight"], target, stochastic, stats, measure))
                emitted.add(layer.name)
            continue
        if key in grouped:
            out.append(Entry(key, e.shape, e.dtype, _plain_loader(e, grouped[key], stats), e.layer))
        else:
            out.append(e)
    return out


def _plain_loader(e: Entry, items: list[Applied], stats: MergeStats) -> Callable[[], torch.Tensor]:
    def load():
        t = e.load()
        stats.plain += 1
        return merge_plain(t, total_delta(items, tuple(t.shape)), key=e.key)
    return load


def _same_grid_conf(model: CanonicalModel, layer) -> dict:
    """The conf that requantizes ``layer`` onto its own scale grid: an int8_tensorwise file may hold
    one scale per tensor or per row under the same comfy_quant, and the output's header is planned
    from the source's shapes, so a per-tensor layer must stay per tensor."""
    se = model.entries.get(f"{layer.name}.weight_scale")
    if layer.format not in GRID_FORMATS or se is None:
        return layer.conf
    return get_format(layer.format).requant_conf(layer.conf, math.prod(se.shape))


def _layer_entries(model: CanonicalModel, layer, items: list[Applied], shape: tuple[int, ...], target: str,
                   stochastic: bool, stats: MergeStats, measure: bool) -> list[Entry]:
    """The entries of one rewritten quantized layer, all fed from one merge done on first use."""
    name = layer.name
    same = target == layer.format
    if same:
        kept = [model.entries.get(f"{name}.{s}") for s in ("weight", "weight_scale", "weight_scale_2", "comfy_quant")]
        planned = [(e.key[len(name) + 1:], e.shape, e.dtype) for e in kept if e is not None]
    elif target == "bf16":
        planned = [("weight", shape, torch.bfloat16)]
    else:
        probe, conf = get_format(target).quantize(torch.zeros(shape))  # shapes and dtypes only
        probe["comfy_quant"] = comfy_quant_tensor(conf)
        planned = [(s, tuple(t.shape), t.dtype) for s, t in probe.items()]
    state: dict = {"cache": {}, "pending": set()}

    def produce() -> dict[str, torch.Tensor]:
        if state["cache"]:
            return state["cache"]
        src = get_format(layer.format)
        tensors = {s: model.entries[f"{name}.{s}"].load() for s in ("weight", "weight_scale", "weight_scale_2")
                   if f"{name}.{s}" in model.entries}
        key = f"{name}.weight"
        w = src.dequantize(tensors, torch.float32, layer.conf)
        del tensors
        patched = bool(items)
        if patched:  # keep only norms of the inputs: one layer-sized fp32 buffer less at the peak
            w_norm = _norm(w) if measure else 0.0
            delta = total_delta(items, shape)
            d_norm = _norm(delta) if measure else 0.0
            merged = w.add_(delta)
            del delta
        else:
            merged = w
        _finite_or_raise(merged, key, "merged weight")
        if target == "bf16":
            new = {"weight": merged.to(torch.bfloat16)}
            got = new["weight"].float() if measure else None
        else:
            fmt = get_format(target)
            gen = torch.Generator(device=merged.device).manual_seed(comfy_seed(key))
            new, conf = fmt.quantize(merged, generator=gen, stochastic=stochastic and patched,
                                     conf=_same_grid_conf(model, layer) if same else None)
            if same:
                new["comfy_quant"] = comfy_quant_tensor({**layer.conf, **conf})
                conf = {**layer.conf, **conf}
            else:
                new["comfy_quant"] = comfy_quant_tensor(conf)
            got = fmt.dequantize(new, torch.float32, conf) if measure else None
        if measure:
            ref_norm = max(_norm(merged), 1e-30)
            if patched:
                stats.delta_rel[name] = d_norm / max(w_norm, 1e-30)
            stats.requant_rel[name] = _norm(got.sub_(merged)) / ref_norm
            del got
            if not math.isfinite(stats.requant_rel[name]):
                raise WanquantError("requantized layer is not finite (LoRA too strong for this format?)", layer=key,
                                    found=f"relative error {stats.requant_rel[name]}")
            if not same:
                stats.reencoded[name] = target
        state["cache"] = new
        state["pending"] = {s for s, _, _ in planned}
        return new

    def loader(suffix: str, want_shape, want_dtype):
        def load():
            t = produce()[suffix]
            state["pending"].discard(suffix)
            if not state["pending"]:
                state["cache"] = {}  # every piece of this layer is written: free it
            if t.dtype != want_dtype and t.element_size() == torch.empty((), dtype=want_dtype).element_size():
                t = t.view(want_dtype)  # e.g. E8M0/fp8 scales kept as uint8 in canonical form
            if tuple(t.shape) != tuple(want_shape) and t.numel() == math.prod(want_shape):
                t = t.reshape(want_shape)
            return t
        return load

    return [Entry(f"{name}.{s}", tuple(shp), dt, loader(s, shp, dt), name) for s, shp, dt in planned]


def _refuse_gguf(model: CanonicalModel, grouped: dict[str, list[Applied]], model_path) -> None:
    """GGUF layers can be read but not written: refused before anything is written (naming a
    LoRA-patched GGUF layer when there is one), with the two ways that do work."""
    gguf = [n for n, l in model.layers.items() if l.quantized and is_gguf(l.format)]
    if not gguf:
        return
    name = next((n for n in gguf if f"{n}.weight" in grouped), gguf[0])
    raise WanquantError("merge-lora cannot write GGUF layers (wanquant reads GGUF, it does not re-quantize it)",
                        file=str(model_path), layer=name,
                        expected="convert the model first (wanquant convert MODEL OUT.safetensors --to "
                                 "float8_e4m3fn), then merge into OUT; or apply the LoRA on the fly in ComfyUI "
                                 "(Apply LoRA (quantized Wan), mode 'on the fly')",
                        found=f"{model.layers[name].format} ({len(gguf)} GGUF layers)")


@dataclass
class MergeResult:
    dst: str
    tensors: int
    bytes_written: int
    matches: list[LoraMatch]
    stats: MergeStats
    text: list[str] = field(default_factory=list)  # lines(), rendered before DST was replaced

    def lines(self) -> list[str]:
        out = [m.text() for m in self.matches]
        out += self.stats.lines()
        out.append(f"wrote {self.dst}: {self.tensors} tensors, {self.bytes_written / 2**20:.1f} MiB of tensor data")
        return out


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``path[:strength]``; a trailing ``:number`` is the strength (paths with ':' elsewhere still work).
    ``lora.safetensors:abc`` (an existing file and a tail that is not a number) is a bad strength,
    not a missing file."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            if os.path.exists(head) and not os.path.exists(arg):
                raise WanquantError("LoRA strength is not a number", file=head, expected="LORA[:STRENGTH], "
                                    "e.g. lora.safetensors:0.8", found=repr(tail)) from None
    return arg, 1.0


def merge_lora_file(model_path, loras: Sequence[tuple[str, float]], dst, *, stochastic: bool = True,
                    allow_unmatched: bool = True, progress: Callable[[int, int], None] | None = None,
                    nibble_order: str | None = None, fp4_to: str = "float8_e4m3fn") -> MergeResult:
    """``wanquant merge-lora``: read MODEL in canonical form, merge LoRAs, stream a ComfyUI-native file.

    Every LoRA is read and checked against the model before anything is written; the output
    appears (atomically) only when every layer merged cleanly. Memory: the LoRAs plus one layer."""
    check_destination(dst)
    with load_canonical(model_path, nibble_order=nibble_order) as model:
        return _merge(model, model_path, loras, dst, stochastic, allow_unmatched, progress, fp4_to)


def _merge(model: CanonicalModel, model_path, loras, dst, stochastic, allow_unmatched, progress,
           fp4_to) -> MergeResult:
    if model.report.errors:
        raise WanquantError(model.report.errors[0], file=str(model_path))
    example = lora_key_example(model.source.tensors if model.source is not None else model.entries)
    if example:
        raise WanquantError("MODEL is a LoRA, not a model (give the model first, then the LoRAs)",
                            file=str(model_path), layer=example, expected="a model checkpoint", found="LoRA keys")
    shapes = canonical_shapes(model)
    matches = []
    for path, strength in loras:
        lf = read_lora(path)
        m = match_lora(lf, shapes, strength=strength, mode="merge")
        if m.unmatched and not allow_unmatched:
            raise WanquantError(f"{len(m.unmatched)} LoRA keys do not match the model (drop --strict to merge the matching keys anyway)",
                                file=str(path), layer=m.unmatched[0][0], found=m.unmatched[0][1])
        matches.append(m)
    grouped = group_patches(matches)
    _refuse_gguf(model, grouped, model_path)
    stats = MergeStats(rounding="stochastic" if stochastic else "nearest")
    entries = plan_merge(model, grouped, stochastic=stochastic, stats=stats, fp4_to=fp4_to)
    meta = dict(model.metadata)
    meta["format"] = "pt"
    meta["wanquant"] = json.dumps({"source": str(model_path), "variant": model.report.variant,
                                   "merged_loras": [{"path": str(p), "strength": s} for p, s in loras],
                                   "rounding": "stochastic" if stochastic else "nearest"})
    result = MergeResult(str(dst), len(entries), sum(e.nbytes for e in entries), matches, stats)

    def render():  # before DST is replaced: a report that cannot be built leaves DST untouched
        result.text = result.lines()

    write_safetensors(dst, [(e.key, e.shape, e.dtype, e.load) for e in entries], meta, progress,
                      before_commit=render)
    return result
