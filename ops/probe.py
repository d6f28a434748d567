"""What runs fast on this machine, and why: the hardware probe behind ``wanquant probe`` and the
*Hardware probe (wanquant)* node.

Users cannot see why a format is slow on their machine (no CUDA-13 torch for NVFP4, no fp8
tensor cores on an RTX 3090, ...). The probe reports, per format, the path ``choose`` picks on
this device with its reason and one thing the user can do about it, then times each available
path at a Wan-14B FFN shape as a ratio to dense bf16 (a short benchmark, <= ``budget_s``).

Every fact comes from ``policy.CAPABILITIES`` through ``choose`` and the capability predicates;
only the advice wording lives here. Also home of the timing helpers the GPU check shares
(CUDA events on a GPU, median of the timed calls). No ComfyUI import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import statistics
import time

import torch
import torch.nn.functional as F

from ..errors import WanquantError
from .formats import FORMAT_NAMES, FP8_FORMATS, FP8_ROWWISE_FORMATS, INT8_FORMATS, get_format
from .formats.gguf import example_tensors as gguf_example
from .formats.gguf import is_gguf
from .linear_grid import linear_fp8_rowwise, linear_int8
from .policy_grid import BLOCK_GRID_FORMATS, INT8_MATMUL, int8_matmul_possible
from .formats._common import kitchen
from .linear import linear_dequant, linear_fp8_scaled_mm
from .policy import (DEQUANT, FP8_MATMUL, KITCHEN_FORMATS, KITCHEN_MATMUL, DeviceCaps, capability, choose,
                     fp8_matmul_native, fp8_matmul_possible, kitchen_matmul_possible, probe_device)

log = logging.getLogger(__name__)

#: Wan-14B ffn.0 (5120 -> 13824) as [N, K]; on CPU the probe times a 1/16 row slice of it
WAN14B_FFN = (13824, 5120)
CPU_ROW_FRACTION = 16
CU130_HINT = "pip install torch --index-url https://download.pytorch.org/whl/cu130 (in ComfyUI's python)"


# ------------------------------------------------------------------------------ timing

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_time(fn, dev: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls: CUDA events on a GPU (no host
    timing of asynchronous launches), perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    if dev.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_bytes(fn, dev: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before (CUDA only)."""
    if dev.type != "cuda":
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    out = fn()
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    del out
    return int(peak)


def kitchen_layout_linear(x: torch.Tensor, fmt: str, w: torch.Tensor):
    """A call running the path ComfyUI's own forward runs for NVFP4/MXFP8 on SM 10+: ``F.linear``
    on a comfy-kitchen ``QuantizedTensor`` of ComfyUI's layout (kitchen quantizes the activations)."""
    ck = kitchen()  # through importlib, like every kitchen use in ops/ (a kernel library, not ComfyUI)
    if ck is None:
        raise WanquantError("comfy-kitchen is not importable", expected="comfy_kitchen", found="nothing")
    layout = {"nvfp4": "TensorCoreNVFP4Layout", "mxfp8": "TensorCoreMXFP8Layout"}[fmt]
    qt = importlib.import_module("comfy_kitchen.tensor").QuantizedTensor.from_float(w.to(x.dtype), layout)
    return lambda: F.linear(x, qt)


# ------------------------------------------------------------------------------ environment

def environment(caps: DeviceCaps) -> dict:
    """GPU, SM, torch / CUDA build, comfy-kitchen version and backends, ``_scaled_mm`` presence."""
    ck = kitchen()
    backends = {}
    if ck is not None:
        try:
            for name, info in ck.list_backends().items():
                backends[name] = ("available" if info.get("available") and not info.get("disabled") else
                                  "disabled" if info.get("disabled") else
                                  f"unavailable: {info.get('unavailable_reason') or '?'}")
        except Exception as exc:  # noqa: BLE001 - a broken kitchen is reported, not raised
            backends["error"] = f"list_backends failed: {exc}"
    try:
        kver = importlib.metadata.version("comfy-kitchen") if ck is not None else None
    except importlib.metadata.PackageNotFoundError:
        kver = getattr(ck, "__version__", "unknown")
    return {
        "device": caps.describe(),
        "device_type": caps.device_type,
        "gpu": caps.name if caps.device_type == "cuda" else None,
        "sm": f"{caps.sm[0]}.{caps.sm[1]}" if caps.sm else None,
        "torch": torch.__version__,
        "torch_cuda": f"{caps.torch_cuda[0]}.{caps.torch_cuda[1]}" if caps.torch_cuda else None,
        "kitchen": kver,
        "kitchen_backends": backends,
        "kitchen_gpu_ops": sorted(caps.kitchen_gpu_ops),
        "scaled_mm": hasattr(torch, "_scaled_mm"),
    }


