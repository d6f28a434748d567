"""Loader benchmark: ``wanquant convert`` vs a plain safetensors read-and-write, and peak RSS.

Builds a Vista4D-style sharded fp8 checkpoint (sibling ``.weight.scale_weight`` scales, index)
with Wan-14B block shapes at two sizes, then times in fresh subprocesses:

* baseline: ``safetensors.torch.load_file`` + ``save_file`` of every shard (the plain copy);
* wanquant: ``convert`` of the same index to one ComfyUI-native file.

It prints the time ratio (target ≤ 1.3) and the peak RSS above the RSS after imports (target
≤ 1 GB and independent of the file size), plus ``inspect`` time on a 14B-sized header (target
< 2 s, built as a sparse file so it costs no disk). Every number is the median of ``--runs``
(default 3) fresh processes per side, the two sides interleaved so machine noise hits both.
A GGUF Q8_0 file and LightX2V NVFP4 / int8 files at Wan-14B layer shapes (``--gguf-gb``,
``--lightx2v-gb``) are opened in canonical form with every page of every tensor read: load time
and the private memory that adds, against the file size.

    python -m wanquant.benchmarks.bench_loader [--sizes-gb 1 4] [--runs 3] [--dir /tmp/wanquant-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DIM, FFN = 5120, 13824
BLOCK_LINEARS = [("self_attn.q", DIM, DIM), ("self_attn.k", DIM, DIM), ("self_attn.v", DIM, DIM),
                 ("self_attn.o", DIM, DIM), ("cross_attn.q", DIM, DIM), ("cross_attn.k", DIM, DIM),
                 ("cross_attn.v", DIM, DIM), ("cross_attn.o", DIM, DIM), ("ffn.0", FFN, DIM), ("ffn.2", DIM, FFN)]
BLOCK_BYTES = sum(o * i for _, o, i in BLOCK_LINEARS)  # fp8: one byte per weight


def build_vista4d_like(folder: Path, size_gb: float, shard_gb: float = 2.0) -> Path:
    """Sharded fp8 with sibling scales, written tensor by tensor (never whole in RAM)."""
    import torch

    from wanquant.loaders.writer import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    n_blocks = max(1, int(size_gb * 2**30 // BLOCK_BYTES))
    items = []
    for b in range(n_blocks):
        for name, o, i in BLOCK_LINEARS:
            key = f"blocks.{b}.{name}.weight"
            # random bytes masked to finite e4m3 codes (0x7F/0xFF are NaN)
            items.append((key, (o, i), torch.float8_e4m3fn,
                          lambda o=o, i=i: (torch.randint(0, 0x7E, (o, i), dtype=torch.uint8)).view(torch.float8_e4m3fn)))
            items.append((key + ".scale_weight", (), torch.float32, lambda: torch.tensor(1e-3)))
        items.append((f"blocks.{b}.modulation", (1, 6, DIM), torch.float32, lambda: torch.zeros(1, 6, DIM)))
    shards, cur, cur_bytes = [], [], 0
    for it in items:
        n = 1
        for d in it[1]:
            n *= d
        if cur and cur_bytes + n > shard_gb * 2**30:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += n
    shards.append(cur)
    weight_map = {}
    for s, chunk in enumerate(shards):
        name = f"diffusion_pytorch_model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, chunk)
        weight_map.update({k: name for k, *_ in chunk})
    idx = folder / "diffusion_pytorch_model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return idx


CHILD = r"""
import json, os, resource, sys, time
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
mode, src, dst = sys.argv[1:4]
import torch, safetensors.torch
from wanquant.loaders.convert import convert
base_rss = rss()
t0 = time.perf_counter()
if mode == 'plain':
    idx = json.load(open(src))
    folder = os.path.dirname(src)
    os.makedirs(dst, exist_ok=True)
    for shard in sorted(set(idx['weight_map'].values())):
        sd = safetensors.torch.load_file(os.path.join(folder, shard))
        safetensors.torch.save_file(sd, os.path.join(dst, shard))
        del sd
