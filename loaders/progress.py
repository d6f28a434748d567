"""A tqdm bar behind the ``progress(done, total)`` callback that loaders/ functions accept
(the command line uses it; ComfyUI nodes pass a ProgressBar-backed callback instead)."""

from __future__ import annotations

import sys


def tqdm_progress(desc: str, unit: str = "tensor"):
    """(update(done, total), close) for a tqdm bar on stderr; no bar when stderr is not a terminal
    (a log file or a pipe would get kilobytes of redraws, and an error line glued to them)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, leave=False, file=sys.stderr, disable=not _is_tty(sys.stderr))

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
