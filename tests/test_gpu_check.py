"""``python -m wanquant.benchmarks.gpu_check --quick`` runs on CPU (what CI can run of the one-call
GPU check): every check passes or is skipped with a reason, the JSON holds every field, the exit
status says whether anything failed. Where ComfyUI is importable (COMFYUI_PATH), its section runs
on a tiny Wan; otherwise it is one SKIP line naming the reason."""

import json
import os
import subprocess
import sys

import pytest

from wanquant.benchmarks.gpu_check import Report
from wanquant.ops.formats import FORMAT_NAMES
from wanquant.ops.policy_grid import BLOCK_GRID_FORMATS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    proc = subprocess.run([sys.executable, "-m", "wanquant.benchmarks.gpu_check", "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_quick_cpu_run_passes(run):
    proc, data = run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert data["summary"]["fail"] == 0
    lines = proc.stdout.splitlines()
    checks = [l for l in lines if l.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert len(checks) == len(data["checks"])  # one printed line per check, in the JSON too
    assert lines[-1].startswith(f"SUMMARY {data['summary']['pass']} passed, 0 failed, {data['summary']['skip']} skipped")


def test_json_has_every_field(run):
    _, data = run
    assert set(data) == {"args", "env", "checks", "summary"}
    for key in ("device", "gpu", "sm", "torch", "torch_cuda", "kitchen", "kitchen_backends", "scaled_mm", "quick"):
        assert key in data["env"]
    assert set(data["summary"]) == {"pass", "fail", "skip", "seconds"}
    for c in data["checks"]:
        assert c["status"] in ("PASS", "SKIP") and c["name"] and c["detail"], c
    names = {c["name"]: c for c in data["checks"]}
    for fmt in FORMAT_NAMES:  # dequant of every format: 2 shapes x fp32/bf16 x 2-D/4-D, within the stated tolerance
        hits = [c for n, c in names.items() if n.startswith(f"correct.dequant.{fmt}.")]
        shapes = 1 if fmt in BLOCK_GRID_FORMATS else 2  # block grids only where the block divides the layer
        assert len(hits) == 4 * shapes and all(c["rel_err"] <= c["tol"] for c in hits), fmt
    for kind in ("int8", "fp8_rowwise"):  # both run on CPU: 2 shapes x (2-D+bias, 4-D)
        hits = [c for n, c in names.items() if n.startswith(f"correct.{kind}_matmul.")]
        assert len(hits) == 4 and all(c["status"] == "PASS" and c["rel_err"] <= c["tol"] for c in hits), kind
    fp8 = [c for n, c in names.items() if n.startswith("correct.fp8_matmul.")]  # CPU runs _scaled_mm emulated
    assert len(fp8) == 16 and all(c["status"] == "PASS" and c["rel_err"] <= c["tol"] for c in fp8)
    assert {c["status"] for n, c in names.items() if n.startswith("correct.kitchen_matmul.")} == {"SKIP"}
    for shape in ("qkvo", "ffn0", "ffn2"):
        base = names[f"speed.{shape}.m64.dense_bf16"]
        assert base["ratio_to_bf16"] == 1.0 and base["ms"] > 0
        for p in ("fp8_matmul_dynamic", "fp8_matmul_static", "fp8_comfy_scale1", "float8_e4m3fn_dequant",
                  "nvfp4_dequant", "mxfp8_dequant", "fp4_g32_dequant"):
            c = names[f"speed.{shape}.m64.{p}"]
            assert c["ms"] > 0 and c["ratio_to_bf16"] > 0 and "peak_extra_mib" in c
    if os.environ.get("COMFYUI_PATH"):
        for fmt in ("float8_e4m3fn", "fp4_g32"):
            assert names[f"comfy.vs_bf16.{fmt}"]["status"] == "PASS"
            assert names[f"comfy.lowvram.{fmt}"]["streamed"] > 0
            assert names[f"comfy.compile.{fmt}.graph_breaks"]["ours"] == []
    else:
        assert names["comfy"]["status"] == "SKIP" and "COMFYUI_PATH" in names["comfy"]["detail"]


def test_exit_status_is_nonzero_iff_a_check_failed(capsys):
    rep = Report()
    rep.add("PASS", "a", "ok")
    rep.add("SKIP", "b", "no device")
    assert rep.exit_code() == 0
    rep.check(False, "c", "rel err 1 (tol 0.1)")
    assert rep.exit_code() == 1
    assert rep.summary()["fail"] == 1 and rep.to_json({})["checks"][2]["status"] == "FAIL"
    assert capsys.readouterr().out.splitlines() == ["PASS a ok", "SKIP b no device", "FAIL c rel err 1 (tol 0.1)"]
