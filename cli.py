"""The ``wanquant`` command: inspect, convert (and remap), merge-lora.

Arguments, progress bars and printing only; the work is done in loaders/ and ops/.
Run without arguments it builds a tiny Wan-shaped example checkpoint and inspects and converts
it, so a newcomer sees the tool work before downloading 20 GB.

Every failure is one line on stderr and an exit code: 2 bad input or options (WanquantError),
1 an OS error, 130 Ctrl-C, 128+N a SIGTERM/SIGHUP, 141 a closed pipe (``inspect --json | head``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from .errors import WanquantError

log = logging.getLogger("wanquant")


def format_report(rep) -> str:
    """Human-readable inspect report."""
    from .loaders.report_text import report_lines

    return "\n".join(report_lines(rep))


def cmd_inspect(args) -> int:
    from .loaders.canonical import load_canonical

    with load_canonical(args.path, nibble_order=args.nibble_order, nvfp4_scale_layout=args.nvfp4_scale_layout,
                        collect_errors=True) as model:
        rep = model.report
    if args.json:
        print(json.dumps(rep.to_json(), indent=1))
    else:
        print(format_report(rep))
    return 1 if rep.errors else 0


def cmd_convert(args) -> int:
    from .loaders.convert import convert

    from .loaders.progress import tqdm_progress

    progress, close = tqdm_progress("convert")
    try:
        result = convert(args.src, args.dst, base=args.base, to=args.to, nibble_order=args.nibble_order,
                         nvfp4_scale_layout=args.nvfp4_scale_layout, progress=progress)
    finally:
        close()
    for line in result.text:
        print(line)
    return 0


def cmd_demo(_args) -> int:
    from .loaders.synthetic import demo_checkpoint
    from .loaders.canonical import load_canonical
    from .loaders.convert import convert

    with tempfile.TemporaryDirectory(prefix="wanquant-demo-") as tmp:
        src = demo_checkpoint(tmp)
        print(f"No checkpoint given: built a tiny Wan-shaped example in a temporary folder, {tmp}\n"
              f"(WorldStereo-style: kijai scaled fp8, diffusers keys, bf16 scales, 'scaled_fp8' marker;\n"
              f"the folder is deleted when this demo ends). Try `wanquant inspect YOUR_FILE` or `wanquant --help`.\n")
        print(f"$ wanquant inspect {Path(src).name}")
        with load_canonical(src) as model:
            print(format_report(model.report))
        dst = Path(tmp) / "tiny-native-comfy.safetensors"
        print(f"\n$ wanquant convert {Path(src).name} {dst.name}")
        result = convert(src, dst)
        for line in result.lines():
            print(line)
        print(f"\n$ wanquant inspect {dst.name}")
        with load_canonical(dst) as model:
            print(format_report(model.report))
    return 0


def _verbose_parent() -> argparse.ArgumentParser:
    """``-v`` for every subcommand too (``wanquant convert -v A B``), without overriding a ``-v``
    given before the subcommand (SUPPRESS: the subparser sets it only when it sees it)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    return parent


def _convert_args(pc: argparse.ArgumentParser) -> None:
    pc.add_argument("src", help="the checkpoint to convert: a .safetensors/.pth/.gguf file, a *.index.json or a "
                                "model folder")
    pc.add_argument("dst", help="output .safetensors (written to a temp file, renamed when complete); "
                                "its folder must exist")
    pc.add_argument("--base", help="base model to overlay a partial finetune on (e.g. Vista4D on Wan2.1-T2V-14B)")
    pc.add_argument("--to", "--fp4-to", dest="to", choices=["bf16", "float8_e4m3fn", "nvfp4", "int8",
                                                            "float8_e4m3fn_rowwise"], default="float8_e4m3fn",
                    help="target for layers stock ComfyUI cannot load: FP4 group-32, GGUF quants, per-row / block "
                         "fp8, block int8 "
                         "(default float8_e4m3fn; int8 = per-channel int8_tensorwise, ComfyUI 0.33's own layout, fast on "
                         "Ampere/Turing; float8_e4m3fn_rowwise loads through wanquant only; --fp4-to is the same option, "
                         "as merge-lora spells it)")
    pc.add_argument("--nibble-order", choices=["auto", "low_first", "high_first"], default="auto",
                    help="FP4 group-32 packing (as for inspect)")
    pc.add_argument("--nvfp4-scale-layout", choices=["auto", "blocked", "row_major"], default="auto",
                    help="NVFP4 block-scale layout without comfy_quant (as for inspect)")
    pc.set_defaults(func=cmd_convert)


