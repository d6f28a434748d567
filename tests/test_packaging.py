"""Install metadata: pyproject.toml for pip and the Comfy Registry, requirements.txt for ComfyUI
installs, and the onnxruntime vs onnxruntime-gpu handling in prestartup_script.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "xformers", "triton"}
ORT = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-rocm"}
# Comfy Registry / comfy_config rules (comfy_config/config_parser.py): one invalid entry empties the list
REGISTRY_OS = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCEL = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                  "GPU :: Apple Metal"}


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements() -> list[Requirement]:
    lines = [l.split("#", 1)[0].strip() for l in (REPO / "requirements.txt").read_text().splitlines()]
    return [Requirement(l) for l in lines if l]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------ registry metadata

def test_registry_fields(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9-]{1,38}", comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    icon = comfy["Icon"]
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/main/.+\.(png|jpg|jpeg|svg|webp)", icon)
    assert (REPO / icon.split("/main/", 1)[1]).is_file(), "the icon URL points at a file that is not in the repo"
    spec = SpecifierSet(comfy["requires-comfyui"])
    assert Version("0.29.0") in spec and Version("0.33.0") in spec and Version("0.28.0") not in spec
    assert isinstance(comfy.get("includes", []), list)


def test_project_fields(pyproject):
    project = pyproject["project"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", project["name"])
    Version(project["version"])
    assert project["description"].strip() and project["license"]
    SpecifierSet(project["requires-python"])
    for key in ("Repository", "Issues", "Documentation"):
        assert project["urls"][key].startswith("https://")
    classifiers = project["classifiers"]
    os_values = [c[len("Operating System :: "):] for c in classifiers if c.startswith("Operating System :: ")]
    accel = [c[len("Environment :: "):] for c in classifiers if c.startswith("Environment ::")]
    assert os_values and all(v.startswith(REGISTRY_OS) for v in os_values)
    assert accel and all(v in REGISTRY_ACCEL for v in accel)


def test_license_is_pep639(pyproject):
    """setuptools deprecates the license table and License :: classifiers (removal 2027-02-18):
    an SPDX expression, license-files that exist, and a setuptools new enough to read them."""
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    files = [p for pattern in project["license-files"] for p in REPO.glob(pattern)]
    assert files and "Apache License" in files[0].read_text()
    req = next(Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools"))
    assert req.specifier.contains("77") and not req.specifier.contains("76.9")


def test_pip_install_mapping_and_entry_points(pyproject):
    st = pyproject["tool"]["setuptools"]
    assert st["package-dir"] == {"wanquant": "."}
    packages = set(st["packages"])
    for init in REPO.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        # hidden folders (.venv, the GPU bundle .gpu) are local, git-ignored artifacts, never shipped
        if rel.parts and (rel.parts[0] in ("tests", "build", "venv") or rel.parts[0].startswith(".")) \
                or "egg-info" in str(rel):
            continue
        name = ".".join(("wanquant", *rel.parts))
        assert name in packages, f"{name} is a package but pip would not install it"
    assert pyproject["project"]["scripts"]["wanquant"] == "wanquant.cli:main"
    extras = pyproject["project"]["optional-dependencies"]
    assert {_norm(Requirement(r).name) for r in extras["test"]} >= {"pytest", "onnx", "onnxruntime"}
    assert [Requirement(r).name for r in extras["pose"]] == ["onnxruntime"]
    assert [Requirement(r).name for r in extras["pose-gpu"]] == ["onnxruntime-gpu"]


# ------------------------------------------------------------------ requirements

def test_requirements_never_touch_torch_or_pick_an_onnxruntime(pyproject):
    reqs = _requirements()
    names = {_norm(r.name) for r in reqs}
    assert not names & TORCH_FAMILY, "ComfyUI owns torch"
    assert not names & ORT, "listing one onnxruntime wheel installs it beside the other"
    kitchen = [r for r in reqs if _norm(r.name) == "comfy-kitchen"]
    assert kitchen and not str(kitchen[0].specifier), "comfy-kitchen is pinned by ComfyUI, not by us"
    deps = {_norm(Requirement(d).name): str(Requirement(d).specifier) for d in pyproject["project"]["dependencies"]}
    assert deps == {_norm(r.name): str(r.specifier) for r in reqs}, "requirements.txt and pyproject disagree"


# what pip (urllib3/requests) prints when no package index can be reached; anything else is a real failure
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "No route to host", "Connection refused",
                  "ConnectTimeoutError", "ReadTimeoutError", "Max retries exceeded", "ProxyError", "Could not fetch URL")


def pip_error(stderr: str) -> str:
    """pip's own error lines, minus the notes about absent local index folders in pip.conf."""
    lines = [l for l in stderr.strip().splitlines() if "is ignored: it is neither a file nor a directory" not in l]
    return "\n".join(lines)[-1500:]


