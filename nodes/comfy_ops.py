"""ComfyUI bridge: a custom operations class that runs wanquant's linear paths.

``build_operations(policy_option, compute_dtype, load_device)`` returns ``(ops, plan)``; the
loader passes ``model_options={"custom_operations": ops}`` to
``comfy.sd.load_diffusion_model_state_dict`` and, after loading, calls ``plan.finalize()`` and
shows ``plan.report()``.

Design (COMFYUI.md §3/§10): ``ops`` subclasses the class ``comfy.ops.mixed_precision_ops``
returns, so ComfyUI keeps doing what it does well: ``comfy_quant`` loading into
``QuantizedTensor`` weights, LoRA dequant -> patch -> requant (``convert_weight`` /
``set_weight``), lowvram LoRA (``weight_function``), offloading and dynamic VRAM
(``cast_bias_weight``), ``state_dict`` and device moves. wanquant adds only:

* the per-layer path choice from ``ops.policy`` (ComfyUI computes no disabled set when custom
  operations are given, so the policy is the gate);
* the fp8 path with dynamic per-tensor activation scaling instead of ComfyUI's scale 1.0;
* ``fp4_g32``, which ComfyUI does not know (its loader raises on unknown formats): loaded here
  into a ``QuantizedTensor`` with a wanquant layout, so LoRA and offloading work unchanged. A
  model saved from such layers does not load in vanilla ComfyUI.

NVFP4/MXFP8 on SM >= 10 go through ComfyUI's own forward (kitchen kernels), and so do the
``comfy_quant`` algorithms wanquant has no decoder for (int8 + ConvRot, convrot_w4a4,
asym_w4a8_int8, NVFP4 + pre_quant_scale: ``loaders/comfy_algos.py``), untouched, planned as
``comfy_layout``; ``nodes/comfy_native.py`` refuses those the running ComfyUI does not load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging

import torch

import comfy.model_management
import comfy.ops
from comfy.quant_ops import QuantizedTensor

from ..errors import WanquantError
from ..loaders import comfy_algos
from ..loaders.grid_detect import GRID_FORMATS
from ..ops.formats import (FORMAT_NAMES, FP8_FORMATS, FP8_ROWWISE_FORMATS, comfy_quant_tensor, get_format, parse_comfy_quant,
                           swap_nibbles)
from ..ops.formats.fp4_g32 import check_canonical as check_fp4_canonical
from ..ops.formats.gguf import BLOCKS, dequantize_bytes, is_gguf
from ..ops.linear import linear_dequant, linear_fp8_scaled_mm
from ..ops.linear_grid import linear_fp8_rowwise, linear_int8, requantize_fp8_to_int8
from ..ops.policy import COMFY_LAYOUT, DENSE, DEQUANT, FP8_MATMUL, INT8_MATMUL, KITCHEN_MATMUL, OpsPlan, choose
from ..ops.policy_grid import BLOCK_GRID_FORMATS

from . import comfy_native
from .gguf_layout import GGUF_LAYOUT, GGUFLayout
from .nvfp4_file_layout import COMFY_NVFP4_LAYOUT, NVFP4_FILE_LAYOUT, NVFP4FileOrderLayout

log = logging.getLogger(__name__)

FP4G32_LAYOUT = "WanquantFP4G32Layout"
GRID_LAYOUT = "WanquantScaleGridLayout"

try:  # the layout base classes live in comfy-kitchen, which ComfyUI requires
    from comfy_kitchen.tensor import BaseLayoutParams, QuantizedLayout, register_layout_class
except ImportError:  # pragma: no cover - ComfyUI without kitchen cannot load quantized models at all
    BaseLayoutParams = QuantizedLayout = None
    register_layout_class = None


if QuantizedLayout is not None:
    class FP4G32Layout(QuantizedLayout):
        """E2M1 codes with per-32 group scales (the file's float dtype): weight-only everywhere.

        ``hi_first`` False keeps a low-nibble-first file's bytes as they are (memory-mapped, no
        swapped private copy); decoding reads that order, and everything handed out of the layout
        (state dicts, plain tensors) is the canonical high-nibble-first form."""

        MIN_SM_VERSION = None

        @dataclasses.dataclass(frozen=True)
        class Params(BaseLayoutParams):
            hi_first: bool = True  # byte order of qdata, as loaders.nibble_order decided it

        @classmethod
        def quantize(cls, tensor, scale=None, stochastic_rounding=0, inplace_ops=False, **kwargs):
            """Fresh group scales always (LoRA merges call this with scale="recalculate");
            a non-zero ``stochastic_rounding`` seeds the rounding, as ComfyUI's layouts do."""
            gen = None
            if stochastic_rounding:
                gen = torch.Generator(device=tensor.device)
                gen.manual_seed(int(stochastic_rounding))
            t, _ = get_format("fp4_g32").quantize(tensor, generator=gen, stochastic=bool(stochastic_rounding))
            return t["weight"], cls.Params(scale=t["weight_scale"], orig_dtype=tensor.dtype,
                                           orig_shape=tuple(tensor.shape))

        @classmethod
        def dequantize(cls, qdata, params):
            return get_format("fp4_g32").decode(qdata, params.scale, params.orig_dtype, hi_first=params.hi_first)

        @staticmethod
        def _wq_canonical(qdata, params):
            return qdata if params.hi_first else swap_nibbles(qdata)

        @classmethod
        def get_plain_tensors(cls, qtensor):
            return cls._wq_canonical(qtensor._qdata, qtensor._params), qtensor._params.scale

        @classmethod
        def state_dict_tensors(cls, qdata, params):
            return {"": cls._wq_canonical(qdata, params), "_scale": params.scale}

    register_layout_class(FP4G32_LAYOUT, FP4G32Layout)

    class ScaleGridLayout(QuantizedLayout):
        """Per-row / block fp8 and int8 (``ops.formats._scale_grid``): one layout for all five
        formats, so ComfyUI's LoRA requant, offloading and state dicts work unchanged. ``fmt`` and
        ``block`` say which grid ``scale`` is; a LoRA requant keeps the format (and a per-tensor
        int8 scale stays per tensor)."""

        MIN_SM_VERSION = None

        @dataclasses.dataclass(frozen=True)
        class Params(BaseLayoutParams):
            fmt: str = "int8_tensorwise"
            block: int = 0

        @staticmethod
        def _wq_conf(fmt, block):
            """The layer's comfy_quant (state dicts) and the format's conf (dequant / quantize)."""
            conf = {"format": fmt}
            if block:
                conf["group_size"] = int(block)
            return conf

        @classmethod
        def quantize(cls, tensor, scale=None, stochastic_rounding=0, inplace_ops=False, fmt="int8_tensorwise",
                     block=0, per_tensor=False, **kwargs):
            gen = None
            if stochastic_rounding:
                gen = torch.Generator(device=tensor.device)
                gen.manual_seed(int(stochastic_rounding))
            conf = cls._wq_conf(fmt, block)
            if per_tensor:
                conf["per_tensor"] = True
            t, _ = get_format(fmt).quantize(tensor, generator=gen, stochastic=bool(stochastic_rounding), conf=conf)
            return t["weight"], cls.Params(scale=t["weight_scale"], orig_dtype=tensor.dtype,
                                           orig_shape=tuple(tensor.shape), fmt=fmt, block=block)

        @classmethod
        def requantize_kwargs(cls, qtensor):
            p = qtensor._params
            conf = get_format(p.fmt).requant_conf(cls._wq_conf(p.fmt, p.block), p.scale.numel())
            return {"fmt": p.fmt, "block": p.block, "per_tensor": bool(conf.get("per_tensor"))}

        @classmethod
        def dequantize(cls, qdata, params):
            return get_format(params.fmt).dequantize({"weight": qdata, "weight_scale": params.scale},
                                                     params.orig_dtype, cls._wq_conf(params.fmt, params.block))

        @classmethod
        def get_plain_tensors(cls, qtensor):
            return qtensor._qdata, qtensor._params.scale

        @classmethod
        def state_dict_tensors(cls, qdata, params):
            return {"": qdata, "_scale": params.scale}

    register_layout_class(GRID_LAYOUT, ScaleGridLayout)


