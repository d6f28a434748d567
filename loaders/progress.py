"""A tqdm bar behind the ``progress(done, total)`` callback that loaders/ functions accept
(the command line uses it; ComfyUI nodes pass a ProgressBar-backed callback instead)."""

from __future__ import annotations

import sys


def tqdm_progress(desc: str, unit: str = "tensor"):
    """(update(done, total), close) for a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, leave=False, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close
