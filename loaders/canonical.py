"""The one canonical form: native Wan keys, ComfyUI's per-layer quantized representation.

``load_canonical(path)`` runs container → prefix strip → key map → per-layer detection and
returns a :class:`CanonicalModel`: an ordered map of key → :class:`Entry` (shape, dtype and a
loader; nothing is read until asked) plus a :class:`Report`. The CLI writes it, the ComfyUI bridge
hands it to ComfyUI, the LoRA code reads from it.

fp8 payloads are passed through bit for bit; scales are only re-typed to fp32 scalars (exact for
bf16/fp16 sources); FP4 group-32 nibbles are normalised to high-nibble-first (a lossless swap; the
order is decided in :mod:`.nibble_order`); row-major NVFP4 block scales are re-tiled to ComfyUI's
layout (:mod:`.nvfp4_layout`); quantized layers ComfyUI cannot run quantized are dequantized
exactly (:mod:`.comfy_linear`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import WanquantError
from ..ops.formats import comfy_quant_tensor, swap_nibbles, to_blocked
from ..ops.formats.gguf import is_gguf
from . import comfy_algos, keymap
from .comfy_linear import runs_quantized
from .containers import Source, TensorReader, TensorRef, open_source
from .detect import MARKER_KEY, Detection, Layer, _header_quant_layers, detect_layers
from .family import Family, recognise
from .grid_detect import GRID_FORMATS
from .grid_detect import canonical_entries as grid_entries
from .nibble_order import resolve as resolve_nibble_order
from .nvfp4_layout import ROW_MAJOR, UNTAGGED_NVFP4
from .nvfp4_layout import resolve as resolve_scale_layout

log = logging.getLogger(__name__)


@dataclass
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor] = field(repr=False)
    layer: str | None = None  # owning quantized/plain module, for overlay and reports
    # An fp4_g32 or nvfp4 weight stored low-nibble-first: ``load`` swaps it into the canonical order (a
    # fresh copy); ``unswapped`` hands out the file's own bytes, for a consumer that decodes that
    # order in place (the ComfyUI loader: pages stay file-backed instead of a private copy).
    unswapped: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Report:
    """Everything ``inspect`` prints and the loader node shows."""

    path: str
    container: str
    key_style: str = "native"
    prefix: str = ""
    family: str = "wan"
    variant: str = ""
    formats: Counter = field(default_factory=Counter)  # format → number of weight-bearing layers
    format_bytes: Counter = field(default_factory=Counter)
    spellings: Counter = field(default_factory=Counter)
    scale_dtypes: Counter = field(default_factory=Counter)
    extras: dict[str, list[str]] = field(default_factory=dict)
    unrecognised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    needs_base: str | None = None
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    remapped: int = 0
    nibble_order: str | None = None
    dequantized: list[str] = field(default_factory=list)  # quantized non-Linear layers, now fp32
    notes: list[str] = field(default_factory=list)
    family_notes: list[str] = field(default_factory=list)  # those of ``notes`` the family added (overlay redoes it)
    total_bytes: int = 0
    base: "Report | None" = None

    def verdict(self) -> str:
        if self.errors:
            return f"NOT LOADABLE: {len(self.errors)} layer(s) are broken; first: {self.errors[0]}"
        if self.family != "wan":
            return "formats understood; not a Wan DiT, so it converts but does not run as a Wan model in ComfyUI"
        if self.missing:
            return (f"partial checkpoint ({self.variant}): needs its base model ({self.needs_base}) overlaid "
                    f"underneath to run")
        q = {f: n for f, n in self.formats.items() if f not in ("bf16", "fp16", "fp32")}
        qtxt = ", ".join(f"{n} {f}" for f, n in sorted(q.items())) or "no quantized layers"
        return f"loadable: {self.variant}, {self.key_style} keys, {qtxt}"

    def to_json(self) -> dict:
        return {
            "path": self.path, "container": self.container, "key_style": self.key_style, "prefix": self.prefix,
            "family": self.family, "variant": self.variant, "formats": dict(self.formats),
            "format_bytes": dict(self.format_bytes), "spellings": dict(self.spellings),
            "scale_dtypes": dict(self.scale_dtypes), "extras": {k: len(v) for k, v in self.extras.items()},
            "extra_modules": self.extras, "unrecognised": self.unrecognised, "missing": self.missing,
            "needs_base": self.needs_base, "warnings": self.warnings, "errors": self.errors,
            "remapped_keys": self.remapped, "nibble_order": self.nibble_order,
            "dequantized": self.dequantized, "notes": self.notes,
            "total_bytes": self.total_bytes, "verdict": self.verdict(),
            **({"base": self.base.to_json()} if self.base else {}),
        }


@dataclass
class CanonicalModel:
    entries: dict[str, Entry]
    layers: dict[str, Layer]  # canonical module name → detected layer
    report: Report
    source: Source | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # e.g. {"config": ...} for ComfyUI
    base_sources: list[Source] = field(default_factory=list)  # an overlay's base file(s)

    def sources(self) -> list[Source]:
        return [s for s in (self.source, *self.base_sources) if s is not None]

    def close(self) -> None:
        """Close every file this model reads from (its own and an overlaid base's)."""
        for src in self.sources():
            src.close()

    def __enter__(self) -> "CanonicalModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    def state_dict(self, progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
        """Materialise every entry (quantized stays quantized: this is the size on disk)."""
        out = {}
        n = len(self.entries)
        for i, (k, e) in enumerate(self.entries.items()):
            out[k] = e.load()
            if progress:
                progress(i + 1, n)
        return out


class LazyTensors(Mapping):
    """Tensors kept as references to their file and read only when asked.

    For modules no node uses yet (Vista4D's camera encoder, WorldStereo's controlnet): they
    cost nothing until read. Each read closes the sources again, so holding this map keeps no
    descriptor open; the tensor returned stays valid on its own."""

    def __init__(self, entries: dict[str, Entry], sources: list[Source]):
        self._entries = dict(entries)
        self._sources = list(sources)

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        try:
            return entry.load()
        finally:
            for src in self._sources:
                src.close()

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self._entries.items()}


