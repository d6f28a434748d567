"""The path policy under faked devices: capability 7.5 ... 12.0 and CPU, torch CUDA builds, and
comfy-kitchen with or without its CUDA backend; forced options; the per-layer and summary report.
"""

import pytest
import torch

from wanquant.errors import WanquantError
from wanquant.ops import policy
from wanquant.ops.policy import DeviceCaps, OpsPlan, choose, validate_option


KITCHEN_GPU_OPS = frozenset({"scaled_mm_nvfp4", "scaled_mm_mxfp8", "quantize_nvfp4", "quantize_mxfp8"})


def gpu(sm, cuda=(13, 0), kitchen_cuda=True, torch_version=(2, 13), kitchen=True, mx=True):
    ops = set(KITCHEN_GPU_OPS) if kitchen_cuda and kitchen else set()
    if not mx:
        ops -= {"scaled_mm_mxfp8", "quantize_mxfp8"}
    note = "" if kitchen_cuda else "CUDA backend failed to load: libcublasLt.so.13 not found"
    return DeviceCaps("cuda", sm, f"fake SM{sm[0]}{sm[1]}", torch_version, cuda, False, kitchen, frozenset(ops), note)


CPU = DeviceCaps("cpu", None, "cpu", (2, 13), None, False, True, frozenset(), "CUDA not available on this system")

# capability -> expected auto path for (fp8, nvfp4, mxfp8, fp4_g32) with a CUDA-13 torch + kitchen CUDA
TABLE = [
    ((7, 5), "dequant", "dequant", "dequant"),
    ((8, 0), "dequant", "dequant", "dequant"),
    ((8, 6), "dequant", "dequant", "dequant"),
    ((8, 9), "fp8_matmul", "dequant", "dequant"),
    ((9, 0), "fp8_matmul", "dequant", "dequant"),
    ((10, 0), "fp8_matmul", "kitchen_matmul", "kitchen_matmul"),
    ((12, 0), "fp8_matmul", "kitchen_matmul", "kitchen_matmul"),
]


@pytest.mark.parametrize("sm,fp8,nv,mx", TABLE)
def test_auto_path_by_capability(sm, fp8, nv, mx):
    caps = gpu(sm)
    assert choose("float8_e4m3fn", caps).path == fp8
    assert choose("float8_e5m2", caps).path == fp8
    assert choose("nvfp4", caps).path == nv
    assert choose("mxfp8", caps).path == mx
    assert choose("fp4_g32", caps).path == "dequant"
    assert choose(None, caps).path == "dense"
    if fp8 == "dequant":
        assert "needs 8.9" in choose("float8_e4m3fn", caps).reason


