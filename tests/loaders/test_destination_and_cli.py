"""Outputs and the command line (issue 12): a DST that is not a regular file is refused before any
work, outputs get the umask's mode, DST is replaced only when everything succeeded, every failure
(OS errors, signals, Ctrl-C, closed pipes) is one line and an exit code, and LoRA/scale values that
would write inf/NaN are refused."""

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from fixtures import syn, tiny_wan

from wanquant.cli import main as cli_main
from wanquant.errors import WanquantError
from wanquant.loaders import writer
from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.containers import open_source
from wanquant.lora.keys import parse_lora
from wanquant.lora.merge import merge_lora_file

OLD = b"the user's model, must survive"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return syn.save(syn.kijai_scaled_fp8(tiny_wan(), scale_dtype=torch.float32),
                    tmp_path_factory.mktemp("src") / "m.safetensors")


def one_line_error(capsys, rc, want_rc=2):
    err = capsys.readouterr().err
    assert rc == want_rc, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def no_partials(folder):
    return not [p for p in os.listdir(folder) if p.startswith(".wanquant-")]


# ---------------------------------------------------------------- DST checks, before any work

def test_dst_fifo_directory_symlink_and_device_are_refused(tmp_path, src, capsys):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    target = tmp_path / "real.safetensors"
    target.write_bytes(OLD)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    cases = {fifo: "not a regular file", folder: "not a regular file", link: "symbolic link"}
    try:
        dev = tmp_path / "null.safetensors"
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers; root only
        cases[dev] = "not a regular file"
    except PermissionError:
        dev = None
    for dst, why in cases.items():
        err = one_line_error(capsys, cli_main(["convert", str(src), str(dst)]))
        assert why in err and str(dst) in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir() and os.listdir(folder) == []
    assert link.is_symlink() and target.read_bytes() == OLD
    if dev is not None:
        assert stat.S_ISCHR(os.lstat(dev).st_mode)
    assert no_partials(tmp_path)


@pytest.mark.parametrize("make,why", [
    (lambda t: str(t / "out") + "/", "trailing '/'"),
    (lambda t: str(t / "missing" / "o.safetensors"), "folder does not exist"),
    (lambda t: (t / "file").write_bytes(b"x") and str(t / "file" / "o.safetensors"), "parent is not a folder"),
    (lambda t: "", "empty"),
])
def test_dst_path_shapes_refused(tmp_path, src, capsys, make, why):
    dst = make(tmp_path)
    err = one_line_error(capsys, cli_main(["convert", str(src), dst]))
    assert why in err
    assert not (tmp_path / "missing").exists() and not (tmp_path / "out").exists()


