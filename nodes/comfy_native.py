"""Which ``comfy_quant`` algorithms the running ComfyUI loads (feature detection, not version
numbers), and the load-time gate for layers only ComfyUI's own layout runs.

A file may carry algorithms newer than wanquant (``loaders/comfy_algos.py``); the truth about
whether this ComfyUI can run them is its own ``comfy.quant_ops.QUANT_ALGOS`` (and, for int8 with a
ConvRot rotation, whether its int8 layout has the ``convrot`` parameter). Such layers go to
ComfyUI untouched; any other gets one ``WanquantError`` naming the ComfyUI release that adds it
before a tensor is loaded, instead of a ``KeyError`` from inside ComfyUI's loader.
"""

from __future__ import annotations

import dataclasses

import comfy.quant_ops

from ..errors import WanquantError
from ..loaders import comfy_algos


def running_algos() -> frozenset[str]:
    """Table keys (loaders/comfy_algos.py) the running ComfyUI loads."""
    algos = comfy.quant_ops.QUANT_ALGOS
    names = set(algos)
    if "int8_tensorwise" in algos:
        params = getattr(comfy.quant_ops.get_layout_class(algos["int8_tensorwise"]["comfy_tensor_layout"]),
                         "Params", None)
        if params is not None and dataclasses.is_dataclass(params) and \
                "convrot" in {f.name for f in dataclasses.fields(params)}:
            names.add(comfy_algos.CONVROT)
    if "pre_quant_scale" in algos.get("nvfp4", {}).get("parameters", ()):
        names.add(comfy_algos.PRE_QUANT)
    return frozenset(names)


def publish() -> frozenset[str]:
    """Tell the loaders what this ComfyUI runs, so an algorithm newer than wanquant's table is kept."""
    names = running_algos()
    comfy_algos.publish_running(names)
    return names


def layout_name(conf: dict) -> str:
    """The ComfyUI layout class that will hold a layer of ``conf`` (for the report)."""
    entry = comfy.quant_ops.QUANT_ALGOS.get(conf.get("format"), {})
    return entry.get("comfy_tensor_layout", f"layout for {conf.get('format')}")


def gate(conf: dict, tensors, running: frozenset[str], *, file: str | None = None, layer: str | None = None) -> None:
    """Raise the one error for a ComfyUI-only layer this ComfyUI cannot load (``running``: what
    ``running_algos`` returned, read once per load rather than once per layer)."""
    if comfy_algos.algo_key(conf, tensors) not in running:
        raise comfy_algos.unknown_error(conf, file=file, layer=layer, in_comfyui=True, tensors=tensors)


def gate_model(layers: dict, file: str) -> None:
    """``gate`` every ComfyUI-only layer of a canonical model, first failure raised."""
    running = running_algos()
    for name, layer in layers.items():
        if comfy_algos.layer_native(layer):
            gate(layer.conf, {**layer.sides, **layer.others}, running, file=file, layer=name)


def gate_own_ops(layers: dict, file: str, policy: str) -> None:
    """Op policy ``comfy_native`` hands every layer to ComfyUI's own loader, which raises a bare
    ``KeyError`` on a format its ``QUANT_ALGOS`` lacks (FP4 group-32, GGUF, the row/block scale
    grids; int8 before 0.27): one error naming the first such layer, before anything loads."""
    algos = comfy.quant_ops.QUANT_ALGOS
    for name, layer in layers.items():
        if layer.quantized and not comfy_algos.layer_native(layer) and layer.format not in algos:
            raise WanquantError(f"{layer.format} layers need wanquant's ops: choose an op policy other than "
                                f"'{policy}' (or convert the file with `wanquant convert --to ...`)", file=file,
                                layer=name, expected="a format this ComfyUI loads itself: " + ", ".join(sorted(algos)),
                                found=layer.format)


__all__ = ["running_algos", "publish", "gate", "gate_model", "gate_own_ops", "layout_name"]