PART_MARK = "@part"


def _map_keys(keys, style: str, file: str) -> tuple[dict[str, str], list[str]]:
    """source key (prefix stripped) → canonical key; plus unrecognised keys kept as they are.

    Animate's diffusers ``face_adapter.N.to_k`` / ``to_v`` both become rows of the native fused
    ``linear1_kv``: they are mapped to temporary ``<module>@partI`` modules here and fused after
    per-layer detection (``_fuse_parts``), so each part's format is known before fusing."""
    from .animate_keys import layout_change
    from .detect import _split

    mapping: dict[str, str] = {}
    unrecognised: list[str] = []
    for k in keys:
        if PART_MARK in k:  # would be taken for one half of a fused k/v layer below
            raise WanquantError(f"key contains '{PART_MARK}', which no checkpoint format uses", file=file, layer=k,
                                expected="Wan parameter names")
        if k == MARKER_KEY or style == "native" or keymap.is_extra(k):
            mapping[k] = k
            continue
        new, ok = keymap.map_diffusers_key(k)
        if not ok:
            unrecognised.append(k)
        change = layout_change(k) if ok else None
        if change is not None and change.kind == "concat_rows":
            module, _ = _split(new)
            new = f"{module}{PART_MARK}{change.part}{new[len(module):]}"
        mapping[k] = new
    seen: dict[str, str] = {}
    for old, new in mapping.items():
        if new in seen:
            raise WanquantError("two source keys map to the same native key", file=file, layer=new,
                                expected="one spelling per tensor", found=f"{seen[new]} and {old}")
        seen[new] = old
    return mapping, unrecognised


def load_canonical(path, *, nibble_order: str | None = None, nvfp4_scale_layout: str | None = None,
                   collect_errors: bool = False, tensor_reader: TensorReader | None = None) -> CanonicalModel:
    """Open any supported checkpoint and describe it in canonical form (lazily).

    The result owns the open file(s): use it as a context manager or call ``close()``.
    ``tensor_reader``: see ``containers.open_source`` (the ComfyUI loader maps the file)."""
    src = open_source(path, tensor_reader=tensor_reader)
    try:
        return canonical_from_source(src, nibble_order=nibble_order, nvfp4_scale_layout=nvfp4_scale_layout,
                                     collect_errors=collect_errors)
    except BaseException:
        src.close()
        raise


