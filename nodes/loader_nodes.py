"""Loader, inspect and remap/convert nodes (ComfyUI V3). Thin: one call into bridge/loaders each."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..errors import WanquantError
from ..loaders.nvfp4_layout import LAYOUTS
from ..loaders.report_text import report_lines
from . import bridge

SCALE_LAYOUTS = ("auto", *LAYOUTS)

log = logging.getLogger(__name__)

NONE = "(none)"
MODEL_FOLDER = "diffusion_models"
SHARD_HINT = "-of-"


def _walk_each_folder_once(root: str):
    """``os.walk`` following folder links (users link model folders in), but visiting each real
    folder once: two links to ``.`` otherwise make the walk explode (200k folders in 32 s)."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        yield dirpath, files


def model_choices() -> list[str]:
    """Model files plus sharded indexes found in diffusion_models (and unet), shards hidden.

    Our own walk (not ``folder_paths.get_filename_list``, which follows folder links without a
    loop guard), listing what ComfyUI would: files with the folder's extensions, relative names."""
    exts = {e.lower() for e in folder_paths.folder_names_and_paths.get(MODEL_FOLDER, ([], set()))[1]}
    names, files_found = set(), set()
    index_dirs = set()
    for root in folder_paths.get_folder_paths(MODEL_FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, files in _walk_each_folder_once(root):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                if f.endswith(".index.json"):
                    names.add(rel.replace(os.sep, "/"))
                    index_dirs.add(os.path.relpath(dirpath, root))
                elif not exts or os.path.splitext(f)[1].lower() in exts or f.lower().endswith(".gguf"):
                    files_found.add(rel)
    for name in files_found:
        d = os.path.dirname(name) or "."
        if SHARD_HINT in name and d in index_dirs:
            continue  # offered through its index
        names.add(name)
    return sorted(names)


def _walk_each_folder_once(root: str):
    """os.walk following folder links, as ComfyUI's own listing does, but entering each real folder
    once: a folder link to one of its parents would otherwise be walked until the path gets too long."""
    seen = set()
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield dirpath, files


def resolve(name: str) -> str:
    """Full path of a choice. Like ComfyUI's ``folder_paths.get_full_path`` this follows links, so a
    model symlinked into diffusion_models (the usual way to share models between installs) loads;
    the *name* itself must stay inside the folders: an absolute name or '..' is refused, not rewritten.
    (Shards named by an index are checked against the index's folder when the index is opened.)"""
    folders = folder_paths.get_folder_paths(MODEL_FOLDER)
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        raise WanquantError(f"'{name}' leaves the {MODEL_FOLDER} folders",
                            expected=f"a name relative to {', '.join(folders)}", found=repr(name))
    dangling = []
    for root in folders:
        candidate = Path(root, name)
        if candidate.is_file():  # follows links, to files and through linked folders
            return str(candidate)
        if candidate.is_symlink() and not candidate.exists():
            dangling.append(f"{candidate} -> {os.readlink(candidate)}")
    if dangling:
        raise WanquantError(f"'{name}' is a link to nothing", expected="a link to an existing model file",
                            found="; ".join(dangling))
    raise WanquantError(f"'{name}' was not found in the {MODEL_FOLDER} folders", expected=", ".join(folders))


def _files_signature(path: str) -> tuple:
    """(name, size, mtime) of the file(s) behind a choice, so an edited file is reloaded."""
    p = Path(path)
    files = [p]
    if p.name.endswith(".index.json"):
        files += sorted(p.parent.glob("*.safetensors"))
    sig = []
    for f in files:
        try:
            st = f.stat()
            sig.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((str(f), None, None))
    return tuple(sig)


def _fingerprint(model_names, *options):
    """What decides a node's result: the files behind each chosen name (size, mtime) and the options.
    None when a name does not resolve; execute() then reports the problem."""
    try:
        files = tuple(_files_signature(resolve(n)) if n != NONE else None for n in model_names)
    except WanquantError:
        return None
    return (files, *options)


def _progress_cb(total_hint: int = 0):
    import comfy.utils

    bar = {"pb": None}

    def update(done: int, total: int) -> None:
        if bar["pb"] is None:
            bar["pb"] = comfy.utils.ProgressBar(total)
        bar["pb"].update_absolute(done, total)

    return update


def _policy_tooltip() -> str:
    return ("How quantized Linears run. auto: fp8 tensor-core matmul with dynamic activation scaling on SM 8.9+, "
            "NVFP4/MXFP8 kitchen kernels on SM 10+ where comfy-kitchen has a GPU backend for them, dequantize-on-the-fly elsewhere (Ampere, CPU). "
            "int8 files (LightX2V, convert_to_quant) run W8A8 int8 matmul on SM 7.5+ and CPU. "
            "dequant / fp8_matmul / kitchen_matmul force a path (an impossible choice stops before sampling); "
            "int8_matmul also re-quantizes fp8 weights to per-channel int8 at load (fast on Ampere/Turing, error logged). "
            f"{bridge.NATIVE}: ComfyUI's own ops (fp8 activations clamped at ±448, no FP4 group-32).")


class WanQuantLoadDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantLoadDiT",
            display_name="Load Wan DiT (quantized)",
            category="wanquant/loaders",
            description="Loads any quantized Wan DiT release (scaled fp8, sibling scales, __fp8_scale, NVFP4/MXFP8, "
                        "FP4 group-32; native or diffusers keys; single file, sharded index or .pth) as a MODEL, "
                        "with ops chosen for this GPU, and reports what it found.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices(),
                               tooltip="A file or a sharded *.index.json in models/diffusion_models (or models/unet)."),
                io.Combo.Input("base_name", options=[NONE, *model_choices()], default=NONE,
                               tooltip="Base model under a partial finetune (e.g. Wan2.1-T2V-14B under Vista4D): "
                                       "the finetune's layers replace the base's."),
                io.Combo.Input("op_policy", options=bridge.policy_options(), default="auto", tooltip=_policy_tooltip()),
                io.Combo.Input("compute_dtype", options=list(bridge.COMPUTE_DTYPES), default="auto",
                               tooltip="Activation dtype; auto lets ComfyUI pick for this device (fp16/bf16 on GPU, fp32 on CPU)."),
                io.Combo.Input("fp4_nibble_order", options=["auto", "low_first", "high_first"], default="auto",
                               tooltip="FP4 group-32 packing. auto: quantize_config.json beside the file, else decided from the weights (low nibble first, with a report warning, when they cannot tell)."),
                io.Combo.Input("nvfp4_scale_layout", options=list(SCALE_LAYOUTS), default="auto", optional=True,
                               tooltip="NVFP4 files without comfy_quant: block-scale layout. auto: from the scale shapes, else from the scales (refused when they cannot tell)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name, base_name=NONE, op_policy="auto", compute_dtype="auto",
                           fp4_nibble_order="auto", nvfp4_scale_layout="auto"):
        return _fingerprint((model_name, base_name), op_policy, compute_dtype, fp4_nibble_order, nvfp4_scale_layout)

    @classmethod
    def execute(cls, model_name, base_name=NONE, op_policy="auto", compute_dtype="auto", fp4_nibble_order="auto",
                nvfp4_scale_layout="auto"):
        path = resolve(model_name)
        base = resolve(base_name) if base_name != NONE else None
        result = bridge.load_wan_model(path, base, op_policy, compute_dtype, fp4_nibble_order, progress=_progress_cb(),
                                       nvfp4_scale_layout=nvfp4_scale_layout)
        return io.NodeOutput(result.patcher, result.text)


class WanQuantInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantInspect",
            display_name="Inspect checkpoint (wanquant)",
            category="wanquant/utils",
            description="Reports container, key style, model family and per-layer formats of a checkpoint without loading it.",
            inputs=[io.Combo.Input("model_name", options=model_choices(), tooltip="The checkpoint to inspect."),
                    io.Combo.Input("fp4_nibble_order", options=["auto", "low_first", "high_first"], default="auto",
                                   tooltip="FP4 group-32 packing to assume (auto: quantize_config.json, else decided from the weights)."),
                    io.Combo.Input("nvfp4_scale_layout", options=list(SCALE_LAYOUTS), default="auto", optional=True,
                                   tooltip="NVFP4 block-scale layout to assume for files without comfy_quant (auto: from shapes, else from the scales).")],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, model_name, fp4_nibble_order="auto", nvfp4_scale_layout="auto"):
        return _fingerprint((model_name,), fp4_nibble_order, nvfp4_scale_layout)

    @classmethod
    def execute(cls, model_name, fp4_nibble_order="auto", nvfp4_scale_layout="auto"):
        from ..loaders.canonical import load_canonical
        from .comfy_native import publish

        publish()  # comfy_quant algorithms this ComfyUI runs are named, not refused
        with load_canonical(resolve(model_name), nibble_order=fp4_nibble_order,
                            nvfp4_scale_layout=nvfp4_scale_layout, collect_errors=True) as model:
            rep = model.report
        text = "\n".join(report_lines(rep))
        return io.NodeOutput(text, ui={"text": [text]})