def is_network_error(stderr: str) -> bool:
    return any(s in stderr for s in NETWORK_ERRORS)


def test_pip_network_failures_are_told_apart_from_others(tmp_path):
    """The skip above rests on this: pip's real output for an unreachable index reads as a network
    error, and for an index that is reachable but lacks the package does not (both local, no network)."""
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {"PIP_CONFIG_FILE": os.devnull}
    base = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--retries", "1",
            "--timeout", "2", "safetensors"]
    down = subprocess.run([*base, "--index-url", "http://127.0.0.1:1/simple"], capture_output=True, text=True,
                          env=env, timeout=120)
    (tmp_path / "simple").mkdir()
    empty = subprocess.run([*base, "--index-url", (tmp_path / "simple").as_uri()], capture_output=True, text=True,
                           env=env, timeout=120)
    assert down.returncode != 0 and is_network_error(down.stderr), down.stderr[-1500:]
    assert empty.returncode != 0 and not is_network_error(empty.stderr), empty.stderr[-1500:]


def test_requirements_install_without_resolving_torch(tmp_path):
    """pip's resolver agrees: nothing in requirements.txt depends on torch (dry run, no downloads
    beyond metadata). Skipped only when pip cannot reach a package index; any other pip failure fails."""
    report_file = tmp_path / "report.json"  # not --quiet: that hides the connection errors told apart below
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report",
                        str(report_file), "-r", str(REPO / "requirements.txt")], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        err = pip_error(r.stderr)
        if is_network_error(r.stderr):
            pytest.skip(f"pip cannot reach a package index (network error), so requirements.txt was not resolved:\n{err}")
        pytest.fail(f"pip could not resolve requirements.txt (exit {r.returncode}; not a network error):\n{err}")
    report = json.loads(report_file.read_text())
    names = {_norm(i["metadata"]["name"]) for i in report.get("install", [])}
    assert "safetensors" in names and "comfy-kitchen" in names  # the whole set was resolved
    assert not names & TORCH_FAMILY, names & TORCH_FAMILY
    assert not names & ORT, names & ORT


# ------------------------------------------------------------------ onnxruntime handling

def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def installer():
    return _load(REPO / "install.py", "wanquant_install_under_test")  # not __main__: installs nothing


@pytest.mark.parametrize("present,torch_ver,platform,want", [
    ([], "2.9.0+cu130", "linux", ("install", "onnxruntime-gpu")),
    ([], "2.9.0+cu128", "win32", ("install", "onnxruntime-gpu")),
    ([], "2.13.0+cpu", "linux", ("install", "onnxruntime")),
    ([], "2.9.0", "darwin", ("install", "onnxruntime")),
    ([], None, "linux", ("install", "onnxruntime")),
    (["onnxruntime-gpu"], "2.9.0+cu130", "linux", ("ok", "onnxruntime-gpu")),
    (["onnxruntime"], "2.9.0+cu130", "linux", ("ok", "onnxruntime")),
])
def test_onnxruntime_plan(installer, present, torch_ver, platform, want):
    assert installer.plan(present, torch_ver, platform) == want


def test_both_onnxruntimes_is_reported_with_the_fix(installer):
    action, fix = installer.plan(["onnxruntime", "onnxruntime-gpu"], "2.9.0+cu130", "linux")
    assert action == "conflict"
    assert fix == "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"