def default_compute_dtype(load_device) -> torch.dtype:
    """The compute dtype ComfyUI itself picks for a quantized Wan model on ``load_device``
    (``unet_manual_cast(None, …)``: fp32 on CPU, fp16 first on NVIDIA)."""
    dt = comfy.model_management.unet_manual_cast(None, load_device,
                                                 [torch.float16, torch.bfloat16, torch.float32])
    return dt if dt is not None else torch.float32


def plain_tensors(qt) -> dict[str, torch.Tensor]:
    """Canonical tensors (weight / weight_scale / weight_scale_2) of a ComfyUI QuantizedTensor,
    via its layout's own serialisation so every layout maps the same way."""
    parts = qt.layout_cls.state_dict_tensors(qt._qdata, qt._params)
    return {"weight" + suffix: t for suffix, t in parts.items()}


def quantized_parameter(q) -> torch.nn.Parameter:
    """``nn.Parameter`` around a QuantizedTensor, keeping its layout params' tensors as given.

    ``nn.Parameter`` detaches, and comfy-kitchen's detach clones every params tensor: for the
    block-scaled formats those are the block scales (1/8 of the packed weights for NVFP4 and FP4
    group-32), so each load held them as a private copy instead of the file's mapped pages (stock
    ComfyUI does the same). The params are frozen dataclasses; keeping the originals shares them
    with the file exactly as ``qdata`` already is."""
    p = torch.nn.Parameter(q, requires_grad=False)
    p._params = q._params
    return p


