"""ComfyUI's own ``comfy_quant`` algorithms: which release adds each, what sits beside the weight,
and whether wanquant decodes it itself.

Why a table: ComfyUI keeps adding algorithms to ``comfy/quant_ops.py`` ``QUANT_ALGOS`` (int8 with
a ConvRot rotation, int4 ConvRot, W4A8 with a codebook). A file made for a newer ComfyUI must
either run through that ComfyUI's own layout untouched, or fail with one error that says which
ComfyUI it needs, never be read half right. Versions are the first ComfyUI release whose
``QUANT_ALGOS`` / loader has the name (from the upstream history, commit given); tensor names and
shapes are those ComfyUI's ``_load_quantized_module`` pops and comfy-kitchen's layouts store.

Layers of an algorithm that wanquant has no exact decoder for (``ours`` is None) are kept
untouched in the canonical form: every tensor beside the weight and the ``comfy_quant`` JSON as
the file has them. The ComfyUI bridge hands them to ComfyUI's own layout when the running
ComfyUI knows the algorithm (``nodes/comfy_native.py`` publishes its ``QUANT_ALGOS`` here);
nothing outside ComfyUI dequantizes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import WanquantError


@dataclass(frozen=True)
class ComfyAlgo:
    """One ComfyUI ``comfy_quant`` algorithm (``key`` may carry a variant: ``int8_tensorwise+convrot``)."""

    key: str
    since: str | None  # first ComfyUI release that loads it; None: in no release we know
    added_by: str  # the upstream change (commit / PR) that added it
    tensors: tuple[str, ...]  # required suffixes beside ``.weight``
    optional: tuple[str, ...] = ()
    ours: str | None = None  # wanquant's exact format module for it, if any
    note: str = ""

    @property
    def needs(self) -> str:
        """``needs ComfyUI >= X`` / ``not in any ComfyUI release we know``, for messages."""
        return f"needs ComfyUI >= {self.since}" if self.since else "not in any ComfyUI release we know"


CONVROT = "int8_tensorwise+convrot"
PRE_QUANT = "nvfp4+pre_quant_scale"
#: name -> algorithm. Upstream: Comfy-Org/ComfyUI comfy/quant_ops.py + comfy/ops.py (0.33.0 = 783545f).
ALGOS: dict[str, ComfyAlgo] = {a.key: a for a in (
    ComfyAlgo("float8_e4m3fn", "0.3.68", "8817f8fc (#10498)", ("weight_scale",), ("input_scale",), "float8_e4m3fn"),
    ComfyAlgo("float8_e5m2", "0.8.0", "6da00dd8 (#11635)", ("weight_scale",), ("input_scale",), "float8_e5m2"),
    ComfyAlgo("nvfp4", "0.8.0", "6da00dd8 (#11635)", ("weight_scale", "weight_scale_2"), ("input_scale",), "nvfp4"),
    ComfyAlgo(PRE_QUANT, "0.30.0", "57500fc5 (#15224)", ("weight_scale", "weight_scale_2", "pre_quant_scale"),
              ("input_scale",), None, "ModelOpt AWQ: ComfyUI multiplies the input by pre_quant_scale [in]"),
    ComfyAlgo("mxfp8", "0.18.0", "1c5db739 (#12907)", ("weight_scale",), (), "mxfp8"),
    ComfyAlgo("int8_tensorwise", "0.27.0", "1a510f04 (#14636)", ("weight_scale",), (), "int8_tensorwise",
              "int8 [N, K] + fp32 scale, 0-d or [N, 1]"),
    ComfyAlgo(CONVROT, "0.27.0", "1a510f04 (#14636)", ("weight_scale",), (), None,
              "weight stored rotated (W H, H a regular Hadamard per convrot_groupsize inputs, default 256); "
              "ComfyUI rotates the activations the same way"),
    ComfyAlgo("convrot_w4a4", "0.28.0", "73e84d5e (#14859)", ("weight_scale",), (), None,
              "int4 packed two per int8 [N, K/2] + fp32 row scale [N]; convrot_groupsize, linear_dtype int4/int8"),
    ComfyAlgo("asym_w4a8_int8", "0.31.0", "344b4398 (#15308)", ("weight_s_rel", "weight_s_channel"),
              ("weight_codebook",), None,
              "int4 packed [N, K/2] + fp8 group scale weight_s_rel [N, K/group_size] + fp32 weight_s_channel [N] "
              "(+ 16-entry Lloyd-Max weight_codebook); group_size (16), convrot_groupsize"),
    ComfyAlgo("svdquant_w4a4", None, "Comfy-Org/ComfyUI PR #13580 (open)", ("weight_scale",),
              ("proj_down", "proj_up", "smooth_factor")),
    ComfyAlgo("awq_w4a16", None, "Comfy-Org/ComfyUI PR #13580 (open)", ("weight_scale", "weight_zero")),
)}
#: ComfyUI's MoE expert banks (``MixedPrecisionOps.MoEExperts``, comfy_quant ``num_experts``)
MOE_SINCE = "0.23.0"  # 41812fa0 (#14077)

_RUNNING: dict[str, frozenset] = {"algos": frozenset()}


def publish_running(names) -> None:
    """Called by ``nodes/`` with the running ComfyUI's ``QUANT_ALGOS`` names (feature detection):
    an algorithm newer than this table is then kept untouched for that ComfyUI instead of refused."""
    _RUNNING["algos"] = frozenset(names)


def algo_key(conf: dict, tensors=()) -> str:
    """The table key of a layer's conf and the tensor names beside its weight (int8 with a ConvRot
    rotation and NVFP4 with an AWQ ``pre_quant_scale`` are rows of their own)."""
    fmt = str(conf.get("format"))
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if fmt == "int8_tensorwise" and (conf.get("convrot") or params.get("convrot")):
        return CONVROT
    if fmt == "nvfp4" and "pre_quant_scale" in tensors:
        return PRE_QUANT
    return fmt


def native_only(conf: dict | None, tensors=()) -> bool:
    """Whether a layer is one only ComfyUI's own layout runs (no exact wanquant decoder)."""
    if not conf or "format" not in conf:
        return False
    from ..ops.formats import FORMAT_NAMES

    return algo_key(conf, tensors) not in (*FORMAT_NAMES, "hybrid_mxfp8")


