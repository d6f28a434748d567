"""Cameras for Vista4D: Plücker ray maps, target trajectory presets and the upstream ``.npz``.

Conventions are upstream's (OpenCV): camera-to-world ``c2w`` 4x4 matrices, x right, y down,
z forward; intrinsics per frame as ``[fx, fy, cx, cy]`` in pixels of the video being rendered.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import WanquantError

PRESETS = ("static", "orbit", "dolly", "pan", "crane")


def intrinsics_from_fov(frames: int, height: int, width: int, fov_deg: float) -> torch.Tensor:
    """``f x 4`` pinhole intrinsics from a horizontal field of view, principal point centred."""
    if not 1.0 <= fov_deg <= 170.0:
        raise WanquantError("field of view out of range", expected="1..170 degrees", found=fov_deg)
    fx = (width / 2) / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([fx, fx, width / 2, height / 2], dtype=torch.float64).repeat(frames, 1)


def plucker(intrinsics: torch.Tensor, c2w: torch.Tensor, height: int, width: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Plücker rays ``(o x d, d)`` at the centre of each cell of a ``grid_h x grid_w`` grid over a
    ``height x width`` image: ``f x 4`` intrinsics, ``f x 4 x 4`` c2w → ``f x grid_h x grid_w x 6``.

    Same sampling as upstream ``get_plucker_embedding`` with its DiT grid: cell (j, i) looks
    through pixel ((i + 0.5) * pw + pw / 2, (j + 0.5) * ph + ph / 2), pw = width / grid_w.
    """
    f = c2w.shape[0]
    if intrinsics.shape != (f, 4) or c2w.shape != (f, 4, 4):
        raise WanquantError("camera arrays disagree", expected=f"intrinsics {f}x4 and c2w {f}x4x4",
                            found=f"intrinsics {tuple(intrinsics.shape)}, c2w {tuple(c2w.shape)}")
    dt = c2w.dtype
    pw, ph = width / grid_w, height / grid_h
    j, i = torch.meshgrid(torch.arange(grid_h, dtype=dt), torch.arange(grid_w, dtype=dt), indexing="ij")
    u = (i + 0.5) * pw + pw / 2
    v = (j + 0.5) * ph + ph / 2
    fx, fy, cx, cy = (intrinsics[:, k, None, None].to(dt) for k in range(4))
    x, y = (u - cx) / fx, (v - cy) / fy
    d = torch.stack((x, y, torch.ones_like(x)), dim=-1)
    d = d / d.norm(dim=-1, keepdim=True)
    d = torch.einsum("fhwk,fck->fhwc", d, c2w[:, :3, :3])
    o = c2w[:, None, None, :3, 3].expand_as(d)
    return torch.cat((torch.cross(o, d, dim=-1), d), dim=-1)


def _rot_y(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)


def preset_motion(preset: str, frames: int, amount: float, pivot_depth: float) -> torch.Tensor:
    """Per-frame camera motion ``f x 4 x 4`` in the first camera's own frame (c2w of the target
    relative to the source camera), ramping linearly from identity at frame 0.

    orbit: ``amount`` degrees around a point ``pivot_depth`` ahead (positive: camera moves right);
    pan: ``amount`` degrees of yaw in place; dolly: ``amount`` x pivot_depth forward (negative:
    back); crane: ``amount`` x pivot_depth up.
    """
    if preset not in PRESETS:
        raise WanquantError("unknown camera preset", expected=" / ".join(PRESETS), found=preset)
    if pivot_depth <= 0:
        raise WanquantError("pivot depth must be positive", expected="> 0", found=pivot_depth)
    out = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    for k in range(frames):
        t = k / (frames - 1) if frames > 1 else 0.0
        if preset == "orbit":
            r = _rot_y(-math.radians(amount) * t)
            pivot = torch.tensor([0.0, 0.0, pivot_depth], dtype=torch.float64)
            out[k, :3, :3] = r
            out[k, :3, 3] = pivot - r @ pivot
        elif preset == "pan":
            out[k, :3, :3] = _rot_y(math.radians(amount) * t)
        elif preset == "dolly":
            out[k, 2, 3] = amount * pivot_depth * t
        elif preset == "crane":
            out[k, 1, 3] = -amount * pivot_depth * t  # y points down
    return out


def load_npz(path: str, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream camera file (``np.savez(path, cam_c2w=f×4×4, intrinsics=f×4)``)."""
    try:
        data = np.load(path)
        c2w, intr = data["cam_c2w"], data["intrinsics"]
    except (OSError, ValueError, KeyError) as e:
        raise WanquantError(f"not an upstream Vista4D camera file ({e})", file=path,
                            expected="npz with cam_c2w (f×4×4) and intrinsics (f×4)") from None
    if c2w.shape != (frames, 4, 4) or intr.shape != (frames, 4):
        raise WanquantError("camera file frame count or shape does not match the video", file=path,
                            expected=f"cam_c2w {frames}x4x4, intrinsics {frames}x4",
                            found=f"cam_c2w {c2w.shape}, intrinsics {intr.shape}")
    return torch.from_numpy(c2w.astype(np.float64)), torch.from_numpy(intr.astype(np.float64))
