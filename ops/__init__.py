"""Quantized weight formats, linear paths and the capability policy (pure torch, no ComfyUI).

Public API:
* ``ops.formats``: ``get_format(name)`` -> ``QuantFormat`` (``dequantize`` / ``quantize``),
  ``comfy_quant_tensor``, ``parse_comfy_quant``, ``swap_nibbles``, ``FORMAT_NAMES``.
* ``ops.linear``: ``linear_dequant``, ``linear_fp8_scaled_mm`` (dynamic activation scaling);
  NVFP4/MXFP8 tensor-core matmuls are ComfyUI's own (its layouts call comfy-kitchen).
* ``ops.policy``: ``probe_device``, ``choose``, ``validate_option``, ``OpsPlan`` (per-layer
  choices, ``summary()``, ``report()``).
"""
