"""LoRA merge benchmark: time and error of wanquant's merge vs ComfyUI's own LoRA patching.

A rank-64 LoRA (alpha 64) over every Linear of Wan-14B-shaped blocks (dim 5120, ffn 13824; ten
Linears per block), for each quantized format:

* **time**: wanquant's merge (``total_delta`` + ``merge_quantized``: dequantize, add, requantize
  with a fresh scale and seeded stochastic rounding) against ComfyUI's own patch of the same
  layer, i.e. the calls ``ModelPatcher.patch_weight_to_device`` makes on a quantized weight:
  ``convert_weight`` (``QuantizedTensor.dequantize``), ``comfy.lora.calculate_weight`` with a
  ``LoRAAdapter``, ``set_weight`` (``requantize_from_float(scale="recalculate",
  stochastic_rounding=seed)``). Reported per block, scaled to 40 blocks, and as a ratio.
* **error** against the bf16-merged reference ``W_bf16 + strength·(alpha/rank)·up@down`` (fp64):
  the quantized model's merged weights (wanquant / ComfyUI), the same reference quantized
  directly round-to-nearest (the best a merge could do), and "on the fly" (the original quantized
  weight plus the exact LoRA, i.e. only the base model's quantization error).

ComfyUI's side runs only when ``comfy`` imports (run with ComfyUI's python and COMFYUI_PATH set);
otherwise only wanquant's numbers are printed. Each layer's merge is timed ``--reps`` times per
side (median). CPU timings are noisy: read the ratios. The default (one block, four formats,
3 reps) takes ~10 minutes on 2 CPU cores; ``--quick`` (two Linears per block, 1 rep) ~1 minute.

    $COMFY_PY -m wanquant.benchmarks.bench_lora [--quick] [--blocks 1] [--reps 3] [--formats float8_e4m3fn nvfp4 mxfp8 fp4_g32]

``--forward`` times the forward pass instead, per Wan-14B layer shape with M tokens (4096): the fp8
path alone (``linear_fp8_scaled_mm``), the fp8 path plus a rank-64 LoRA on the low-rank side path
(``lora.side``: what "on the fly" runs on wanquant-loaded layers), and ComfyUI's own on-the-fly
handling of the same LoRA on the same fp8 layer (its weight function: dequantize, add
``calculate_weight``'s LoRA delta, dense matmul; wanquant's dequantize + addmm stand-in when ComfyUI
is not importable). Ratios are to the fp8 path alone, from one run (target on GPU: side ≤ 1.1×).
The same table has the int8 W8A8 path (``linear_int8``: per-token int8 activations, ``torch._int_mm``,
per-channel int8 weight) alone and with the same rank-64 LoRA on the side path, as a ratio to int8
alone (on CPU too: ``_int_mm`` has a native CPU kernel).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

DIM, FFN, RANK = 5120, 13824, 64
BLOCK_LINEARS = [("self_attn.q", DIM, DIM), ("self_attn.k", DIM, DIM), ("self_attn.v", DIM, DIM),
                 ("self_attn.o", DIM, DIM), ("cross_attn.q", DIM, DIM), ("cross_attn.k", DIM, DIM),
                 ("cross_attn.v", DIM, DIM), ("cross_attn.o", DIM, DIM), ("ffn.0", FFN, DIM), ("ffn.2", DIM, FFN)]
COMFY_LAYOUT = {"float8_e4m3fn": "TensorCoreFP8E4M3Layout", "float8_e5m2": "TensorCoreFP8E5M2Layout",
                "nvfp4": "TensorCoreNVFP4Layout", "mxfp8": "TensorCoreMXFP8Layout"}


def _comfy():
    """ComfyUI's modules, or None (then only wanquant is measured)."""
    path = os.environ.get("COMFYUI_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    stubs = os.environ.get("WANQUANT_COMFY_STUBS")  # CPU stand-ins for torchvision/torchaudio (shared/comfyui)
    if stubs and stubs not in sys.path:
        sys.path.insert(0, stubs)
    try:
        from comfy.cli_args import args

        args.cpu = not torch.cuda.is_available()
        import comfy.lora
        import comfy.model_management  # noqa: F401
        from comfy.quant_ops import QuantizedTensor
        from comfy.weight_adapter import LoRAAdapter
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        print(f"(ComfyUI not importable: {type(exc).__name__}: {str(exc)[:120]}; timing wanquant only. "
              f"For the comparison run with ComfyUI's python and COMFYUI_PATH set, e.g. "
              f"`COMFYUI_PATH=/path/to/ComfyUI $COMFY_PY -m wanquant.benchmarks.bench_lora`)")
        return None
    return comfy.lora, QuantizedTensor, LoRAAdapter


def _layers(blocks: int, seed: int = 0, linears=BLOCK_LINEARS):
    g = torch.Generator().manual_seed(seed)
    for b in range(blocks):
        for name, o, i in linears:
            w = (torch.randn(o, i, generator=g) / i ** 0.5).to(torch.bfloat16)
            # a distill-LoRA-sized change: ‖ΔW‖ about 10% of ‖W‖
            up = (torch.randn(o, RANK, generator=g) * (0.1 / (i * RANK) ** 0.5)).to(torch.bfloat16)
            down = torch.randn(RANK, i, generator=g).to(torch.bfloat16)
            yield f"blocks.{b}.{name}.weight", w, up, down


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def _median_time(fn, reps: int):
    """(median seconds of ``reps`` calls, the last call's result)."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(blocks: int, formats: list[str], strength: float, reps: int = 3, linears=BLOCK_LINEARS) -> list[dict]:
    from wanquant.lora.keys import LoraPatch
    from wanquant.lora.merge import comfy_seed, merge_quantized, total_delta
    from wanquant.ops.formats import get_format

    comfy = _comfy()
    rows = []
    for fmt_name in formats:
        fmt = get_format(fmt_name)
        acc = {"ours_s": 0.0, "comfy_s": 0.0, "n": 0}
        err = {k: [0.0, 0.0] for k in ("ours", "comfy", "rtn_of_ref", "on_the_fly")}  # Σ‖e‖², Σ‖ref‖²

        def add(kind, got, ref):
            err[kind][0] += float((got.double() - ref).pow(2).sum())
            err[kind][1] += float(ref.pow(2).sum())

        for key, w, up, down in _layers(blocks, linears=linears):
            patch = LoraPatch(key, "lora", (key,), up=up, down=down, alpha=float(RANK), scale=1.0)
            ref = w.double() + strength * (up.double() @ down.double())
            tensors, conf = fmt.quantize(w.float())  # the quantized model as loaded

            def ours():
                delta = total_delta([(patch, strength)], tuple(w.shape))
                return merge_quantized(fmt_name, tensors, conf, delta, key=key)

            dt, (new, new_conf, _) = _median_time(ours, reps)
            acc["ours_s"] += dt
            add("ours", fmt.dequantize(new, torch.float32, new_conf), ref)
            add("on_the_fly", fmt.dequantize(tensors, torch.float32, conf).double() + (ref - w.double()), ref)
            rt, rconf = fmt.quantize(ref.float())
            add("rtn_of_ref", fmt.dequantize(rt, torch.float32, rconf), ref)
            del new, rt
            if comfy is not None and fmt_name in COMFY_LAYOUT:
                lora_mod, QT, LoRAAdapter = comfy
                qt = QT.from_float(w.float(), COMFY_LAYOUT[fmt_name])
                adapter = LoRAAdapter({key}, (up, down, float(RANK), None, None, None))

                def comfy_patch():
                    temp = qt.to(torch.float32, copy=True).dequantize()  # convert_weight
                    out = lora_mod.calculate_weight([(strength, adapter, 1.0, None, None)], temp, key)
                    return qt.requantize_from_float(out, scale="recalculate",
                                                    stochastic_rounding=comfy_seed(key), inplace_ops=True)

                with torch.inference_mode():
                    dt, new_qt = _median_time(comfy_patch, reps)
                acc["comfy_s"] += dt
                add("comfy", new_qt.dequantize().float(), ref)
                del qt, new_qt
            acc["n"] += 1
        row = {"format": fmt_name, "layers": acc["n"], "ours_s": acc["ours_s"],
               "comfy_s": acc["comfy_s"] if comfy is not None and fmt_name in COMFY_LAYOUT else None}
        for k, (num, den) in err.items():
            row[f"err_{k}"] = (num / den) ** 0.5 if den and num else None
        rows.append(row)
    return rows


def run_forward(tokens: int, reps: int, device: str) -> list[dict]:
    """Seconds per forward (median) of fp8 alone / fp8 + side path / ComfyUI's weight-function LoRA."""
    from wanquant.lora.side import LoraSide
    from wanquant.ops.formats import get_format
    from wanquant.ops.linear import linear_fp8_scaled_mm
    from wanquant.ops.linear_grid import linear_int8

    comfy = _comfy()
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, k in sorted({(o, i) for _, o, i in BLOCK_LINEARS}):
        w = torch.randn(n, k, generator=g) / k ** 0.5
        scale = w.abs().amax() / 448.0
        w8 = (w / scale).to(torch.float8_e4m3fn).to(device)
        sc = scale.reshape(()).to(device)
        up = torch.randn(n, RANK, generator=g) * (0.1 / (k * RANK) ** 0.5)
        down = torch.randn(RANK, k, generator=g)
        side = LoraSide([LoraSide.term("bench", 1.0, up=up, down=down)])
        x = torch.randn(tokens, k, generator=g).to(device, dt)
        i8, i8s = (t.to(device) for t in get_format("int8_tensorwise").quantize(w)[0].values())  # per channel

        def fp8():
            return linear_fp8_scaled_mm(x, w8, sc)

        def fp8_side():
            return side.apply(x, linear_fp8_scaled_mm(x, w8, sc), owns_y=True)

        def int8():
            return linear_int8(x, i8, i8s)

        def int8_side():
            return side.apply(x, linear_int8(x, i8, i8s), owns_y=True)

        if comfy is not None:
            lora_mod, QT, LoRAAdapter = comfy
            qt = QT.from_float(w.to(device), COMFY_LAYOUT["float8_e4m3fn"])
            adapter = LoRAAdapter({"w"}, (up.to(device), down.to(device), float(RANK), None, None, None))

            def comfy_fly():  # ComfyUI: cast_bias_weight dequantizes, then the weight function adds the LoRA
                wd = lora_mod.calculate_weight([(1.0, adapter, 1.0, None, None)], qt.dequantize().to(dt), "w")
                return torch.nn.functional.linear(x, wd)
        else:
            upd, downd = up.to(device, dt), down.to(device, dt)

            def comfy_fly():
                wd = torch.addmm(w8.to(dt) * sc.to(dt), upd, downd)
                return torch.nn.functional.linear(x, wd)

        row = {"shape": f"{n}x{k}", "tokens": tokens}
        with torch.inference_mode():
            for name, fn in (("fp8", fp8), ("fp8_side", fp8_side), ("comfy_fly", comfy_fly), ("int8", int8),
                             ("int8_side", int8_side)):
                fn()
                sync()

                def timed(fn=fn):
                    out = fn()
                    sync()
                    return out

                row[name], _ = _median_time(timed, reps)
        rows.append(row)
    return rows


def main_forward(a) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = 512 if a.quick else a.tokens
    reps = 1 if a.quick else max(3, a.reps)
    print(f"forward, M = {tokens} tokens, rank-{RANK} LoRA, {device}, median of {reps}, torch {torch.__version__}")
    print(f"{'shape N x K':<14}{'fp8 ms':>9}{'fp8+side ms':>12}{'ComfyUI ms':>11}{'side/fp8':>9}{'ComfyUI/fp8':>12}"
          f"{'int8 ms':>9}{'int8+side ms':>13}{'side/int8':>10}")
    for r in run_forward(tokens, reps, device):
        print(f"{r['shape']:<14}{r['fp8'] * 1e3:9.1f}{r['fp8_side'] * 1e3:12.1f}{r['comfy_fly'] * 1e3:11.1f}"
              f"{r['fp8_side'] / r['fp8']:9.2f}{r['comfy_fly'] / r['fp8']:12.2f}"
              f"{r['int8'] * 1e3:9.1f}{r['int8_side'] * 1e3:13.1f}{r['int8_side'] / r['int8']:10.2f}")
    print("ComfyUI = its on-the-fly LoRA on the same fp8 layer (dequantize + LoRA delta + dense matmul). "
          "int8 = W8A8 torch._int_mm (per-token activations, per-channel weight).")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=1, help="Wan-14B blocks to build (times are scaled to 40)")
    p.add_argument("--formats", nargs="+", default=["float8_e4m3fn", "nvfp4", "mxfp8", "fp4_g32"])
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3, help="timed merges per layer and side (median)")
    p.add_argument("--quick", action="store_true",
                   help="two Linears per block (self_attn.q, ffn.0) and 1 rep: ~1 minute on 2 cores")
    p.add_argument("--forward", action="store_true",
                   help="time forwards: fp8 alone vs fp8 + rank-64 side path vs ComfyUI's on-the-fly LoRA")
    p.add_argument("--tokens", type=int, default=4096, help="M for --forward (--quick: 512)")
    a = p.parse_args(argv)
    if a.forward:
        return main_forward(a)
    linears = [l for l in BLOCK_LINEARS if l[0] in ("self_attn.q", "ffn.0")] if a.quick else BLOCK_LINEARS
    reps = 1 if a.quick else max(3, a.reps)
    print(f"rank-{RANK} LoRA over {a.blocks} Wan-14B block(s) ({len(linears)} Linears each), "
          f"median of {reps} per layer, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = run(a.blocks, a.formats, a.strength, reps, linears)
    # seconds for a whole 14B model: 40 blocks of all ten Linears (quick: scaled by parameter count)
    per_block = sum(o * i for _, o, i in BLOCK_LINEARS) / sum(o * i for _, o, i in linears)
    scale = 40 / a.blocks * per_block
    print(f"{'format':<14}{'ours s/14B':>11}{'comfy s/14B':>12}{'ratio':>7}  "
          f"{'err ours':>9}{'err comfy':>10}{'ratio':>7}{'RTN(ref)':>9}{'on-the-fly':>11}")
    for r in rows:
        ours, cf = r["ours_s"] * scale, (r["comfy_s"] * scale if r["comfy_s"] is not None else None)
        ratio = f"{ours / cf:7.2f}" if cf else "      -"
        ecf = r["err_comfy"]
        eratio = f"{r['err_ours'] / ecf:7.3f}" if ecf else "      -"
        print(f"{r['format']:<14}{ours:11.1f}{(f'{cf:12.1f}' if cf else '           -')}{ratio}  "
              f"{r['err_ours']:9.2e}{(f'{ecf:10.2e}' if ecf else '         -')}{eratio}"
              f"{r['err_rtn_of_ref']:9.2e}{r['err_on_the_fly']:11.2e}")
    print("ratio = wanquant / ComfyUI (time: < 1 is faster; error: ~1 means the same requantization quality). "
          "Errors are relative L2 vs the bf16-merged reference.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
