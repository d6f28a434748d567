"""Loading a 14B-shaped Wan checkpoint into ComfyUI: wanquant's loader vs stock ComfyUI.

What a user on a 24-32 GB PC feels is the *private* memory a load pins (pages that are not
backed by the file and cannot be dropped under pressure) and the wall time. This builds
kijai-style scaled-fp8 checkpoints with real Wan2.1-14B layer shapes (dim 5120, ffn 13824,
native keys, ``.scale_weight`` siblings and the ``scaled_fp8`` marker) at two sizes, plus the
same weights under diffusers keys (WorldStereo-style, needs remapping), and loads each in a
fresh process with:

* ``stock``: ``comfy.sd.load_diffusion_model`` (the core *Load Diffusion Model* node);
* ``auto`` / ``comfy_native``: wanquant's ``load_wan_model`` with that op policy;
* ``diffusers``: wanquant ``auto`` on the diffusers-keyed file.

``--format int8`` builds ComfyUI's per-channel ``int8_tensorwise`` instead; ``--format
lightx2v_nvfp4`` builds LightX2V's NVFP4 (low-nibble-first bytes), which stock ComfyUI cannot
read, so ``stock`` loads the same weights written in ComfyUI's own ``nvfp4`` (the RAM a user would
spend had the release shipped in ComfyUI's format), and ``comfy_native`` shows the swap-at-load
cost that wanquant's own layout avoids.

Two ComfyUI load modes: ``legacy`` (what a CPU or non-DynamicVRAM ComfyUI does: the state dict
is copied into the model's own parameters) and ``assign`` (what ComfyUI >= 0.33 with DynamicVRAM
does on NVIDIA: ``load_state_dict(assign=True)``, the model keeps the tensors it is handed, so
file-backed tensors stay file-backed). DynamicVRAM itself needs a GPU; ``assign`` reproduces its
load step on CPU by making ``ModelPatcher.is_dynamic`` true, nothing else.

Per case: wall time, peak RSS growth and peak private growth (``/proc/self/smaps_rollup``
``Anonymous``, sampled every 5 ms in the loading process) over the process after its imports, and
private memory still held after the load. Anonymous, not Private_Clean + Private_Dirty: the
latter also counts the file's own pages once this process alone has read them (page cache the
kernel can drop), which made a load that reads the weights look twice as expensive as it is. Each number is the median of
``--runs`` fresh processes; ratios are against stock in the same run.

Runs when ComfyUI is importable (``COMFYUI_PATH`` set, run with ComfyUI's python); prints a
clear skip otherwise. Linux only (``/proc``).

    COMFYUI_PATH=... $COMFY_PY -m wanquant.benchmarks.bench_load_comfy [--sizes 2 6] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

DIM, FFN, TEXT, FREQ = 5120, 13824, 4096, 256
COMFY_QUANT = {"int8": b'{"format": "int8_tensorwise"}', "nvfp4": b'{"format": "nvfp4"}'}
CASES = ("stock", "auto", "comfy_native", "diffusers")
#: --format -> what stock ComfyUI loads in the same run: the same weights in a format it reads
STOCK_TWIN = {"lightx2v_nvfp4": "nvfp4"}
CITY96_ENV = "WANQUANT_CITY96"  # a ComfyUI-GGUF checkout: the `stock` case of --format gguf


# ---------------------------------------------------------------------- checkpoint builder

def _linear(name: str, n: int, k: int, fmt: str):
    """(key, shape, dtype) of one quantized Linear: kijai scaled fp8; ComfyUI 0.33's per-channel
    ``int8_tensorwise`` (``weight_scale`` [n, 1] + ``comfy_quant``, what ``convert --to int8`` writes);
    ComfyUI's ``nvfp4``; or LightX2V's NVFP4 (low-nibble-first bytes, the kernel's block scales,
    ``input_global_scale`` + ``alpha``, no ``comfy_quant``). Wan-14B shapes need no NVFP4 padding."""
    bias = (f"{name}.bias", (n,), torch.bfloat16)
    if fmt == "int8":
        return [(f"{name}.weight", (n, k), torch.int8), bias,
                (f"{name}.weight_scale", (n, 1), torch.float32),
                (f"{name}.comfy_quant", (len(COMFY_QUANT[fmt]),), torch.uint8)]
    if fmt in ("nvfp4", "lightx2v_nvfp4"):
        packed = [(f"{name}.weight", (n, k // 2), torch.uint8), bias,
                  (f"{name}.weight_scale", (n, k // 16), torch.float8_e4m3fn)]
        if fmt == "lightx2v_nvfp4":
            return packed + [(f"{name}.input_global_scale", (), torch.float32), (f"{name}.alpha", (), torch.float32)]
        return packed + [(f"{name}.weight_scale_2", (), torch.float32), (f"{name}.input_scale", (), torch.float32),
                         (f"{name}.comfy_quant", (len(COMFY_QUANT[fmt]),), torch.uint8)]
    return [(f"{name}.weight", (n, k), torch.float8_e4m3fn), (f"{name}.bias", (n,), torch.bfloat16),
            (f"{name}.scale_weight", (), torch.float32)]


def _block_tensors(b: int, fmt: str = "fp8"):
    """(key, shape, dtype) of one Wan-14B block."""
    p = f"blocks.{b}"
    out = []
    for att in ("self_attn", "cross_attn"):
        for m in ("q", "k", "v", "o"):
            out += _linear(f"{p}.{att}.{m}", DIM, DIM, fmt)
        out += [(f"{p}.{att}.norm_q.weight", (DIM,), torch.bfloat16),
                (f"{p}.{att}.norm_k.weight", (DIM,), torch.bfloat16)]
    out += [(f"{p}.norm3.weight", (DIM,), torch.bfloat16), (f"{p}.norm3.bias", (DIM,), torch.bfloat16),
            *_linear(f"{p}.ffn.0", FFN, DIM, fmt), *_linear(f"{p}.ffn.2", DIM, FFN, fmt),
            (f"{p}.modulation", (1, 6, DIM), torch.bfloat16)]
    return out


def _top_tensors(fmt: str = "fp8"):
    t = [("patch_embedding.weight", (DIM, 16, 1, 2, 2), torch.bfloat16), ("patch_embedding.bias", (DIM,), torch.bfloat16)]
    for name, o, i in (("text_embedding.0", DIM, TEXT), ("text_embedding.2", DIM, DIM), ("time_embedding.0", DIM, FREQ),
                       ("time_embedding.2", DIM, DIM), ("time_projection.1", DIM * 6, DIM), ("head.head", 64, DIM)):
        t += [(f"{name}.weight", (o, i), torch.bfloat16), (f"{name}.bias", (o,), torch.bfloat16)]
    t += [("head.modulation", (1, 2, DIM), torch.bfloat16)]
    return t + ([("scaled_fp8", (), torch.bfloat16)] if fmt == "fp8" else [])


def _random(shape, dtype, gen, key="", fmt="fp8"):
    if key.endswith(".comfy_quant"):
        return torch.frombuffer(bytearray(COMFY_QUANT[fmt]), dtype=torch.uint8)
    if dtype == torch.uint8:  # packed E2M1 codes
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
    if key.endswith(".weight_scale"):
        return torch.full(shape, 1e-3, dtype=dtype)
    if dtype in (torch.float8_e4m3fn,):
        u = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        return u.bitwise_and_(0xBF).view(dtype)  # clear bit 6: finite values |x| <= 0.5ish, never NaN
    if shape == ():
        return torch.tensor(0.01, dtype=dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def build_gguf(path: Path, gib: float) -> Path:
    """The same Wan-14B-shaped model as GGUF the way city96's ``tools/convert.py`` writes it: block
    Linear weights Q8_0 (random valid blocks), 1-D tensors and modulations F32, the rest F16."""
    import gguf
    import numpy as np

    from ..ops.formats.gguf import example_tensors

    if path.exists():
        return path
    per_block = sum(torch.Size(s).numel() for k, s, d in _block_tensors(0, "fp8") if d == torch.float8_e4m3fn)
    blocks = max(1, round(gib * 2**30 / (per_block * 34 / 32)))
    gen = torch.Generator().manual_seed(0)
    w = gguf.GGUFWriter(str(path), arch="wan")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    specs = [t for t in _top_tensors("gguf") + [t for b in range(blocks) for t in _block_tensors(b, "fp8")]
             if not t[0].endswith(".scale_weight")]
    for key, shape, dtype in specs:
        if dtype == torch.float8_e4m3fn:  # a block Linear weight
            t, _ = example_tensors("Q8_0", tuple(shape), gen)
            w.add_tensor(key, t["weight"].numpy(), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            arr = _random(shape, torch.float32, gen, key).numpy()
            w.add_tensor(key, arr if len(shape) == 1 or "modulation" in key else arr.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _city96_load(file: str):
    """city96's *Unet Loader (GGUF)*: its ``gguf_sd_loader`` into ComfyUI with its ``GGMLOps``."""
    import importlib
    import types

    import comfy.sd

    root = os.environ[CITY96_ENV]
    pkg = types.ModuleType("city96_gguf")
    pkg.__path__ = [root]  # its modules only; its __init__ registers nodes with a running server
    sys.modules["city96_gguf"] = pkg
    ops = importlib.import_module("city96_gguf.ops").GGMLOps()
    sd = importlib.import_module("city96_gguf.loader").gguf_sd_loader(file)
    return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops})


