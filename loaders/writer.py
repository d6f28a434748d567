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
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for i, (key, shape, dtype, load) in enumerate(items):
                t = load()
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise WanquantError("internal: tensor differs from its planned header entry", layer=key,
                                        expected=f"{dtype} {list(shape)}", found=f"{t.dtype} {list(t.shape)}")
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
                del t
                if progress:
                    progress(i + 1, len(items))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return offset