def layer_key(layer) -> str:
    return algo_key(layer.conf, {**layer.sides, **layer.others})


def layer_native(layer) -> bool:
    """``native_only`` for a detected layer (its conf and the tensors beside its weight)."""
    return layer.quantized and native_only(layer.conf, {**layer.sides, **layer.others})


def kept_as_is(layer) -> bool:
    """A layer whose canonical entries are the file's tensors untouched (all ComfyUI-only ones but
    NVFP4 + pre_quant_scale, whose NVFP4 part takes the usual canonical form, the vector beside it)."""
    return layer_native(layer) and layer_key(layer) != PRE_QUANT


def check_pre_quant(layer, file: str):
    """An NVFP4 layer with ModelOpt's ``pre_quant_scale`` [in] (ComfyUI >= 0.30.0 multiplies the input
    by it): checked, named in the spelling; nothing outside ComfyUI's own layout may decode it."""
    pre = layer.others.get("pre_quant_scale")
    if pre is None or layer.format != "nvfp4":
        return layer
    k = int(layer.weight.shape[-1]) * 2
    if len(pre.shape) != 1 or pre.numel != k or pre.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise _bad(layer.name, file, "nvfp4 pre_quant_scale must be one float per input", f"float [{k}]",
                   f"{pre.dtype} {list(pre.shape)} ({pre.key})")
    layer.spelling += f" + pre_quant_scale (ComfyUI's own layout only; {needs_text(PRE_QUANT)})"
    return layer


def needs_text(key: str) -> str:
    """What ComfyUI an algorithm (table key) needs, in words."""
    a = ALGOS.get(key)
    if a is not None and (a.since or key not in _RUNNING["algos"]):
        return a.needs
    if key in _RUNNING["algos"]:
        return "known to the running ComfyUI"
    return "not in any ComfyUI release we know"


