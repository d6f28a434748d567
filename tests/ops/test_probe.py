"""The hardware probe under faked devices (SM 7.5 ... 12.0, with and without comfy-kitchen's GPU
backend, CUDA 12.8 vs 13.0 torch builds): the path and the advice a user reads per format; the
real CPU probe's JSON has every field; the README table is the rendered capability table.
"""

import json
from pathlib import Path

import pytest

from wanquant import cli
from wanquant.ops import policy
from wanquant.ops.policy import DeviceCaps
from wanquant.ops.probe import advice, format_paths, probe, render

REPO = Path(__file__).resolve().parents[2]
KITCHEN_GPU_OPS = frozenset({"scaled_mm_nvfp4", "scaled_mm_mxfp8"})
NOTE = "CUDA backend failed to load: libcublasLt.so.13 not found"
SMS = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]


def gpu(sm, cuda=(13, 0), backend=True, kitchen=True, torch_version=(2, 10)):
    ops = KITCHEN_GPU_OPS if backend and kitchen else frozenset()
    return DeviceCaps("cuda", sm, f"fake SM{sm[0]}{sm[1]}", torch_version, cuda, False, kitchen, ops,
                      "" if backend else NOTE)


CPU = DeviceCaps("cpu", None, "cpu", (2, 10), None, False, True, frozenset(), "CUDA not available on this system")


def paths(caps):
    return {f["format"]: (f["path"], f["advice"]) for f in format_paths(caps)}


@pytest.mark.parametrize("cuda", [(12, 8), (13, 0)])
@pytest.mark.parametrize("backend", [True, False])
@pytest.mark.parametrize("sm", SMS)
def test_faked_device_paths_and_advice(sm, backend, cuda):
    got = paths(gpu(sm, cuda, backend))
    fp8_fast = sm >= (8, 9)
    blackwell = sm >= (10, 0)
    for fmt in ("float8_e4m3fn", "float8_e5m2"):
        path, adv = got[fmt]
        if fp8_fast:
            assert path == "fp8_matmul" and "nothing to do" in adv
        else:
            assert path == "dequant"
            assert f"SM {sm[0]}.{sm[1]}) has no fp8 tensor cores" in adv and "Nothing to install" in adv
    for fmt, up in (("nvfp4", "NVFP4"), ("mxfp8", "MXFP8")):
        path, adv = got[fmt]
        if not blackwell:
            assert path == "dequant"
            assert f"{up} tensor cores exist only on Blackwell (SM 10.0+)" in adv
            assert ("an fp8 checkpoint runs faster" in adv) == fp8_fast
            assert "CUDA 13" not in adv  # a new torch does not help a Hopper/Ada/Ampere GPU
        elif backend:
            assert path == "kitchen_matmul" and "nothing to do" in adv
        elif cuda == (12, 8):
            assert path == "dequant"
            assert f"torch is built for CUDA 12.8; {up} tensor cores (comfy-kitchen's CUDA backend) need a CUDA 13 build" in adv
            assert "download.pytorch.org/whl/cu130" in adv
        else:
            assert path == "dequant"
            assert "comfy-kitchen's CUDA backend is unavailable" in adv and NOTE in adv
    path, adv = got["fp4_g32"]
    assert path == "dequant" and "dequantized on every device" in adv
    if blackwell and backend:
        assert adv.endswith("--to nvfp4")
    elif fp8_fast:
        assert adv.endswith("--to float8_e4m3fn")
    else:
        assert "--to" not in adv


def test_kitchen_missing_and_old_torch_are_named():
    adv = advice("nvfp4", gpu((12, 0), kitchen=False))
    assert "pip install comfy-kitchen" in adv
    adv = advice("mxfp8", gpu((10, 0), torch_version=(2, 9)))
    assert "upgrade torch to 2.10+" in adv
    adv = advice("float8_e4m3fn", gpu((8, 9), torch_version=(2, 2)))
    assert "upgrade torch to 2.3 or newer" in adv


def test_cpu_reports_cpu_paths():
    got = paths(CPU)
    # int8 W8A8: the CPU has a native int8 GEMM (torch._int_mm, ~3x fp32 dense at 512x5120x5120)
    assert {f for f, (p, _) in got.items() if p != "dequant"} == {"int8_tensorwise"}
    assert got["int8_tensorwise"][0] == "int8_matmul"
    assert "fastest CPU path" in got["float8_e4m3fn"][1]
    assert "need an NVIDIA Blackwell GPU" in got["nvfp4"][1]


def test_real_probe_json_has_every_field():
    rep = probe(bench=True, budget_s=30, shape=(64, 256), m=8)
    env = rep["environment"]
    for key in ("device", "device_type", "gpu", "sm", "torch", "torch_cuda", "kitchen", "kitchen_backends",
                "kitchen_gpu_ops", "scaled_mm"):
        assert key in env
    assert [f["format"] for f in rep["formats"]] == list(policy.FORMAT_NAMES)
    for f in rep["formats"]:
        assert set(f) == {"format", "path", "reason", "advice"} and f["reason"] and f["advice"]
    b = rep["benchmark"]
    assert b["shape"] == [64, 256] and b["m"] == 8 and b["reps"] >= 3
    rows = b["rows"]
    assert rows[0]["path"] == "dense bf16" and rows[0]["ratio_to_bf16"] == 1.0
    for fmt in policy.FORMAT_NAMES:  # every format has its auto path timed
        auto = [r for r in rows if r["format"] == fmt and r["auto"]]
        assert len(auto) == 1 and auto[0]["ms"] > 0 and auto[0]["ratio_to_bf16"] > 0, auto
    assert not [r for r in rows if "error" in r]
    text = render(rep)
    assert "what 'auto' runs per weight format" in text and "x bf16 time" in text


def test_budget_skips_paths_instead_of_overrunning():
    rep = probe(bench=True, budget_s=0.0, shape=(64, 256), m=8)
    rows = [r for r in rep["benchmark"]["rows"] if r["format"]]
    assert rows and all(r.get("skipped") == "0 s budget spent" for r in rows)
    assert "budget spent" in render(rep)


def test_cli_probe_json(capsys):
    assert cli.main(["probe", "--json", "--no-bench"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["benchmark"] is None and len(rep["formats"]) == len(policy.FORMAT_NAMES)


def test_readme_table_is_the_policy_table():
    readme = (REPO / "README.md").read_text()
    table = policy.render_capability_table()
    assert table in readme, "README 'What runs fast where' is stale: paste `python -m wanquant.ops.policy`"
    # and the table states the capability facts: one row per CAPABILITIES format group
    assert "SM 8.6 has no fp8 matmul (needs 8.9+)" in table
    assert "nvfp4 matmul unavailable: SM 9.0 < 10.0" in table


def test_capability_thresholds_drive_choose(monkeypatch):
    """The table is the source: moving a threshold moves choose's decision and its reason."""
    rows = tuple(policy.Capability(c.path, c.formats, (9, 0) if c.path == "fp8_matmul" else c.min_sm, c.hardware,
                                   c.min_torch, c.torch_gate_below, c.kitchen_op) for c in policy.CAPABILITIES)
    assert policy.choose("float8_e4m3fn", gpu((8, 9))).path == "fp8_matmul"
    monkeypatch.setattr(policy, "CAPABILITIES", rows)
    ch = policy.choose("float8_e4m3fn", gpu((8, 9)))
    assert ch.path == "dequant" and "needs 9.0+" in ch.reason