DESCRIPTION = ("Inspect, convert (remap) and LoRA-merge quantized Wan video DiT checkpoints: .safetensors "
               "(one file or a sharded *.index.json), .pth and GGUF (.gguf) files. convert --to targets: "
               "bf16, float8_e4m3fn, nvfp4, int8, float8_e4m3fn_rowwise. "
               "Run with no command for a demo on a tiny built-in example.")


def cmd_probe(args) -> int:
    from .ops.probe import probe, render

    rep = probe(bench=not args.no_bench)
    print(json.dumps(rep, indent=1) if args.json else render(rep))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanquant", description=DESCRIPTION)
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command")
    verbose = [_verbose_parent()]

    pi = sub.add_parser("inspect", parents=verbose,
                        help="report container, key style, family and per-layer formats (no model load)")
    pi.add_argument("path", help="a .safetensors/.pth/.gguf file, a *.index.json or a model folder")
    pi.add_argument("--json", action="store_true", help="print one JSON object")
    pi.add_argument("--nibble-order", choices=["auto", "low_first", "high_first"], default="auto",
                    help="FP4 group-32 packing (auto: quantize_config.json, else decided from the weights; "
                         "low_first with a warning when they cannot tell)")
    pi.add_argument("--nvfp4-scale-layout", choices=["auto", "blocked", "row_major"], default="auto",
                    help="block-scale layout of NVFP4 layers without comfy_quant (auto: from shapes, else "
                         "from the scales; refused when they cannot tell)")
    pi.set_defaults(func=cmd_inspect)

    _convert_args(sub.add_parser("convert", parents=verbose,
                                 help="write ComfyUI's native format (loads in stock ComfyUI's UNETLoader)"))
    _convert_args(sub.add_parser("remap", parents=verbose,
                                 help="alias of convert (diffusers/Vista4D/WorldStereo keys → native)",
                                 description="Same as `wanquant convert`: rewrite diffusers/Vista4D/WorldStereo "
                                             "keys to native and write ComfyUI's native format."))
    pp = sub.add_parser("probe", parents=verbose,
                        help="what runs fast on this machine and why, plus a short (<= 10 s) benchmark")
    pp.add_argument("--json", action="store_true", help="print one JSON object")
    pp.add_argument("--no-bench", action="store_true", help="skip the micro-benchmark")
    pp.set_defaults(func=cmd_probe)
    _register_extra_commands(sub, verbose)
    return p


def _register_extra_commands(sub, parents) -> None:
    """Commands contributed by other modules (merge-lora); an import error there is a bug to see."""
    from .lora import cli as lora_cli

    lora_cli.register(sub, parents)


def _fail(message: str, code: int) -> int:
    try:
        print(f"wanquant: {message}", file=sys.stderr)
    except (OSError, ValueError):  # stderr itself gone
        pass
    return code


def _silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so Python's exit-time flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file descriptor (captured in tests)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # a key or path that cannot be encoded must not crash printing
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None) or cmd_demo
    from .loaders.writer import Terminated

    try:
        return func(args)
    except WanquantError as err:
        return _fail(f"error: {err}", 2)
    except KeyboardInterrupt:
        return _fail("interrupted (nothing was written)", 130)
    except Terminated as sig:
        return _fail(f"{sig} (nothing was written)", 128 + sig.signum)
    except BrokenPipeError:
        _silence_stdout()
        return 128 + getattr(signal, "SIGPIPE", 13)
    except MemoryError:
        return _fail("error: out of memory", 1)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(f"error: {exc.strerror or exc}{where}", 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