def load_with_base(path, base=None, *, check: Callable[[CanonicalModel, str, str], None] | None = None,
                   **kwargs) -> CanonicalModel:
    """``load_canonical(path)``, overlaid on ``base`` when given; one model that owns (and on
    failure closes) every file it opened. ``check(model, path, role)`` runs on each file's model
    before the overlay (role "model" or "--base") and may raise."""
    def opened(p, role):
        m = load_canonical(p, **kwargs)
        try:
            if check is not None:
                check(m, p, role)
        except BaseException:
            m.close()
            raise
        return m

    model = opened(path, "model")
    if not base:
        return model
    try:
        base_model = opened(base, "--base")
    except BaseException:
        model.close()
        raise
    try:
        return overlay(model, base_model)
    except BaseException:
        model.close()
        base_model.close()
        raise


def canonical_from_source(src: Source, *, nibble_order: str | None = None, nvfp4_scale_layout: str | None = None,
                          collect_errors: bool = False) -> CanonicalModel:
    file = src.path
    report = Report(path=file, container=src.container)
    raw_keys = list(src.tensors)
    prefix = keymap.detect_prefix([k for k in raw_keys if k != MARKER_KEY])
    report.prefix = prefix
    stripped = {keymap.strip_prefix(k, prefix): ref for k, ref in src.tensors.items()}
    if len(stripped) != len(src.tensors):
        raise WanquantError("keys collide after removing the prefix", file=file,
                            expected=f"unique keys after stripping '{prefix}'")
    style, _, _ = keymap.detect_style(stripped)
    report.key_style = style
    mapping, unrecognised = _map_keys(stripped, style, file)
    report.unrecognised = unrecognised
    report.remapped = sum(1 for o, n in mapping.items() if o != n)
    if prefix:
        report.notes.append(f"prefix '{prefix}' removed")
    tensors = {mapping[k]: _reshaped(k, ref) if style == "diffusers" else ref for k, ref in stripped.items()}

    header_conf = {}
    for layer, conf in _header_quant_layers(src.metadata, file).items():
        lk = keymap.strip_prefix(layer, prefix)
        lk = mapping.get(lk + ".weight", lk + ".weight")[: -len(".weight")]
        header_conf[lk] = conf

    det = detect_layers(tensors, file, header_conf=header_conf, collect_errors=collect_errors)
    if any(l.format == "fp4_g32" and l.nibble_order is None for l in det.layers.values()):
        order, order_src, order_warnings = resolve_nibble_order(det.layers, nibble_order, src.side_files)
        report.nibble_order = f"{order}; decided by: {order_src}"
        report.warnings += order_warnings
    if any(l.format == "nvfp4" and l.spelling == UNTAGGED_NVFP4 for l in det.layers.values()):
        try:
            layout, why = resolve_scale_layout(det.layers, nvfp4_scale_layout)
            report.notes.append(f"NVFP4 without comfy_quant: block scales read as {layout} ({why})")
        except WanquantError as err:
            if not collect_errors:
                raise
            det.errors.append(err)
    _fuse_parts(det, file, report)
    _dequantize_non_linear(det, report)
    report.notes.extend(comfy_algos.report_notes(det.layers))
    report.errors = [str(e) for e in det.errors]
    if det.marker is not None:
        kind = {0: "input scales present", 2: "fp8 matmul disabled by the producer"}.get(det.marker.numel, "")
        report.notes.append(f"legacy 'scaled_fp8' marker found{': ' + kind if kind else ''} (dropped)")
    quant = (src.index_metadata or {}).get("quantization")
    if quant:
        report.notes.append(f"index metadata: quantization = {quant}")

    entries = _entries(det, report)
    if style == "diffusers":
        _add_animate_buffers(entries, report)
    fam = recognise(_family_shapes(entries, det.layers), src.metadata)
    _fill_family(report, fam)
    if unrecognised:
        report.warnings.append(f"{len(unrecognised)} keys have no native Wan name and are kept as they are "
                               f"(first: {unrecognised[0]})")
    report.total_bytes = sum(e.nbytes for e in entries.values())
    # ComfyUI's own loader hands the file's metadata to model_detection, whose "config" entry
    # overrides the shape-detected model (the only way Wan-Animate-2 is told from I2V-14B):
    # pass that entry on, nothing else (quantization metadata is already resolved here).
    config = {"config": src.metadata["config"]} if "config" in (src.metadata or {}) else {}
    return CanonicalModel(entries, det.layers, report, src, metadata=config)


