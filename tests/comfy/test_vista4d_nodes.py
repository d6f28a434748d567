"""Vista4D nodes in-process in a real ComfyUI (skips without it): camera → render → conditioning →
ComfyUI's own sampler on the tiny Vista4D, and the one-message errors for wrong wiring."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vista4d"))

F, H, W = 5, 32, 48


def _node(name):
    from wanquant.nodes import vista4d_nodes

    return getattr(vista4d_nodes, name).execute


def _vae():
    import comfy.ldm.wan.vae as v
    import comfy.sd

    m = v.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(0)  # ComfyUI's layers start uninitialised: give them small weights
    sd = {k: (0.1 * torch.randn(t.shape, generator=g)).to(t.dtype) for k, t in m.state_dict().items()}
    return comfy.sd.VAE(sd=sd)


def _model(tmp_path, sd):
    from safetensors.torch import save_file

    from wanquant.nodes.bridge import load_wan_model

    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    return load_wan_model(str(path)).patcher


def _inputs():
    g = torch.Generator().manual_seed(3)
    source = torch.rand(F, H, W, 3, generator=g)
    depth = torch.full((F, H, W, 3), 0.5)
    return source, depth


def _render(source, depth, preset="orbit"):
    camera = _node("WanQuantVista4DCamera")(preset, 10.0, 0.0, "").args[0]
    return _node("WanQuantVista4DRender")(source, depth, camera, "inverse (bright = near)", 1.0, 10.0, 60.0, "").args


def test_reshoot_chain_samples_with_comfyuis_sampler(comfy_inprocess, tmp_path):
    import comfy.sample

    from tiny import tiny_vista4d

    source, depth = _inputs()
    render, alpha, motion, cams = _render(source, depth)
    assert render.shape == (F, H, W, 3) and alpha.shape == motion.shape == (F, H, W)
    assert 0.5 < alpha.mean() < 1.0  # an orbit uncovers part of the frame
    assert torch.equal(motion, alpha)  # default: everything dynamic, so every drawn pixel moves
    static = _render(source, depth, "static")
    assert static[1].all()
    model = _model(tmp_path, tiny_vista4d())
    cond = [[torch.randn(1, 4, 4096), {}]]
    pos, neg, latent = _node("WanQuantVista4DConditioning")(model, cond, cond, _vae(), source, render, alpha,
                                                            motion, cams).args
    v = pos[0][1]["vista4d"]
    assert v is neg[0][1]["vista4d"]  # the negative keeps all video/camera conditioning
    assert v["source_mask"].shape == (1, 512, 2, 4, 6) and v["cam"].shape == (1, 2, 2, 3, 6)
    assert latent["samples"].shape == (1, 16, 2, 4, 6)
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(0))
    out = comfy.sample.sample(model, noise, 2, 5.0, "euler", "simple", pos, neg, latent["samples"])
    assert out.shape == (1, 16, 2, 4, 6) and torch.isfinite(out).all()


def test_wrong_wiring_is_one_clear_error(comfy_inprocess, tmp_path):
    from wanquant.errors import WanquantError
    from wanquant.loaders import synthetic as syn
    from tiny import tiny_vista4d

    source, depth = _inputs()
    render, alpha, motion, cams = _render(source, depth)
    cond = [[torch.randn(1, 4, 4096), {}]]
    plain = _model(tmp_path, syn.wan_state_dict())
    with pytest.raises(WanquantError, match="not Vista4D"):
        _node("WanQuantVista4DConditioning")(plain, cond, cond, None, source, render, alpha, motion, cams)
    model = _model(tmp_path, tiny_vista4d())
    with pytest.raises(WanquantError, match="render does not match the source video") as e:
        _node("WanQuantVista4DConditioning")(model, cond, cond, None, source, render[:4], alpha, motion, cams)
    assert e.value.expected == f"{F} frames of {W}x{H}"
    with pytest.raises(WanquantError, match="depth does not match"):
        _node("WanQuantVista4DRender")(source, depth[:3], {"preset": "orbit", "amount": 1.0, "pivot_depth": 0.0,
                                                           "file": ""}, "inverse (bright = near)", 1.0, 10.0, 60.0, "")
    with pytest.raises(WanquantError, match="1 \\+ 4k"):
        _render(source[:4], depth[:4])
    np_path = tmp_path / "cams.npz"
    import numpy as np

    np.savez(np_path, cam_c2w=np.tile(np.eye(4), (3, 1, 1)), intrinsics=np.ones((3, 4)))
    camera = _node("WanQuantVista4DCamera")("file", 0.0, 0.0, str(np_path)).args[0]
    with pytest.raises(WanquantError, match="frame count"):
        _node("WanQuantVista4DRender")(source, depth, camera, "inverse (bright = near)", 1.0, 10.0, 60.0, "")


def test_render_node_reports_progress_and_falls_back_to_cpu_when_the_gpu_is_short_of_memory(comfy_inprocess,
                                                                                             monkeypatch, caplog):
    """The render runs on ComfyUI's device; a GPU out of memory retries on the CPU (same result) with
    a warning, and the progress bar counts every frame. The GPU is faked: only its OOM is simulated."""
    import comfy.model_management as mm
    import comfy.utils

    from wanquant.nodes import vista4d_nodes
    from wanquant.vista4d import render

    source, depth = _inputs()
    on_cpu = _render(source, depth)
    calls, steps = [], []
    real = render.render_video

    def short_gpu(*args, device=None, frame_done=None):
        calls.append(torch.device(device).type)
        if torch.device(device).type != "cpu":
            frame_done(0)
            raise mm.OOM_EXCEPTION("faked: out of memory")
        return real(*args, device=device, frame_done=frame_done)

    monkeypatch.setattr(render, "render_video", short_gpu)
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: None)
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute",
                        lambda self, value, total=None, preview=None: steps.append(value))
    with caplog.at_level("WARNING", logger=vista4d_nodes.__name__):
        fallback = _render(source, depth)
    assert calls == ["cuda", "cpu"]
    assert "rendering on the CPU" in caplog.text
    assert steps[-1] == F and steps[-F - 1] == 0  # restarted at 0, then one step per frame
    for a, b in zip(on_cpu[:3], fallback[:3]):
        assert torch.equal(a, b)
