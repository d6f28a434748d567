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
    """``f h w 3`` colours, ``f h w`` depths/masks → points (colour, world xyz) and ``n x f``
    visibility, pixel centres at +0.5 as upstream."""
    f, h, w, _ = video.shape
    dt = depths.dtype
    fi, hi, wi = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    pix = torch.stack((wi, hi, torch.ones_like(hi)), dim=-1).to(dt)
    pix[..., :2] += 0.5
    cam = (pix.flatten(1, 2) @ torch.linalg.inv(K.to(dt)).mT) * depths.flatten(1, 2)[..., None]
    world = cam @ c2w[:, :3, :3].to(dt).mT + c2w[:, None, :3, 3].to(dt)
    keep = (dynamic | static).reshape(-1)
    frame = fi.reshape(-1)[keep]
    visible = torch.zeros(frame.shape[0], f, dtype=torch.bool)
    visible.scatter_(1, frame[:, None], True)
    visible = (visible & dynamic.reshape(-1)[keep][:, None]) | static.reshape(-1)[keep][:, None]
    return video.reshape(-1, 3)[keep], world.reshape(-1, 3)[keep], visible


def render_frame(colors, points, dynamic, c2w, K, height, width):
    """One target view: ``(rgb h w 3, alpha h w, motion h w)``."""
    dt = points.dtype
    n_pix = height * width
    acc_c = torch.zeros(n_pix, 3, dtype=torch.float64)
    acc_w = torch.zeros(n_pix, dtype=torch.float64)
    acc_m = torch.zeros(n_pix, dtype=torch.float64)
    w2c = torch.linalg.inv(c2w.to(dt))
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    ok = z > 1e-5
    cam, col, z, dyn = cam[ok], colors[ok], z[ok], dynamic[ok]
    uvz = cam @ K.to(dt).T
    u, v = uvz[:, 0] / uvz[:, 2], uvz[:, 1] / uvz[:, 2]
    u0, v0 = torch.floor(u).long(), torch.floor(v).long()
    du, dv = u - u0, v - v0
    uf = torch.cat((u0, u0, u0 + 1, u0 + 1))
    vf = torch.cat((v0, v0 + 1, v0, v0 + 1))
    wg = torch.cat(((1 - du) * (1 - dv), (1 - du) * dv, du * (1 - dv), du * dv))
    zf, cf, mf = z.repeat(4), col.repeat(4, 1), dyn.repeat(4).to(torch.float64)
    wf = wg.to(torch.float64) * zf.to(torch.float64).clamp(min=0.1).pow(-OCCLUSION_SHARPNESS).clamp(min=1e-10)
    sel = (uf >= 0) & (uf < width) & (vf >= 0) & (vf < height) & (wf > 0)
    idx, zf, cf, mf, wf = (vf * width + uf)[sel], zf[sel], cf[sel], mf[sel], wf[sel]
    order = torch.argsort(zf, descending=True, stable=True)  # far → near: the last write wins
    idx, zf, cf, mf, wf = idx[order], zf[order], cf[order], mf[order], wf[order]
    # nearest fragment per pixel, then keep only fragments within tolerance of it
    zmin = torch.full((n_pix,), float("inf"), dtype=torch.float64).scatter_reduce(
        0, idx, zf.to(torch.float64), reduce="amin")
    near = (torch.log1p(zf.to(torch.float64)) - torch.log1p(zmin[idx])).abs() <= Z_TOLERANCE
    idx, zf, cf, mf, wf = idx[near], zf[near], cf[near], mf[near], wf[near]
    acc_c.index_add_(0, idx, cf.to(torch.float64) * wf[:, None])
    acc_w.index_add_(0, idx, wf)
    acc_m.index_add_(0, idx, mf * wf)
    alpha = acc_w > 1e-16
    rgb = torch.zeros(n_pix, 3, dtype=torch.float64)
    rgb[alpha] = acc_c[alpha] / acc_w[alpha, None]
    motion = torch.zeros(n_pix, dtype=torch.bool)
    motion[alpha] = (acc_m[alpha] / acc_w[alpha]) > 0
    return rgb.reshape(height, width, 3), alpha.reshape(height, width), motion.reshape(height, width)


def render_video(video: torch.Tensor, depths: torch.Tensor, c2w_src: torch.Tensor, c2w_tgt: torch.Tensor,
                 intr_src: torch.Tensor, intr_tgt: torch.Tensor, dynamic: torch.Tensor | None = None,
                 static: torch.Tensor | None = None):
    """Source video ``f h w 3`` (0..1), depths ``f h w``, cameras ``f x 4 x 4``/``f x 4``, masks
    ``f h w`` bool (default: every pixel dynamic, none static, as Wan2GP) →
    ``(rgb f h w 3, alpha f h w, motion f h w)`` seen from the target cameras."""
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
    dynamic = torch.ones(f, h, w, dtype=torch.bool) if dynamic is None else dynamic.bool()
    static = ~dynamic if static is None else static.bool()
    dt = torch.float64
    colors, points, visible = unproject(video.to(dt), depths.to(dt), c2w_src.to(dt), K_from(intr_src.to(dt)),
                                        dynamic, static)
    point_dynamic = visible.sum(dim=1) == 1  # upstream: a point seen in exactly one frame is dynamic
    K_tgt = K_from(intr_tgt.to(dt))
    rgb = torch.zeros(f, h, w, 3, dtype=dt)
    alpha = torch.zeros(f, h, w, dtype=torch.bool)
    motion = torch.zeros(f, h, w, dtype=torch.bool)
    for i in range(f):
        vis = visible[:, i]
        rgb[i], alpha[i], motion[i] = render_frame(colors[vis], points[vis], point_dynamic[vis],
                                                   c2w_tgt[i].to(dt), K_tgt[i], h, w)
    return rgb.clamp(0, 1), alpha, motion