def _add_animate_buffers(entries: dict[str, Entry], report: Report) -> None:
    """Animate from diffusers keys lacks the motion encoder's persistent blur-kernel buffers
    (non-persistent in diffusers); native files carry them, so the canonical form adds them with
    the value ComfyUI's ``Blur`` module registers (fp32: ``ConvLayer`` builds ``Blur`` without a dtype)."""
    from .animate_keys import native_only_buffers

    if not any(k.startswith("motion_encoder.enc.net_app.") for k in entries):
        return
    added = [k for k in native_only_buffers() if k not in entries]
    for k in added:
        value = native_only_buffers()[k]
        entries[k] = Entry(k, (len(value), len(value[0])), torch.float32,
                           lambda value=value: torch.tensor(value, dtype=torch.float32), None)
    if added:
        report.notes.append(f"added {len(added)} constant motion-encoder blur kernels (not stored in diffusers files)")


def _reshaped(source_key: str, ref: TensorRef) -> TensorRef:
    """Animate motion-encoder activation biases are [C] in diffusers, [1, C, 1, 1] native."""
    from .animate_keys import layout_change

    change = layout_change(source_key)
    if change is None or change.kind != "unsqueeze_bias":
        return ref
    return TensorRef(ref.key, (1, ref.shape[0], 1, 1), ref.dtype, ref.file, lambda: ref.load().reshape(1, -1, 1, 1))


def _concat_ref(refs: list[TensorRef]) -> TensorRef:
    shape = (sum(r.shape[0] for r in refs), *refs[0].shape[1:])
    return TensorRef("+".join(r.key for r in refs), shape, refs[0].dtype, refs[0].file,
                     lambda: torch.cat([r.load() for r in refs], 0))


def _fuse_parts(det: Detection, file: str, report: Report) -> None:
    """Fuse ``X@part0`` / ``X@part1`` layers into one native layer X (rows of k, then v).

    Same plain dtype, or FP4 group-32 (row-wise scales): concatenated exactly. Anything with one
    scale per tensor (fp8, NVFP4's global scale) cannot share rows exactly, so that layer is
    dequantized to fp32 and the report says so."""
    groups: dict[str, dict[int, Layer]] = {}
    for name in [n for n in det.layers if PART_MARK in n]:
        base, part = name.split(PART_MARK)
        groups.setdefault(base, {})[int(part)] = det.layers.pop(name)
    for base, parts in groups.items():
        ordered = [parts[i] for i in sorted(parts)]
        if len(ordered) != 2 or sorted(parts) != [0, 1]:
            det.errors.append(WanquantError("fused k/v layer is missing one of its parts", file=file, layer=base,
                                            expected="both to_k and to_v", found=f"parts {sorted(parts)}"))
            continue
        fmts = {l.format for l in ordered}
        native = [l for l in ordered if comfy_algos.layer_native(l)]
        if native:  # fusing rows needs the weights decoded
            det.errors.append(comfy_algos.no_decoder_error(native[0], "to_k/to_v must be fused into one layer"))
            continue
        biases = [l.others.get("bias") for l in ordered]
        others = {"bias": _concat_ref(biases)} if all(biases) else {}
        same_order = len({l.nibble_order for l in ordered}) == 1
        if len(fmts) == 1 and same_order and (not ordered[0].quantized or ordered[0].format == "fp4_g32"):
            weight = _concat_ref([l.weight for l in ordered])
            sides = {r: _concat_ref([l.sides[r] for l in ordered]) for r in ordered[0].sides}
            fused = Layer(base, ordered[0].format, ordered[0].spelling + " (k/v fused)", weight, sides,
                          dict(ordered[0].conf), others, ordered[0].nibble_order)
        else:
            weight = _dequant_concat(ordered)
            fused = Layer(base, "fp32", "k/v fused, dequantized to fp32 (per-tensor scales differ)", weight, {}, {}, others)
            report.notes.append(f"{base}: to_k/to_v stored as {'/'.join(sorted(fmts))} with separate scales; "
                                "fused into linear1_kv in fp32")
        det.layers[base] = fused


