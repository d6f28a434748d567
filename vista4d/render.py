"""Point-cloud rendering for Vista4D in plain torch (no pytorch3d / nvdiffrast).

A port of upstream ``utils/point_cloud/point_cloud.py`` (``unproject``/``render_frame``/
``render``) with its semantics kept: every source pixel becomes a 3-D point; a *dynamic*
point exists only in the frame it came from, a *static* one in every frame (temporal
persistence). Points splat bilinearly to 4 pixels weighted by depth^-10; a pixel keeps the
nearest surface, blending fragments within 2 % (log-depth) of it. Outputs per target frame:
RGB, alpha (something was drawn) and motion mask (the drawn surface is dynamic, i.e. seen in
exactly one source frame). Upstream's ``diag(-1,-1,1,1)`` world flip is a rotation applied to
both cameras, so it changes nothing and is left out.
"""

from __future__ import annotations

import torch

from ..errors import WanquantError

Z_TOLERANCE = 0.02
OCCLUSION_SHARPNESS = 10.0


def K_from(intr: torch.Tensor) -> torch.Tensor:
    """``f x 4`` [fx fy cx cy] → ``f x 3 x 3``."""
    K = torch.zeros(intr.shape[0], 3, 3, dtype=intr.dtype)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = intr[:, 0], intr[:, 1], intr[:, 2], intr[:, 3], 1
    return K


def unproject(video, depths, c2w, K, dynamic, static):
    """``f h w 3`` colours, ``f h w`` depths/masks → points (colour, world xyz), the frame each
    came from and whether it is static, pixel centres at +0.5 as upstream. A dynamic point is
    visible only in its own frame, a static one in every frame (two vectors, not an n x f matrix:
    that was 2.6 GB of booleans for 81 frames at 480x832). Frame by frame into preallocated
    outputs, so no whole-clip pixel grids are held beside them."""
    f, h, w, _ = video.shape
    dt, dev = depths.dtype, depths.device
    hi, wi = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    pix = torch.stack((wi, hi, torch.ones_like(hi)), dim=-1).to(dt).reshape(-1, 3)
    pix[:, :2] += 0.5
    keep = (dynamic | static).reshape(f, -1)
    counts = keep.sum(dim=1).tolist()
    n = sum(counts)
    colors = torch.empty(n, 3, dtype=video.dtype, device=dev)
    points = torch.empty(n, 3, dtype=dt, device=dev)
    frame = torch.empty(n, dtype=torch.long, device=dev)
    is_static = torch.empty(n, dtype=torch.bool, device=dev)
    start = 0
    for i, count in enumerate(counts):
        k, end = keep[i], start + count
        cam = (pix[k] @ torch.linalg.inv(K[i].to(dt)).T) * depths[i].reshape(-1)[k][:, None]
        points[start:end] = cam @ c2w[i, :3, :3].to(dt).T + c2w[i, :3, 3].to(dt)
        colors[start:end] = video[i].reshape(-1, 3)[k]
        frame[start:end] = i
        is_static[start:end] = static[i].reshape(-1)[k]
        start = end
    return colors, points, frame, is_static


#: points projected per pass: bounds a frame's temporaries (~100 bytes per fragment, 4 per point,
#: so ~0.8 GB) whatever the scene size; a static-masked 81-frame 480x832 clip draws ~16 M points
#: per frame. A frame with more points projects them twice (once per pass) rather than hold them.
CHUNK_POINTS = 1 << 21


def _footprint(points, w2c, K, height, width):
    """The bilinear footprint of each point: (pixel index, depth, weight, valid) for its 4
    fragments (point-major within each corner). Fragments that miss the view (behind the camera,
    off screen, zero weight) go to pixel ``height * width``, a dump bin, instead of being cut out
    with boolean masks: the same sums, without the compaction passes."""
    dt = points.dtype
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    front = z > 1e-5
    uvz = cam @ K.to(dt).T
    zs = torch.where(front, uvz[:, 2], 1.0)
    # points behind the camera go off screen; the clamp keeps huge coordinates finite for .long()
    # without moving any point that could land on the image (its 2x2 footprint stays outside)
    u = torch.where(front, uvz[:, 0] / zs, -2.0).clamp(-2.0, width + 1.0)
    v = torch.where(front, uvz[:, 1] / zs, -2.0).clamp(-2.0, height + 1.0)
    u0, v0 = torch.floor(u).long(), torch.floor(v).long()
    du, dv = u - u0, v - v0
    uf = torch.cat((u0, u0, u0 + 1, u0 + 1))
    vf = torch.cat((v0, v0 + 1, v0, v0 + 1))
    wg = torch.cat(((1 - du) * (1 - dv), (1 - du) * dv, du * (1 - dv), du * dv))
    zf = z.repeat(4).to(torch.float64)
    wf = wg.to(torch.float64) * zf.clamp(min=0.1).pow(-OCCLUSION_SHARPNESS).clamp(min=1e-10)
    valid = front.repeat(4) & (uf >= 0) & (uf < width) & (vf >= 0) & (vf < height) & (wf > 0)
    return torch.where(valid, vf * width + uf, height * width), zf, wf, valid


