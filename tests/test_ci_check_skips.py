""".ci/check_skips.py, which fails a CI run with ComfyUI on any skip that .ci/allowed-skips does not name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" skipped="2" tests="3">
<testcase classname="tests.loaders.test_comfy_algos" name="test_a[asym_w4a8_int8-0.31.0]">
<skipped type="pytest.skip" message="this comfy-kitchen has no AsymW4A8Int8Layout">x</skipped></testcase>
<testcase classname="tests.comfy.test_frontend_load" name="test_b">
<skipped type="pytest.skip" message="no chromium, chromium-browser or google-chrome on PATH">x</skipped></testcase>
<testcase classname="tests.test_packaging" name="test_c"/>
</testsuite></testsuites>"""


@pytest.fixture()
def check():
    spec = importlib.util.spec_from_file_location("check_skips", REPO / ".ci" / "check_skips.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unlisted_skip_fails_and_listed_ones_pass(check, tmp_path, monkeypatch, capsys):
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    monkeypatch.delenv("WANQUANT_CI_NO_CHROMIUM", raising=False)
    assert check.main(str(junit), str(REPO / ".ci" / "allowed-skips")) == 1
    out = capsys.readouterr()
    assert "NOT ALLOWED  tests.comfy.test_frontend_load::test_b: no chromium" in out.out
    assert "allowed      tests.loaders.test_comfy_algos::test_a" in out.out
    monkeypatch.setenv("WANQUANT_CI_NO_CHROMIUM", "1")  # .ci/run sets it only where apt-get is missing
    assert check.main(str(junit), str(REPO / ".ci" / "allowed-skips")) == 0


def test_frontend_skip_reason_is_one_the_allowlist_knows(check, monkeypatch):
    """The [no-chromium] entry must match the reason test_frontend_load really gives."""
    reason = "no chromium, chromium-browser or google-chrome on PATH"
    assert reason in (REPO / "tests" / "comfy" / "test_frontend_load.py").read_text()
    monkeypatch.setenv("WANQUANT_CI_NO_CHROMIUM", "1")
    patterns = check.allowed_patterns(str(REPO / ".ci" / "allowed-skips"))
    assert any(p.search(f"tests.comfy.test_frontend_load::test_x: {reason}") for p in patterns)
