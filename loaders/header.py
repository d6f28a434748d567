"""Validate a safetensors header the way the safetensors library does, before any data is read.

ComfyUI loads files through the safetensors library, which refuses headers whose byte ranges
overlap, leave gaps, or do not cover the data exactly. Accepting what it refuses lets a 1 MB file
with 400 entries aliasing one region turn into a 419 MB conversion, or a header that is not what it
seems flow on into the output. So the same rules are enforced here, plus limits that keep a hostile
header from costing minutes or gigabytes (tensor count, JSON nesting, integer size), and every
violation is one :class:`WanquantError` naming the file and the entry.

One entry point: :func:`read_safetensors_header`.
"""

from __future__ import annotations

import json
import os
import stat
import struct

import torch

from ..errors import WanquantError

#: the safetensors library's own cap on the header length (``MAX_HEADER_SIZE``)
MAX_HEADER_BYTES = 100_000_000
#: no Wan checkpoint or LoRA comes near this (a 14B model with per-layer scales has a few thousand);
#: it keeps a header of a million empty tensors from taking minutes and gigabytes to inspect
MAX_TENSORS = 50_000
#: shapes and offsets are u64 in the format; Python ints are unbounded, so bound them here
MAX_INT = 2**63 - 1

_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
#: safetensors dtype name -> torch dtype / element size, for the dtypes this torch can hold
TORCH_DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items() if hasattr(torch, v)}
DTYPE_SIZES: dict[str, int] = {k: v.itemsize for k, v in TORCH_DTYPES.items()}


def regular_file_size(path: str, what: str = "model file") -> int:
    """Size of ``path``, refusing anything that is not a regular file *before* opening it:
    opening a FIFO blocks forever and a device or directory is never a checkpoint."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise WanquantError(f"cannot read {what}: {exc.strerror}", file=path) from exc
    if not stat.S_ISREG(st.st_mode):
        raise WanquantError(f"{what} is not a regular file", file=path, expected="a file",
                            found=file_kind(st.st_mode))
    return st.st_size


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for error messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # before int(): Python refuses >4300 digits with a ValueError anyway
        raise ValueError(f"integer too large ({len(text)} digits)")
    return int(text)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def load_json(raw: bytes | str, *, file: str, what: str) -> object:
    """``json.loads`` that ends in a WanquantError for anything a hostile file can throw at it:
    invalid UTF-8, bad JSON, NaN/Infinity, duplicate keys, huge integers, nesting past the
    recursion limit."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        return json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant,
                          object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise WanquantError(f"{what} is not valid UTF-8", file=file, found=str(exc)[:200]) from exc
    except RecursionError as exc:
        raise WanquantError(f"{what} is nested too deeply", file=file) from exc
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise WanquantError(f"{what} is not valid JSON ({str(exc)[:200]})", file=file) from exc


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Parse and validate a safetensors header without touching the data.

    Returns ``(entries, metadata, data_start)``: ``entries`` maps key → ``{"dtype", "shape",
    "data_offsets"}`` (shape a list of non-negative ints, offsets ``[begin, end]`` relative to
    ``data_start``), ``metadata`` the ``__metadata__`` str → str map. Rules, as the safetensors
    library's: a JSON object, ``__metadata__`` a str → str object, known dtypes, shapes whose
    element count times the dtype size equals the byte range, and byte ranges that start at 0,
    follow each other without gap or overlap and end exactly at the end of the file."""
    path = os.fspath(path)
    size = regular_file_size(path)
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the check, opening must not block
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise WanquantError("model file is not a regular file", file=path, expected="a file")
            head = f.read(8)
            if len(head) < 8:
                raise WanquantError("file is too short to be safetensors (truncated?)", file=path,
                                    expected="an 8-byte header length", found=f"{len(head)} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > size and f.read(1) != b"{":  # text, JSON, an image...: the first 8 bytes are no length
                raise WanquantError("not a safetensors file: its first 8 bytes are not a header length",
                                    file=path, expected=f"a header length below the file size ({size:,} bytes)",
                                    found=repr(head))
            if n > MAX_HEADER_BYTES:
                raise WanquantError("safetensors header is too large (not safetensors, or hostile)", file=path,
                                    expected=f"at most {MAX_HEADER_BYTES:,} bytes, the safetensors library's limit",
                                    found=f"{n:,} bytes")
            if 8 + n > size:
                raise WanquantError("safetensors header is larger than the file (truncated or not safetensors)",
                                    file=path, expected=f"header of {n} bytes within a {size}-byte file")
            f.seek(8)
            raw = f.read(n)
    except OSError as exc:
        raise WanquantError(f"cannot read file: {exc.strerror}", file=path) from exc
    if not raw.startswith(b"{"):
        raise WanquantError("safetensors header does not start with '{' (not safetensors)", file=path,
                            found=repr(raw[:20]))
    objects = raw.count(b"{")  # every entry needs one: an upper bound, counted before parsing
    if objects > 4 * MAX_TENSORS:
        _too_many(path, f"{objects:,} JSON objects")
    header = load_json(raw, file=path, what="safetensors header")
    if not isinstance(header, dict):
        raise WanquantError("safetensors header is not a JSON object", file=path, found=type(header).__name__)
    if len(header) > MAX_TENSORS + 1:
        _too_many(path, f"{len(header) - 1:,} tensors")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WanquantError("safetensors __metadata__ must map strings to strings", file=path,
                            found=repr(metadata)[:200])
    for text in (*header, *metadata, *metadata.values()):
        _utf8(path, text)
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        dtype_name, shape, begin, end = _entry(path, key, info)
        spans.append((begin, end, key))
        numel = 1
        for s in shape:
            numel *= s
        want = numel * DTYPE_SIZES[dtype_name]
        if end - begin != want:
            raise WanquantError("header byte range does not match shape and dtype", file=path, layer=key,
                                expected=f"{want} bytes for {dtype_name}{shape}", found=f"{end - begin}")
    _check_spans(path, spans, data_len, size, 8 + n)
    return header, metadata, 8 + n


def _utf8(path: str, text: str) -> None:
    """JSON's \\ud800 escapes decode to lone surrogates that no file name or terminal can hold
    (the safetensors library refuses them); refuse them here, not when the report is printed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise WanquantError("safetensors header holds a string that is not valid Unicode (lone surrogate)",
                            file=path, found=repr(text)[:100]) from exc


