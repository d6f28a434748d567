"""``.gguf`` files as a :class:`~.containers.Source` (city96's ComfyUI-GGUF Wan conventions).

Read through the ``gguf`` package's ``GGUFReader``, which memory-maps the file: tensors handed
out are views of the mapping (file-backed pages, no copy), as for safetensors in the loader.

Conventions (city96's ``loader.py`` / ``tools/convert.py``):

* ``general.architecture`` must be ``wan``: a Flux or LLM GGUF is refused, not guessed at;
* tensor names are ComfyUI's native Wan names (``blocks.0.self_attn.q.weight``), sometimes with
  ``model.diffusion_model.`` in front (the usual prefix strip removes it);
* GGUF lists dims innermost first: the torch shape is the reverse; a tensor stored reshaped
  carries its real shape in ``comfy.gguf.orig_shape.<name>`` (an INT32 array);
* F32 / F16 / BF16 tensors are plain tensors here; block-quantized ones are handed on as their
  raw bytes (uint8 [rows, bytes per row]) with ``quant_conf`` = ``{"format": "gguf_<type>",
  "orig_shape": [...]}`` so per-layer detection names the type (never the file name);
* a block-quantized tensor that is not a ``.weight`` (city96 keeps those in F32, but a file may
  not) is dequantized here, exactly, to fp32: nothing but a Linear weight can stay quantized.

Every check names the file and tensor: bad magic or header fields, a type gguf-py or wanquant
cannot decode, data past the end of the file, a shape that does not fit the bytes.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch

from ..errors import WanquantError
from ..ops.formats.gguf import BLOCKS, GGML_TYPE_IDS, PLAIN_TYPES, dequantize_bytes, format_name

log = logging.getLogger(__name__)

ARCHITECTURE = "wan"
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
_TYPE_NAMES = {v: k for k, v in GGML_TYPE_IDS.items()}
_SUPPORTED = " / ".join(GGML_TYPE_IDS)


def _reader_class():
    """``GGUFReader`` with one extra step: every tensor's info is checked before gguf-py slices
    its data, so a bad tensor is reported by name (gguf-py itself raises an anonymous
    ``ValueError`` from deep inside numpy, or silently maps a short array)."""
    try:
        import gguf
    except ImportError as exc:  # a runtime dependency; only missing in a broken install
        raise WanquantError("reading .gguf files needs the 'gguf' package", expected="pip install gguf",
                            found="not importable") from exc

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _check_tensor_info(self.wq_path, field.parts, start_offs, size)
            return super()._build_tensors(start_offs, fields)

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == gguf.GGUFValueType.ARRAY:
                _check_array_length(self, orig_offs, gguf.GGUFValueType)
            return super()._get_field_parts(orig_offs, raw_type)

    return CheckedReader


def _check_array_length(reader, offs: int, value_type) -> None:
    """A metadata array must fit in the bytes after it. gguf-py walks an array item by item and,
    past the end of the file, reads empty items forever: one corrupt count (2**60) hung a load and
    grew its memory without bound. Each item takes at least its scalar size (8 bytes for a
    string's length, 12 for a nested array's header)."""
    head, count = reader._get(offs, np.uint32), reader._get(offs + 4, np.uint64)
    if len(head) < 1 or len(count) < 1:
        raise WanquantError("GGUF metadata array header runs past the end of the file", file=reader.wq_path,
                            expected="item type and count", found=f"file of {len(reader.data)} bytes")
    itype, n = int(head[0]), int(count[0])
    try:
        vtype = value_type(itype)
    except ValueError as exc:
        raise WanquantError("GGUF metadata array has an unknown item type", file=reader.wq_path,
                            expected="a GGUF value type", found=f"type id {itype}") from exc
    scalar = reader.gguf_scalar_to_np.get(vtype)
    least = np.dtype(scalar).itemsize if scalar is not None else (8 if vtype == value_type.STRING else 12)
    room = len(reader.data) - (offs + 12)
    if n * least > room:
        raise WanquantError("GGUF metadata array is longer than the file (corrupt or lying header)",
                            file=reader.wq_path, expected=f"at most {max(room, 0) // least} items of {vtype.name}",
                            found=f"{n} items")


def _check_tensor_info(path: str, parts, start_offs: int, file_size: int) -> None:
    _len, name_data, _n_dims, dims, raw_dtype, offset = parts
    name = bytes(name_data).decode("utf-8", errors="replace")
    type_id = int(raw_dtype[0])
    qtype = _TYPE_NAMES.get(type_id)
    if qtype is None:
        raise WanquantError("GGUF tensor has a quantization type wanquant does not decode", file=path, layer=name,
                            expected=_SUPPORTED, found=f"GGML type id {type_id}")
    shape = [int(d) for d in dims]
    if not shape or any(d <= 0 for d in shape):
        raise WanquantError("GGUF tensor has an empty or zero dimension", file=path, layer=name,
                            expected="positive dims", found=str(shape))
    n = int(np.prod(shape, dtype=object))
    bs, ts = BLOCKS.get(qtype, (1, PLAIN_TYPES[qtype].itemsize if qtype in PLAIN_TYPES else 1))
    if shape[0] % bs:
        raise WanquantError(f"GGUF {qtype} tensor's innermost dim is not a whole number of blocks", file=path,
                            layer=name, expected=f"a multiple of {bs}", found=f"dims {shape}")
    begin = start_offs + int(offset[0])
    end = begin + n // bs * ts
    if end > file_size:
        raise WanquantError("GGUF tensor data runs past the end of the file (truncated or the header lies)",
                            file=path, layer=name, expected=f"bytes {begin}..{end}",
                            found=f"file of {file_size} bytes")


def _string_field(reader, key: str, path: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return str(field.contents())
    except Exception as exc:  # noqa: BLE001 - a malformed field is one clear error
        raise WanquantError(f"GGUF metadata field {key} is malformed", file=path, found=repr(exc)[:120]) from exc


def _orig_shape(reader, name: str, path: str) -> tuple[int, ...] | None:
    field = reader.get_field(ORIG_SHAPE_KEY + name)
    if field is None:
        return None
    try:
        vals = field.contents()
        if not isinstance(vals, list) or not vals:
            raise TypeError("not a non-empty array")
        return tuple(int(v) for v in vals)
    except (TypeError, ValueError) as exc:
        raise WanquantError("GGUF orig_shape metadata is malformed", file=path, layer=name,
                            expected="an array of ints", found=str(exc)) from exc


def _open_reader(path: str):
    reader_cls = _reader_class()
    reader_cls.wq_path = path
    try:
        return reader_cls(path)
    except WanquantError:
        raise
    except OSError as exc:
        raise WanquantError(f"cannot read GGUF file: {exc.strerror}", file=path) from exc
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError/KeyError/IndexError on a lying header
        raise WanquantError("not a readable GGUF file (bad magic, version or header)", file=path,
                            expected="a GGUF v2/v3 file", found=f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def open_gguf(path: str):
    """(tensor refs by name, string metadata, handle) of one ``.gguf`` file."""
    from .containers import TensorRef

    reader = _open_reader(path)
    handle = _Handle(reader)
    arch = _string_field(reader, "general.architecture", path)
    if arch != ARCHITECTURE:
        handle.close()
        raise WanquantError("GGUF file is not a Wan model", file=path, expected=f"general.architecture = '{ARCHITECTURE}'",
                            found=repr(arch))
    refs: dict = {}
    try:
        for i, t in enumerate(reader.tensors):
            refs[t.name] = _ref(TensorRef, handle, i, t, _orig_shape(reader, t.name, path), path)
    except BaseException:
        handle.close()
        raise
    metadata = {"gguf.architecture": arch}
    ftype = reader.get_field("general.file_type")
    if ftype is not None:
        metadata["gguf.file_type"] = str(ftype.contents())
    return refs, metadata, handle


def _ref(TensorRef, handle, index, t, orig, path):
    name = t.name
    qtype = _TYPE_NAMES[int(t.tensor_type)]
    stored = tuple(int(d) for d in reversed(t.shape.tolist()))
    logical = orig or stored
    if int(np.prod(logical, dtype=object)) != int(t.n_elements):
        raise WanquantError("GGUF orig_shape does not hold the tensor's elements", file=path, layer=name,
                            expected=f"{t.n_elements} elements (stored dims {list(stored)})",
                            found=f"orig_shape {list(logical)}")
    if qtype in PLAIN_TYPES:
        dtype = PLAIN_TYPES[qtype]
        return TensorRef(name, logical, dtype, path, lambda: handle.plain(index, dtype, logical))
    conf = {"format": format_name(qtype), "orig_shape": list(logical)}
    if name.endswith(".weight"):
        rows = int(np.prod(stored[:-1], dtype=object)) if len(stored) > 1 else 1
        byte_shape = (rows, int(t.n_bytes) // rows)
        return TensorRef(name, byte_shape, torch.uint8, path, lambda: handle.raw(index, byte_shape), quant_conf=conf)
    log.warning("%s: %s is %s-quantized but not a weight; dequantized to fp32", path, name, qtype)
    return TensorRef(name, logical, torch.float32, path,
                     lambda: dequantize_bytes(handle.raw(index, (int(t.n_bytes),)), qtype, logical))


class _Handle:
    """Owns the reader (and with it the mapping); ``close`` drops it. A tensor already handed out
    keeps its pages mapped; a later load reopens the file."""

    def __init__(self, reader):
        self.path = reader.wq_path
        self._reader = reader
        self._tensors = list(reader.tensors)

    def _data(self, index: int) -> np.ndarray:
        if self._reader is None:  # closed, then asked again: map the file anew
            self._reader = _open_reader(self.path)
            self._tensors = list(self._reader.tensors)
        return self._tensors[index].data

    def _torch(self, index: int) -> torch.Tensor:
        with warnings.catch_warnings():  # the mapping is read-only; nothing here writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self._data(index))

    def plain(self, index: int, dtype: torch.dtype, shape) -> torch.Tensor:
        t = self._torch(index)
        if t.dtype != dtype:  # BF16 arrives as raw uint8 pairs
            t = t.reshape(-1).view(dtype)
        return t.reshape(shape)

    def raw(self, index: int, shape) -> torch.Tensor:
        return self._torch(index).reshape(shape)

    def close(self) -> None:
        self._reader = None
        self._tensors = []


def is_gguf_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")