def test_cpu_never_gets_a_kernel_path_in_auto():
    for fmt in ("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "fp4_g32"):
        assert choose(fmt, CPU).path == "dequant"
    assert "CPU" in choose("float8_e4m3fn", CPU).reason


def test_blackwell_gate_is_comfyuis_plus_kitchens_own_report():
    # ComfyUI gates NVFP4 on SM >= 10 only: a CUDA 12.8 torch whose kitchen backend lists the
    # matmul runs it (the old gate also demanded a CUDA-13 torch and dequantized here)
    assert choose("nvfp4", gpu((10, 0), cuda=(12, 8))).path == "kitchen_matmul"
    c = choose("nvfp4", gpu((12, 0), kitchen_cuda=False))
    assert c.path == "dequant" and "no GPU backend for scaled_mm_nvfp4" in c.reason
    assert "libcublasLt.so.13 not found" in c.reason  # kitchen's own reason is passed on
    c = choose("mxfp8", gpu((10, 0), kitchen=False))
    assert c.path == "dequant" and "not importable" in c.reason
    c = choose("mxfp8", gpu((10, 0), torch_version=(2, 9)))
    assert c.path == "dequant" and "torch < 2.10" in c.reason
    c = choose("mxfp8", gpu((10, 0), mx=False))
    assert c.path == "dequant" and "scaled_mm_mxfp8" in c.reason
    # both failing conditions are named at once
    c = choose("nvfp4", gpu((9, 0), kitchen_cuda=False))
    assert "SM 9.0 < 10.0" in c.reason and "no GPU backend" in c.reason
    # fp8 is unaffected by the kitchen/CUDA build
    assert choose("float8_e4m3fn", gpu((10, 0), cuda=(12, 8), kitchen=False)).path == "fp8_matmul"


def test_sm89_needs_torch_2_3_and_static_scale_is_reported():
    assert choose("float8_e4m3fn", gpu((8, 9), torch_version=(2, 2))).path == "dequant"
    c = choose("float8_e4m3fn", gpu((9, 0)), has_input_scale=True)
    assert c.path == "fp8_matmul" and c.static_input_scale and "static input_scale" in c.reason
    assert "amax/448" in choose("float8_e4m3fn", gpu((9, 0))).reason


def test_full_precision_flag_and_nvfp4_shape_constraint():
    assert choose("float8_e4m3fn", gpu((9, 0)), conf={"full_precision_matrix_mult": True}).path == "dequant"
    assert choose("nvfp4", gpu((10, 0)), shape=(64, 48)).path == "dequant"  # K pads to 48, not 32-aligned
    assert choose("nvfp4", gpu((10, 0)), shape=(64, 64)).path == "kitchen_matmul"


def test_forced_options():
    # dequant is always possible
    for caps in (CPU, gpu((9, 0)), gpu((12, 0))):
        assert choose("nvfp4", caps, "dequant").path == "dequant"
        assert choose("float8_e4m3fn", caps, "dequant").forced
    # fp8_matmul: torch supports it on CPU, so forcing it there is allowed
    assert choose("float8_e4m3fn", CPU, "fp8_matmul").path == "fp8_matmul"
    assert validate_option("FP8_matmul", CPU) == "fp8_matmul"
    # ... but not on an RTX 3090: a clear error before anything runs
    with pytest.raises(WanquantError) as e:
        validate_option("fp8_matmul", gpu((8, 6)))
    assert "SM 8.6" in str(e.value)
    with pytest.raises(WanquantError):
        choose("float8_e4m3fn", gpu((8, 6)), "fp8_matmul", layer="blocks.0.ffn.0")
    # a forced option leaves formats it does not serve on auto
    assert choose("nvfp4", gpu((9, 0)), "fp8_matmul").path == "dequant"
    # kitchen matmul never on CPU or Hopper, nor on Blackwell when kitchen lists no GPU backend
    for caps in (CPU, gpu((9, 0)), gpu((10, 0), kitchen_cuda=False)):
        with pytest.raises(WanquantError):
            validate_option("kitchen_matmul", caps)
    assert choose("mxfp8", gpu((10, 0)), "kitchen_matmul").path == "kitchen_matmul"
    with pytest.raises(WanquantError):
        validate_option("fastest", CPU)


def wan_layers(n_blocks=40):
    names = []
    for i in range(n_blocks):
        names += [f"blocks.{i}.self_attn.{p}" for p in "qkvo"]
        names += [f"blocks.{i}.cross_attn.{p}" for p in "qkvo"]
        names += [f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.2"]
    return names


def test_plan_summary_and_report_for_a_wan_14b_layout():
    plan = OpsPlan("auto", gpu((9, 0)), compute_dtype=torch.bfloat16)
    for nm in wan_layers():
        plan.decide(nm, "float8_e4m3fn", shape=(5120, 5120))
    for nm in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
               "time_projection.1", "head.head"):
        plan.decide(nm, None, dtype=torch.bfloat16)
    plan.finalize()
    assert plan.summary() == ("40×4 self-attention + 40×4 cross-attention + 40×2 FFN layers: "
                              "fp8 matmul with dynamic scaling; head and embeddings: bf16")
    assert plan.counts() == {"fp8_matmul": 400, "dense": 6}
    rep = plan.report().splitlines()
    assert rep[0].startswith("device: fake SM90 (SM 9.0") and "option: auto" in rep[0]
    assert "blocks.3.ffn.2 5120x5120 [float8_e4m3fn] -> fp8_matmul: SM 9.0 has fp8 tensor cores" in plan.report()
    assert any(line.startswith("head.head [bf16] -> dense") for line in rep)


def test_plan_on_cpu_mixed_formats_summary():
    plan = OpsPlan("auto", CPU, compute_dtype=torch.float32)
    for i in range(2):
        for p in "qkvo":
            plan.decide(f"blocks.{i}.self_attn.{p}", "nvfp4")
        plan.decide(f"blocks.{i}.ffn.0", "fp4_g32")
        plan.decide(f"blocks.{i}.ffn.2", "fp4_g32")
    plan.decide("head.head", None, dtype=torch.float32)
    assert plan.summary() == ("2×4 self-attention layers: nvfp4 dequantized to fp32; "
                              "2×2 FFN layers: fp4_g32 dequantized to fp32; head and embeddings: fp32")


def test_forced_option_that_serves_no_layer_is_an_error():
    plan = OpsPlan("fp8_matmul", CPU, compute_dtype=torch.float32)
    plan.decide("blocks.0.ffn.0", "fp4_g32")
    with pytest.raises(WanquantError) as e:
        plan.finalize()
    assert "fp4_g32" in str(e.value)


def test_plan_uses_the_probe_function(monkeypatch):
    calls = []

    def fake_probe(device=None):
        calls.append(device)
        return gpu((8, 6))

    monkeypatch.setattr(policy, "probe_device", fake_probe)
    with pytest.raises(WanquantError):
        OpsPlan("fp8_matmul", "cuda:0")
    assert calls == ["cuda:0"]
    assert OpsPlan("auto", "cuda:0").decide("x", "float8_e4m3fn").path == "dequant"


def test_real_probe_on_this_machine():
    caps = policy.probe_device("cpu")
    assert caps.device_type == "cpu" and caps.sm is None and not caps.kitchen_gpu_ops
    assert caps.torch_version >= (2, 0)
