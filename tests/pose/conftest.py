"""Make the fake-ONNX builders (``onnx_fakes.py``) importable from the pose tests."""

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    """Each test gets its own sha256 cache instead of the user's ~/.cache/wanquant."""
    monkeypatch.setenv("WANQUANT_CACHE_DIR", str(tmp_path / "wq-cache"))
