"""``wanquant merge-lora MODEL LORA[:strength]... -o OUT``: arguments, progress and printing only.

The work is :func:`wanquant.lora.merge.merge_lora_file`; ``cli.py`` calls
:func:`register` when this module exists.
"""

from __future__ import annotations

from ..loaders.progress import tqdm_progress


def register(subparsers, parents=()) -> None:
    p = subparsers.add_parser(
        "merge-lora", parents=list(parents),
        help="merge LoRAs into a (quantized) model and write ComfyUI's native format",
        description="Dequantize each patched layer, add every LoRA at once, requantize with a fresh scale and "
                    "seeded stochastic rounding (ComfyUI's seeds). Streams: memory is the LoRAs plus one layer.")
    p.add_argument("model", help="a .safetensors/.pth file, a *.index.json or a model folder (any supported format)")
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]",
                   help="LoRA file, optionally with ':strength' (default 1.0); several are applied together")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (written to a temp file, renamed when complete)")
    p.add_argument("--nearest", action="store_true",
                   help="round to nearest instead of stochastic rounding when requantizing (biased for small LoRA changes)")
    p.add_argument("--strict", action="store_true", help="fail if any LoRA key does not match the model")
    p.add_argument("--to", "--fp4-to", dest="fp4_to", choices=["float8_e4m3fn", "nvfp4", "bf16"], default="float8_e4m3fn",
                   help="format for FP4 group-32 layers, which stock ComfyUI cannot load (default float8_e4m3fn; "
                        "the same option as convert's --to, which also offers int8 and float8_e4m3fn_rowwise)")
    p.add_argument("--nibble-order", choices=["auto", "low_first", "high_first"], default="auto",
                   help="FP4 group-32 packing of MODEL (auto: quantize_config.json, else decided from the weights)")
    p.add_argument("--error-report", metavar="JSON",
                   help="also write every merged layer's added requantization error (and LoRA change) to this "
                        "JSON file, worst first (the text output lists the five worst)")
    p.set_defaults(func=cmd_merge_lora)


def cmd_merge_lora(args) -> int:
    import json

    from ..loaders.writer import check_destination, write_text_atomic
    from .merge import merge_lora_file, parse_lora_arg

    loras = [parse_lora_arg(a) for a in args.loras]
    if args.error_report:
        check_destination(args.error_report)  # refused before minutes of merging, not after
    update, close = tqdm_progress("merge-lora")
    try:
        result = merge_lora_file(args.model, loras, args.output, stochastic=not args.nearest,
                                 allow_unmatched=not args.strict, progress=update, fp4_to=args.fp4_to,
                                 nibble_order=None if args.nibble_order == "auto" else args.nibble_order)
    finally:
        close()
    for line in result.text:
        print(line)
    if args.error_report:
        write_text_atomic(args.error_report, json.dumps(
            {"output": result.dst, "rounding": result.stats.rounding, "layers": result.stats.per_layer()}, indent=1))
        print(f"per-layer errors: {args.error_report}")
    return 0