class WanQuantRemap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantRemap",
            display_name="Remap / convert Wan checkpoint (wanquant)",
            category="wanquant/utils",
            description="Turns a Vista4D, WorldStereo or diffusers-keyed checkpoint (optionally over its base) into a "
                        "native-key model, and optionally saves it as a ComfyUI-native file that stock ComfyUI loads. "
                        "Extra modules (Vista4D latent_encoder/cam_encoder/projector, WorldStereo controlnet) are kept "
                        "in the file under their own names and listed in the report.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices(), tooltip="Source checkpoint (file or index)."),
                io.Combo.Input("base_name", options=[NONE, *model_choices()], default=NONE,
                               tooltip="Base model to overlay a partial finetune on."),
                io.String.Input("save_as", default="",
                                tooltip="File name to write into models/diffusion_models (e.g. vista4d_full_fp8). "
                                        "Empty: do not save, only output the model."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of the save_as name. Off: an existing model is "
                                         "never replaced (a shared workflow cannot overwrite yours)."),
                io.Combo.Input("fp4_target", options=["float8_e4m3fn", "bf16", "nvfp4"], default="float8_e4m3fn",
                               tooltip="What FP4 group-32 layers become in the saved file (stock ComfyUI cannot read FP4 group-32)."),
                io.Combo.Input("op_policy", options=bridge.policy_options(), default="auto", tooltip=_policy_tooltip()),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, model_name, base_name=NONE, save_as="", overwrite=False, fp4_target="float8_e4m3fn",
                           op_policy="auto"):
        return _fingerprint((model_name, base_name), save_as, overwrite, fp4_target, op_policy)

    @classmethod
    def execute(cls, model_name, base_name=NONE, save_as="", overwrite=False, fp4_target="float8_e4m3fn",
                op_policy="auto"):
        from ..loaders.convert import convert

        path = resolve(model_name)
        base = resolve(base_name) if base_name != NONE else None
        lines = []
        if save_as.strip():
            name = os.path.basename(save_as.strip())
            if not name.endswith(".safetensors"):
                name += ".safetensors"
            roots = folder_paths.get_folder_paths(MODEL_FOLDER)
            root = next((r for r in roots if os.path.basename(r.rstrip("/\\")) == MODEL_FOLDER), roots[0])
            os.makedirs(root, exist_ok=True)  # ComfyUI's own models folder, not a user-typed path
            dst = os.path.join(root, name)
            res = convert(path, dst, base=base, to=fp4_target, progress=_progress_cb(), overwrite=overwrite)
            lines += res.lines()
        result = bridge.load_wan_model(path, base, op_policy, "auto", "auto", progress=_progress_cb())
        text = "\n".join(result.report_lines + lines)
        return io.NodeOutput(result.patcher, text, ui={"text": [text]})


NODES = [WanQuantLoadDiT, WanQuantInspect, WanQuantRemap]
