"""Path choice for per-row fp8 and int8 on faked devices (every SM class, CPU, ROCm), and the
opt-in int8_matmul policy."""

import pytest

from wanquant.errors import WanquantError
from wanquant.ops.policy import DeviceCaps, OpsPlan, choose, validate_option


def gpu(sm, hip=False):
    return DeviceCaps("cuda", sm, f"SM {sm}", (2, 10), (13, 0), hip, True, frozenset())


CPU = DeviceCaps("cpu", None, "cpu", (2, 10), None, False, True)


@pytest.mark.parametrize("caps,row,int8", [
    (gpu((9, 0)), "fp8_matmul", "int8_matmul"), (gpu((8, 9)), "fp8_matmul", "int8_matmul"),
    (gpu((8, 6)), "dequant", "int8_matmul"), (gpu((7, 5)), "dequant", "int8_matmul"),
    (gpu((7, 0)), "dequant", "dequant"), (CPU, "dequant", "int8_matmul"), (gpu((9, 0), hip=True), "dequant", "dequant")])
def test_auto_paths(caps, row, int8):
    assert choose("float8_e4m3fn_rowwise", caps).path == row
    assert choose("int8_tensorwise", caps).path == int8
    for block in ("float8_e4m3fn_blockwise", "float8_e4m3fn_block3d", "int8_blockwise"):
        assert choose(block, caps).path == "dequant"


def test_int8_matmul_option_requantizes_fp8_on_ampere_only_when_asked():
    amp = gpu((8, 6))
    assert choose("float8_e4m3fn", amp).path == "dequant"
    ch = choose("float8_e4m3fn", amp, "int8_matmul")
    assert ch.path == "int8_matmul" and ch.forced and "re-quantized" in ch.reason
    assert choose("nvfp4", amp, "int8_matmul").path == "dequant"  # the option serves fp8 and int8 only


def test_int8_matmul_impossible_device_is_one_error_before_loading():
    with pytest.raises(WanquantError, match="int8_matmul"):
        validate_option("int8_matmul", gpu((7, 0)))
    plan = OpsPlan("int8_matmul", CPU)
    plan.decide("blocks.0.ffn.0", "nvfp4")
    with pytest.raises(WanquantError, match="applies to no layer"):
        plan.finalize()


def test_forced_fp8_matmul_serves_rowwise_on_cpu():
    ch = choose("float8_e4m3fn_rowwise", CPU, "fp8_matmul")
    assert ch.path == "fp8_matmul" and ch.forced
    with pytest.raises(WanquantError, match="fp8_matmul"):
        choose("float8_e4m3fn_rowwise", gpu((8, 6)), "fp8_matmul")
