"""Runs before ComfyUI imports its modules: say (never do) what the pose nodes still need.

It only logs: installing packages while ComfyUI starts can hold the start for minutes and changes
an environment the user did not ask to change. The install itself is ``install.py`` (run by
ComfyUI-Manager / ``comfy node install``, or by hand), and this script logs the one command to run
when no onnxruntime is installed, or the one-line fix when several are. Self-contained (no
package-relative imports): ComfyUI loads this file on its own.
"""

from __future__ import annotations

import importlib.util
import logging
import os

log = logging.getLogger("wanquant.prestartup")


def _install_helpers():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "install.py")
    spec = importlib.util.spec_from_file_location("wanquant_install_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines helpers only; installing needs __main__
    return module, path


def check_onnxruntime() -> str:
    """Log what the pose nodes need; returns the plan's action. Never installs anything."""
    helpers, path = _install_helpers()
    action, detail = helpers.plan(helpers.installed(), helpers.torch_version(), helpers.sys.platform)
    if action == "conflict":
        log.warning("[wanquant] several onnxruntime packages are installed; they share one module and shadow "
                    "each other. Fix: %s", detail)
    elif action == "install":
        log.warning("[wanquant] onnxruntime is not installed (only the pose nodes need it). Install it with: %s",
                    helpers.install_command(detail))
    return action


if __name__ != "wanquant.prestartup_script":  # imported by ComfyUI (any module name) or run directly
    try:
        check_onnxruntime()
    except Exception:  # never stop ComfyUI from starting
        log.warning("[wanquant] onnxruntime check failed", exc_info=True)
