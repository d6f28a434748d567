"""wanquant: a ComfyUI custom node pack for quantized Wan video DiTs.

This file is ComfyUI's entry point. It must import cleanly *without* ComfyUI (the same
package is the `wanquant` library and command line), so the nodes are only registered when
ComfyUI's node API is importable. ComfyUI calls ``comfy_entrypoint()``; we deliberately do not
export ``NODE_CLASS_MAPPINGS`` because ComfyUI would then never call the V3 entry point.
"""

import importlib.util
import sys

__version__ = "0.1.0"

# ComfyUI has imported its `comfy` package before it loads custom nodes. Checking sys.modules (not
# just importability) keeps the `wanquant` command fast and ComfyUI-free even when it is run from
# a ComfyUI folder where `comfy_api` happens to be importable.
if "comfy" in sys.modules and importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI looks this name up)
