"""``wanquant merge-lora`` on the int8 W8A8, row-wise fp8, block-grid and GGUF formats.

Scale-grid layers are merged in their own format (same comfy_quant format, same scale grid: a
per-tensor int8 scale stays per tensor) and ``--error-report`` lists every merged layer's added
requantization error; each merged weight and each reported number is recomputed here in fp64 from
the raw written tensors (``q * scale[cell]`` by index arithmetic) and the raw LoRA tensors. GGUF,
which wanquant reads but cannot write, is refused before anything is written with one error that
names the layer, the format and the way out (convert first, which is then checked to work).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from fixtures import ref_scale_grid
from safetensors.torch import load_file

from wanquant.cli import main as cli_main
from wanquant.loaders import synthetic, synthetic_grid
from wanquant.lora.keys import render_lora
from wanquant.ops.formats import get_format

STRENGTH = 0.8
RANK = 4
MODES = {"int8_tensor": "int8_tensorwise", "int8_row": "int8_tensorwise", "fp8_row": "float8_e4m3fn_rowwise",
         "fp8_block": "float8_e4m3fn_blockwise", "int8_block": "int8_blockwise"}
DATA = Path(__file__).resolve().parents[1] / "data" / "gguf"


def _sd():
    return synthetic.wan_state_dict(dim=128, ffn_dim=256, num_blocks=1, text_dim=64, freq_dim=32, seed=11)


def _layers(sd):
    return [l for l in synthetic.quantizable_linears(sd) if l.startswith("blocks.")]


def _lora(sd):
    g = torch.Generator().manual_seed(7)
    return {l: {"up": torch.randn(sd[f"{l}.weight"].shape[0], RANK, generator=g) * 0.05,
                "down": torch.randn(RANK, sd[f"{l}.weight"].shape[1], generator=g), "alpha": 2.0} for l in _layers(sd)}


def _deq64(t: dict, layer: str) -> torch.Tensor:
    return ref_scale_grid(t[f"{layer}.weight"], t[f"{layer}.weight_scale"])


def _fmt(t: dict, layer: str) -> str:
    return json.loads(bytes(t[f"{layer}.comfy_quant"].tolist()).decode())["format"]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_merge_lora_keeps_the_format_and_reports_each_layers_added_error(tmp_path, mode, capsys):
    sd = _sd()
    d = _lora(sd)
    src_t = synthetic_grid.ctq(sd, mode, block=64, layers=_layers(sd))
    src = synthetic.save(src_t, tmp_path / "src.safetensors")
    lora = synthetic.save(render_lora(d, "comfy"), tmp_path / "l.safetensors")
    out, rep = tmp_path / "merged.safetensors", tmp_path / "errors.json"
    assert cli_main(["merge-lora", str(src), f"{lora}:{STRENGTH}", "-o", str(out), "--error-report", str(rep)]) == 0
    assert f"per-layer errors: {rep}" in capsys.readouterr().out
    got_t = load_file(str(out))
    report = json.loads(rep.read_text())["layers"]
    assert set(report) == set(d)
    fmt = get_format(MODES[mode])
    for layer, p in d.items():
        assert _fmt(got_t, layer) == MODES[mode]
        assert got_t[f"{layer}.weight"].dtype == src_t[f"{layer}.weight"].dtype
        # the same scale grid (canonical form may write a row scale [N] as [N, 1])
        assert got_t[f"{layer}.weight_scale"].numel() == src_t[f"{layer}.weight_scale"].numel(), layer
        ref = _deq64(src_t, layer) + STRENGTH * (p["alpha"] / RANK) * (p["up"].double() @ p["down"].double())
        got = _deq64(got_t, layer)
        rel = float((got - ref).norm() / ref.norm())
        # tolerance scale: the format's own round-to-nearest error of the reference (stochastic
        # rounding has about √2 its RMS error)
        t, conf = fmt.quantize(ref.float(), conf={"format": MODES[mode], "group_size": 64,
                                                  "per_tensor": src_t[f"{layer}.weight_scale"].numel() == 1})
        rtn = float((fmt.dequantize(t, torch.float64, conf) - ref).norm() / ref.norm())
        assert 0 < rel < 1.6 * rtn, (layer, rel, rtn)
        assert report[layer]["requant_rel"] == pytest.approx(rel, rel=2e-3), layer
        delta = float((ref - _deq64(src_t, layer)).norm() / _deq64(src_t, layer).norm())
        assert report[layer]["delta_rel"] == pytest.approx(delta, rel=2e-3), layer


def test_merge_lora_refuses_gguf_naming_layer_and_format_and_convert_first_works(tmp_path, capsys):
    pytest.importorskip("gguf")
    spec = importlib.util.spec_from_file_location("make_gguf", DATA / "make_gguf.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    sd = _sd()
    d = _lora(sd)
    src = tmp_path / "m.gguf"
    recipe.write_wan_gguf(src, sd, {f"{l}.weight": "Q8_0" for l in _layers(sd)})
    lora = synthetic.save(render_lora(d, "comfy"), tmp_path / "l.safetensors")
    out, rep = tmp_path / "merged.safetensors", tmp_path / "errors.json"
    assert cli_main(["merge-lora", str(src), str(lora), "-o", str(out), "--error-report", str(rep)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "layer 'blocks.0." in err and "gguf_q8_0" in err and "wanquant convert" in err and "on the fly" in err
    assert not out.exists() and not rep.exists()
    conv = tmp_path / "fp8.safetensors"
    assert cli_main(["convert", str(src), str(conv), "--to", "float8_e4m3fn"]) == 0
    assert cli_main(["merge-lora", str(conv), str(lora), "-o", str(out), "--error-report", str(rep)]) == 0
    assert set(json.loads(rep.read_text())["layers"]) == set(d)