def build(path: Path, gib: float, diffusers: bool, fmt: str = "fp8") -> Path:
    """A native or diffusers-keyed Wan-14B-shaped file of about ``gib`` GiB in ``fmt`` (see ``_linear``)."""
    from ..loaders.keymap import native_to_diffusers
    from ..loaders.writer import write_safetensors

    if path.exists():
        return path
    per_block = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                    for _, s, d in _block_tensors(0, fmt))
    blocks = max(1, round(gib * 2**30 / per_block))
    specs = _top_tensors(fmt) + [t for b in range(blocks) for t in _block_tensors(b, fmt)]
    gen = torch.Generator().manual_seed(0)
    name = (lambda k: native_to_diffusers(k)[0]) if diffusers else (lambda k: k)
    items = [(name(k), s, d, (lambda s=s, d=d, k=k: _random(s, d, gen, k, fmt))) for k, s, d in specs]
    write_safetensors(path, items)
    return path


# ---------------------------------------------------------------------- one measured load

def _private_kib() -> int:
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Anonymous:", "Private_Hugetlb:")):
                total += int(line.split()[1])
    return total


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _Peak(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.private = self.rss = 0

    def run(self):
        while not self.stop.is_set():
            self.private = max(self.private, _private_kib())
            self.rss = max(self.rss, _rss_kib())
            time.sleep(0.005)


def child(case: str, file: str, mode: str = "legacy") -> dict:
    """Import ComfyUI, then load ``file`` the way ``case`` says; return the measurements."""
    comfy_path = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, comfy_path)
    stubs = os.environ.get("WANQUANT_COMFY_STUBS")
    if stubs:
        sys.path.insert(0, stubs)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher
    import comfy.sd

    if mode == "assign":  # DynamicVRAM's load step: the model keeps the tensors it is given
        comfy.model_patcher.ModelPatcher.is_dynamic = lambda self: True

    from ..nodes.bridge import load_wan_model

    import gc
    gc.collect()
    base_priv, base_rss = _private_kib(), _rss_kib()
    peak = _Peak()
    peak.start()
    t0 = time.perf_counter()
    if case == "stock" and file.endswith(".gguf"):
        model = _city96_load(file)
    elif case == "stock":
        model = comfy.sd.load_diffusion_model(file)
    else:
        policy = "comfy_native" if case == "comfy_native" else "auto"
        model = load_wan_model(file, policy=policy).patcher
    wall = time.perf_counter() - t0
    gc.collect()
    held = _private_kib() - base_priv
    peak.stop.set()
    peak.join()
    assert model is not None
    return {"case": case, "wall_s": wall, "peak_private_mib": (peak.private - base_priv) / 1024,
            "held_private_mib": held / 1024, "peak_rss_mib": (peak.rss - base_rss) / 1024,
            "fds": len(os.listdir("/proc/self/fd"))}


