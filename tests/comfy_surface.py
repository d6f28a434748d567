"""The ComfyUI surface wanquant relies on: every ``comfy.*``, ``comfy_api.*``, ``folder_paths`` and
(for the layout the bridge registers) ``comfy_kitchen.tensor`` name used in ``nodes/`` and
``__init__.py``, with how we call it.

ComfyUI's internals move under custom nodes all the time; a renamed function or a dropped keyword
otherwise shows up deep inside a forward. ``tests/comfy/test_comfy_compat.py`` checks this list against
the ComfyUI under test, so a break names the symbol; ``tests/test_comfy_surface.py`` checks (without
ComfyUI) that the list matches what the source actually uses, so it cannot rot. Keep the surface small.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the modules ComfyUI provides to a custom node (comfy_kitchen: ComfyUI pins it; we register a layout)
ROOTS = ("comfy", "comfy_api", "comfy_kitchen", "folder_paths")


@dataclass(frozen=True)
class Use:
    """How the pack uses a name. ``args``: the most positional arguments of any call (None: never
    called, only looked up, subclassed or read); ``kwargs``: the keywords passed; ``probed``: keywords
    passed only when ``inspect.signature`` shows them (optional on older ComfyUI, so not required)."""

    args: int | None = None
    kwargs: tuple[str, ...] = ()
    probed: tuple[str, ...] = ()


_SCHEMA = ("node_id", "display_name", "category", "description", "inputs", "outputs", "is_output_node")
_INPUT = ("default", "tooltip")

NAMES: dict[str, Use] = {
    # the bridge (nodes/comfy_ops.py, nodes/bridge.py)
    "comfy.ops.mixed_precision_ops": Use(2, ("full_precision_mm", "disabled")),
    "comfy.ops.cast_bias_weight": Use(2, ("offloadable",), probed=("compute_dtype", "want_requant")),
    "comfy.ops.uncast_bias_weight": Use(4),
    "comfy.ops.run_every_op": Use(0),
    "comfy.quant_ops.QuantizedTensor": Use(3),
    "comfy.quant_ops.QUANT_ALGOS.get": Use(2),  # nodes/comfy_native.py: what the running ComfyUI loads
    "comfy.quant_ops.get_layout_class": Use(1),
    "comfy.model_management.get_torch_device": Use(0),
    "comfy.model_management.unet_manual_cast": Use(3),
    "comfy.model_management.cast_to_device": Use(3),
    "comfy.model_management.OOM_EXCEPTION": Use(),  # Vista4D render: a GPU short of memory falls back to the CPU
    "comfy.model_management.soft_empty_cache": Use(0),
    "comfy.sd.load_diffusion_model_state_dict": Use(1, ("model_options", "metadata", "disable_dynamic")),
    "comfy_kitchen.tensor.BaseLayoutParams": Use(None, ("scale", "orig_dtype", "orig_shape")),
    "comfy_kitchen.tensor.QuantizedLayout": Use(),
    "comfy_kitchen.tensor.register_layout_class": Use(2),
    # LoRA and pose nodes
    "comfy.utils.load_torch_file": Use(1),
    "comfy.utils.ProgressBar": Use(1),
    "comfy.utils.get_attr": Use(2),
    "comfy.utils.common_upscale": Use(5),
    "comfy.weight_adapter.LoRAAdapter": Use(2),
    # model folders
    "folder_paths.get_folder_paths": Use(1),
    "folder_paths.get_filename_list": Use(1),
    "folder_paths.get_full_path_or_raise": Use(2),
    "folder_paths.add_model_folder_path": Use(2),
    "folder_paths.folder_names_and_paths.get": Use(2),
    "folder_paths.filename_list_cache.pop": Use(2),
    "folder_paths.models_dir": Use(),
    # Vista4D on ComfyUI's Wan (nodes/vista4d_model.py)
    "comfy.conds.CONDRegular": Use(1),
    "comfy.ldm.common_dit.pad_to_patch_size": Use(2),
    "comfy.ldm.wan.model.WanModel": Use(),
    "comfy.ldm.wan.model.repeat_e": Use(),
    "comfy.ldm.wan.model.sinusoidal_embedding_1d": Use(2),
    "comfy.model_base.WAN21": Use(),
    "comfy.model_management.cast_to": Use(1, ("dtype", "device")),
    "comfy.ops.manual_cast": Use(),
    # the V3 node API
    "comfy_api.latest.ComfyExtension": Use(),
    "comfy_api.latest.io.ComfyNode": Use(),
    "comfy_api.latest.io.Schema": Use(0, _SCHEMA),
    "comfy_api.latest.io.NodeOutput": Use(5, ("ui",)),
    "comfy_api.latest.io.Custom": Use(1),
    "comfy_api.latest.io.Combo.Input": Use(1, ("options", "default", "optional", "tooltip")),
    "comfy_api.latest.io.Boolean.Input": Use(1, _INPUT),
    "comfy_api.latest.io.Int.Input": Use(1, ("default", "min", "max", "step", "tooltip")),
    "comfy_api.latest.io.Float.Input": Use(1, ("default", "min", "max", "step", "tooltip")),
    "comfy_api.latest.io.String.Input": Use(1, _INPUT),
    "comfy_api.latest.io.Image.Input": Use(1, ("optional", "tooltip")),
    "comfy_api.latest.io.Model.Input": Use(1, ("tooltip",)),
    "comfy_api.latest.io.Image.Output": Use(0, ("display_name", "tooltip")),
    "comfy_api.latest.io.Conditioning.Input": Use(1),
    "comfy_api.latest.io.Conditioning.Output": Use(0, ("display_name",)),
    "comfy_api.latest.io.Latent.Output": Use(0, ("display_name",)),
    "comfy_api.latest.io.Mask.Input": Use(1, ("optional", "tooltip")),
    "comfy_api.latest.io.Mask.Output": Use(0, ("display_name",)),
    "comfy_api.latest.io.Vae.Input": Use(1, ("tooltip",)),
    "comfy_api.latest.io.Model.Output": Use(0, ("display_name", "tooltip")),
    "comfy_api.latest.io.String.Output": Use(0, ("display_name", "tooltip")),
    "comfy_api.latest.ui.PreviewText": Use(1),
}

# Members of objects ComfyUI hands us (no import names them, so the source check only makes sure each
# is still used): ModelPatcher methods (with their positional counts) and attributes, and the attributes
# of mixed_precision_ops' Linear and of the BaseModel that we read, or set for ComfyUI's own code to read.
PATCHER_METHODS = {"model_state_dict": 0, "clone": 0, "get_model_object": 1, "add_object_patch": 2,
                   "add_weight_wrapper": 2, "add_patches": 2, "set_model_compute_dtype": 1}
PATCHER_ATTRS = ("model", "patches", "object_patches", "cached_patcher_init", "load_device")
# comfy.model_base.BaseModel (patcher.model): a method we call, and an attribute we set that ComfyUI reads
MODEL_METHODS = {"get_dtype_inference": 0}
MODEL_FLAGS_COMFY_READS = ("manual_cast_dtype",)
LINEAR_ATTRS = ("factory_kwargs", "weight_function", "bias_function")        # read on every instance
LINEAR_FLAGS_COMFY_READS = ("_full_precision_mm", "quant_format", "layout_type", "comfy_force_cast_weights")
QTENSOR_ATTRS = ("_qdata", "_params", "layout_cls")
# methods our ComfyUI subclasses define that no ComfyUI base has (our own helpers, called only by us):
# those named OWN_PREFIX..., plus these; any other method must override one of ComfyUI's
OWN_PREFIX = "_wq_"
OWN_METHODS = {"_load_fp4_g32"}


def source_files() -> list[Path]:
    return [REPO / "__init__.py", *sorted((REPO / "nodes").glob("*.py"))]


def used_names(files: list[Path] | None = None) -> dict[str, Use]:
    """The ComfyUI names the given sources use, read from their syntax tree: each maximal dotted chain
    rooted at a ComfyUI import (``comfy.ops.cast_bias_weight``, ``io.Combo.Input`` through
    ``from comfy_api.latest import io``), each ``from comfy... import name``, with the most positional
    arguments and every keyword of their calls (``**kwargs`` is invisible here: list those by hand)."""
    found: dict[str, list] = {}
    for path in files or source_files():
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in ROOTS:
                        if a.asname:
                            aliases[a.asname] = a.name
                        else:
                            aliases[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] in ROOTS:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    found.setdefault(f"{node.module}.{a.name}", [None, set()])
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Name) or node.id not in aliases:
                continue
            chain, top = [aliases[node.id]], node
            while isinstance(parents.get(top), ast.Attribute) and parents[top].value is top:
                top = parents[top]
                chain.append(top.attr)
            name = ".".join(chain)
            if name == aliases[node.id] and "." not in name:
                continue  # a bare module object (``import comfy.utils`` binds ``comfy``)
            entry = found.setdefault(name, [None, set()])
            call = parents.get(top)
            if isinstance(call, ast.Call) and call.func is top:
                entry[0] = max(entry[0] or 0, len(call.args))
                entry[1] |= {k.arg for k in call.keywords if k.arg}
    # a module reached only as the head of longer chains is not a name of its own
    names = {n for n in found if not any(o.startswith(n + ".") for o in found) or found[n][0] is not None}
    return {n: Use(found[n][0], tuple(sorted(found[n][1]))) for n in sorted(names)}