def _dequantize_non_linear(det: Detection, report: Report) -> None:
    """Quantized layers ComfyUI cannot run quantized (convs, custom linears: see
    :mod:`.comfy_linear`) become fp32 layers holding the producer's exact dequantized values,
    listed in ``report.dequantized``; ComfyUI would otherwise ignore their scales."""
    from ..ops.formats import get_format

    for name, layer in list(det.layers.items()):
        logical = layer.conf.get("orig_shape")  # GGUF: the payload is bytes, the conf holds the shape
        if not layer.quantized or runs_quantized(name, len(logical or layer.weight.shape)):
            continue
        if comfy_algos.layer_native(layer):
            raise comfy_algos.no_decoder_error(layer, "ComfyUI does not run this module as a Linear")
        if logical and len(logical) != 2:
            shape = tuple(int(s) for s in logical)
        else:
            shape = tuple(layer.weight.shape) if len(layer.weight.shape) != 2 else _logical_shape(layer)

        def load(layer=layer, shape=shape):
            ents = {e.key.rsplit(".", 1)[1]: e.load() for e in _layer_entries(layer)}
            ents["weight"] = ents["weight"].reshape(ents["weight"].shape[0], -1)  # convs: [out, in*k...]
            return get_format(layer.format).dequantize(ents, torch.float32, dict(layer.conf)).reshape(shape)

        ref = TensorRef(layer.weight.key, shape, torch.float32, layer.weight.file, load)
        det.layers[name] = Layer(name, "fp32", f"{layer.spelling} -> fp32 (not a Linear in ComfyUI)", ref, {}, {},
                                 layer.others)
        report.dequantized.append(f"{name} ({layer.format})")
    if report.dequantized:
        report.notes.append(f"{len(report.dequantized)} quantized layers ComfyUI only runs unquantized "
                            f"(convolutions, custom linears) dequantized exactly to fp32: "
                            f"{', '.join(report.dequantized[:3])}{' ...' if len(report.dequantized) > 3 else ''}")


def _dequant_concat(layers: list[Layer]) -> TensorRef:
    from ..ops.formats import get_format

    def load():
        rows = []
        for l in layers:
            ents = {e.key.rsplit(".", 1)[1]: e.load() for e in _layer_entries(l)}
            if l.quantized:
                rows.append(get_format(l.format).dequantize(ents, torch.float32, dict(l.conf)))
            else:
                rows.append(ents["weight"].float())
        return torch.cat(rows, 0)

    shapes = [_logical_shape(l) for l in layers]
    w0 = layers[0].weight
    return TensorRef("+".join(l.weight.key for l in layers), (sum(n for n, _ in shapes), shapes[0][1]),
                     torch.float32, w0.file, load)


def _logical_shape(layer: Layer) -> tuple[int, int]:
    """[out, in] of a layer as the model sees it (packed and padded storage undone)."""
    if layer.conf.get("orig_shape"):
        n, k = layer.conf["orig_shape"]
        return int(n), int(k)
    n, k = layer.weight.shape[0], layer.weight.shape[1]
    return (n, k * 2) if layer.format in ("nvfp4", "fp4_g32") else (n, k)