# ------------------------------------------------------------------------------ advice

def advice(fmt: str, caps: DeviceCaps) -> str:
    """One thing the user can do about ``fmt``'s path on ``caps`` (or why nothing is needed)."""
    ch = choose(fmt, caps)
    if ch.path in (FP8_MATMUL, KITCHEN_MATMUL):
        return "fastest path for this format here; nothing to do"
    if ch.path == INT8_MATMUL:
        return "fastest path for this format here; nothing to do"
    if fmt in FP8_FORMATS + FP8_ROWWISE_FORMATS:
        return _fp8_advice(caps)
    if fmt in INT8_FORMATS + BLOCK_GRID_FORMATS:
        return ("no kernel takes a block scale grid, so it is dequantized on every device; for speed convert once: "
                "wanquant convert SRC DST --to int8" if int8_matmul_possible(caps)[0] else
                "int8 tensor cores need NVIDIA SM 7.5+; dequantized here (VRAM saved)")
    if fmt in KITCHEN_FORMATS:
        return _kitchen_advice(fmt, caps)
    if is_gguf(fmt):
        return _gguf_advice(caps)
    return _fp4_g32_advice(caps)


def _fp8_advice(caps: DeviceCaps) -> str:
    cap = capability(FP8_FORMATS[0])
    if caps.device_type == "cpu":
        return "no GPU: dequantizing (fp32 upcast, output-side scaling) is the fastest CPU path"
    if caps.device_type != "cuda" or caps.is_hip:
        return f"{caps.device_type.upper()}/ROCm: fp8 weights are dequantized per layer (VRAM saved, bf16 speed)"
    if caps.sm is None or caps.sm < cap.min_sm:
        return (f"this GPU (SM {_sm(caps.sm)}) has no fp8 tensor cores; the fp8 file still halves VRAM, it runs "
                f"at bf16 speed plus a per-layer dequant. Nothing to install changes that (needs SM "
                f"{_sm(cap.min_sm)}+: Ada, Hopper, Blackwell)")
    need = cap.needs_torch(caps.sm)
    return f"upgrade torch to {_sm(need)} or newer: ComfyUI enables fp8 matmul on SM {_sm(caps.sm)} only from there"


def _kitchen_advice(fmt: str, caps: DeviceCaps) -> str:
    cap = capability(fmt)
    up = fmt.upper()
    if caps.device_type != "cuda" or caps.is_hip:
        return f"{up} tensor cores need an NVIDIA Blackwell GPU (SM {_sm(cap.min_sm)}+); dequantized here (VRAM saved)"
    if caps.sm is None or caps.sm < cap.min_sm:  # no software fixes this; say only that
        alt = " (an fp8 checkpoint runs faster on this GPU)" if fp8_matmul_native(caps)[0] else ""
        return (f"{up} tensor cores exist only on Blackwell (SM {_sm(cap.min_sm)}+); this SM {_sm(caps.sm)} "
                f"GPU dequantizes per layer, the file still saves VRAM{alt}")
    acts = []
    need = cap.needs_torch(caps.sm or (0, 0))
    if need and caps.torch_version < need:
        acts.append(f"upgrade torch to {_sm(need)}+ (ComfyUI's {up} gate)")
    if not caps.kitchen:
        acts.append("install comfy-kitchen (ComfyUI's requirements.txt pins it): pip install comfy-kitchen")
    elif cap.kitchen_op not in caps.kitchen_gpu_ops:
        if caps.torch_cuda is not None and caps.torch_cuda < (13, 0):
            acts.append(f"torch is built for CUDA {_sm(caps.torch_cuda)}; {up} tensor cores (comfy-kitchen's CUDA "
                        f"backend) need a CUDA 13 build: {CU130_HINT}")
        else:
            note = f" ({caps.kitchen_note})" if caps.kitchen_note else ""
            acts.append(f"comfy-kitchen's CUDA backend is unavailable{note}; reinstall comfy-kitchen to match this torch")
    return "; ".join(acts) or kitchen_matmul_possible(caps, fmt)[1]


