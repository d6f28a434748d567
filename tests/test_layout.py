"""Architecture rules anyone can check: only nodes/ (and __init__.py) import ComfyUI; the pack
imports cleanly and silently without ComfyUI; imports inside the pack are relative."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_IMPORT = re.compile(r"^\s*(import comfy\b(?!_)|from comfy\b(?!_)|import folder_paths|from folder_paths)", re.M)
ABS_PACK_IMPORT = re.compile(r"^\s*(import|from) (nodes|ops|loaders|lora|pose|vista4d)\b", re.M)


def _py(*parts):
    for part in parts:
        p = ROOT / part
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


COMFY_IMPORT_TOP = re.compile(r"^(import comfy\b(?!_)|from comfy\b(?!_))", re.M)


def test_only_nodes_import_comfy():
    offenders = [str(p.relative_to(ROOT)) for p in _py("ops", "loaders", "lora", "pose", "vista4d", "cli.py", "errors.py")
                 if COMFY_IMPORT.search(p.read_text())]
    assert offenders == []


def test_benchmarks_run_without_comfyui():
    """A benchmark may time ComfyUI's own code as a baseline when it is importable, but only
    inside a function guarded for its absence: never at module level."""
    offenders = [str(p.relative_to(ROOT)) for p in _py("benchmarks") if COMFY_IMPORT_TOP.search(p.read_text())]
    assert offenders == []


def test_no_absolute_imports_of_pack_modules():
    offenders = [str(p.relative_to(ROOT)) for p in _py("__init__.py", "nodes", "ops", "loaders", "lora", "pose", "vista4d", "cli.py")
                 if ABS_PACK_IMPORT.search(p.read_text())]
    assert offenders == []


def test_package_imports_without_comfyui_silently():
    proc = subprocess.run([sys.executable, "-c", "import wanquant, wanquant.loaders.canonical, wanquant.ops.policy; "
                           "print(hasattr(wanquant, 'comfy_entrypoint'))"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False" and proc.stderr == ""


def test_lora_and_loaders_import_downward_only():
    """Floors: ``lora/`` may import ``loaders/`` and ``ops/`` but never ``nodes/``; ``loaders/`` and
    ``ops/`` never import ``lora/`` (LoRA has its own room above them)."""
    up_from_lora = re.compile(r"^\s*from \.\.(nodes)\b", re.M)
    up_into_lora = re.compile(r"^\s*from \.\.(lora)\b|^\s*from \.\.\.lora\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in _py("lora") if up_from_lora.search(p.read_text())]
    offenders += [str(p.relative_to(ROOT)) for p in _py("loaders", "ops") if up_into_lora.search(p.read_text())]
    assert offenders == []


def test_vista4d_room_stands_on_errors_only():
    """``vista4d/`` is pure tensor math (renderer, cameras, stream layout): it imports nothing of the
    pack but ``errors``, and only ``nodes/`` builds on it."""
    pack_import = re.compile(r"^\s*from \.\.(\w+)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in _py("vista4d")
                 if set(pack_import.findall(p.read_text())) - {"errors"}]
    offenders += [str(p.relative_to(ROOT)) for p in _py("ops", "loaders", "lora", "pose")
                  if re.search(r"^\s*from \.\.+vista4d\b", p.read_text(), re.M)]
    assert offenders == []