def _fill_family(report: Report, fam: Family) -> None:
    report.family, report.variant = fam.family, fam.variant
    report.extras, report.missing, report.needs_base = fam.extras, fam.missing, fam.needs_base
    report.family_notes = list(fam.notes) + ([f"to run: {fam.needs}"] if fam.needs else [])
    report.notes.extend(report.family_notes)


def _family_shapes(entries: dict[str, Entry], layers: dict[str, Layer]) -> dict[str, tuple[int, ...]]:
    """Shapes as the model sees them, for family recognition: a GGUF weight's entry holds its raw
    block bytes (rows may even be city96's [n/256, 256] reshape), its conf the real shape."""
    shapes = {k: tuple(e.shape) for k, e in entries.items()}
    for name, layer in layers.items():
        orig = layer.conf.get("orig_shape")
        if orig and f"{name}.weight" in shapes:
            shapes[f"{name}.weight"] = tuple(int(d) for d in orig)
    return shapes


def _entries(det: Detection, report: Report) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for key, ref in det.plain.items():
        entries[key] = Entry(key, ref.shape, ref.dtype, ref.loader, None)
    for name, layer in det.layers.items():
        report.formats[layer.format] += 1
        report.spellings[layer.spelling] += 1
        for ref in layer.sides.values():
            report.scale_dtypes[f"{layer.format}: {str(ref.dtype).replace('torch.', '')}"] += 1
        for e in _layer_entries(layer):
            entries[e.key] = e
            report.format_bytes[layer.format] += e.nbytes
        for suffix, ref in layer.others.items():
            entries[f"{name}.{suffix}"] = Entry(f"{name}.{suffix}", ref.shape, ref.dtype, ref.loader, name)
    return entries


def _scalar_fp32(ref: TensorRef) -> Callable[[], torch.Tensor]:
    return lambda: ref.load().reshape(()).to(torch.float32)