#: unquantized weight dtypes kept as the file has them (fp8 without scales is left to ComfyUI)
DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: ComfyUI-loaded formats whose params field holds the file's ``weight_scale`` bytes as they are
_COMFY_MAPPED_SCALES = {"nvfp4": "block_scale", "mxfp8": "scale"}


_CAST_PARAMS = set(inspect.signature(comfy.ops.cast_bias_weight).parameters)


@contextlib.contextmanager
def _cast_weights(layer, x, want_requant):
    """ComfyUI's offload-aware weight cast (and release), on any recent ComfyUI."""
    kwargs = {"offloadable": True}
    if "compute_dtype" in _CAST_PARAMS:
        kwargs["compute_dtype"] = x.dtype
    if "want_requant" in _CAST_PARAMS:
        kwargs["want_requant"] = want_requant
    weight, bias, stream = comfy.ops.cast_bias_weight(layer, x, **kwargs)
    try:
        yield weight, bias
    finally:
        comfy.ops.uncast_bias_weight(layer, weight, bias, stream)


def build_operations(policy_option: str = "auto", compute_dtype: torch.dtype | None = None, load_device=None):
    """Custom operations for ``load_diffusion_model_state_dict`` plus the ``OpsPlan`` it fills.

    Raises ``WanquantError`` at once when the option is unknown or the device can never run it
    (e.g. ``fp8_matmul`` on an SM 8.6 GPU); per-layer problems raise while loading."""
    if load_device is None:
        load_device = comfy.model_management.get_torch_device()
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(load_device)
    plan = OpsPlan(policy_option, load_device, compute_dtype)
    base = comfy.ops.mixed_precision_ops({}, compute_dtype, full_precision_mm=False, disabled=[])
    running = comfy_native.running_algos()  # the comfy_quant algorithms this ComfyUI loads

    class WanquantOps(base):
        wanquant_plan = plan
        # fp4_g32 / nvfp4 layers the loader hands over in the file's low-nibble-first order (unswapped)
        wanquant_low_first: frozenset = frozenset()

        class Linear(base.Linear):
            _wq_choice = None
            _wq_conf: dict = {}
            # lora.side.LoraSide set per MODEL clone by ComfyUI's object patches (Apply LoRA, on the fly)
            wanquant_lora = None

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs):
                name = prefix.rstrip(".")
                raw = state_dict.get(f"{prefix}comfy_quant")
                conf = parse_comfy_quant(raw) if raw is not None else None
                fmt = conf.get("format") if conf else None
                tensors = ("pre_quant_scale",) if f"{prefix}pre_quant_scale" in state_dict else ()
                native = comfy_algos.native_only(conf, tensors)  # only ComfyUI's own layout runs it: handed over untouched
                if native:
                    comfy_native.gate(conf, tensors, running, layer=name)
                if fmt == "fp4_g32":
                    self._load_fp4_g32(state_dict, prefix, local_metadata, strict, missing_keys,
                                       unexpected_keys, error_msgs, conf, name)
                elif fmt in GRID_FORMATS and not native:
                    self._wq_load_grid(state_dict, prefix, local_metadata, strict, missing_keys,
                                       unexpected_keys, error_msgs, conf, name)
                elif is_gguf(fmt):
                    self._wq_load_gguf(state_dict, prefix, local_metadata, strict, missing_keys,
                                       unexpected_keys, error_msgs, conf, name)
                else:
                    file_scale = state_dict.get(f"{prefix}weight_scale")
                    file_weight = state_dict.get(f"{prefix}weight")
                    keep_weight = conf is None and self._wq_keeps_file_dtype(file_weight)
                    if keep_weight:  # ComfyUI would cast it to the model dtype: hand it an empty stand-in
                        state_dict[f"{prefix}weight"] = file_weight[:0]
                    try:
                        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                      missing_keys, unexpected_keys, error_msgs)
                    except (KeyError, ValueError) as exc:
                        raise WanquantError(f"ComfyUI could not load this quantized layer: {exc}",
                                            layer=name, expected="a ComfyUI comfy_quant format",
                                            found=str(fmt)) from exc
                    if fmt in _COMFY_MAPPED_SCALES and not native:
                        self._wq_keep_file_scale(fmt, file_scale)
                    if keep_weight:
                        self.weight = torch.nn.Parameter(file_weight, requires_grad=False)
                shape = (self.out_features, self.in_features)
                weight = getattr(self, "weight", None)
                if native:
                    note = ""
                    if fmt in FORMAT_NAMES:  # e.g. NVFP4 + pre_quant_scale: its matmul gated as the format's
                        base = choose(fmt, plan.caps, "auto", conf=conf, shape=shape, layer=name)
                        self._full_precision_mm = base.path != KITCHEN_MATMUL
                        note = f"{fmt} matmul: {base.reason}"
                    choice = plan.comfy_layout(name, comfy_algos.algo_key(conf, tensors),
                                               comfy_native.layout_name(conf), shape, note)
                else:
                    choice = plan.decide(name, fmt, conf, shape, getattr(self, "input_scale", None) is not None,
                                         None if fmt else (weight.dtype if weight is not None else None))
                self._wq_choice = choice
                self._wq_name = name
                self._wq_ran = set()  # paths this layer has executed (recorded once each)
                self._wq_conf = dict(conf or {}, orig_shape=list(shape))
                if fmt == "nvfp4" and name in WanquantOps.wanquant_low_first:
                    self._wq_nvfp4_file_order(choice.path == KITCHEN_MATMUL)
                if choice.path == INT8_MATMUL and fmt in FP8_FORMATS:
                    self._wq_requant_int8(name)
                    self._wq_conf = dict(self._wq_conf, format="int8_tensorwise")
                if fmt is not None and not native:
                    # ComfyUI's own forward runs only the kitchen path; keep its flag consistent
                    self._full_precision_mm = choice.path != KITCHEN_MATMUL

            def _wq_load_grid(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs, conf, name):
                """A scale-grid layer into wanquant's own layout (ComfyUI has none of these grids;
                its int8_tensorwise needs a newer ComfyUI, and one layout keeps every version alike)."""
                device = self.factory_kwargs["device"]
                w = state_dict.pop(f"{prefix}weight", None)
                s = state_dict.pop(f"{prefix}weight_scale", None)
                state_dict.pop(f"{prefix}comfy_quant", None)
                n, k = self.out_features, self.in_features
                fmt = conf["format"]
                fobj = get_format(fmt)
                block = fobj.block(conf) if fmt in BLOCK_GRID_FORMATS else 0
                if w is None or s is None or tuple(w.shape) != (n, k):
                    raise WanquantError(f"{fmt} tensors do not match the layer", layer=name,
                                        expected=f"weight [{n}, {k}] and a weight_scale",
                                        found=f"weight {None if w is None else list(w.shape)}, "
                                              f"weight_scale {None if s is None else list(s.shape)}")
                fobj.scale({"weight": w, "weight_scale": s}, conf)  # shape check: one clear error
                self.quant_format = fmt
                self.layout_type = GRID_LAYOUT
                self._wq_set_grid(w.to(device=device), s.to(device=device, dtype=torch.float32), fmt, block)
                self._wq_load_rest(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                   error_msgs, ("weight", "weight_scale", "comfy_quant"))

            def _wq_load_rest(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs, taken):
                """Bias and anything else through torch's own loader; the quantized tensors this layer
                already took (``taken``) are not reported missing."""
                torch.nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                                      missing_keys, unexpected_keys, error_msgs)
                for key in taken:
                    if f"{prefix}{key}" in missing_keys:
                        missing_keys.remove(f"{prefix}{key}")

            def _wq_set_grid(self, qdata, scale, fmt, block):
                params = ScaleGridLayout.Params(scale=scale, orig_dtype=self.factory_kwargs["dtype"] or torch.float32,
                                                orig_shape=(self.out_features, self.in_features), fmt=fmt, block=block)
                self.weight = quantized_parameter(QuantizedTensor(qdata, GRID_LAYOUT, params))

            def _wq_keeps_file_dtype(self, file_weight) -> bool:
                """Whether an unquantized weight stays the file's tensor: yes when its float dtype is
                no wider than the model's. ComfyUI casts every weight to the activations' dtype per
                forward anyway, and its load-time cast made each such layer a private copy (on the
                CPU bf16 -> fp32 doubled them; GGUF files keep the text/time embeddings in F16,
                which city96's loader does not copy). A wider file dtype (F32 on a bf16 model) is
                still cast, so a layer never holds more than the model dtype would."""
                model_dtype = self.factory_kwargs["dtype"]
                device = torch.device(self.factory_kwargs["device"] or "cpu")
                return (file_weight is not None and model_dtype is not None and file_weight.dtype in DENSE_DTYPES
                        and file_weight.dtype != model_dtype
                        and file_weight.element_size() <= model_dtype.itemsize
                        and file_weight.device == device
                        and tuple(file_weight.shape) == (self.out_features, self.in_features))

            def _wq_keep_file_scale(self, fmt, file_scale):
                """ComfyUI built this layer's params through ``nn.Parameter``, which cloned the block
                scales (see ``quantized_parameter``): put the file's own tensor back, viewed as the
                clone is, when it holds the same bytes on the same device (compared, never assumed:
                the clone has just read those pages, so the check reads memory, not the disk)."""
                w = self.weight
                field = _COMFY_MAPPED_SCALES[fmt]
                made = getattr(w._params, field, None) if isinstance(w, QuantizedTensor) else None
                if (made is None or file_scale is None or file_scale.device != made.device
                        or file_scale.nbytes != made.nbytes or not file_scale.is_contiguous()
                        or not made.is_contiguous()):
                    return
                same = file_scale.reshape(-1).view(torch.uint8)
                if torch.equal(same, made.reshape(-1).view(torch.uint8)):
                    w._params = dataclasses.replace(w._params, **{field: same.view(made.dtype).view(made.shape)})

            def _wq_nvfp4_file_order(self, kitchen_runs):
                """A LightX2V NVFP4 weight arrives as the file's low-nibble-first bytes (mapped, not
                copied). Kitchen's matmul reads ComfyUI's high-first order: swapped once, here. Every
                other path dequantizes per forward, so the bytes stay the file's, in our file-order
                layout (``nodes/nvfp4_file_layout.py``)."""
                w = self.weight
                if kitchen_runs:
                    q = QuantizedTensor(swap_nibbles(w._qdata), COMFY_NVFP4_LAYOUT, w._params)
                else:
                    q = QuantizedTensor(w._qdata, NVFP4_FILE_LAYOUT, NVFP4FileOrderLayout.from_comfy(w._params, False))
                    self.layout_type = NVFP4_FILE_LAYOUT
                self.weight = quantized_parameter(q)

            def _wq_requant_int8(self, name):
                """Option int8_matmul: per-tensor fp8 -> per-channel int8 now, error logged and kept."""
                t = plain_tensors(self.weight)
                q, s, err = requantize_fp8_to_int8(t["weight"], t["weight_scale"])
                self.quant_format = "int8_tensorwise"
                self.layout_type = GRID_LAYOUT
                self._wq_set_grid(q, s, "int8_tensorwise", 0)
                if getattr(self, "input_scale", None) is not None:
                    self.input_scale = None  # int8 activations are scaled per token
                plan.requantized[name] = err
                log.info("wanquant: %s re-quantized fp8 -> per-channel int8 (option int8_matmul): relative weight "
                         "error added %.3e", name, err)

            def _load_fp4_g32(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs, conf, name):
                device = self.factory_kwargs["device"]
                w = state_dict.pop(f"{prefix}weight", None)
                s = state_dict.pop(f"{prefix}weight_scale", None)
                state_dict.pop(f"{prefix}comfy_quant", None)
                n, k = self.out_features, self.in_features
                if w is None or s is None or tuple(w.shape) != (n, k // 2) or tuple(s.shape) != (n, k // 32):
                    raise WanquantError("fp4_g32 tensors do not match the layer", layer=name,
                                        expected=f"weight uint8 [{n}, {k // 2}], weight_scale [{n}, {k // 32}]",
                                        found=f"weight {None if w is None else list(w.shape)}, "
                                              f"weight_scale {None if s is None else list(s.shape)}")
                check_fp4_canonical(conf, layer=name)  # loaders.nibble_order owns the order
                self.quant_format = "fp4_g32"
                self.layout_type = FP4G32_LAYOUT
                params = FP4G32Layout.Params(scale=s.to(device=device),  # the file's scale dtype (bf16): no upcast
                                             orig_dtype=self.factory_kwargs["dtype"], orig_shape=(n, k),
                                             hi_first=name not in WanquantOps.wanquant_low_first)
                self.weight = quantized_parameter(QuantizedTensor(w.to(device=device, dtype=torch.uint8),
                                                                  FP4G32_LAYOUT, params))
                self._wq_load_rest(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                   error_msgs, ("weight", "weight_scale", "comfy_quant"))

            def _wq_load_gguf(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs, conf, name):
                """Raw GGUF blocks into a GGUFLayout QuantizedTensor (the file's mapped bytes on CPU)."""
                w = state_dict.pop(f"{prefix}weight", None)
                state_dict.pop(f"{prefix}comfy_quant", None)
                n, k = self.out_features, self.in_features
                fmt = get_format(conf["format"])
                shape = tuple(conf.get("orig_shape") or ())
                want = n * k // fmt.group_size * BLOCKS[fmt.qtype][1]
                if w is None or w.dtype != torch.uint8 or shape != (n, k) or w.numel() != want:
                    raise WanquantError(f"{fmt.name} tensors do not match the layer", layer=name,
                                        expected=f"uint8, {want} bytes, orig_shape [{n}, {k}]",
                                        found=f"{None if w is None else f'{w.dtype}, {w.numel()} bytes'}, "
                                              f"orig_shape {list(shape)}")
                self.quant_format = fmt.name
                self.layout_type = GGUF_LAYOUT
                params = GGUFLayout.Params(scale=torch.ones((), device=self.factory_kwargs["device"]),
                                           orig_dtype=self.factory_kwargs["dtype"], orig_shape=(n, k),
                                           qtype=fmt.qtype)
                self.weight = quantized_parameter(QuantizedTensor(w.to(device=self.factory_kwargs["device"]),
                                                                  GGUF_LAYOUT, params))
                self._wq_load_rest(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                   error_msgs, ("weight", "comfy_quant"))

            def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                """A weight ComfyUI patched (its own LoRA loader, merged at load) on a GGUF layer stays
                dense in the layer's dtype: wanquant cannot re-encode GGUF blocks, and requantizing
                would raise mid-load. ComfyUI's unpatch restores the blocks from its backup."""
                if getattr(self, "layout_type", None) == GGUF_LAYOUT and isinstance(self.weight, QuantizedTensor):
                    dense = weight.to(self.weight._params.orig_dtype or weight.dtype)
                    if return_weight:
                        return dense
                    self.weight = torch.nn.Parameter(dense, requires_grad=False)
                    return None
                return super().set_weight(weight, inplace_update=inplace_update, seed=seed,
                                          return_weight=return_weight, **kwargs)

            def state_dict(self, *args, destination=None, prefix="", **kwargs):
                sd = super().state_dict(*args, destination=destination, prefix=prefix, **kwargs)
                if getattr(self, "quant_format", None) == "fp4_g32":
                    sd[f"{prefix}comfy_quant"] = comfy_quant_tensor({"format": "fp4_g32", "group_size": 32})
                elif getattr(self, "layout_type", None) == GRID_LAYOUT:
                    p = self.weight._params
                    sd[f"{prefix}comfy_quant"] = comfy_quant_tensor(ScaleGridLayout._wq_conf(p.fmt, p.block))
                elif is_gguf(getattr(self, "quant_format", None)) and isinstance(self.weight, QuantizedTensor):
                    sd[f"{prefix}comfy_quant"] = comfy_quant_tensor(
                        {"format": self.quant_format, "orig_shape": [self.out_features, self.in_features]})
                return sd

            def _wq_planned_path(self) -> str:
                """The path this layer was planned to run, as the LoRA report names it beside the side
                path ("fp8_matmul rowwise" for row-wise scales); the plan's ``executed`` says what ran."""
                choice = self._wq_choice
                if choice is None:
                    return DENSE
                if choice.path == FP8_MATMUL and getattr(self, "quant_format", None) in FP8_ROWWISE_FORMATS:
                    return f"{FP8_MATMUL} rowwise"
                return choice.path

            def _wq_record(self, path, why=""):
                """Note the path this layer really ran, once per path (the report's ground truth)."""
                if path not in self._wq_ran:
                    self._wq_ran.add(path)
                    plan.record(self._wq_name, path, why)

            def _wq_patched(self) -> str:
                """Why ComfyUI hands this layer a dense weight at run time ('' when it does not)."""
                if getattr(self, "comfy_force_cast_weights", False):
                    return "ComfyUI forces weight casts on this model"
                if len(self.weight_function) or len(self.bias_function):
                    return "weights patched at run time (LoRA on the fly or lowvram patches)"
                return ""

            def forward(self, input, *args, **kwargs):
                """The layer's own path (fp8 / dequant / ComfyUI's), plus the low-rank LoRA side path."""
                out = self._wq_forward(input, *args, **kwargs)
                side = self.wanquant_lora
                if side is not None:
                    x = input.dequantize() if isinstance(input, QuantizedTensor) else input
                    out = side.apply(x, out, owns_y=True)
                return out

            def _wq_forward(self, input, *args, **kwargs):
                choice = self._wq_choice
                fmt = getattr(self, "quant_format", None)
                if (choice is None or fmt is None or getattr(self, "layout_type", None) is None
                        or choice.path in (KITCHEN_MATMUL, COMFY_LAYOUT) or input.requires_grad
                        or getattr(self, "pre_quant_scale", None) is not None
                        or isinstance(input, QuantizedTensor)):
                    if choice is not None:
                        self._wq_record(*self._wq_comfy_path(input, fmt))
                    return super().forward(input, *args, **kwargs)
                comfy.ops.run_every_op()
                patched = self._wq_patched()
                fast = not patched and ((choice.path == FP8_MATMUL and fmt in FP8_FORMATS + FP8_ROWWISE_FORMATS)
                                        or (choice.path == INT8_MATMUL and fmt == "int8_tensorwise"))
                with _cast_weights(self, input, want_requant=fast) as (weight, bias):
                    if isinstance(weight, QuantizedTensor):
                        if fmt == "fp4_g32":  # our own layout: decode qdata in its stored order, into input's dtype
                            self._wq_record(DEQUANT, patched)
                            params = weight._params  # plain tensors and a bool: traceable by torch.compile
                            w = get_format("fp4_g32").decode(weight._qdata, params.scale, input.dtype,
                                                             hi_first=params.hi_first)
                            return torch.nn.functional.linear(input, w, bias)
                        if is_gguf(fmt):  # raw blocks decoded into the activations' dtype
                            self._wq_record(DEQUANT, patched)
                            params = weight._params
                            w = dequantize_bytes(weight._qdata, params.qtype, params.orig_shape, input.dtype)
                            return torch.nn.functional.linear(input, w, bias)
                        tensors = plain_tensors(weight)
                        if fast and fmt == "int8_tensorwise":
                            self._wq_record(INT8_MATMUL)
                            return linear_int8(input, tensors["weight"], tensors["weight_scale"], bias)
                        if fast and fmt in FP8_ROWWISE_FORMATS:
                            self._wq_record(FP8_MATMUL, "row-wise scales")
                            return linear_fp8_rowwise(input, tensors["weight"], tensors["weight_scale"], bias)
                        if fast:
                            self._wq_record(FP8_MATMUL)
                            scale = getattr(self, "input_scale", None)
                            if scale is not None:
                                scale = comfy.model_management.cast_to_device(scale, input.device, None)
                            return linear_fp8_scaled_mm(input, tensors["weight"], tensors["weight_scale"],
                                                        bias, input_scale=scale)
                        self._wq_record(DEQUANT, patched)
                        return linear_dequant(input, fmt, tensors, bias, self._wq_conf)
                    # ComfyUI already made it dense: patches applied, or a dtype change dequantized it
                    self._wq_record(DEQUANT, patched or f"ComfyUI cast the weight to {weight.dtype} "
                                                        f"(activations arrive in {input.dtype})")
                    return torch.nn.functional.linear(input, weight.to(input.dtype), bias)

            def _wq_comfy_path(self, input, fmt):
                """The path ComfyUI's own forward takes for this layer (mirrors its quantized-path gate)."""
                if fmt is None or getattr(self, "layout_type", None) is None:
                    return DENSE, ""
                why = self._wq_patched()
                if self._wq_choice is not None and self._wq_choice.path == COMFY_LAYOUT:  # its own forward
                    return COMFY_LAYOUT, why or ("dequantized by ComfyUI" if self._full_precision_mm else "")
                if self._full_precision_mm:
                    return DEQUANT, why or "full-precision matmul for this layer"
                if why or isinstance(input, QuantizedTensor):
                    return DEQUANT, why or "quantized input"
                return (FP8_MATMUL if fmt in FP8_FORMATS else KITCHEN_MATMUL), "ComfyUI's own quantized matmul"

    WanquantOps.__name__ = "WanquantOps"
    return WanquantOps, plan


__all__ = ["build_operations", "default_compute_dtype", "plain_tensors", "FP4G32_LAYOUT", "DEQUANT", "FP8_MATMUL"]
