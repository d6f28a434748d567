"""Validate a sharded checkpoint's ``*.index.json`` and resolve its shard names safely.

An index is a small JSON file naming, per tensor, the shard that holds it. Read carelessly it can
point outside its folder (``..``, absolute paths, symlinks), at a FIFO that blocks forever, at a
symlink loop, or be a multi-gigabyte or deeply nested JSON; each of those ends here as one
:class:`WanquantError` naming the index and the shard name *as the index spells it*.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import WanquantError
from .header import load_json, regular_file_size

#: a 14B model's index is ~100 KB; anything past this is not an index
MAX_INDEX_BYTES = 20_000_000
#: longest file name most file systems allow (one path component)
MAX_NAME_BYTES = 255


def read_index(index_path: Path) -> tuple[dict[str, str], dict]:
    """``(weight_map, metadata)`` of a shard index, both checked for type and size."""
    path = str(index_path)
    size = regular_file_size(path, "shard index")
    if size > MAX_INDEX_BYTES:
        raise WanquantError("shard index is too large", file=path, expected=f"at most {MAX_INDEX_BYTES:,} bytes",
                            found=f"{size:,} bytes")
    try:
        raw = index_path.read_bytes()
    except OSError as exc:
        raise WanquantError(f"cannot read shard index: {exc.strerror}", file=path) from exc
    index = load_json(raw, file=path, what="shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WanquantError("shard index has no weight_map", file=path, expected='{"weight_map": {key: shard file}}')
    metadata = index.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise WanquantError("shard index 'metadata' is not an object", file=path, found=repr(metadata)[:200])
    return weight_map, metadata


def shard_path(folder: Path, name, index_path: str, key: str) -> Path:
    """The shard file ``name`` (from the index, for tensor ``key``) inside ``folder``; refuses a name
    that is not a plain relative file name, leaves the folder (directly or through a link), loops,
    is missing, or is not a regular file."""
    def bad(why: str, expected: str = "a file name relative to the index folder", found: str | None = None):
        return WanquantError(f"index names a shard {why}", file=index_path, layer=key, expected=expected,
                             found=found if found is not None else repr(name)[:300])

    if not isinstance(name, str):
        raise bad("that is not a string", expected="a file name (string)", found=f"{type(name).__name__} {name!r}"[:300])
    if not name or "\x00" in name:
        raise bad("with an empty name or a NUL character")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise bad("outside its folder (absolute path)")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise bad("outside its folder ('..')")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for p in parts):
        raise bad("with a name too long for a file system", expected=f"at most {MAX_NAME_BYTES} bytes per name",
                  found=f"{name[:60]!r}... ({len(name)} characters)")
    candidate = folder / name
    try:
        real_folder = folder.resolve()
        real = candidate.resolve(strict=False)
        try:
            st = os.stat(candidate)
        except FileNotFoundError:
            st = None
    except (OSError, RuntimeError) as exc:  # RuntimeError: Python < 3.13 reports a symlink loop so
        raise bad("that cannot be resolved (a symlink loop?)", found=f"{name!r}: {exc}"[:300]) from exc
    if real != real_folder and real_folder not in real.parents:
        raise bad("that links outside its folder", expected=f"a file inside {real_folder}", found=f"{name!r} -> {real}")
    if st is None:
        raise bad("that does not exist", expected=f"shard file {candidate}", found="no such file")
    if not stat.S_ISREG(st.st_mode):
        raise bad("that is not a regular file", expected=f"shard file {candidate}",
                  found=f"{name!r} is not a regular file (directory, FIFO or device)")
    return candidate