def _too_many(path: str, found: str):
    raise WanquantError("safetensors header lists too many tensors for a Wan checkpoint or LoRA", file=path,
                        expected=f"at most {MAX_TENSORS:,} tensors", found=found)


def _entry(path: str, key: str, info) -> tuple[str, list[int], int, int]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise WanquantError("malformed header entry", file=path, layer=key,
                            expected="an object with dtype, shape and data_offsets", found=repr(info)[:200])
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPE_SIZES:
        raise WanquantError("unsupported tensor dtype", file=path, layer=key,
                            expected="one of " + ", ".join(DTYPE_SIZES), found=repr(dtype_name)[:100])
    if not _ints(shape) or not all(0 <= s <= MAX_INT for s in shape):
        raise WanquantError("malformed tensor shape", file=path, layer=key,
                            expected="a list of non-negative integers", found=repr(shape)[:200])
    if not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= MAX_INT:
        raise WanquantError("malformed data_offsets", file=path, layer=key,
                            expected="[begin, end] with 0 <= begin <= end", found=repr(offsets)[:200])
    return dtype_name, shape, offsets[0], offsets[1]


def _ints(v) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)  # bool is an int subclass: refused


def _check_spans(path: str, spans: list[tuple[int, int, str]], data_len: int, size: int, data_start: int) -> None:
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap after the previous tensor"
            raise WanquantError(f"header byte range {what} (the safetensors library refuses this file)",
                                file=path, layer=key, expected=f"data_offsets starting at {pos}",
                                found=f"[{begin}, {end}]")
        pos = end
    if pos > data_len:
        key = spans[-1][2]
        raise WanquantError("file is truncated: tensor data runs past the end of the file", file=path, layer=key,
                            expected=f"at least {data_start + pos} bytes", found=f"{size} bytes")
    if pos != data_len:
        raise WanquantError("file has bytes after the last tensor (the safetensors library refuses this file)",
                            file=path, expected=f"{data_start + pos} bytes", found=f"{size} bytes")