def _view(ref: TensorRef, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: ref.load().view(dtype)


def _layer_entries(layer: Layer) -> list[Entry]:
    n = layer.name
    w = layer.weight
    if not layer.quantized:
        return [Entry(f"{n}.weight", w.shape, w.dtype, w.loader, n)]
    if comfy_algos.kept_as_is(layer):  # ComfyUI's own algorithm: every tensor as the file has it
        return comfy_algos.entries(layer, Entry)
    out = []
    conf = dict(layer.conf)
    if layer.format in ("float8_e4m3fn", "float8_e5m2"):
        out.append(Entry(f"{n}.weight", w.shape, w.dtype, w.loader, n))
        ws = layer.sides.get("weight_scale")
        out.append(Entry(f"{n}.weight_scale", (), torch.float32,
                         _scalar_fp32(ws) if ws is not None else (lambda: torch.tensor(1.0)), n))
        inp = layer.sides.get("input_scale")
        if inp is not None:
            if inp.key.endswith(".scale_input") and float(inp.load().float().reshape(())) == 1.0:
                pass  # legacy "no calibration" placeholder; ComfyUI drops it too
            else:
                out.append(Entry(f"{n}.input_scale", (), torch.float32, _scalar_fp32(inp), n))
    elif layer.format == "nvfp4":
        if layer.nibble_order == "low_first":  # LightX2V packs the even element low: swap (lossless)
            out.append(Entry(f"{n}.weight", w.shape, torch.uint8, lambda w=w: swap_nibbles(w.load()), n,
                             unswapped=w.loader))
        else:
            out.append(Entry(f"{n}.weight", w.shape, torch.uint8, w.loader, n))
        ws = layer.sides["weight_scale"]
        if layer.scale_layout == ROW_MAJOR:  # canonical is ComfyUI's blocked layout
            shape = (-(-w.shape[0] // 128) * 128, -(-w.shape[1] * 2 // 16 // 4) * 4)
            out.append(Entry(f"{n}.weight_scale", shape, torch.float8_e4m3fn,
                             lambda ws=ws: to_blocked(ws.load().view(torch.float8_e4m3fn)), n))
        else:
            out.append(Entry(f"{n}.weight_scale", ws.shape, torch.float8_e4m3fn, _view(ws, torch.float8_e4m3fn), n))
        out.append(Entry(f"{n}.weight_scale_2", (), torch.float32, _scalar_fp32(layer.sides["weight_scale_2"]), n))
        if "input_scale" in layer.sides:
            out.append(Entry(f"{n}.input_scale", (), torch.float32, _scalar_fp32(layer.sides["input_scale"]), n))
    elif layer.format == "mxfp8":
        out.append(Entry(f"{n}.weight", w.shape, w.dtype, w.loader, n))
        ws = layer.sides["weight_scale"]
        out.append(Entry(f"{n}.weight_scale", ws.shape, torch.uint8, _view(ws, torch.uint8), n))
    elif is_gguf(layer.format):  # raw blocks as the file holds them (memory-mapped); conf has orig_shape
        out.append(Entry(f"{n}.weight", w.shape, torch.uint8, w.loader, n))
    elif layer.format == "fp4_g32":
        if layer.nibble_order == "high_first":
            out.append(Entry(f"{n}.weight", w.shape, torch.uint8, w.loader, n))
        else:
            out.append(Entry(f"{n}.weight", w.shape, torch.uint8, lambda w=w: swap_nibbles(w.load()), n,
                             unswapped=w.loader))
        ws = layer.sides["weight_scale"]
        out.append(Entry(f"{n}.weight_scale", ws.shape, ws.dtype, ws.loader, n))  # source dtype (bf16): no upcast
    elif layer.format in GRID_FORMATS:
        return grid_entries(layer, Entry)
    else:  # pragma: no cover - detect.py only produces the formats above
        raise WanquantError("no canonical form for format", layer=n, found=layer.format)
    out.append(Entry(f"{n}.comfy_quant", (len(json.dumps(conf).encode()),), torch.uint8,
                     lambda conf=conf: comfy_quant_tensor(conf), n))
    return out


def overlay(finetune: CanonicalModel, base: CanonicalModel) -> CanonicalModel:
    """Put a partial finetune on top of its base: the finetune wins per *layer*.

    A layer replaced by the finetune drops all of the base's tensors for that layer (its scales
    and comfy_quant too), since the two files may store it in different formats.
    """
    replaced_layers = {e.layer for e in finetune.entries.values() if e.layer} | set(finetune.layers)
    entries = {}
    for k, e in base.entries.items():
        if k in finetune.entries or (e.layer and e.layer in replaced_layers):
            continue
        entries[k] = e
    entries.update(finetune.entries)
    layers = {**{k: v for k, v in base.layers.items() if k not in replaced_layers}, **finetune.layers}
    fr = finetune.report
    report = Report(path=fr.path, container=fr.container, key_style=fr.key_style, prefix=fr.prefix)
    for r in (base.report, fr):
        report.warnings += r.warnings
        report.errors += r.errors
        report.unrecognised += r.unrecognised
    report.formats = Counter(l.format for l in layers.values())
    report.spellings = Counter(l.spelling for l in layers.values())
    report.scale_dtypes = base.report.scale_dtypes + fr.scale_dtypes
    report.format_bytes = Counter()
    for e in entries.values():
        if e.layer and e.layer in layers:
            report.format_bytes[layers[e.layer].format] += e.nbytes
    report.nibble_order = fr.nibble_order or base.report.nibble_order
    report.dequantized = [d for d in base.report.dequantized if d.split(" ")[0] in layers] + fr.dequantized
    report.remapped = fr.remapped + base.report.remapped
    report.base = base.report
    n_over = len([k for k in finetune.entries if k in base.entries])
    metadata = finetune.source.metadata if finetune.source else None
    report.notes = [n for n in fr.notes if n not in fr.family_notes] + [f"overlaid on base {base.report.path}: {n_over} base tensors replaced, "
                                     f"{len(replaced_layers)} finetune layers"]
    fam = recognise(_family_shapes(entries, layers), metadata)
    _fill_family(report, fam)
    report.total_bytes = sum(e.nbytes for e in entries.values())
    return CanonicalModel(entries, layers, report, finetune.source, metadata=dict(finetune.metadata),
                          base_sources=[*finetune.base_sources, base.source, *base.base_sources])
