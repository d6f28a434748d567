"""Wan2.2-Animate's extra modules: diffusers names → ComfyUI native names (filled in by the loader work)."""

from __future__ import annotations


def animate_diffusers_to_native(key: str) -> tuple[str, bool]:
    return key, False
