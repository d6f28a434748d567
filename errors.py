"""The one error type the pack raises for bad input.

Every problem with a user's file ends as a ``WanquantError`` that names the file, the layer
(or key) and what was expected versus found, so the CLI and the nodes can show one readable
line instead of a traceback from deep inside torch or ComfyUI.
"""

from __future__ import annotations


class WanquantError(Exception):
    """A user-facing problem with an input file or option.

    ``file``, ``layer``, ``expected`` and ``found`` are kept as attributes so tests and the
    report can inspect them; ``str(err)`` is the one-line message.
    """

    def __init__(self, message: str, *, file: str | None = None, layer: str | None = None,
                 expected: str | None = None, found: str | None = None):
        self.message = message
        self.file = None if file is None else str(file)
        self.layer = layer
        self.expected = expected
        self.found = found
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.layer:
            parts.append(f"layer '{self.layer}'")
        head = ": ".join([", ".join(parts), self.message]) if parts else self.message
        detail = []
        if self.expected is not None:
            detail.append(f"expected {self.expected}")
        if self.found is not None:
            detail.append(f"found {self.found}")
        return head + (f" ({'; '.join(detail)})" if detail else "")