def _fp4_g32_advice(caps: DeviceCaps) -> str:
    base = "no tensor-core kernel exists for group-32 FP4 with float scales, so it is dequantized on every device"
    if kitchen_matmul_possible(caps, "nvfp4")[0]:
        return f"{base}; for speed convert once: wanquant convert SRC DST --to nvfp4"
    if fp8_matmul_native(caps)[0]:
        return f"{base}; for speed convert once: wanquant convert SRC DST --to float8_e4m3fn"
    return base


def _gguf_advice(caps: DeviceCaps) -> str:
    base = "GGUF blocks have no tensor-core kernel, so they are dequantized per forward on every device"
    if fp8_matmul_native(caps)[0]:
        return f"{base}; for speed convert once: wanquant convert SRC DST --to float8_e4m3fn"
    return f"{base}; wanquant convert SRC DST --to bf16 trades file size for no dequant cost"


def _sm(v) -> str:
    return f"{v[0]}.{v[1]}" if v else "?"


# ------------------------------------------------------------------------------ probe

def format_paths(caps: DeviceCaps) -> list[dict]:
    """Per format: the path ``auto`` picks, ``choose``'s reason, the advice."""
    out = []
    for fmt in FORMAT_NAMES:
        ch = choose(fmt, caps)
        out.append({"format": fmt, "path": ch.path, "reason": ch.reason, "advice": advice(fmt, caps)})
    return out


def _available_paths(fmt: str, caps: DeviceCaps) -> list[str]:
    paths = [DEQUANT]
    if fmt in FP8_FORMATS + FP8_ROWWISE_FORMATS and fp8_matmul_possible(caps)[0]:
        paths.append(FP8_MATMUL)
    if fmt == INT8_FORMATS[0] and int8_matmul_possible(caps)[0]:
        paths.append(INT8_MATMUL)
    if fmt in KITCHEN_FORMATS and kitchen_matmul_possible(caps, fmt)[0]:
        paths.append(KITCHEN_MATMUL)
    return paths


