"""Benchmark wanquant's linear paths on Wan 14B shapes; prints ratios measured in this run.

    python -m wanquant.benchmarks.bench_linear            # GPU if present, else CPU (small M)
    python -m wanquant.benchmarks.bench_linear --m 512 --device cpu
    python -m wanquant.benchmarks.bench_linear --quick    # one shape, M=128 on CPU: ~1 minute

Every time is the median of ``--reps`` calls (default 3 on CPU, 10 on GPU) after warm-up; the
default CPU run (3 shapes, 6 formats, M=512) takes ~8-12 minutes on 2 cores. GGUF (Q8_0, Q4_K) is
timed on random valid blocks, as wanquant never writes GGUF (its weight error is printed as nan).

Shapes: x [M, K] through q/k/v/o (5120x5120) and the FFN (5120->13824, 13824->5120); on a GPU
M = 32760 (81 frames 480x832 after patching). Per path: time as a ratio to bf16 dense F.linear
with the weight already in bf16 (and, on CPU, to fp32 dense, the fastest dense CPU baseline),
peak extra memory over the inputs, and the relative error against an fp64 reference
``x @ W_deq.T`` on the first rows (W_deq = the fp64 dequantized weight of that format).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ..ops.formats import get_format
from ..ops.formats.gguf import example_tensors as gguf_example
from ..ops.formats.gguf import is_gguf
from ..ops.linear import linear_dequant, linear_fp8_scaled_mm
from ..ops.linear_grid import linear_fp8_rowwise, linear_int8
from ..ops.policy_grid import int8_matmul_possible
from ..ops.policy import choose, probe_device
from ..ops.probe import kitchen_layout_linear, median_time, peak_extra_bytes

SHAPES = {"qkvo": (5120, 5120), "ffn0": (13824, 5120), "ffn2": (5120, 13824)}  # name -> (N, K)
SHAPE_LABELS = {"qkvo": "q/k/v/o 5120x5120", "ffn0": "ffn.0 5120->13824", "ffn2": "ffn.2 13824->5120"}
FORMATS = ("float8_e4m3fn", "nvfp4", "mxfp8", "fp4_g32", "float8_e4m3fn_rowwise", "int8_tensorwise", "gguf_q8_0",
           "gguf_q4_k")
REF_ROWS = 128


def rel(y, ref):
    return float((y[:REF_ROWS].double() - ref).norm() / ref.norm())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--m", type=int, default=None, help="activation rows (default 32760 GPU, 512 CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per path (median; at least 3)")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="comma list of: " + ", ".join(f"{k} ({v})" for k, v in SHAPE_LABELS.items()))
    ap.add_argument("--quick", action="store_true", help="only 'qkvo' and M=128 on CPU (~1 minute on 2 cores)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--cpu-fp8-matmul", action="store_true", help="also time the emulated fp8 matmul on CPU")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    if args.quick:
        args.shapes = "qkvo"
    m = args.m or (32760 if gpu else (128 if args.quick else 512))
    reps = max(3, args.reps or (10 if gpu else 3))
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    caps = probe_device(dev)
    print(f"device: {caps.describe()}  torch {torch.__version__}  M={m}  threads={torch.get_num_threads()}")
    g = torch.Generator().manual_seed(0)
    rows = []
    for sname in args.shapes.split(","):
        n, k = SHAPES[sname]
        w = (torch.randn(n, k, generator=g) * 0.02).to(dev)
        x = (torch.randn(m, k, generator=g) * 2).to(dev)
        xb, xf = x.to(torch.bfloat16), x.float()
        wb = w.to(torch.bfloat16)
        t_bf16 = median_time(lambda: F.linear(xb, wb), dev, 2, reps)
        base = {"bf16": t_bf16}
        if not gpu:
            wf = w.float()
            base["fp32"] = median_time(lambda: F.linear(xf, wf), dev, 1, reps)
            del wf
        print(f"\n{SHAPE_LABELS[sname]}: bf16 dense {t_bf16 * 1e3:.2f} ms" +
              (f", fp32 dense {base['fp32'] * 1e3:.2f} ms" if "fp32" in base else ""))
        xin = xb if gpu else xf
        for fmt in args.formats.split(","):
            f = get_format(fmt)
            if is_gguf(fmt):  # wanquant reads GGUF, never writes it: random valid blocks (same decode cost)
                t, conf = gguf_example(f.qtype, (n, k), g, dev)
            else:
                t, conf = f.quantize(w)
            conf = dict(conf, orig_shape=[n, k])
            w64 = f.dequantize(t, conf=conf).double()
            ref = x[:REF_ROWS].double() @ w64.T
            werr = float("nan") if is_gguf(fmt) else float((w64 - w.double()).norm() / w.double().norm())
            bf_err = rel(F.linear(xb[:REF_ROWS], w64.to(torch.bfloat16)), ref)
            paths = {"dequant": lambda: linear_dequant(xin, fmt, t, None, conf)}
            if fmt == "float8_e4m3fn" and (gpu or args.cpu_fp8_matmul):
                paths["fp8_matmul dynamic"] = lambda: linear_fp8_scaled_mm(xin, t["weight"], t["weight_scale"])
                paths["fp8_matmul scale=1 (ComfyUI)"] = lambda: linear_fp8_scaled_mm(
                    xin, t["weight"], t["weight_scale"], input_scale=torch.tensor(1.0, device=dev))
            if fmt == "float8_e4m3fn_rowwise" and (gpu or args.cpu_fp8_matmul):
                paths["fp8_matmul row-wise (per-token)"] = lambda: linear_fp8_rowwise(xin, t["weight"], t["weight_scale"])
            if fmt == "int8_tensorwise" and int8_matmul_possible(caps)[0]:
                paths["int8_matmul W8A8 (per-token)"] = lambda: linear_int8(xin, t["weight"], t["weight_scale"])
            if fmt in ("nvfp4", "mxfp8") and choose(fmt, caps).path == "kitchen_matmul":
                paths["kitchen_matmul (ComfyUI's layout)"] = kitchen_layout_linear(xin, fmt, w)
            print(f"  {fmt}: weight rel err {werr:.4f}; bf16 dense (same W) output rel err {bf_err:.5f}")
            for pname, fn in paths.items():
                try:
                    tp = median_time(fn, dev, 2 if gpu else 1, reps)
                    mem = peak_extra_bytes(fn, dev)
                    err = rel(fn()[:REF_ROWS], ref)
                except Exception as exc:  # noqa: BLE001 - report and continue with the other paths
                    print(f"    {pname:32s} failed: {type(exc).__name__}: {exc}")
                    continue
                ratios = "  ".join(f"{tp / tb:5.2f}x {b}" for b, tb in base.items())
                memtxt = f"{mem / 2**20:8.1f} MiB extra" if mem is not None else ""
                print(f"    {pname:32s} {tp * 1e3:9.2f} ms  {ratios}  speedup vs bf16 {t_bf16 / tp:5.2f}  "
                      f"rel err {err:.5f}  {memtxt}")
                rows.append((sname, fmt, pname, tp / t_bf16, err))
        del w, x, xb, xf, wb
        if gpu:
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
