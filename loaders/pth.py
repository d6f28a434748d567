"""Read a ``.pth``/``.pt``/``.ckpt`` state dict safely: no code runs, nothing huge materialises.

``torch.load(weights_only=True)`` already refuses pickles that need code. What it happily returns,
and what would then blow up later, is refused here before any tensor is touched: a 2 MB file can
hold a ``zeros(1).expand(60000, 60000)`` view that becomes 14 GB the moment anything copies it, and
sparse, meta, quantized or aliased tensors, or non-string keys, are not a checkpoint wanquant can
convert faithfully. Both the zip format and the legacy (pre-1.6) format are read; anything else
(text, a plain pickle) is named for what it is.
"""

from __future__ import annotations

import os
import pickle

import torch

from ..errors import WanquantError
from .header import TORCH_DTYPES, regular_file_size

_ZIP_MAGIC = b"PK\x03\x04"
_STORABLE = set(TORCH_DTYPES.values())


def read_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The validated flat state dict of a torch.save file (zip tensors stay memory-mapped)."""
    path = os.fspath(path)
    regular_file_size(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    is_zip = magic == _ZIP_MAGIC
    if not is_zip and not (len(magic) >= 2 and magic[0] == 0x80 and 2 <= magic[1] <= 5):
        raise WanquantError("not a torch.save file (neither the zip format nor a legacy pickle)", file=path,
                            found=f"starts with {magic!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0][:300]
        if "global" in str(exc).lower():
            raise WanquantError("refused: this pickle needs to run code to load (only plain tensors are "
                                "accepted, torch.load weights_only=True)", file=path, found=first) from exc
        raise WanquantError("corrupt .pth file (its pickle cannot be read)", file=path, found=first) from exc
    except Exception as exc:  # noqa: BLE001 - torch.load fails on hostile bytes with any exception type
        raise WanquantError(f"cannot read .pth file: {type(exc).__name__}: {exc}".splitlines()[0][:500],
                            file=path) from exc
    if isinstance(obj, dict) and len(obj) == 1:
        (only,) = obj.values()
        if isinstance(only, dict):
            obj = only  # {"state_dict": {...}} / {"module": {...}}
    if not isinstance(obj, dict):
        raise WanquantError("the .pth file does not hold a dict of tensors", file=path,
                            expected="a state dict", found=type(obj).__name__)
    if not obj:
        raise WanquantError("the .pth file holds no tensors", file=path, expected="a state dict", found="{}")
    owners: dict[tuple, str] = {}
    for key, t in obj.items():
        _check(path, key, t, owners)
    return obj


def _check(path: str, key, t, owners: dict[tuple, str]) -> None:
    if not isinstance(key, str):
        raise WanquantError("state dict key is not a string", file=path, layer=repr(key)[:100],
                            expected="str keys", found=type(key).__name__)
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise WanquantError("state dict key is not valid Unicode (lone surrogate)", file=path,
                            layer=repr(key)[:100]) from None
    if not isinstance(t, torch.Tensor):
        raise WanquantError("state dict entry is not a tensor", file=path, layer=key, found=type(t).__name__)
    if t.layout != torch.strided or t.is_quantized:
        raise WanquantError("sparse or quantized tensors are not supported", file=path, layer=key,
                            expected="a dense tensor", found=str(t.layout) + (" quantized" if t.is_quantized else ""))
    if t.is_meta:
        raise WanquantError("tensor has no data (a meta tensor)", file=path, layer=key)
    if t.dtype not in _STORABLE:
        raise WanquantError("tensor dtype cannot be stored in safetensors", file=path, layer=key, found=str(t.dtype))
    if t.numel() == 0:
        return
    storage = t.untyped_storage()
    size = t.element_size()
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    if (last + 1) * size > storage.nbytes() or t.numel() * size > storage.nbytes():
        raise WanquantError("tensor claims more data than the file stores (an expanded or overlapping view, "
                            "which would become a huge copy)", file=path, layer=key,
                            expected=f"{t.numel() * size:,} bytes stored", found=f"{storage.nbytes():,} bytes, "
                            f"strides {list(t.stride())}")
    if any(s == 0 for n, s in zip(t.shape, t.stride()) if n > 1):
        raise WanquantError("tensor is an expanded (stride-0) view", file=path, layer=key,
                            expected="a dense tensor", found=f"strides {list(t.stride())}")
    ident = (storage.data_ptr(), storage.nbytes()) if storage.data_ptr() else (id(storage),)
    other = owners.setdefault(ident, key)
    if other != key:
        raise WanquantError("two tensors share one storage (tied or aliased weights would be written twice); "
                            "save them as separate tensors", file=path, layer=key, found=f"shared with '{other}'")
