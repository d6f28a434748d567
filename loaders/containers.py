"""Container readers: a single safetensors file, a sharded index, a folder, or a ``.pth``.

Every reader yields the same thing, a :class:`Source`: a map of key → :class:`TensorRef` that
knows shape and dtype from the header alone and loads the tensor only when asked. Nothing here
knows about Wan or quantization; it only refuses files that are unsafe or broken, with a message
that names the file and what was expected.

Two ways to read safetensors data, because the two users want opposite things:

* positioned reads into fresh buffers (the default): right for a *writer* (``convert``,
  ``merge-lora``), which holds one tensor at a time and must not grow a 20 GB mapping;
* a ``tensor_reader`` (e.g. ComfyUI's own ``load_torch_file``): tensors backed by the
  memory-mapped file, right for *loading a model*, whose pages then stay file-backed and
  reclaimable exactly as stock ComfyUI keeps them (and carry ComfyUI's own file-slice hints).

``.pth`` goes through ``torch.load(mmap=True, weights_only=True)``. A :class:`Source` owns what
it opened: close it (it is a context manager) and no descriptor or mapping outlives it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import WanquantError

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

MODEL_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".ckpt")
SIDE_FILES = ("config.yaml", "config.json", "quantize_config.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024

#: file path -> its tensors by key, memory-mapped (loaded lazily, once per file)
TensorReader = Callable[[str], Mapping[str, torch.Tensor]]


@dataclass
class TensorRef:
    """A tensor known by its header entry; ``load()`` reads it (lazily, mmap-backed)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    _loader: Callable[[], torch.Tensor] = field(repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def load(self) -> torch.Tensor:
        return self._loader()

    @property
    def loader(self) -> Callable[[], torch.Tensor]:
        """The raw loader (carries ``source_range`` for kernel-side copies when it has one)."""
        return self._loader


@dataclass
class Source:
    """What a container holds: tensors by key, header metadata and side files."""

    path: str
    container: str  # "safetensors" | "sharded" | "pth"
    tensors: dict[str, TensorRef]
    metadata: dict[str, str] = field(default_factory=dict)
    index_metadata: dict = field(default_factory=dict)
    side_files: dict[str, object] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    handles: list = field(default_factory=list, repr=False)  # per-file readers, closed by close()

    def keys(self):
        return self.tensors.keys()

    def close(self) -> None:
        """Close every descriptor and drop every mapping this source opened (idempotent).

        A tensor already handed out stays valid (a mapping lives as long as its tensors); a
        later ``load()`` reopens the file."""
        for handle in self.handles:
            handle.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SafetensorsFile:
    """Reads tensors of one file with positioned reads into fresh buffers.

    Not mmap: a memory map keeps every touched page of a 20 GB file resident in this process,
    so streaming a conversion would still grow RSS to the file size. A positioned read holds
    one tensor at a time; the page cache stays the kernel's business.
    """

    def __init__(self, path: str, data_start: int):
        self.path = path
        self.data_start = data_start
        self._fd: int | None = None

    def read(self, key: str, begin: int, end: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = end - begin
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            out = torch.empty(n, dtype=torch.uint8)  # no zero-fill, unlike bytearray
            got, pos = 0, self.data_start + begin
            view = memoryview(out.numpy())
            while got < n:
                k = os.preadv(self._fd, [view[got:]], pos + got)
                if k <= 0:
                    raise WanquantError("file ended while reading a tensor (truncated?)", file=self.path,
                                        layer=key, expected=f"{n} bytes", found=f"{got}")
                got += k
        except OSError as exc:
            raise WanquantError(f"cannot read tensor: {exc.strerror}", file=self.path, layer=key) from exc
        return out.view(dtype).reshape(shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _MappedFile:
    """Tensors of one file as a ``TensorReader`` hands them out (file-backed, memory-mapped).

    The reader runs once per file, on the first tensor asked for; ``close`` drops its result,
    so the mapping lives exactly as long as the tensors taken from it."""

    def __init__(self, path: str, reader: TensorReader):
        self.path = path
        self.reader = reader
        self._tensors: Mapping[str, torch.Tensor] | None = None

    def read(self, key: str, begin: int, end: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if self._tensors is None:
            try:
                self._tensors = self.reader(self.path)
            except OSError as exc:
                raise WanquantError(f"cannot map file: {exc.strerror}", file=self.path, layer=key) from exc
            except Exception as exc:  # noqa: BLE001 - the reader (ComfyUI's) refused what our header check passed
                raise WanquantError(f"cannot map file ({type(exc).__name__}: {str(exc)[:300]})",
                                    file=self.path, layer=key) from exc
        t = self._tensors.get(key)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            raise WanquantError("memory-mapped tensor differs from the header", file=self.path, layer=key,
                                expected=f"{dtype} {list(shape)}",
                                found="absent" if t is None else f"{t.dtype} {list(t.shape)}")
        return t

    def close(self) -> None:
        self._tensors = None


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Parse and validate a safetensors header without touching the data.

    Returns (entries, metadata, data_start). Checks that the header is complete JSON, that every
    entry's byte range lies inside the file and matches its shape × dtype, so a truncated or
    corrupt download is reported here, not as a crash halfway through sampling.
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WanquantError("file is too short to be safetensors (truncated?)", file=path,
                                    expected="an 8-byte header length", found=f"{len(head)} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise WanquantError("safetensors header is larger than the file (truncated or not safetensors)",
                                    file=path, expected=f"header of {n} bytes within a {size}-byte file")
            raw = f.read(n)
    except OSError as exc:
        raise WanquantError(f"cannot read file: {exc.strerror}", file=path) from exc
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" \x00"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WanquantError(f"safetensors header is not valid JSON ({exc})", file=path) from exc
    if not isinstance(header, dict):
        raise WanquantError("safetensors header is not a JSON object", file=path)
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    for key, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise WanquantError("malformed header entry", file=path, layer=key,
                                expected="dtype, shape and data_offsets", found=repr(info)[:200]) from exc
        if dtype_name not in SAFETENSORS_DTYPES:
            raise WanquantError("unsupported tensor dtype", file=path, layer=key,
                                expected="one of " + ", ".join(SAFETENSORS_DTYPES), found=dtype_name)
        numel = 1
        for s in shape:
            numel *= s
        want = numel * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype_name]).element_size()
        if end - begin != want or begin < 0:
            raise WanquantError("header byte range does not match shape and dtype", file=path, layer=key,
                                expected=f"{want} bytes for {dtype_name}{list(shape)}", found=f"{end - begin}")
        if end > data_len:
            raise WanquantError("file is truncated: tensor data runs past the end of the file",
                                file=path, layer=key, expected=f"at least {data_start + end} bytes",
                                found=f"{size} bytes")
    return header, {str(k): str(v) for k, v in metadata.items()}, data_start


def _open_safetensors(path: str, reader: TensorReader | None = None):
    """(tensor refs, header metadata, the handle that owns the file's descriptor or mapping)."""
    header, metadata, data_start = read_safetensors_header(path)
    handle = _SafetensorsFile(path, data_start) if reader is None else _MappedFile(path, reader)
    refs = {}
    for key, info in header.items():
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        loader = _bind(handle, key, begin, end, dtype, shape, data_start)
        refs[key] = TensorRef(key, shape, dtype, path, loader)
    return refs, metadata, handle


def _bind(handle, key: str, begin: int, end: int, dtype: torch.dtype, shape, data_start: int):
    def load():
        return handle.read(key, begin, end, dtype, shape)

    # lets the writer copy an unchanged tensor file-to-file in the kernel (copy_file_range)
    load.source_range = (handle.path, data_start + begin, end - begin)
    return load


def _inside(folder: Path, name: str, index_path: str) -> Path:
    """Resolve a shard name from an index, refusing anything that leaves the folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or name.startswith(("/", "\\")):
        raise WanquantError("index names a shard outside its folder (absolute path)", file=index_path,
                            expected="a file name relative to the index folder", found=repr(name))
    if ".." in Path(name).parts or ".." in name.replace("\\", "/").split("/"):
        raise WanquantError("index names a shard outside its folder ('..')", file=index_path,
                            expected="a file name relative to the index folder", found=repr(name))
    candidate = folder / name
    real_folder = folder.resolve()
    real = candidate.resolve()
    if real != real_folder and real_folder not in real.parents:
        raise WanquantError("index names a shard that links outside its folder", file=index_path,
                            expected=f"a file inside {real_folder}", found=str(real))
    return candidate


def _open_index(index_path: Path, reader: TensorReader | None = None) -> Source:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WanquantError(f"cannot read shard index ({exc})", file=str(index_path)) from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WanquantError("shard index has no weight_map", file=str(index_path),
                            expected='{"weight_map": {key: shard file}}')
    folder = index_path.parent
    shards: dict[str, tuple[dict[str, TensorRef], dict, object]] = {}
    tensors: dict[str, TensorRef] = {}
    metadata: dict[str, str] = {}
    for key, name in weight_map.items():
        shard = _inside(folder, name, str(index_path))
        if name not in shards:
            if not shard.is_file():
                raise WanquantError("index names a shard that does not exist", file=str(index_path),
                                    layer=key, expected=f"shard file {shard}", found="no such file")
            shards[name] = _open_safetensors(str(shard), reader)
            metadata.update(shards[name][1])
        refs = shards[name][0]
        if key not in refs:
            raise WanquantError("key from the index is missing in its shard", file=str(shard), layer=key,
                                expected=f"'{key}' in {name} (as the index says)", found="absent")
        tensors[key] = refs[key]
    unlisted = sum(len(set(r) - set(weight_map)) for r, _, _ in shards.values())
    if unlisted:
        log.warning("%s: %d tensors in shards are not listed in the index and are ignored", index_path, unlisted)
    return Source(str(index_path), "sharded", tensors, metadata,
                  index_metadata=index.get("metadata") or {}, files=[str(folder / n) for n in shards],
                  handles=[h for _, _, h in shards.values()])


def _open_pth(path: Path) -> Source:
    import pickle

    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy non-zip format
    except pickle.UnpicklingError as exc:
        raise WanquantError("refused: this pickle needs to run code to load (only plain tensors are "
                            "accepted, torch.load weights_only=True)", file=str(path),
                            found=str(exc).splitlines()[0][:300]) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WanquantError(f"cannot read .pth file: {exc}".splitlines()[0][:500], file=str(path)) from exc
    if isinstance(obj, dict) and len(obj) == 1:
        (only,) = obj.values()
        if isinstance(only, dict):
            obj = only  # {"state_dict": {...}} / {"module": {...}}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WanquantError("the .pth file does not hold a flat dict of tensors", file=str(path),
                            expected="a state dict", found=type(obj).__name__)
    tensors = {k: TensorRef(k, tuple(v.shape), v.dtype, str(path), (lambda v=v: v)) for k, v in obj.items()}
    return Source(str(path), "pth", tensors, files=[str(path)])


def _read_side_files(folder: Path) -> dict[str, object]:
    """config.json / quantize_config.json (JSON) and config.yaml (kept as text): read, never executed."""
    found: dict[str, object] = {}
    for name in SIDE_FILES:
        p = folder / name
        if not p.is_file():
            continue
        text = p.read_text(errors="replace")
        if name.endswith(".json"):
            try:
                found[name] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise WanquantError(f"side file is not valid JSON ({exc})", file=str(p)) from exc
        else:
            found[name] = text
    return found


def _pick_in_folder(folder: Path) -> Path:
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise WanquantError("folder holds several shard indexes; pick one", file=str(folder),
                            found=", ".join(p.name for p in indexes))
    models = sorted(p for p in folder.iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file())
    if len(models) == 1:
        return models[0]
    raise WanquantError("folder must hold one shard index or exactly one model file", file=str(folder),
                        expected="*.index.json or one .safetensors/.pth",
                        found=", ".join(p.name for p in models) or "nothing")


def open_source(path: str | os.PathLike, *, tensor_reader: TensorReader | None = None) -> Source:
    """Open a checkpoint given as a file, an index or a folder.

    ``tensor_reader`` (file path -> tensors by key) serves safetensors data instead of
    positioned reads; the loader passes ComfyUI's own mmap reader so the model's pages stay
    file-backed. Headers are always parsed and validated here first."""
    p = Path(path)
    if not p.exists():
        raise WanquantError("no such file or folder", file=str(p))
    if p.is_dir():
        p = _pick_in_folder(p)
    if p.name.endswith(".index.json"):
        src = _open_index(p, tensor_reader)
    elif p.suffix in (".pth", ".pt", ".ckpt"):
        src = _open_pth(p)
    else:
        refs, metadata, handle = _open_safetensors(str(p), tensor_reader)
        src = Source(str(p), "safetensors", refs, metadata, files=[str(p)], handles=[handle])
    src.side_files = _read_side_files(p.parent)
    return src
