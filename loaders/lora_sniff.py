"""Whether a safetensors file is a LoRA rather than a model, from its key suffixes alone.

Lives in ``loaders`` because detection does (``convert`` refuses a LoRA handed to it as a model);
``lora.keys`` builds its key mapping on the same suffix table, so the two never disagree."""

from __future__ import annotations

import re

# suffix → role; checked longest first so ".lora_B.weight" wins over ".lora_B"
_SUFFIX_ROLES = {
    ".lora_B.default.weight": "up", ".lora_A.default.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_mid.weight": "mid",
    ".lora_B.weight": "up", ".lora_A.weight": "down", ".lora_B.bias": "up_bias",
    ".lora.up.weight": "up", ".lora.down.weight": "down",
    "_lora.up.weight": "up", "_lora.down.weight": "down",
    ".lora_B": "up", ".lora_A": "down",
    ".alpha": "alpha", ".dora_scale": "dora_scale",
    ".diff_b": "diff_b", ".diff_m": "diff_m", ".diff": "diff",
    ".set_weight": "unsupported", ".reshape_weight": "unsupported",
    ".w_norm": "diff", ".b_norm": "diff_b",
}
_SUFFIXES = sorted(_SUFFIX_ROLES, key=len, reverse=True)
_UNSUPPORTED_MARKERS = re.compile(r"\.(hada_|lokr_|oft_|boft_|a1\.weight|a2\.weight|b1\.weight|b2\.weight)")


def key_role(key: str) -> str:
    """The role a LoRA key's suffix gives it (up, down, alpha, diff, ...), 'unsupported' or 'unknown'."""
    if _UNSUPPORTED_MARKERS.search(key):
        return "unsupported"
    for suf in _SUFFIXES:
        if key.endswith(suf):
            return _SUFFIX_ROLES[suf]
    return "unknown"


def lora_key_example(keys) -> str | None:
    """The first key only a LoRA has (up/down/alpha/mid/DoRA suffixes), or None for a model.

    LightX2V NVFP4 models store a GEMM ``<layer>.alpha`` beside ``<layer>.input_global_scale``:
    that alpha is a model's, not a LoRA's."""
    keys = [k for k in keys if isinstance(k, str)]
    nvfp4_alpha = {k[: -len(".input_global_scale")] + ".alpha" for k in keys if k.endswith(".input_global_scale")}
    for k in keys:
        if key_role(k) in ("up", "down", "alpha", "mid", "dora_scale") and k not in nvfp4_alpha:
            return k
    return None