else:
    convert(src, dst)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({'seconds': dt, 'base_rss': base_rss, 'peak_rss': peak}))
"""


def _child(mode: str, src: Path, dst: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(dst)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def inspect_14b_header(folder: Path, runs: int = 3) -> float:
    """A 14B-shaped native fp8 file as a sparse file (only header and scales written); time inspect."""
    import torch

    from wanquant.loaders.canonical import load_canonical
    from wanquant.loaders.containers import DTYPE_TO_SAFETENSORS

    entries = []
    for b in range(40):
        for name, o, i in BLOCK_LINEARS:
            entries.append((f"blocks.{b}.{name}.weight", torch.float8_e4m3fn, (o, i)))
            entries.append((f"blocks.{b}.{name}.scale_weight", torch.float32, ()))
            entries.append((f"blocks.{b}.{name}.bias", torch.bfloat16, (o,)))
        for n in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "norm3"):
            entries.append((f"blocks.{b}.{n}.weight", torch.bfloat16, (DIM,)))
        entries.append((f"blocks.{b}.modulation", torch.float32, (1, 6, DIM)))
    entries += [("head.head.weight", torch.bfloat16, (64, DIM)), ("head.modulation", torch.float32, (1, 2, DIM)),
                ("patch_embedding.weight", torch.bfloat16, (DIM, 16, 1, 2, 2)),
                ("text_embedding.0.weight", torch.bfloat16, (DIM, 4096)), ("scaled_fp8", torch.bfloat16, ())]
    header, off, scale_pos = {}, 0, []
    for key, dt, shape in entries:
        n = torch.empty(shape, dtype=dt, device="meta").numel() * torch.empty((), dtype=dt).element_size()
        header[key] = {"dtype": DTYPE_TO_SAFETENSORS[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        if key.endswith(".scale_weight"):
            scale_pos.append(off)
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path = folder / "wan14b_header_only.safetensors"
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        start = 8 + len(raw)
        for pos in scale_pos:
            f.seek(start + pos)
            f.write(torch.tensor(1e-3, dtype=torch.float32).numpy().tobytes())
        f.truncate(start + off)  # sparse: the weights occupy no disk
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        with load_canonical(path, collect_errors=True) as model:
            rep = model.report
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    print(f"inspect on a 14B-shaped header ({off / 2**30:.1f} GiB logical, {rep.formats['float8_e4m3fn']} fp8 "
          f"layers): {dt:.2f} s, median of {runs} (target < 2 s)")
    _drop(path)
    return dt


LOAD_CHILD = r"""
import json, sys, time
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
def comfy_reader(path):  # comfy.utils.load_torch_file's .safetensors branch: the loader node's reader
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        return {k: f.get_tensor(k) for k in f.keys()}
import torch
from wanquant.loaders.canonical import load_canonical
base = anon()
t0 = time.perf_counter()
with load_canonical(sys.argv[1], tensor_reader=comfy_reader if sys.argv[2] == 'comfy' else None) as m:
    held = [e.load() for e in m.entries.values()]
    touched = sum(int(t.reshape(-1).view(torch.uint8)[::4096].sum()) for t in held)  # every page read
    dt = time.perf_counter() - t0
    print(json.dumps({'seconds': dt, 'anon_delta': anon() - base}))
