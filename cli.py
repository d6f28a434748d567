"""The ``wanquant`` command: inspect, convert (and remap), merge-lora.

Arguments, progress bars and printing only; the work is done in loaders/ and ops/.
Run without arguments it builds a tiny Wan-shaped example checkpoint and inspects and converts
it, so a newcomer sees the tool work before downloading 20 GB.
"""

from __future__ import annotations

import argparse
import json
import logging
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

    with load_canonical(args.path, nibble_order=args.nibble_order, collect_errors=True) as model:
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
                         progress=progress)
    finally:
        close()
    print(format_report(result.report))
    for line in result.lines():
        print(line)
    return 0


def cmd_demo(_args) -> int:
    from .loaders.synthetic import demo_checkpoint
    from .loaders.canonical import load_canonical
    from .loaders.convert import convert

    with tempfile.TemporaryDirectory(prefix="wanquant-demo-") as tmp:
        src = demo_checkpoint(tmp)
        print(f"No checkpoint given: built a tiny Wan-shaped example at {src}\n"
              f"(WorldStereo-style: kijai scaled fp8, diffusers keys, bf16 scales, 'scaled_fp8' marker).\n"
              f"Try `wanquant inspect YOUR_FILE` or `wanquant --help`.\n")
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


def cmd_probe(args) -> int:
    from .ops.probe import probe, render

    rep = probe(bench=not args.no_bench)
    print(json.dumps(rep, indent=1) if args.json else render(rep))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanquant", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command")

    pi = sub.add_parser("inspect", help="report container, key style, family and per-layer formats (no model load)")
    pi.add_argument("path", help="a .safetensors/.pth file, a *.index.json or a model folder")
    pi.add_argument("--json", action="store_true", help="print one JSON object")
    pi.add_argument("--nibble-order", choices=["auto", "low_first", "high_first"], default="auto",
                    help="FP4 group-32 packing (default: quantize_config.json, else low_first)")
    pi.set_defaults(func=cmd_inspect)

    pc = sub.add_parser("convert", help="write ComfyUI's native format (loads in stock ComfyUI's UNETLoader)")
    pc.add_argument("src")
    pc.add_argument("dst", help="output .safetensors (written to a temp file, renamed when complete)")
    pc.add_argument("--base", help="base model to overlay a partial finetune on (e.g. Vista4D on Wan2.1-T2V-14B)")
    pc.add_argument("--to", choices=["bf16", "float8_e4m3fn", "nvfp4"], default="float8_e4m3fn",
                    help="target for FP4 group-32 layers, which stock ComfyUI cannot load (default float8_e4m3fn)")
    pc.add_argument("--nibble-order", choices=["auto", "low_first", "high_first"], default="auto")
    pc.set_defaults(func=cmd_convert)

    pp = sub.add_parser("probe", help="what runs fast on this machine and why, plus a short (<= 10 s) benchmark")
    pp.add_argument("--json", action="store_true", help="print one JSON object")
    pp.add_argument("--no-bench", action="store_true", help="skip the micro-benchmark")
    pp.set_defaults(func=cmd_probe)

    sub.add_parser("remap", parents=[], add_help=True,
                   help="alias of convert (diffusers/Vista4D/WorldStereo keys → native)").set_defaults(func=None)
    _register_extra_commands(sub)
    return p


def _register_extra_commands(sub) -> None:
    """Commands contributed by other modules (e.g. merge-lora)."""
    try:
        from .loaders import lora_cli
    except ImportError:
        return
    lora_cli.register(sub)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "remap":
        argv = ["convert", *argv[1:]]
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None) or cmd_demo
    try:
        return func(args)
    except WanquantError as err:
        print(f"wanquant: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
