"""Run by ComfyUI-Manager (and `comfy node install`) after `pip install -r requirements.txt`:
the same onnxruntime check as prestartup_script.py, done at install time."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("wanquant_prestartup", Path(__file__).with_name("prestartup_script.py"))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # performs the check
