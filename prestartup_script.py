"""Runs before ComfyUI imports its modules: make sure exactly one onnxruntime wheel is installed.

``onnxruntime`` and ``onnxruntime-gpu`` (and -directml/-openvino/-rocm) all provide the module
``onnxruntime``; with two installed, whichever was installed last owns the files and the pose models
may run on CPU or fail to load. So requirements.txt lists neither and this script, on start:

* none installed   -> pip installs ``onnxruntime-gpu`` when the installed torch is a CUDA build on
                      Linux/Windows, else ``onnxruntime`` (never touches torch; ``--no-deps`` is not
                      used because onnxruntime needs its own small deps, none of which is torch);
* several installed -> logs the one-line fix, changes nothing;
* exactly one      -> nothing.

``WANQUANT_NO_ORT_INSTALL=1`` turns the install off (offline machines, managed environments). A
failure here only logs: the pack's other nodes never need onnxruntime, and the pose loader raises a
clear error when it is missing. Self-contained (no package-relative imports): ComfyUI loads this
file on its own.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-rocm")
log = logging.getLogger("wanquant.prestartup")


def installed(names=ORT_DISTRIBUTIONS) -> list[str]:
    found = []
    for name in names:
        try:
            importlib.metadata.version(name)
            found.append(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(present: list[str], torch_ver: str | None, platform: str) -> tuple[str, str]:
    """(action, detail): ('ok', dist) | ('install', package) | ('conflict', fix command)."""
    if len(present) == 1:
        return "ok", present[0]
    if len(present) > 1:
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in present else present[0]
        return "conflict", f"pip uninstall -y {' '.join(present)} && pip install {keep}"
    cuda_torch = bool(torch_ver) and "+cu" in torch_ver
    if cuda_torch and platform in ("linux", "win32"):
        return "install", "onnxruntime-gpu"
    return "install", "onnxruntime"


FAILED_MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".onnxruntime_install_failed")
PIP_QUICK = ["--retries", "1", "--timeout", "15"]  # an offline machine must not hold ComfyUI's start


def ensure_onnxruntime(run=subprocess.run, marker: str = FAILED_MARKER) -> str:
    """Make sure exactly one onnxruntime wheel is installed (see the module docstring).

    A failed install (offline, no pip) is tried only once: ``marker`` records it and later starts
    just log the command to run by hand (delete the marker to try again)."""
    action, detail = plan(installed(), torch_version(), sys.platform)
    if action == "conflict":
        log.warning("[wanquant] several onnxruntime packages are installed (%s); they share one module and "
                    "shadow each other. Fix: %s", ", ".join(installed()), detail)
    elif action == "install":
        if os.environ.get("WANQUANT_NO_ORT_INSTALL") or os.path.exists(marker):
            log.warning("[wanquant] no onnxruntime installed (the pose nodes need it): pip install %s", detail)
            return "skipped"
        log.info("[wanquant] installing %s for the pose nodes (set WANQUANT_NO_ORT_INSTALL=1 to skip)", detail)
        try:
            r = run([sys.executable, "-m", "pip", "install", *PIP_QUICK, detail], capture_output=True, text=True,
                    timeout=600)
            failed = r.returncode != 0
            why = (r.stderr or "")[-500:]
        except Exception as exc:  # offline, no pip: the pose loader will say what is missing
            failed, why = True, str(exc)
        if failed:
            log.warning("[wanquant] pip install %s failed (not retried on later starts; delete %s to retry): %s",
                        detail, marker, why)
            try:
                with open(marker, "w") as f:
                    f.write(detail + "\n")
            except OSError:
                pass
            return "failed"
    return action


if __name__ != "wanquant.prestartup_script":  # imported by ComfyUI (any module name) or run directly
    try:
        ensure_onnxruntime()
    except Exception:  # never stop ComfyUI from starting
        log.warning("[wanquant] onnxruntime check failed", exc_info=True)
