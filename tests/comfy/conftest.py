"""Harness for tests that need a real ComfyUI checkout (``COMFYUI_PATH``).

Two ways to reach ComfyUI:

* ``comfy_server``: a headless ``main.py --cpu`` subprocess (run by ``COMFY_PY``, the ComfyUI
  venv's python, default ``python``) with a scratch base directory whose ``custom_nodes/wanquant``
  links to this checkout and whose ``models/`` the test fills. Used for import, /object_info and
  prompt-execution tests. The interpreter running pytest does not need ComfyUI's dependencies.
* ``comfy_inprocess``: imports ComfyUI into this interpreter (CPU mode). Only possible when
  pytest itself runs in the ComfyUI venv (``$COMFY_PY -m pytest tests/comfy``); otherwise skips.

Without ``COMFYUI_PATH`` every test here skips with the reason. CI (``.ci/run``) sets it up from
``../shared/comfyui`` and runs these on ComfyUI 0.33.0 and 0.29.0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
STUBS = os.environ.get("WANQUANT_COMFY_STUBS", str(REPO.parent / "shared" / "comfyui" / "stubs"))

needs_comfyui = pytest.mark.skipif(
    not COMFYUI_PATH or not Path(COMFYUI_PATH, "main.py").is_file(),
    reason="COMFYUI_PATH is not set to a ComfyUI checkout; real-ComfyUI tests skipped "
           "(see README: 'Tests', the full command)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A running headless ComfyUI with its own base directory."""

    def __init__(self, base: Path):
        self.base = base
        self.models = base / "models"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> None:
        py = os.environ.get("COMFY_PY", sys.executable)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (STUBS, env.get("PYTHONPATH", "")) if p)
        cmd = [py, str(Path(COMFYUI_PATH, "main.py")), "--cpu", "--port", str(self.port),
               "--listen", "127.0.0.1", "--disable-api-nodes", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.base, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log()[-4000:]}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2).read()
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        raise RuntimeError(f"ComfyUI did not start in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get_json(self, path: str):
        return json.loads(urllib.request.urlopen(self.url + path, timeout=60).read())

    def submit(self, prompt: dict) -> dict:
        body = json.dumps({"prompt": prompt, "client_id": str(uuid.uuid4())}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            return json.loads(urllib.request.urlopen(req, timeout=60).read())
        except urllib.error.HTTPError as e:
            return {"http_error": e.code, **json.loads(e.read() or b"{}")}

    def run_prompt(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Submit an API-format prompt and wait for its history entry (status + outputs)."""
        answer = self.submit(prompt)
        if "prompt_id" not in answer:
            raise AssertionError(f"prompt rejected: {json.dumps(answer)[:4000]}")
        pid = answer["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get_json(f"/history/{pid}")
            if pid in hist:
                return hist[pid]
            time.sleep(0.5)
        raise AssertionError(f"prompt {pid} did not finish in {timeout}s\n{self.log()[-4000:]}")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A shared ComfyUI server; tests put files under ``server.models/<folder>`` before use.

    Model folders are listed per request by ComfyUI, so files added after start are seen."""
    if not COMFYUI_PATH or not Path(COMFYUI_PATH, "main.py").is_file():
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "models/diffusion_models", "models/loras", "models/detection",
                "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    os.symlink(REPO, base / "custom_nodes" / "wanquant")
    # test-only nodes (stand-in conditioning, latent/image statistics output nodes)
    os.symlink(Path(__file__).resolve().parent / "test_node_pack", base / "custom_nodes" / "wanquant_test_nodes")
    server = ComfyServer(base)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy_inprocess():
    """Import ComfyUI into this interpreter on CPU, or skip when that is impossible."""
    if not COMFYUI_PATH or not Path(COMFYUI_PATH, "main.py").is_file():
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    if STUBS not in sys.path:
        # first, so the torchaudio stand-in wins over a CUDA torchaudio that cannot import here
        sys.path.insert(0, STUBS)
    try:
        from comfy.cli_args import args

        args.cpu = True
        import comfy.model_management  # noqa: F401  (must come after args.cpu)
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {COMFYUI_PATH} is not importable from this interpreter ({exc}); "
                    f"run these tests with the ComfyUI venv's python")
    return Path(COMFYUI_PATH)
