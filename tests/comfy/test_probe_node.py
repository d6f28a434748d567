"""The *Hardware probe (wanquant)* node in a real ComfyUI server: listed under wanquant/utils with
a tooltip that says it benchmarks, and it runs (CPU server: the CPU paths and a short benchmark)."""

import time

from wanquant.ops.formats import FORMAT_NAMES


def test_probe_node_is_listed(comfy_server):
    info = comfy_server.get_json("/object_info/WanQuantProbe")["WanQuantProbe"]
    assert info["display_name"] == "Hardware probe (wanquant)"
    assert info["category"] == "wanquant/utils"
    assert info["output"] == ["STRING"] and info["output_node"] is True
    tip = info["input"]["required"]["benchmark"][1]["tooltip"]
    assert "benchmark" in tip and "10 s" in tip


def test_probe_node_runs_and_shows_text(comfy_server):
    t0 = time.time()
    hist = comfy_server.run_prompt({"1": {"class_type": "WanQuantProbe", "inputs": {"benchmark": True}}}, timeout=120)
    assert hist["status"]["status_str"] == "success", hist["status"]
    text = hist["outputs"]["1"]["text"][0]
    assert text.startswith("device: cpu")
    for fmt in FORMAT_NAMES:
        # a CPU ComfyUI dequantizes every format but int8, which runs the CPU's int8 GEMM
        path = "int8_matmul" if fmt == "int8_tensorwise" else "dequant"
        assert f"  {fmt}: {path} - " in text
        assert f"{fmt} {path} (auto)" in text  # ... and timed it
    assert "dense bf16" in text and "x bf16 time" in text
    assert time.time() - t0 < 60