def _read_only_folder(folder):
    """A folder this process cannot write into. Mode 0555 stops everyone but root; root (CI runs
    as root) is stopped by the immutable attribute, which even root's writes obey."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    run = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if run.returncode:
        pytest.skip(f"running as root and `chattr +i` failed ({run.stderr.strip()}): no folder root cannot write")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_dst_in_read_only_folder(tmp_path, src, capsys):
    ro = tmp_path / "ro"
    undo = _read_only_folder(ro)
    try:
        err = one_line_error(capsys, cli_main(["convert", str(src), str(ro / "o.safetensors")]))
        assert "not writable" in err
    finally:
        undo()


def test_dst_refused_before_any_work(tmp_path, capsys):
    # the source is broken too: the DST problem is reported first, so no time is spent on the model
    bad_src = tmp_path / "broken.safetensors"
    bad_src.write_bytes(b"garbage")
    err = one_line_error(capsys, cli_main(["convert", str(bad_src), str(tmp_path / "nope" / "o.safetensors")]))
    assert "folder does not exist" in err


# ---------------------------------------------------------------- mode, commit, cleanup

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_output_mode_follows_umask(tmp_path, src, umask, mode):
    old = os.umask(umask)
    try:
        assert cli_main(["convert", str(src), str(tmp_path / "o.safetensors")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "o.safetensors").st_mode) == mode


def test_failure_before_commit_leaves_dst_untouched(tmp_path):
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(OLD)

    def report_fails():
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
    with pytest.raises(UnicodeEncodeError):
        writer.write_safetensors(dst, [("a", (2,), torch.float32, lambda: torch.ones(2))], before_commit=report_fails)
    assert dst.read_bytes() == OLD and no_partials(tmp_path)


def test_lone_surrogate_key_refused_before_anything_is_written(tmp_path, capsys):
    import json
    import struct
    raw = json.dumps({"blocks.0.\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    p = tmp_path / "s.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(OLD)
    err = one_line_error(capsys, cli_main(["convert", str(p), str(dst)]))
    assert "surrogate" in err and dst.read_bytes() == OLD


def _messages(stderr: str) -> list[str]:
    """stderr lines that are not the progress bar (tqdm redraws with \\r)."""
    lines = [seg for line in stderr.splitlines() for seg in line.split("\r")]
    return [ln for ln in lines if ln.strip() and not ln.startswith(("convert:", "merge-lora:"))]


def _run_cli_with_signal(tmp_path, src, dst, sig):
    """Run the real `wanquant convert` in a child that sends itself ``sig`` once the first tensor
    bytes are written (the signal timing is the only thing injected)."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        from wanquant.loaders import writer
        orig = writer._write_all
        def write_then_signal(f, data):
            orig(f, data)
            os.kill(os.getpid(), signal.{sig.name})
        writer._write_all = write_then_signal
        from wanquant.cli import main
        sys.exit(main(["convert", {str(src)!r}, {str(dst)!r}]))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signals_remove_the_partial_and_exit_in_one_line(tmp_path, src, sig, rc):
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(OLD)
    r = _run_cli_with_signal(tmp_path, src, dst, sig)
    assert r.returncode == rc, r.stderr
    assert "Traceback" not in r.stderr and len(_messages(r.stderr)) == 1, r.stderr
    assert dst.read_bytes() == OLD and no_partials(tmp_path)


