"""The first impression of the command line (issue 18): help texts read as plain text and
mention the demo, every positional has help, convert and merge-lora spell the FP4 target the
same way, a non-safetensors file is called that, no progress bar is written to a non-terminal,
and merge-lora's report says what it did (once, in the right words)."""

import subprocess
import sys

import pytest
import torch
from fixtures import syn, tiny_wan

from wanquant.cli import build_parser, main as cli_main
from wanquant.lora.keys import render_lora


def _help(*argv) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    return ""


def test_top_level_help_is_plain_text_and_names_the_demo(capsys):
    _help()
    out = capsys.readouterr().out
    assert "``" not in out
    assert "no command" in out and "demo" in out
    for cmd in ("inspect", "convert", "remap", "merge-lora"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["convert", "remap"])
def test_convert_and_remap_help_describe_every_argument(capsys, cmd):
    _help(cmd)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: wanquant {cmd}")
    src_line = next(l for l in out.splitlines() if l.strip().startswith("src"))
    assert len(src_line.split()) > 1, "src has no help text"
    assert "--to" in out and "--fp4-to" in out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    return syn.save(syn.kijai_scaled_fp8(tiny_wan(seed=3), scale_dtype=torch.float32), folder / "m.safetensors")


def test_to_and_fp4_to_are_one_option_in_both_commands():
    p = build_parser()
    assert p.parse_args(["convert", "a", "b", "--fp4-to", "bf16"]).to == "bf16"
    assert p.parse_args(["convert", "a", "b", "--to", "nvfp4"]).to == "nvfp4"
    assert p.parse_args(["merge-lora", "m", "l", "-o", "x", "--to", "bf16"]).fp4_to == "bf16"
    assert p.parse_args(["merge-lora", "m", "l", "-o", "x", "--fp4-to", "nvfp4"]).fp4_to == "nvfp4"


def test_text_file_is_called_not_safetensors(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"_class_name": "WanTransformer3DModel", "dim": 5120}')
    assert cli_main(["inspect", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "not a safetensors file" in err and err.count("\n") == 1


def test_no_progress_bar_when_stderr_is_not_a_terminal(model, tmp_path):
    """A pipe gets the report and nothing else: no tqdm redraws glued to the lines."""
    dst = tmp_path / "out.safetensors"
    run = subprocess.run([sys.executable, "-m", "wanquant.cli", "convert", str(model), str(dst)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "tensor/s" not in run.stderr and "it/s" not in run.stderr
    assert "changed: " in run.stdout and "marker dropped" in run.stdout


def test_merge_lora_report_once_and_in_its_own_words(model, tmp_path, capsys):
    lora = syn.save(render_lora({"blocks.0.self_attn.q": {"up": torch.randn(256, 4), "down": torch.randn(4, 256)},
                                 "blocks.9.self_attn.q": {"up": torch.randn(256, 4), "down": torch.randn(4, 256)}}),
                    tmp_path / "lora.safetensors")
    assert cli_main(["merge-lora", str(model), str(lora), "-o", str(tmp_path / "o.safetensors"), "--nearest"]) == 0
    cap = capsys.readouterr()
    both = cap.out + cap.err
    assert both.count("LoRA keys were not applied") == 1  # the report says it; no second log line
    assert "→ 1 patch " in cap.out and "1 patches" not in cap.out
    assert "nearest rounding" in cap.out and "stochastic" not in cap.out


def test_help_names_gguf_inputs_and_every_convert_target(capsys):
    """Issue 14: GGUF files are read and convert gained int8 / per-row fp8 targets; the help that a
    user reads first says so (top level in prose, inspect/convert on their path arguments)."""
    from wanquant.loaders.convert import FP4_TARGETS

    targets = ("bf16", "float8_e4m3fn", "nvfp4", "int8", "float8_e4m3fn_rowwise")
    assert set(FP4_TARGETS) == set(targets)  # the help below lists exactly what convert accepts
    _help()
    top = " ".join(capsys.readouterr().out.split())
    assert ".gguf" in top and "GGUF" in top
    prose = top.split("--to targets:")[1].split(".")[0]  # the sentence after "--to targets:"
    assert [t.strip() for t in prose.split(",")] == list(targets)
    for cmd, arg in (("inspect", "path"), ("convert", "src"), ("remap", "src")):
        _help(cmd)
        out = capsys.readouterr().out
        line = " ".join(out.split(f"\n  {arg} ")[1].split("\n\n")[0].split())
        assert ".gguf" in line, (cmd, line)
        if cmd != "inspect":
            assert "GGUF" in " ".join(out.split())
            for t in targets:
                assert f",{t}," in out.replace("{", ",").replace("}", ","), (cmd, t)
