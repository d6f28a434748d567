"""Streaming safetensors writer: header first, then one tensor at a time, then an atomic rename.

``safetensors.torch.save_file`` needs every tensor in memory at once; a 14B model would need its
whole size in RAM. Here the header is computed from shapes and dtypes alone, each tensor is
loaded, written and dropped, and the result only replaces DST once everything succeeded.

DST is checked before any work (:func:`check_destination`): renaming over a device node, FIFO,
symlink or folder would replace it, and a missing folder is more likely a typo than a wish. The
partial file is created with the umask's normal mode (not ``mkstemp``'s 0600, which another user's
ComfyUI could not read) and removed on any failure, Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import stat
import threading
from contextlib import contextmanager
from typing import Callable, Iterable

import torch

from ..errors import WanquantError
from .containers import DTYPE_TO_SAFETENSORS
from .header import file_kind

log = logging.getLogger(__name__)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Terminated(BaseException):
    """SIGTERM/SIGHUP arrived while writing; raised from the handler so the partial is removed."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def check_destination(dst: str | os.PathLike, *, overwrite: bool = True) -> str:
    """Refuse an output path that cannot (or must not) be replaced by a regular file, before any
    work is done; returns it as a string. ``overwrite=False`` also refuses an existing file."""
    raw = os.fspath(dst)
    if not raw or not raw.strip():
        raise WanquantError("output path is empty", expected="a .safetensors file path")
    if raw.endswith(("/", os.sep)):
        raise WanquantError("output path names a folder (trailing '/')", file=raw, expected="a file path")
    folder = os.path.dirname(os.path.abspath(raw)) or "."
    try:
        fst = os.stat(folder)
    except FileNotFoundError:
        raise WanquantError("output folder does not exist (create it first)", file=raw, found=f"no folder {folder}") from None
    except OSError as exc:
        raise WanquantError(f"cannot use output folder: {exc.strerror}", file=raw) from exc
    if not stat.S_ISDIR(fst.st_mode):
        raise WanquantError("output's parent is not a folder", file=raw, found=f"{folder} is a file")
    try:
        st = os.lstat(raw)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise WanquantError(f"cannot use output path: {exc.strerror}", file=raw) from exc
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise WanquantError("output path is a symbolic link; renaming onto it would replace the link",
                                file=raw, expected="a regular file or a new name", found="a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise WanquantError("output path exists and is not a regular file", file=raw,
                                expected="a regular file or a new name", found=file_kind(st.st_mode))
        if not overwrite:
            raise WanquantError("output file already exists (turn on overwrite to replace it)", file=raw)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WanquantError("output folder is not writable", file=raw, found=folder)
    return raw


@contextmanager
def _signals_raise():
    """Turn SIGTERM/SIGHUP into :class:`Terminated` while writing (main thread only: Python
    delivers signals there; ComfyUI's worker threads keep ComfyUI's own handling)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Terminated(signum)

    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def write_text_atomic(dst: str | os.PathLike, text: str) -> None:
    """A small text file (a report) written next to DST and renamed onto it when complete."""
    raw = check_destination(dst)
    fd, tmp = _create_partial(os.path.dirname(os.path.abspath(raw)) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, raw)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_partial(folder: str) -> tuple[int, str]:
    """A new hidden file next to DST, created with mode 0666 so the umask decides (like any tool)."""
    for _ in range(100):
        tmp = os.path.join(folder, f".wanquant-{secrets.token_hex(6)}.partial")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise WanquantError("cannot create a temporary file next to the output", file=folder)


def write_safetensors(dst: str | os.PathLike, items: Iterable[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
                      metadata: dict[str, str] | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      before_commit: Callable[[], object] | None = None) -> int:
    """Write ``(key, shape, dtype, load)`` items to ``dst``; returns bytes of tensor data written.

    Every loaded tensor must have exactly the promised shape and dtype (checked), so a bug in a
    conversion can never produce a file whose header lies about its data. ``before_commit`` runs
    after the data is complete and before DST is replaced (e.g. to render the report), so a failure
    there leaves DST untouched too. OS errors (full or read-only file system) become one
    :class:`WanquantError` naming DST.
    """
    dst = check_destination(dst)
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
    folder = os.path.dirname(os.path.abspath(dst))
    sources: dict[str, int] = {}
    tmp = None
    try:
        with _signals_raise():
            try:
                fd, tmp = _create_partial(folder)
                _write_body(fd, raw, items, sources, progress)
                if before_commit:
                    before_commit()
                os.replace(tmp, dst)
            except OSError as exc:
                raise WanquantError(f"cannot write output: {exc.strerror or exc}", file=dst) from exc
    except BaseException:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    finally:
        for sfd in sources.values():
            os.close(sfd)
    return offset


def _write_body(fd: int, raw: bytes, items, sources: dict[str, int], progress) -> None:
    with os.fdopen(fd, "wb", buffering=0) as f:
        _write_all(f, len(raw).to_bytes(8, "little") + raw)
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
