"""The report is what ran: for every op policy × compute dtype × format the CPU can exercise,
each Linear runs exactly the path the load-time plan promised (recorded by the forward itself),
and where ComfyUI forces another path at run time (weight patches) the plan says so.

In-process ComfyUI (run with ComfyUI's python, ``COMFYUI_PATH`` set). fp8 ``_scaled_mm`` runs on
CPU, so a forced ``fp8_matmul`` is exercised for real here.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from fixtures import denoise, syn, tiny_wan

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

FORMATS = ("float8_e4m3fn", "nvfp4", "mxfp8", "fp4_g32")
POLICIES = ("auto", "dequant", "fp8_matmul")
DTYPES = ("auto", "bf16", "fp16", "fp32")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny Wan file per format, every block Linear in that format (native comfy_quant)."""
    folder = tmp_path_factory.mktemp("path_taken")
    sd = tiny_wan(seed=3)
    layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]
    out = {}
    for fmt in FORMATS:
        if fmt == "fp4_g32":
            q = syn.fp4_g32(sd, layers, order="high_first")
            path = folder / "fp4" / "model.safetensors"
            (folder / "fp4").mkdir()
            (folder / "fp4" / "quantize_config.json").write_text('{"packing": "high_first"}')
            syn.save(q, path)
        else:
            q, _ = syn.comfy_native(sd, {l: fmt for l in layers})
            path = syn.save(q, folder / f"{fmt}.safetensors")
        out[fmt] = (str(path), layers)
    return out


def _expected_path(policy: str, fmt: str) -> str:
    """What the policy must pick on a CPU for a quantized layer of ``fmt``."""
    if policy == "fp8_matmul" and fmt.startswith("float8"):
        return "fp8_matmul"
    return "dequant"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_executed_path_is_reported_path(comfy_inprocess, files, fmt, policy, dtype):
    from wanquant.errors import WanquantError
    from wanquant.nodes.bridge import load_wan_model

    path, layers = files[fmt]
    if policy == "fp8_matmul" and not fmt.startswith("float8"):
        with pytest.raises(WanquantError, match="applies to no layer"):
            load_wan_model(path, policy=policy, compute_dtype=dtype)
        return
    res = load_wan_model(path, policy=policy, compute_dtype=dtype)
    plan = res.patcher.model.wanquant_plan
    want_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype, torch.float32)
    assert plan.compute_dtype == want_dtype
    out = denoise(res.patcher)
    assert torch.isfinite(out).all()
    want = _expected_path(policy, fmt)
    for layer in layers:
        assert plan.layers[layer].choice.path == want, (layer, plan.layers[layer])
        assert set(plan.executed.get(layer, {})) == {want}, (layer, plan.executed.get(layer))
    assert not plan.divergences(), plan.divergences()
    # every Linear that exists ran something and nothing ran unplanned
    assert set(plan.executed) == set(plan.layers)
    # the report line the user reads names the path that ran
    ops_line = next(l for l in res.report_lines if l.startswith("ops: "))
    assert ("fp8 matmul" in ops_line) == (want == "fp8_matmul"), ops_line


def test_fp8_matmul_survives_a_non_auto_compute_dtype(comfy_inprocess, files):
    """The reviewer's case: fp8_matmul with compute dtype bf16 used to run the fp8 path 0 times."""
    from wanquant.nodes.bridge import load_wan_model

    path, layers = files["float8_e4m3fn"]
    res = load_wan_model(path, policy="fp8_matmul", compute_dtype="bf16")
    denoise(res.patcher)
    ran = res.patcher.model.wanquant_plan.executed
    assert sum("fp8_matmul" in ran.get(l, {}) for l in layers) == len(layers)


def test_runtime_weight_patch_is_reported_as_divergence(comfy_inprocess, files, caplog):
    """A weight function (what lowvram LoRA uses) makes ComfyUI hand the layer a dense weight:
    the forward records 'dequant' with the reason, and the log says so once."""
    from wanquant.nodes.bridge import load_wan_model

    path, layers = files["float8_e4m3fn"]
    res = load_wan_model(path, policy="fp8_matmul")
    layer = layers[0]
    module = res.patcher.model.diffusion_model.get_submodule(layer)
    module.weight_function = [lambda w: w * 1.0]  # per module, as ComfyUI's lowvram patching sets it
    with caplog.at_level(logging.WARNING):
        denoise(res.patcher)
    plan = res.patcher.model.wanquant_plan
    assert set(plan.executed[layer]) == {"dequant"}
    div = plan.divergences()
    assert len(div) == 1
    (planned, ran, why), names = next(iter(div.items()))
    assert (planned, ran, names) == ("fp8_matmul", "dequant", [layer])
    assert "patched at run time" in why
    assert any("planned 'fp8_matmul' but ran 'dequant'" in r.getMessage() for r in caplog.records)
    for other in layers[1:]:
        assert set(plan.executed[other]) == {"fp8_matmul"}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_comfy_native_reports_the_forced_cast(comfy_inprocess, files, dtype):
    from wanquant.nodes.bridge import load_wan_model

    res = load_wan_model(files["float8_e4m3fn"][0], policy="comfy_native", compute_dtype=dtype)
    line = next(l for l in res.report_lines if l.startswith("compute dtype:"))
    assert {"bf16": "bfloat16", "fp16": "float16"}[dtype] in line and "casts every weight" in line
    assert torch.isfinite(denoise(res.patcher)).all()
