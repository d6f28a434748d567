"""wanquant: a ComfyUI custom node pack for quantized Wan video DiTs.

This file is ComfyUI's entry point. It must import cleanly *without* ComfyUI (the same
package is the `wanquant` library and command line), so the nodes are only registered when
ComfyUI's node API is importable. ComfyUI calls ``comfy_entrypoint()``; we deliberately do not
export ``NODE_CLASS_MAPPINGS`` because ComfyUI would then never call the V3 entry point.
"""

import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("comfy") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI looks this name up)
