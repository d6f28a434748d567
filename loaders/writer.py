"""Streaming safetensors writer: header first, then one tensor at a time, then an atomic rename.

``safetensors.torch.save_file`` needs every tensor in memory at once; a 14B model would need its
whole size in RAM. Here the header is computed from shapes and dtypes alone, each tensor is
loaded, written and dropped, and the result only replaces DST once everything succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Callable, Iterable

import torch

from ..errors import WanquantError
from .containers import DTYPE_TO_SAFETENSORS

log = logging.getLogger(__name__)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_safetensors(dst: str | os.PathLike, items: Iterable[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
                      metadata: dict[str, str] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> int:
    """Write ``(key, shape, dtype, load)`` items to ``dst``; returns bytes of tensor data written.

    Every loaded tensor must have exactly the promised shape and dtype (checked), so a bug in a
    conversion can never produce a file whose header lies about its data.
    """
    items = list(items)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, shape, dtype, _ in items:
        if dtype not in DTYPE_TO_SAFETENSORS:
            raise WanquantError("dtype cannot be stored in safetensors", layer=key, found=str(dtype))
        n = 1
        for s in shape:
            n *= s
        size = n * _element_size(dtype)
        header[key] = {"dtype": DTYPE_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    dst = os.fspath(dst)
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".wanquant-", suffix=".partial", dir=folder)
    sources: dict[str, int] = {}
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for i, (key, shape, dtype, load) in enumerate(items):
                rng = getattr(load, "source_range", None)
                if not (rng and _copy_range(sources, rng, f.fileno())):
                    t = load()
                    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                        raise WanquantError("internal: tensor differs from its planned header entry", layer=key,
                                            expected=f"{dtype} {list(shape)}", found=f"{t.dtype} {list(t.shape)}")
                    t = t.detach().to("cpu").contiguous()
                    if t.numel():
                        _write_all(f, t.reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
                    del t
                if progress:
                    progress(i + 1, len(items))
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        for sfd in sources.values():
            os.close(sfd)
    return offset


def _write_all(f, data) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n:]


def _copy_range(sources: dict[str, int], rng: tuple[str, int, int], dst_fd: int) -> bool:
    """Copy bytes unchanged from a source file in the kernel; False when the OS cannot."""
    path, offset, count = rng
    if not hasattr(os, "copy_file_range") or count == 0:
        return False
    try:
        if path not in sources:
            sources[path] = os.open(path, os.O_RDONLY)
        start = os.lseek(dst_fd, 0, os.SEEK_CUR)
        done = 0
        while done < count:
            n = os.copy_file_range(sources[path], dst_fd, count - done, offset + done)
            if n <= 0:
                raise OSError("short copy")
            done += n
        return True
    except OSError:
        try:
            os.lseek(dst_fd, start, os.SEEK_SET)  # fall back to read + write from the same place
            os.ftruncate(dst_fd, start)
        except (OSError, UnboundLocalError):
            pass
        return False
