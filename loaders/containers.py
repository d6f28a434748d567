"""Container readers: a single safetensors file, a sharded index, a folder, or a ``.pth``.

Every reader yields the same thing, a :class:`Source`: a map of key → :class:`TensorRef` that
knows shape and dtype from the header alone and loads the tensor only when asked. Nothing here
knows about Wan or quantization; it only refuses files that are unsafe or broken (``header``,
``index``, ``pth`` validate them), with a message that names the file and what was expected.

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

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import WanquantError
from .header import TORCH_DTYPES, load_json, read_safetensors_header
from .index import read_index, shard_path
from .gguf_file import is_gguf_path, open_gguf
from .pth import read_pth

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = dict(TORCH_DTYPES)  # one map, owned by the header validator
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

MODEL_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".gguf")
SIDE_FILES = ("config.yaml", "config.json", "quantize_config.json")
MAX_SIDE_FILE_BYTES = 10_000_000  # configs are a few KB

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
    #: a comfy_quant-style conf the container itself knows from the tensor (GGUF block types:
    #: the payload is raw blocks; ``{"format": "gguf_q4_k", "orig_shape": [...]}``), else None
    quant_conf: dict | None = None

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
    container: str  # "safetensors" | "sharded" | "pth" | "gguf"
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


def _open_index(index_path: Path, reader: TensorReader | None = None) -> Source:
    weight_map, index_metadata = read_index(index_path)
    folder = index_path.parent
    shards: dict[str, tuple[dict[str, TensorRef], dict, object]] = {}
    tensors: dict[str, TensorRef] = {}
    metadata: dict[str, str] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or name not in shards:
            shard = shard_path(folder, name, str(index_path), key)
            shards[name] = _open_safetensors(str(shard), reader)
            metadata.update(shards[name][1])
        refs = shards[name][0]
        if key not in refs:
            raise WanquantError("key from the index is missing in its shard", file=str(folder / name), layer=key,
                                expected=f"'{key}' in {name} (as the index says)", found="absent")
        tensors[key] = refs[key]
    unlisted = sum(len(set(r) - set(weight_map)) for r, _, _ in shards.values())
    if unlisted:
        log.warning("%s: %d tensors in shards are not listed in the index and are ignored", index_path, unlisted)
    return Source(str(index_path), "sharded", tensors, metadata, index_metadata=index_metadata,
                  files=[str(folder / n) for n in shards], handles=[h for _, _, h in shards.values()])


def _open_pth(path: Path) -> Source:
    obj = read_pth(path)
    tensors = {k: TensorRef(k, tuple(v.shape), v.dtype, str(path), (lambda v=v: v)) for k, v in obj.items()}
    return Source(str(path), "pth", tensors, files=[str(path)])


def _read_side_files(folder: Path) -> dict[str, object]:
    """config.json / quantize_config.json (JSON) and config.yaml (kept as text): read, never executed."""
    found: dict[str, object] = {}
    for name in SIDE_FILES:
        p = folder / name
        if not p.is_file():
            continue
        if p.stat().st_size > MAX_SIDE_FILE_BYTES:
            raise WanquantError("side file is too large for a config", file=str(p),
                                expected=f"at most {MAX_SIDE_FILE_BYTES:,} bytes", found=f"{p.stat().st_size:,} bytes")
        raw = p.read_bytes()
        if name.endswith(".json"):
            found[name] = load_json(raw, file=str(p), what="side file")
        else:
            found[name] = raw.decode("utf-8", errors="replace")
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
    elif is_gguf_path(p):  # memory-mapped by gguf's reader; tensor_reader is for safetensors
        refs, metadata, handle = open_gguf(str(p))
        src = Source(str(p), "gguf", refs, metadata, files=[str(p)], handles=[handle])
    else:
        refs, metadata, handle = _open_safetensors(str(p), tensor_reader)
        src = Source(str(p), "safetensors", refs, metadata, files=[str(p)], handles=[handle])
    if not src.tensors:
        raise WanquantError("file holds no tensors", file=str(p), expected="a checkpoint or LoRA", found="0 tensors")
    src.side_files = _read_side_files(p.parent)
    return src