# ---------------------------------------------------------------------- driver

def _comfy_ok() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    if not path or not Path(path, "main.py").is_file():
        return "COMFYUI_PATH is not set to a ComfyUI checkout"
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from comfy.cli_args import args; "
                            "args.cpu = True; import comfy.sd",
                            path], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(
                               p for p in (os.environ.get("WANQUANT_COMFY_STUBS", ""), os.environ.get("PYTHONPATH", "")) if p)})
    if probe.returncode:
        return f"ComfyUI is not importable from {sys.executable}: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def _run_child(case: str, file: Path, mode: str) -> dict:
    env = dict(os.environ)
    stubs = env.get("WANQUANT_COMFY_STUBS")
    if stubs:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (stubs, env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-m", "wanquant.benchmarks.bench_load_comfy", "--child", case, str(file), mode],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{case} on {file.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(gib: float, mode: str, files: dict, a) -> None:
    """``files``: case -> the file that case loads."""
    med: dict[str, list[dict]] = {}
    for _ in range(a.runs):  # interleaved, so drift in machine load hits every case alike
        for case in a.cases:
            med.setdefault(case, []).append(_run_child(case, files[case], mode))
    stock = {k: statistics.median(r[k] for r in med["stock"]) for k in med["stock"][0] if k != "case"} \
        if "stock" in med else None
    size = files["auto"].stat().st_size / 2**30
    for case, rows in med.items():
        m = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "case"}
        ratio = f"{m['wall_s'] / stock['wall_s']:.2f}" if stock else "-"
        over = f"{m['peak_private_mib'] - stock['peak_private_mib']:+.0f}" if stock else "-"
        print(f"{size:>5.2f}G {mode:<7} {case:<13} {m['wall_s']:>7.2f} {ratio:>7} {m['peak_private_mib']:>13.0f} "
              f"{over:>8} {m['held_private_mib']:>9.0f} {m['peak_rss_mib']:>12.0f} {m['fds']:>4.0f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[2.0, 6.0], help="checkpoint sizes in GiB")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per case (median reported)")
    ap.add_argument("--dir", default="bench_out/load_comfy", help="where the checkpoints are built (kept)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--modes", nargs="+", default=["legacy", "assign"], choices=["legacy", "assign"])
    ap.add_argument("--city96", help="a ComfyUI-GGUF checkout (city96): with --format gguf, the `stock` case is its "
                                     "Unet Loader (GGUF), since stock ComfyUI reads no GGUF")
    ap.add_argument("--format", choices=["fp8", "int8", "lightx2v_nvfp4", "gguf"], default="fp8",
                    help="fp8: kijai scaled fp8; int8: per-channel int8_tensorwise comfy_quant (stock ComfyUI >= 0.27); "
                         "lightx2v_nvfp4: LightX2V's NVFP4, which stock ComfyUI cannot read, so stock loads the same "
                         "weights in ComfyUI's own nvfp4; gguf: Q8_0 GGUF (city96's layout), stock = city96's loader")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "FILE", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(*a.child)))
        return 0
    why = _comfy_ok()
    if why:
        print(f"bench_load_comfy: skipped: {why}")
        return 0
    if a.format == "gguf":
        if "stock" in a.cases and not (a.city96 and Path(a.city96, "loader.py").is_file()):
            print("bench_load_comfy: --format gguf compares with city96's loader: pass --city96 DIR (a ComfyUI-GGUF "
                  "checkout) or leave `stock` out of --cases")
            return 2
        a.cases = [c for c in a.cases if c != "diffusers"]  # GGUF files carry native names only
        if a.city96:
            os.environ[CITY96_ENV] = str(Path(a.city96).resolve())
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'size':>6} {'mode':<7} {'case':<13} {'wall s':>7} {'x stock':>7} {'peak priv MiB':>13} {'- stock':>8} "
          f"{'held MiB':>9} {'peak RSS MiB':>12} {'fds':>4}")
    for gib in a.sizes:
        stem = f"wan14b_{'scaled_fp8' if a.format == 'fp8' else a.format}_{gib:g}gib"
        native = build_gguf(folder / f"{stem}.gguf", gib) if a.format == "gguf" else \
            build(folder / f"{stem}.safetensors", gib, False, a.format)
        files = {case: native for case in CASES}
        if "diffusers" in a.cases:
            files["diffusers"] = build(folder / f"{stem}_diffusers.safetensors", gib, True, a.format)
        twin = STOCK_TWIN.get(a.format)
        if twin and "stock" in a.cases:
            files["stock"] = build(folder / f"wan14b_{twin}_{gib:g}gib.safetensors", gib, False, twin)
        for mode in a.modes:
            _report(gib, mode, files, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
