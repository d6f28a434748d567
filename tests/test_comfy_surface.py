"""The list of ComfyUI names in ``comfy_surface.py`` is exactly what the pack's ComfyUI-facing code uses
(no ComfyUI needed): a new ``comfy.*`` call, keyword or positional argument must be added to the list,
which ``tests/comfy/test_comfy_compat.py`` then checks against a real ComfyUI."""

from __future__ import annotations


import comfy_surface as surface


def test_every_comfyui_name_used_is_listed_and_every_listed_name_is_used():
    used = surface.used_names()
    missing = sorted(set(used) - set(surface.NAMES))
    stale = sorted(set(surface.NAMES) - set(used))
    assert not missing, f"used in nodes/ or __init__.py but not in tests/comfy_surface.py NAMES: {missing}"
    assert not stale, f"listed in tests/comfy_surface.py NAMES but no longer used (delete): {stale}"


def test_listed_call_shapes_match_the_calls_in_the_source():
    for name, use in surface.used_names().items():
        listed = surface.NAMES[name]
        assert listed.args == use.args, f"{name}: calls pass up to {use.args} positional arguments, list says {listed.args}"
        extra = sorted(set(use.kwargs) - set(listed.kwargs) - set(listed.probed))
        assert not extra, f"{name}: keywords {extra} are passed but not listed"


def test_listed_members_are_still_used():
    text = "\n".join(p.read_text() for p in surface.source_files())
    members = [*surface.PATCHER_METHODS, *surface.PATCHER_ATTRS, *surface.MODEL_METHODS, *surface.MODEL_FLAGS_COMFY_READS,
               *surface.LINEAR_ATTRS,
               *surface.LINEAR_FLAGS_COMFY_READS, *surface.QTENSOR_ATTRS, *surface.OWN_METHODS]
    for use in surface.NAMES.values():
        members += [*use.kwargs, *use.probed]
    unused = sorted({m for m in members if m not in text})
    assert not unused, f"listed in tests/comfy_surface.py but not in nodes/ or __init__.py (delete): {unused}"


def test_the_reader_sees_aliases_from_imports_and_call_shapes(tmp_path):
    """The extraction itself, on a small source whose answer is known by hand."""
    src = tmp_path / "m.py"
    src.write_text("import os\nimport comfy.utils\nimport comfy.model_management as mm\n"
                   "from comfy_api.latest import io\nfrom comfy.quant_ops import QuantizedTensor\n"
                   "def f(x, **kw):\n    comfy.utils.get_attr(x, 'a')\n    mm.cast_to_device(x, 1, dtype=None, **kw)\n"
                   "    io.Combo.Input('n', options=[])\n    isinstance(x, QuantizedTensor)\n    os.path.join('a')\n")
    got = surface.used_names([src])
    assert got == {"comfy.utils.get_attr": surface.Use(2), "comfy.model_management.cast_to_device": surface.Use(2, ("dtype",)),
                   "comfy_api.latest.io.Combo.Input": surface.Use(1, ("options",)),
                   "comfy.quant_ops.QuantizedTensor": surface.Use(None)}