def micro_benchmark(dev: torch.device, caps: DeviceCaps, budget_s: float = 10.0,
                    shape: tuple[int, int] | None = None, m: int | None = None, seed: int = 0) -> dict:
    """Time each available path of each format at one Wan-14B FFN shape (a 1/16 row slice on
    CPU) against dense bf16; paths that would overrun ``budget_s`` are listed as skipped."""
    t_start = time.perf_counter()
    gpu = dev.type == "cuda"
    n, k = shape or ((WAN14B_FFN[0], WAN14B_FFN[1]) if gpu else (WAN14B_FFN[0] // CPU_ROW_FRACTION, WAN14B_FFN[1]))
    m = m or (4096 if gpu else 16)
    reps, warm = (20, 3) if gpu else (3, 1)
    compute = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=dev).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=dev) * 0.02
    x = torch.randn(m, k, generator=g, device=dev).to(compute)
    wb, xb = w.to(torch.bfloat16), x.to(torch.bfloat16)
    base = median_time(lambda: F.linear(xb, wb), dev, warm, reps)
    rows = [{"format": None, "path": "dense bf16", "auto": False, "ms": base * 1e3, "ratio_to_bf16": 1.0}]
    if not gpu:
        wf = w.float()
        t = median_time(lambda: F.linear(x, wf), dev, warm, reps)
        rows.append({"format": None, "path": "dense fp32", "auto": False, "ms": t * 1e3, "ratio_to_bf16": t / base})
        del wf
    for fmt in FORMAT_NAMES:
        auto = choose(fmt, caps).path
        tensors = conf = None
        for path in _available_paths(fmt, caps):
            row = {"format": fmt, "path": path, "auto": path == auto}
            rows.append(row)
            if time.perf_counter() - t_start > budget_s:
                row["skipped"] = f"{budget_s:g} s budget spent"
                continue
            try:
                if path == KITCHEN_MATMUL:
                    fn = kitchen_layout_linear(x, fmt, w)
                else:
                    if tensors is None and is_gguf(fmt):  # read-only formats: random valid blocks
                        tensors, conf = gguf_example(get_format(fmt).qtype, (n, k), device=dev)
                    elif tensors is None:
                        # the largest common block that divides this shape (Wan rows / 16 on CPU: 864 = 32 x 27)
                        bs = next((b for b in (128, 64, 32, 16) if n % b == 0 and k % b == 0), 16)
                        tensors, conf = get_format(fmt).quantize(w, conf={"group_size": bs})
                        conf = dict(conf, orig_shape=[n, k])
                    if path == FP8_MATMUL and fmt in FP8_ROWWISE_FORMATS:
                        fn = (lambda t=tensors: linear_fp8_rowwise(x, t["weight"], t["weight_scale"]))
                    elif path == INT8_MATMUL:
                        fn = (lambda t=tensors: linear_int8(x, t["weight"], t["weight_scale"]))
                    elif path == FP8_MATMUL:
                        fn = (lambda t=tensors: linear_fp8_scaled_mm(x, t["weight"], t["weight_scale"]))
                    else:
                        fn = (lambda t=tensors, c=conf, f=fmt: linear_dequant(x, f, t, None, c))
                t = median_time(fn, dev, warm, reps)
                row.update(ms=t * 1e3, ratio_to_bf16=t / base)
            except Exception as exc:  # noqa: BLE001 - one path failing must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"
    return {"shape": [n, k], "m": m, "compute_dtype": str(compute).replace("torch.", ""), "reps": reps,
            "seconds": time.perf_counter() - t_start, "rows": rows}


def probe(device=None, caps: DeviceCaps | None = None, bench: bool = True, budget_s: float = 10.0,
          shape: tuple[int, int] | None = None, m: int | None = None) -> dict:
    """The whole report as a JSON-able dict. ``caps`` fakes a device (no benchmark then)."""
    faked = caps is not None
    caps = caps or probe_device(device)
    rep = {"environment": environment(caps), "formats": format_paths(caps), "benchmark": None}
    if bench and not faked:
        dev = torch.device(device) if device is not None else torch.device("cuda" if caps.device_type == "cuda" else "cpu")
        rep["benchmark"] = micro_benchmark(dev, caps, budget_s, shape, m)
    return rep


def render(rep: dict) -> str:
    """The report as the text the CLI prints and the node shows."""
    env = rep["environment"]
    lines = [f"device: {env['device']}",
             f"torch {env['torch']} (CUDA build: {env['torch_cuda'] or 'none'}); torch._scaled_mm: "
             f"{'present' if env['scaled_mm'] else 'missing'}",
             f"comfy-kitchen: {env['kitchen'] or 'not importable'}"
             + "".join(f"\n  backend {k}: {v}" for k, v in env["kitchen_backends"].items()),
             "", "what 'auto' runs per weight format:"]
    for f in rep["formats"]:
        lines.append(f"  {f['format']}: {f['path']} - {f['reason']}")
        lines.append(f"    -> {f['advice']}")
    b = rep.get("benchmark")
    if b:
        n, k = b["shape"]
        lines += ["", f"micro-benchmark: x[{b['m']}, {k}] @ W[{n}, {k}]^T (Wan-14B ffn.0"
                      f"{'' if n == 13824 else ', row slice'}), {b['compute_dtype']} activations, median of "
                      f"{b['reps']}, {b['seconds']:.1f} s in all"]
        for r in b["rows"]:
            label = f"{r['format'] + ' ' if r['format'] else ''}{r['path']}{' (auto)' if r['auto'] else ''}"
            if "ms" in r:
                lines.append(f"  {label:32s} {r['ms']:9.3f} ms  {r['ratio_to_bf16']:6.2f}x bf16 time")
            else:
                lines.append(f"  {label:32s} {r.get('skipped') or 'failed: ' + r.get('error', '?')}")
    return "\n".join(lines)