def unknown_error(conf: dict, *, file: str | None = None, layer: str | None = None,
                  in_comfyui: bool = False, tensors=()) -> WanquantError:
    """The one error for an algorithm that cannot run here: outside ComfyUI one no release has; in
    ComfyUI (``in_comfyui``) one the running ComfyUI's ``QUANT_ALGOS`` lacks."""
    key = algo_key(conf, tensors)
    a = ALGOS.get(key)
    if in_comfyui:
        where = "the running ComfyUI does not load it: update ComfyUI" if a is not None and a.since else \
            "the running ComfyUI does not load it"
    else:
        where = "no ComfyUI release we know loads it"
    return WanquantError(f"comfy_quant algorithm '{key}' {a.needs if a is not None else needs_text(key)} ({where}; "
                         "wanquant has no exact decoder for it)", file=file, layer=layer,
                         expected=f"ComfyUI >= {a.since}" if a is not None and a.since else "a known comfy_quant format",
                         found=json.dumps(conf)[:200])


def _bad(module, file, what, expected, found) -> WanquantError:
    return WanquantError(what, file=file, layer=module, expected=expected, found=found)


def _check_groupsize(module, file, conf, k, key) -> None:
    g = conf.get("convrot_groupsize", (conf.get("params") or {}).get("convrot_groupsize", 256))
    ok = isinstance(g, int) and g >= 4 and (g & (g - 1)) == 0 and (g.bit_length() - 1) % 2 == 0
    if not ok or k % g:
        raise _bad(module, file, f"{key}: convrot_groupsize must be a power of 4 dividing the input width",
                   f"16, 64, 256, 1024 ... dividing in_features {k}", repr(g))


def classify(module: str, weight, sides: dict, others: dict, conf: dict, file: str):
    """A :class:`detect.Layer` kept untouched for ComfyUI's own layout, after the checks the
    table allows (tensors present, dtypes and shapes where upstream fixes them); a layer that
    cannot be checked (an algorithm this table does not know) is refused unless the running
    ComfyUI knows it."""
    from .detect import Layer

    pool = {**others, **sides}
    key = algo_key(conf)
    if "num_experts" in conf:
        raise _bad(module, file, f"comfy_quant MoE expert bank (ComfyUI >= {MOE_SINCE} MoEExperts); a Wan DiT has "
                   "no expert layers", "a Linear's comfy_quant", json.dumps(conf)[:200])
    a = ALGOS.get(key)
    if key not in _RUNNING["algos"] and (a is None or a.since is None):  # in no release, and not this ComfyUI's
        raise unknown_error(conf, file=file, layer=module)
    if a is None:  # the running ComfyUI knows it; nothing here can check it: everything kept as is
        keep = {r: ref for r, ref in pool.items() if r != "bias"}
    else:
        missing = [t for t in a.tensors if t not in pool]
        if missing:
            raise _bad(module, file, f"incomplete {key} layer", f"{', '.join(module + '.' + t for t in a.tensors)}",
                       f"no {', '.join(missing)} (has {', '.join(sorted(pool)) or 'nothing'})")
        keep = {r: pool[r] for r in (*a.tensors, *a.optional) if r in pool}
        _check_shapes(module, weight, keep, conf, key, file)
    rest = {r: ref for r, ref in pool.items() if r not in keep}
    extra = sorted(r for r in rest if r != "bias")
    if extra:
        raise _bad(module, file, f"unexpected tensor beside a {key} layer",
                   ", ".join(f"{module}.{t}" for t in (*a.tensors, *a.optional, "bias")),
                   ", ".join(pool[r].key for r in extra))
    spelling = f"comfy_quant {key} (ComfyUI's own layout only; {needs_text(key)})"
    return Layer(module, str(conf["format"]), spelling, weight, keep, dict(conf), rest)