"""


def build_gguf(path: Path, size_gb: float) -> Path:
    """Wan-14B-shaped blocks (q/k/v/o 5120x5120 x2, FFN 5120<->13824) as Q8_0 GGUF, random valid
    blocks, until ``size_gb`` (about 0.37 GB per block)."""
    import gguf
    import numpy as np
    import torch

    from ..ops.formats.gguf import example_tensors

    if path.exists():
        return path
    w = gguf.GGUFWriter(str(path), arch="wan")
    g = torch.Generator().manual_seed(0)
    total, b = 0, 0
    while total < size_gb * 2**30:
        for name, (n, k) in [(f"{a}.{m}", (5120, 5120)) for a in ("self_attn", "cross_attn") for m in "qkvo"] + \
                [("ffn.0", (13824, 5120)), ("ffn.2", (5120, 13824))]:
            t, _ = example_tensors("Q8_0", (n, k), g)
            w.add_tensor(f"blocks.{b}.{name}.weight", t["weight"].numpy(), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(f"blocks.{b}.{name}.bias", np.zeros(n, dtype=np.float32))
            total += t["weight"].numel()
        b += 1
    w.add_tensor("head.modulation", np.zeros((1, 2, 5120), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_lightx2v(path: Path, size_gb: float, kind: str, linears=BLOCK_LINEARS) -> Path:
    """Wan-14B-shaped blocks as LightX2V's converter writes them (random valid payloads, no
    comfy_quant), written tensor by tensor until ``size_gb``. ``nvfp4``: uint8 ``[N, K/2]`` (even
    element in the low nibble), fp8 block ``weight_scale`` ``[N, K/16]`` (the kernel's swizzled layout;
    Wan-14B shapes need no padding), ``input_global_scale`` + ``alpha`` (the published spelling).
    ``int8``: int8 ``[N, K]`` + bf16 ``weight_scale`` ``[N, 1]``. ``linears``: (name, N, K) per block."""
    import torch

    from wanquant.loaders.writer import write_safetensors

    if path.exists():
        return path
    items, total, b = [], 0, 0
    while total < size_gb * 2**30:
        for name, n, k in linears:
            key = f"blocks.{b}.{name}"
            if kind == "nvfp4":
                items.append((f"{key}.weight", (n, k // 2), torch.uint8,
                              lambda n=n, k=k: torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)))
                items.append((f"{key}.weight_scale", (n, k // 16), torch.float8_e4m3fn,  # finite positive codes
                              lambda n=n, k=k: torch.randint(0x30, 0x48, (n, k // 16), dtype=torch.uint8).view(torch.float8_e4m3fn)))
                items.append((f"{key}.input_global_scale", (), torch.float32, lambda: torch.tensor(900.0)))
                items.append((f"{key}.alpha", (), torch.float32, lambda: torch.tensor(2.0e-6)))
                total += n * k // 2 + n * k // 16
            else:
                items.append((f"{key}.weight", (n, k), torch.int8,
                              lambda n=n, k=k: torch.randint(-128, 128, (n, k), dtype=torch.int8)))
                items.append((f"{key}.weight_scale", (n, 1), torch.bfloat16,
                              lambda n=n: torch.full((n, 1), 1e-3, dtype=torch.bfloat16)))
                total += n * k
            items.append((f"{key}.bias", (n,), torch.bfloat16, lambda n=n: torch.zeros(n, dtype=torch.bfloat16)))
        b += 1
    write_safetensors(path, items)
    return path


READERS = {"positioned": "wanquant's positioned reads (inspect/convert)",
           "comfy": "ComfyUI's mmap reader (the loader node)"}


def _load_every_page(path: Path, label: str, runs: int, why: str, reader: str = "positioned") -> None:
    """Open ``path`` in canonical form in fresh processes, read every page of every tensor, hold
    them all (as a loaded model would): median time and private (anonymous) memory added.
    ``reader``: a key of :data:`READERS` (safetensors only; GGUF is always memory-mapped)."""
    res = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(path), reader], check=True,
                             capture_output=True, text=True)
        res.append(json.loads(out.stdout.strip().splitlines()[-1]))
    secs = statistics.median(r["seconds"] for r in res)
    anon = statistics.median(r["anon_delta"] for r in res)
    size = path.stat().st_size
    print(f"{label} {size / 2**30:.2f} GiB: canonical load + every page read {secs:.2f} s "
          f"({size / 2**30 / secs:.2f} GiB/s); private memory added {anon / 2**20:.1f} MiB "
          f"({anon / size * 100:.2f}% of the file; {why})")


def gguf_load(root: Path, size_gb: float, runs: int) -> None:
    """GGUF Q8_0: the weights stay memory-mapped, so private memory should stay near 0 whatever the
    file size (the page cache holds the file, reclaimable)."""
    path = build_gguf(root / f"wan_q8_0_{size_gb:g}GB.gguf", size_gb)
    _load_every_page(path, "GGUF Q8_0", runs, "weights stay memory-mapped")
    _drop(path)


def lightx2v_load(root: Path, size_gb: float, runs: int) -> None:
    """LightX2V NVFP4 and int8, through both readers. wanquant's own positioned reads put every
    tensor in a fresh buffer (private memory = what is held); ComfyUI's reader keeps tensors
    file-backed, except what the canonical form rebuilds: NVFP4 weights get their nibbles swapped
    into ComfyUI's order (a new tensor per weight: about the weights' size, the bytes ComfyUI's
    kernels then read), int8's bf16 ``[N, 1]`` scales become fp32 copies (tiny)."""
    why = {"nvfp4": {"positioned": "every tensor read into a buffer, weights nibble-swapped",
                     "comfy": "weights nibble-swapped into new tensors"},
           "int8": {"positioned": "every tensor read into a buffer",
                    "comfy": "weights stay memory-mapped; fp32 copies of the scales"}}
    for kind in ("nvfp4", "int8"):
        path = build_lightx2v(root / f"wan_lightx2v_{kind}_{size_gb:g}GB.safetensors", size_gb, kind)
        for reader in READERS:
            _load_every_page(path, f"LightX2V {kind}, {READERS[reader]},", runs, why[kind][reader], reader)
        _drop(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per side (median reported; >= 3)")
    ap.add_argument("--dir", default="/tmp/wanquant-bench")
    ap.add_argument("--gguf-gb", type=float, default=1.0, help="size of the GGUF load test file (0: skip)")
    ap.add_argument("--lightx2v-gb", type=float, default=1.0,
                    help="size of each LightX2V (NVFP4, int8) load test file (0: skip)")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    inspect_14b_header(root, args.runs)
    if args.gguf_gb:
        gguf_load(root, args.gguf_gb, args.runs)
    if args.lightx2v_gb:
        lightx2v_load(root, args.lightx2v_gb, args.runs)
    print(f"{'size':>8} {'plain s':>9} {'convert s':>10} {'ratio':>6} {'plain ΔRSS':>11} {'convert ΔRSS':>13}")
    for size in args.sizes_gb:
        src_dir = root / f"src_{size:g}GB"
        idx = build_vista4d_like(src_dir, size)
        real = sum(p.stat().st_size for p in src_dir.glob("*.safetensors"))
        runs = {"plain": [], "convert": []}
        for _ in range(args.runs):  # interleaved
            runs["plain"].append(_child("plain", idx, root / "plain_out"))
            _drop(root / "plain_out")
            runs["convert"].append(_child("convert", idx, root / "converted.safetensors"))
            _drop(root / "converted.safetensors")
        plain, conv = ({k: statistics.median(r[k] for r in rs) for k in rs[0]} for rs in runs.values())
        gib = 2**30
        print(f"{real / gib:7.2f}G {plain['seconds']:9.2f} {conv['seconds']:10.2f} "
              f"{conv['seconds'] / plain['seconds']:6.2f} {(plain['peak_rss'] - plain['base_rss']) / gib:10.2f}G "
              f"{(conv['peak_rss'] - conv['base_rss']) / gib:12.2f}G")
        _drop(src_dir)
    print("ratio = convert time / plain load_file+save_file time (target <= 1.3); ΔRSS = peak RSS above "
          "the RSS after imports (target <= 1 GB for convert, independent of size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