def test_install_py_installs_one_wheel_and_nothing_else(installer, monkeypatch):
    calls = []
    monkeypatch.setattr(installer, "installed", lambda *a: [])
    monkeypatch.setattr(installer, "torch_version", lambda: "2.9.0+cu130")
    monkeypatch.setattr(installer.sys, "platform", "linux")
    run = lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", "")  # noqa: E731
    assert installer.ensure_onnxruntime(run=run) == "install"
    assert calls == [[sys.executable, "-m", "pip", "install", "onnxruntime-gpu"]]


def test_install_py_failure_names_the_command(installer, monkeypatch, caplog):
    monkeypatch.setattr(installer, "installed", lambda *a: [])
    monkeypatch.setattr(installer, "torch_version", lambda: "2.13.0+cpu")
    offline = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network")  # noqa: E731
    with caplog.at_level("WARNING"):
        assert installer.ensure_onnxruntime(run=offline) == "failed"
    assert f'"{sys.executable}" -m pip install onnxruntime' in caplog.text and "no network" in caplog.text


def test_install_py_changes_nothing_on_conflict(installer, monkeypatch, caplog):
    monkeypatch.setattr(installer, "installed", lambda *a: ["onnxruntime", "onnxruntime-gpu"])
    run = lambda *a, **k: pytest.fail("must not run pip on a conflict")  # noqa: E731
    with caplog.at_level("WARNING"):
        assert installer.ensure_onnxruntime(run=run) == "conflict"
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in caplog.text


def test_prestartup_only_logs(tmp_path):
    """ComfyUI's start must never run pip: run prestartup_script.py as ComfyUI does (its own module
    name) in a Python where no onnxruntime is importable as a distribution, with subprocess
    creation made to fail loudly; it must log the command and return."""
    code = f"""
import importlib.metadata, logging, subprocess, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
real = importlib.metadata.version
def version(name):
    if name.startswith("onnxruntime"):
        raise importlib.metadata.PackageNotFoundError(name)
    return real(name)
importlib.metadata.version = version
def no_pip(*a, **k):
    raise SystemExit("prestartup ran a subprocess: " + repr(a))
subprocess.run = subprocess.Popen = subprocess.call = subprocess.check_call = no_pip
spec = importlib.util.spec_from_file_location("custom_nodes.wanquant.prestartup_script", {str(REPO / "prestartup_script.py")!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "onnxruntime is not installed" in r.stderr and "-m pip install onnxruntime" in r.stderr
    assert "subprocess" not in (REPO / "prestartup_script.py").read_text()


def test_pose_loader_error_names_the_install_command(monkeypatch):
    from wanquant.errors import WanquantError
    from wanquant.pose import sessions

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(WanquantError) as e:
        sessions.import_ort()
    assert f'"{sys.executable}" -m pip install onnxruntime' in str(e.value)


# ------------------------------------------------------------------ ComfyUI's own parser

@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set; ComfyUI's parser not run")
def test_comfyui_config_parser_reads_our_pyproject():
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]);"
            "from comfy_config import config_parser as c;"
            "cfg = c.extract_node_configuration(sys.argv[2]);"
            "print(json.dumps({'publisher': cfg.tool_comfy.publisher_id, 'name': cfg.tool_comfy.display_name,"
            "'icon': cfg.tool_comfy.icon, 'comfyui': cfg.project.supported_comfyui_version,"
            "'os': cfg.project.supported_os, 'accel': cfg.project.supported_accelerators,"
            "'project': cfg.project.name}))")
    py = os.environ.get("COMFY_PY", sys.executable)
    r = subprocess.run([py, "-c", code, os.environ["COMFYUI_PATH"], str(REPO)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    want = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert got["publisher"] == want["tool"]["comfy"]["PublisherId"]
    assert got["name"] == want["tool"]["comfy"]["DisplayName"] and got["icon"] == want["tool"]["comfy"]["Icon"]
    assert got["comfyui"] == want["tool"]["comfy"]["requires-comfyui"]
    assert got["os"] == ["OS Independent"] and got["accel"] == ["GPU :: NVIDIA CUDA"]
    assert got["project"] == "wanquant"
