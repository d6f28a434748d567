"""The human-readable inspect report (CLI and the ComfyUI Inspect node share it)."""

from __future__ import annotations


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def report_lines(rep) -> list[str]:
    lines = [
        f"file:       {rep.path}",
        f"container:  {rep.container}" + (f" (prefix '{rep.prefix}' removed)" if rep.prefix else ""),
        f"key style:  {rep.key_style}" + (f" ({rep.remapped} keys remapped to native)" if rep.remapped else ""),
        f"family:     {rep.family} - {rep.variant}",
        "formats (weight-bearing layers):",
    ]
    for fmt, n in sorted(rep.formats.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {fmt:<14} {n:5d} layers  {_gib(rep.format_bytes.get(fmt, 0))}")
    if rep.spellings:
        lines.append("source spellings:")
        for sp, n in sorted(rep.spellings.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n:5d} x {sp}")
    if rep.scale_dtypes:
        lines.append("scale dtypes: " + ", ".join(f"{k} ({n})" for k, n in sorted(rep.scale_dtypes.items())))
    if rep.nibble_order:
        lines.append(f"FP4 nibble order: {rep.nibble_order}")
    for group, mods in rep.extras.items():
        lines.append(f"extra modules kept under their own names: {group} ({len(mods)}: {', '.join(mods[:3])}"
                     f"{', ...' if len(mods) > 3 else ''})")
    if rep.unrecognised:
        shown = ", ".join(rep.unrecognised[:5]) + (f", ... ({len(rep.unrecognised)} in all)" if len(rep.unrecognised) > 5 else "")
        lines.append(f"unrecognised keys (kept under their own names): {shown}")
    if rep.missing:
        lines.append("missing for a full model: " + "; ".join(rep.missing[:8]) + (" ..." if len(rep.missing) > 8 else ""))
    for note in rep.notes:
        lines.append(f"note: {note}")
    for w in rep.warnings:
        lines.append(f"warning: {w}")
    for e in rep.errors[:20]:
        lines.append(f"error: {e}")
    lines.append(f"total: {_gib(rep.total_bytes)}")
    lines.append(f"verdict: {rep.verdict()}")
    return lines