def test_full_file_system_is_one_line(tmp_path, src):
    """A file-size limit makes write() fail like a full disk (EFBIG instead of ENOSPC)."""
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(OLD)
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from wanquant.cli import main
        sys.exit(main(["convert", {str(src)!r}, {str(dst)!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(_messages(r.stderr)) == 1 and "cannot write output" in r.stderr
    assert dst.read_bytes() == OLD and no_partials(tmp_path)


def test_broken_pipe_is_quiet(src):
    p = subprocess.Popen([sys.executable, "-m", "wanquant.cli", "inspect", "--json", str(src)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # like `| head` exiting before the output is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert err == "", err


# ---------------------------------------------------------------- arguments and messages

def test_verbose_after_the_subcommand(src, tmp_path, capsys):
    assert cli_main(["inspect", str(src), "-v"]) == 0
    assert cli_main(["-v", "inspect", str(src)]) == 0
    assert cli_main(["convert", "-v", str(src), str(tmp_path / "o.safetensors")]) == 0


def test_remap_help_names_remap(capsys):
    with pytest.raises(SystemExit):
        cli_main(["remap", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: wanquant remap")


def _lora(path, sd_model, alpha=2.0, dtype=torch.float32, extra=None):
    g = torch.Generator().manual_seed(3)
    o, i = sd_model["blocks.0.ffn.0.weight"].shape
    lora = {"diffusion_model.blocks.0.ffn.0.lora_up.weight": (torch.randn(o, 4, generator=g) * 0.01).to(dtype),
            "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(4, i, generator=g).to(dtype),
            "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(alpha)}
    lora.update(extra or {})
    return syn.save(lora, path)


@pytest.fixture(scope="module")
def model_and_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    sd = tiny_wan()
    model = syn.save(sd, root / "model.safetensors")
    return model, _lora(root / "lora.safetensors", sd), sd


def test_strict_message_names_a_real_flag(tmp_path, model_and_lora, capsys):
    model, _, sd = model_and_lora
    lora = _lora(tmp_path / "l.safetensors", sd, extra={"diffusion_model.nothing_here.lora_up.weight": torch.zeros(2, 1),
                                                       "diffusion_model.nothing_here.lora_down.weight": torch.zeros(1, 2)})
    err = one_line_error(capsys, cli_main(["merge-lora", str(model), str(lora), "-o", str(tmp_path / "o.safetensors"),
                                           "--strict"]))
    assert "--allow-unmatched" not in err and "--strict" in err


def test_strength_that_is_not_a_number(tmp_path, model_and_lora, capsys):
    model, lora, _ = model_and_lora
    err = one_line_error(capsys, cli_main(["merge-lora", str(model), f"{lora}:abc", "-o", str(tmp_path / "o.safetensors")]))
    assert "strength is not a number" in err and "'abc'" in err and "no such file" not in err


def test_lora_given_as_base_or_model_is_refused(tmp_path, model_and_lora, capsys):
    model, lora, _ = model_and_lora
    dst = tmp_path / "o.safetensors"
    err = one_line_error(capsys, cli_main(["convert", str(model), str(dst), "--base", str(lora)]))
    assert "--base is a LoRA" in err and "merge-lora" in err
    err = one_line_error(capsys, cli_main(["merge-lora", str(lora), str(lora), "-o", str(dst)]))
    assert "is a LoRA" in err
    assert not dst.exists()


@pytest.mark.parametrize("alpha,strength", [(3e38, 1.0), (float("inf"), 1.0), (2.0, 1e30), (2.0, float("nan"))])
def test_lora_alpha_and_strength_out_of_range(tmp_path, model_and_lora, capsys, alpha, strength):
    model, _, sd = model_and_lora
    lora = _lora(tmp_path / "l.safetensors", sd, alpha=alpha)
    dst = tmp_path / "o.safetensors"
    err = one_line_error(capsys, cli_main(["merge-lora", str(model), f"{lora}:{strength}", "-o", str(dst)]))
    assert "out of range" in err or "NaN or Inf" in err
    assert not dst.exists()


def test_fp8_lora_factors_merge_like_their_bf16_values(tmp_path, model_and_lora):
    model, _, sd = model_and_lora
    l8 = _lora(tmp_path / "l8.safetensors", sd, dtype=torch.float8_e4m3fn)
    merge_lora_file(model, [(str(l8), 1.0)], tmp_path / "o.safetensors", stochastic=False)
    f8 = open_source(l8).tensors
    up = f8["diffusion_model.blocks.0.ffn.0.lora_up.weight"].load().double()
    down = f8["diffusion_model.blocks.0.ffn.0.lora_down.weight"].load().double()
    want = sd["blocks.0.ffn.0.weight"].double() + (2.0 / 4) * (up @ down)  # fp64 reference from the raw file
    got = load_canonical(tmp_path / "o.safetensors").entries["blocks.0.ffn.0.weight"].load().double()
    rel = float((got - want).norm() / want.norm())
    assert rel < 4e-3  # one bf16 rounding of the merged weight (2^-9 relative per element)


def test_int_lora_keys_refused(tmp_path):
    with pytest.raises(WanquantError, match="not a string"):
        parse_lora({1: torch.zeros(2, 2)}, file="x.pth")
    p = tmp_path / "l.pth"
    torch.save({7: torch.zeros(2, 2)}, p)
    with pytest.raises(WanquantError, match="not a string"):
        merge_lora_file(p, [(str(p), 1.0)], tmp_path / "o.safetensors")


@pytest.mark.parametrize("value", [3e38, float("nan"), float("inf")])
def test_fp4_group_scale_out_of_range_writes_nothing(tmp_path, capsys, value):
    q = syn.fp4_g32(tiny_wan(), ["blocks.0.ffn.0"])
    scale = q["blocks.0.ffn.0.weight_scale"].clone()
    scale[3, 1] = value
    q["blocks.0.ffn.0.weight_scale"] = scale
    src = syn.save(q, tmp_path / "fp4.safetensors")
    dst = tmp_path / "o.safetensors"
    for to in ("float8_e4m3fn", "nvfp4", "bf16"):
        err = one_line_error(capsys, cli_main(["convert", str(src), str(dst), "--to", to]))
        assert "blocks.0.ffn.0" in err
        assert not dst.exists() and no_partials(tmp_path)


def test_empty_and_negative_dim_inputs_write_nothing(tmp_path, capsys):
    import json
    import struct
    empty = tmp_path / "e.pth"
    torch.save({}, empty)
    neg = tmp_path / "n.safetensors"
    raw = json.dumps({"blocks.0.ffn.0.bias": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}).encode()
    neg.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    dst = tmp_path / "o.safetensors"
    for path, why in ((empty, "no tensors"), (neg, "shape")):
        err = one_line_error(capsys, cli_main(["convert", str(path), str(dst)]))
        assert why in err
    assert not dst.exists()