def render_frame(colors, points, dynamic, c2w, K, height, width):
    """One target view: ``(rgb h w 3, alpha h w, motion h w)``. Two passes over the points (in
    chunks of :data:`CHUNK_POINTS`): the nearest fragment per pixel, then the blend of the
    fragments within tolerance of it (order-free: a minimum and sums, so no depth sort)."""
    dev = points.device
    n_pix = height * width
    w2c = torch.linalg.inv(c2w.to(points.dtype))
    chunks = [slice(i, i + CHUNK_POINTS) for i in range(0, points.shape[0], CHUNK_POINTS)]
    zmin = torch.full((n_pix + 1,), float("inf"), dtype=torch.float64, device=dev)
    kept = None
    for c in chunks:
        kept = _footprint(points[c], w2c, K, height, width)
        zmin.scatter_reduce_(0, kept[0], kept[1], reduce="amin")
    acc_c = torch.zeros(n_pix + 1, 3, dtype=torch.float64, device=dev)
    acc_w = torch.zeros(n_pix + 1, dtype=torch.float64, device=dev)
    acc_m = torch.zeros(n_pix + 1, dtype=torch.float64, device=dev)
    for c in chunks:
        idx, zf, wf, valid = kept if len(chunks) == 1 else _footprint(points[c], w2c, K, height, width)
        near = valid & ((torch.log1p(zf) - torch.log1p(zmin[idx])).abs() <= Z_TOLERANCE)
        wf = torch.where(near, wf, 0.0)
        acc_c.index_add_(0, idx, colors[c].repeat(4, 1).to(torch.float64) * wf[:, None])
        acc_w.index_add_(0, idx, wf)
        acc_m.index_add_(0, idx, dynamic[c].repeat(4).to(torch.float64) * wf)
    acc_c, acc_w, acc_m = acc_c[:n_pix], acc_w[:n_pix], acc_m[:n_pix]
    alpha = acc_w > 1e-16
    rgb = torch.zeros(n_pix, 3, dtype=torch.float64, device=dev)
    rgb[alpha] = acc_c[alpha] / acc_w[alpha, None]
    motion = torch.zeros(n_pix, dtype=torch.bool, device=dev)
    motion[alpha] = (acc_m[alpha] / acc_w[alpha]) > 0
    return rgb.reshape(height, width, 3), alpha.reshape(height, width), motion.reshape(height, width)


def render_video(video: torch.Tensor, depths: torch.Tensor, c2w_src: torch.Tensor, c2w_tgt: torch.Tensor,
                 intr_src: torch.Tensor, intr_tgt: torch.Tensor, dynamic: torch.Tensor | None = None,
                 static: torch.Tensor | None = None, *, device=None, frame_done=None):
    """Source video ``f h w 3`` (0..1), depths ``f h w``, cameras ``f x 4 x 4``/``f x 4``, masks
    ``f h w`` bool (default: every pixel dynamic, none static, as Wan2GP) →
    ``(rgb f h w 3, alpha f h w, motion f h w)`` seen from the target cameras, on the CPU.
    ``device``: where to render (default: the video's); ``frame_done(i)`` is called after each
    target frame (progress, interruption)."""
    f, h, w, _ = video.shape
    checks = {"depth": (tuple(depths.shape), (f, h, w)), "source cameras": (tuple(c2w_src.shape), (f, 4, 4)),
              "target cameras": (tuple(c2w_tgt.shape), (f, 4, 4)), "source intrinsics": (tuple(intr_src.shape), (f, 4)),
              "target intrinsics": (tuple(intr_tgt.shape), (f, 4))}
    if dynamic is not None:
        checks["dynamic mask"] = (tuple(dynamic.shape), (f, h, w))
    for name, (got, want) in checks.items():
        if got != want:
            raise WanquantError(f"{name} do not match the source video ({f} frames of {w}x{h})",
                                expected="x".join(map(str, want)), found="x".join(map(str, got)))
    dev = torch.device(device) if device is not None else video.device
    dynamic = torch.ones(f, h, w, dtype=torch.bool) if dynamic is None else dynamic.bool()
    static = ~dynamic if static is None else static.bool()
    dt = torch.float64

    def on(t, dtype=None):
        return t.to(device=dev, dtype=dtype)

    colors, points, frame, is_static = unproject(on(video), on(depths, dt), on(c2w_src, dt),
                                                 K_from(intr_src.to(dt)).to(dev), on(dynamic), on(static))
    # upstream: a point seen in exactly one frame is dynamic (a static point too, in a one-frame clip)
    # static points are drawn in every frame; dynamic ones (frame-major, as unproject lists them)
    # only in their own: one contiguous run per frame
    s_col, s_pts, d_col, d_pts, d_frame = colors[is_static], points[is_static], colors[~is_static], \
        points[~is_static], frame[~is_static]
    ends = torch.searchsorted(d_frame, torch.arange(f, device=dev), right=True).tolist()
    s_dyn = torch.full((s_pts.shape[0],), f == 1, dtype=torch.bool, device=dev)
    K_tgt = K_from(intr_tgt.to(dt))
    rgb = torch.zeros(f, h, w, 3, dtype=video.dtype)  # blended in fp64, stored in the video's dtype
    alpha = torch.zeros(f, h, w, dtype=torch.bool)
    motion = torch.zeros(f, h, w, dtype=torch.bool)
    for i in range(f):
        a, b = (ends[i - 1] if i else 0), ends[i]
        pts, col = torch.cat((s_pts, d_pts[a:b])), torch.cat((s_col, d_col[a:b]))
        dyn = torch.cat((s_dyn, torch.ones(b - a, dtype=torch.bool, device=dev)))
        out = render_frame(col, pts, dyn, on(c2w_tgt[i], dt), K_tgt[i].to(dev), h, w)
        rgb[i], alpha[i], motion[i] = (t.cpu() for t in out)
        if frame_done is not None:
            frame_done(i)
    return rgb.clamp(0, 1), alpha, motion
