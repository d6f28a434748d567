"""Vista4D point-cloud render at real clip sizes: time, points drawn per second and peak memory.

A source clip of ``--frames`` frames at ``--height`` x ``--width`` (random colours, depths 2-3,
a camera dollying sideways) is rendered by ``vista4d.render.render_video`` with a fraction of
each frame marked static (``--static``, 0 = the default all-dynamic masks; static points are
drawn in every frame, so they dominate the cost). Each case runs in a fresh process (peak RSS is
the process's own); the CPU case is the baseline timed in the same run, and ``x cpu`` is each
device's time over it. Median of ``--runs``.

    python -m wanquant.benchmarks.bench_vista4d_render [--frames 17] [--static 0 0.5] [--devices cpu cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def scene(frames: int, height: int, width: int, static: float):
    """Inputs of one render, made the same way for every device."""
    import torch

    g = torch.Generator().manual_seed(0)
    video = torch.rand(frames, height, width, 3, generator=g)
    depth = 2 + torch.rand(frames, height, width, generator=g)
    src = torch.eye(4).repeat(frames, 1, 1)
    tgt = src.clone()
    tgt[:, 0, 3] = torch.linspace(0, 0.2, frames)
    intr = torch.tensor([[0.6 * width, 0.6 * width, width / 2, height / 2]]).repeat(frames, 1)
    dynamic = torch.ones(frames, height, width, dtype=torch.bool)
    dynamic[:, :, : int(round(static * width))] = False
    return video, depth, src, tgt, intr, intr, dynamic


def child(frames: int, height: int, width: int, static: float, device: str) -> dict:
    import torch

    from ..vista4d.render import render_video

    args = scene(frames, height, width, static)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, alpha, _ = render_video(*args, device=device)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    per_frame = height * width
    n_static = int(round(static * width)) * height * frames
    draws = frames * (per_frame - n_static // frames) + frames * n_static  # own frame's dynamic + every static
    return {"seconds": secs, "draws": draws, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
            "alpha": float(alpha.float().mean())}


def _run(frames, height, width, static, device) -> dict:
    out = subprocess.run([sys.executable, "-m", "wanquant.benchmarks.bench_vista4d_render", "--child",
                          json.dumps([frames, height, width, static, device])], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{device} static {static} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--static", type=float, nargs="+", default=[0.0, 0.5], help="fraction of each frame static")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(*json.loads(a.child))))
        return 0
    devices = a.devices
    if devices is None:
        import torch
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{'frames':>6} {'size':>9} {'static':>6} {'device':<6} {'s':>7} {'x cpu':>6} {'ms/frame':>9} "
          f"{'M draws/s':>9} {'peak RSS MiB':>12} {'peak GPU MiB':>12}")
    for static in a.static:
        base = None
        for device in devices:
            rows = [_run(a.frames, a.height, a.width, static, device) for _ in range(a.runs)]
            m = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            base = m["seconds"] if device == "cpu" else base
            ratio = f"{m['seconds'] / base:.2f}" if base else "-"
            print(f"{a.frames:>6} {a.width:>4}x{a.height:<4} {static:>6.2f} {device:<6} {m['seconds']:>7.2f} {ratio:>6} "
                  f"{1000 * m['seconds'] / a.frames:>9.1f} {m['draws'] / m['seconds'] / 1e6:>9.1f} "
                  f"{m['rss_mib']:>12.0f} {m['gpu_mib']:>12.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