def _check_shapes(module, weight, t: dict, conf: dict, key: str, file: str) -> None:
    if weight.dtype != torch.int8 or len(weight.shape) != 2:
        raise _bad(module, file, f"{key} weight must be an int8 matrix", "int8 [out, in] (int4: [out, in/2])",
                   f"{weight.dtype} {list(weight.shape)}")
    n, kw = (int(d) for d in weight.shape)
    if key == CONVROT:
        ws = t["weight_scale"]
        if tuple(ws.shape) not in ((n, 1), (n,)) or ws.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise _bad(module, file, "int8 ConvRot scale must be per output row", f"float [{n}, 1]",
                       f"{ws.dtype} {list(ws.shape)}")
        _check_groupsize(module, file, conf, kw, key)
    elif key == "convrot_w4a4":
        ws = t["weight_scale"]
        if ws.numel != n:
            raise _bad(module, file, "convrot_w4a4 scale must be one per output row", f"[{n}]", f"{list(ws.shape)}")
        ld = conf.get("linear_dtype", (conf.get("params") or {}).get("linear_dtype", "int4"))
        if ld not in ("int4", "int8"):
            raise _bad(module, file, "convrot_w4a4 linear_dtype must be int4 or int8", "int4 | int8", repr(ld))
        _check_groupsize(module, file, conf, kw * 2, key)
    elif key == "asym_w4a8_int8":
        g = conf.get("group_size", (conf.get("params") or {}).get("group_size", 16))
        k = kw * 2
        rel, ch = t["weight_s_rel"], t["weight_s_channel"]
        if not isinstance(g, int) or g <= 0 or k % g or tuple(rel.shape) != (n, k // g):
            raise _bad(module, file, "asym_w4a8_int8 group scales do not fit the weight",
                       f"weight_s_rel [{n}, {k}/group_size] with group_size {g!r} dividing {k}", f"{list(rel.shape)}")
        if ch.numel != n:
            raise _bad(module, file, "asym_w4a8_int8 weight_s_channel must be one per output row", f"[{n}]",
                       f"{list(ch.shape)}")
        cb = t.get("weight_codebook")
        if cb is not None and cb.numel != 16:
            raise _bad(module, file, "asym_w4a8_int8 codebook must have 16 levels", "[16]", f"{list(cb.shape)}")
        _check_groupsize(module, file, conf, k, key)


def logical_shape(layer) -> tuple[int, int]:
    """[out, in] of an untouched layer (the int4 algorithms pack two values per int8)."""
    n, k = (int(d) for d in layer.weight.shape[:2])
    return (n, k * 2) if layer_key(layer) in ("convrot_w4a4", "asym_w4a8_int8") else (n, k)


def entries(layer, entry_cls) -> list:
    """Canonical entries of an untouched layer: the weight, each tensor beside it and the
    comfy_quant JSON, exactly as the file has them (no retyping: ComfyUI reads them itself)."""
    from ..ops.formats import comfy_quant_tensor

    n, w = layer.name, layer.weight
    out = [entry_cls(f"{n}.weight", tuple(w.shape), w.dtype, w.loader, n)]
    out += [entry_cls(f"{n}.{r}", tuple(ref.shape), ref.dtype, ref.loader, n) for r, ref in layer.sides.items()]
    conf = dict(layer.conf)
    out.append(entry_cls(f"{n}.comfy_quant", (len(json.dumps(conf).encode()),), torch.uint8,
                         lambda conf=conf: comfy_quant_tensor(conf), n))
    return out


def no_decoder_error(layer, why: str) -> WanquantError:
    """A place that would need this layer's weights decoded (outside ComfyUI's own layout)."""
    return WanquantError(f"{why}: comfy_quant {layer_key(layer)} runs only in ComfyUI's own layout "
                         f"({needs_text(layer_key(layer))}); wanquant has no exact decoder for it", layer=layer.name,
                         expected="a layer ComfyUI runs as a Linear", found=layer.format)


def report_notes(layers: dict) -> list[str]:
    """One line per algorithm kept for ComfyUI's own layout (``inspect`` and the loader's report)."""
    counts: dict[str, int] = {}
    for layer in layers.values():
        if layer_native(layer):
            k = layer_key(layer)
            counts[k] = counts.get(k, 0) + 1
    return [f"{n} layers use ComfyUI's comfy_quant {k}: passed through untouched, runs only in ComfyUI's own "
            f"layout ({needs_text(k)})"
            for k, n in sorted(counts.items())]


def version_table() -> str:
    """The README table: algorithm, first ComfyUI, tensors beside the weight, wanquant's own decoder."""
    rows = ["| comfy_quant algorithm | first ComfyUI | tensors beside `.weight` | wanquant decodes it itself |",
            "| --- | --- | --- | --- |"]
    for a in ALGOS.values():
        tensors = ", ".join(f"`{t}`" for t in a.tensors) + "".join(f", (`{t}`)" for t in a.optional)
        rows.append(f"| `{a.key}` | {a.since or 'none (' + a.added_by + ')'} | {tensors} | "
                    f"{'yes (`' + a.ours + '`)' if a.ours else 'no: ComfyUI' + chr(39) + 's own layout only'} |")
    rows.append(f"| MoE expert banks (`num_experts`) | {MOE_SINCE} | as the format | no: Wan has no expert layers |")
    return "\n".join(rows)
