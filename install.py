"""Install exactly one onnxruntime wheel for the pose nodes: run by ComfyUI-Manager and
``comfy node install`` after ``pip install -r requirements.txt``, or by hand (``python install.py``).

``onnxruntime`` and ``onnxruntime-gpu`` (and -directml/-openvino/-rocm) all provide the module
``onnxruntime``; with two installed, whichever was installed last owns the files and the pose models
may run on CPU or fail to load. So requirements.txt lists neither, and this script:

* none installed    -> pip installs ``onnxruntime-gpu`` when the installed torch is a CUDA build on
                       Linux/Windows, else ``onnxruntime`` (never touches torch);
* several installed -> prints the one-line fix, changes nothing;
* exactly one       -> nothing.

Installing happens only here, at install time: never while ComfyUI starts (prestartup_script.py
only logs what to run). Self-contained (no package-relative imports): it runs as a plain script,
and the pack imports its helpers to name the right command in messages.
"""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-rocm")
log = logging.getLogger("wanquant.install")


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


def install_command(package: str | None = None) -> str:
    """The one command that installs the right wheel into *this* Python (ComfyUI's)."""
    package = package or plan([], torch_version(), sys.platform)[1]
    return f'"{sys.executable}" -m pip install {package}'


def ensure_onnxruntime(run=subprocess.run) -> str:
    """Install one onnxruntime wheel when none is present; returns the action taken."""
    action, detail = plan(installed(), torch_version(), sys.platform)
    if action == "conflict":
        log.warning("several onnxruntime packages are installed (%s); they share one module and shadow each "
                    "other. Fix: %s", ", ".join(installed()), detail)
    elif action == "install":
        log.info("installing %s for the wanquant pose nodes", detail)
        try:
            r = run([sys.executable, "-m", "pip", "install", detail], capture_output=True, text=True)
            failed, why = r.returncode != 0, (r.stderr or "")[-500:]
        except OSError as exc:
            failed, why = True, str(exc)
        if failed:
            log.warning("pip install %s failed (the pose nodes need it; the rest of the pack works without): %s\n"
                        "Run it yourself: %s", detail, why, install_command(detail))
            return "failed"
    return action


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[wanquant] %(message)s")
    ensure_onnxruntime()
