"""Wan2.2-Animate pose preprocessing without ComfyUI.

The modules here are the pure logic behind the pose nodes: model files and onnxruntime
sessions (``models``, ``sessions``), person detection (``detect``), the ViTPose crop
(``crop``), DARK heatmap decoding (``decode``), the AAPose layout (``aapose``), face crops
(``face``), drawing (``draw``), retargeting (``retarget``) and the per-clip orchestration
(``pipeline``). Nothing here imports ComfyUI or torch, so the CLI and the tests use it as is.
"""
