"""Vista4D model parity with upstream's own forward (in-process ComfyUI; skips without it).

``tests/vista4d/data/upstream_forward.safetensors`` holds inputs and the output of upstream
``model_fn_vista4d`` (its DiTBlock and LatentEncoder, fp32 on CPU) for the tiny Vista4D of
``tests/vista4d/tiny.py``; ``tests/vista4d/make_upstream_data.py`` made it from a checkout
(commit in the file's metadata). Here the same weights go through our loader and ComfyUI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")

HERE = Path(__file__).resolve().parents[1] / "vista4d"
sys.path.insert(0, str(HERE))
DATA = HERE / "data" / "upstream_forward.safetensors"


def _data():
    with safe_open(str(DATA), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _load(tmp_path, sd, **kw):
    from safetensors.torch import save_file

    from wanquant.nodes.bridge import load_wan_model

    path = tmp_path / "tiny_vista4d.safetensors"
    save_file(sd, str(path))
    return load_wan_model(str(path), compute_dtype="fp32", **kw)


def _conds(d, **over):
    return {"vista4d_source": d["source_video_latents"], "vista4d_render": d["point_cloud_video_latents"],
            "vista4d_source_mask": d["source_mask_latents"], "vista4d_render_mask": d["point_cloud_mask_latents"],
            "vista4d_cam": d["cam_emb"], **over}


def _run(dm, d, **over):
    return dm(d["latents"], d["timestep"], d["context"], transformer_options={}, **_conds(d, **over))


@pytest.mark.parametrize("policy", ["auto", "comfy_native"])
def test_matches_upstream_forward(comfy_inprocess, tmp_path, policy):
    from tiny import digest, tiny_vista4d

    d, meta = _data()
    sd = tiny_vista4d()
    assert digest(sd) == meta["weights_digest"], "the tiny weights are no longer the ones the data was made with"
    res = _load(tmp_path, sd, policy=policy)
    assert any(l.startswith("Vista4D: three-stream") and "Plücker" in l for l in res.report_lines), res.text
    dm = res.patcher.model.diffusion_model
    with torch.inference_mode():
        out = _run(dm, d).float()
        no_cam = _run(dm, d, vista4d_cam=torch.zeros_like(d["cam_emb"])).float()
    err = (out - d["output"]).abs().max().item()
    assert err <= 1e-4, f"max abs diff vs upstream {err}"
    assert (no_cam - d["output"]).abs().max().item() > 1e-2  # the camera path is live in the comparison


def test_fp8_release_layout_loads_as_vista4d(comfy_inprocess, tmp_path):
    """The mirror's recipe (fp8 linears with .weight.scale_weight, projector included) still builds."""
    from tiny import tiny_vista4d
    from wanquant.loaders import synthetic as syn

    d, _ = _data()
    res = _load(tmp_path, syn.vista4d_fp8(tiny_vista4d()))
    with torch.inference_mode():
        out = _run(res.patcher.model.diffusion_model, d).float()
    rel = ((out - d["output"]).norm() / d["output"].norm()).item()
    assert rel < 0.1, rel  # fp8 weights: close to, not equal to, the bf16 forward


def test_sampling_without_conditioning_is_one_clear_error(comfy_inprocess, tmp_path):
    from tiny import tiny_vista4d
    from wanquant.errors import WanquantError

    d, _ = _data()
    dm = _load(tmp_path, tiny_vista4d()).patcher.model.diffusion_model
    with pytest.raises(WanquantError, match="sampled without its conditioning") as e:
        dm(d["latents"], d["timestep"], d["context"], transformer_options={})
    assert "vista4d_cam" in e.value.found
    with pytest.raises(WanquantError, match="does not match the latent"):
        _run(dm, d, vista4d_source=d["source_video_latents"][:, :, :1])


def test_comfyuis_block_patches_run_inside_the_vista4d_forward(comfy_inprocess, tmp_path):
    """A ("double_block", i) replace patch (what speed-up and block-swap packs register) gets the
    Vista4D block as original_block, over all three streams; calling it gives the upstream output
    unchanged, and what a patch returns is what the next block sees."""
    from tiny import tiny_vista4d

    d, _ = _data()
    dm = _load(tmp_path, tiny_vista4d()).patcher.model.diffusion_model
    seen = []

    def passthrough(args, extra):
        seen.append((args["transformer_options"]["block_index"], tuple(args["img"].shape)))
        return extra["original_block"](args)

    def damped(args, extra):
        out = extra["original_block"](args)
        return {"img": out["img"] * 0.5}

    n = len(dm.blocks)
    with torch.inference_mode():
        plain = _run(dm, d).float()
        opts = {"patches_replace": {"dit": {("double_block", i): passthrough for i in range(n)}}}
        patched = dm(d["latents"], d["timestep"], d["context"], transformer_options=opts,
                     **_conds(d)).float()
        opts = {"patches_replace": {"dit": {("double_block", 0): damped}}}
        changed = dm(d["latents"], d["timestep"], d["context"], transformer_options=opts, **_conds(d)).float()
        after = []
        opts = {"patches": {"double_block": [lambda a: after.append(a["block_index"]) or {"img": a["img"]}]}}
        post = dm(d["latents"], d["timestep"], d["context"], transformer_options=opts, **_conds(d)).float()
    assert after == list(range(n)) and torch.equal(post, plain)
    assert [i for i, _ in seen] == list(range(n))
    target_tokens = d["latents"].shape[2] * (d["latents"].shape[3] // 2) * (d["latents"].shape[4] // 2)
    assert all(shape[1] == 3 * target_tokens for _, shape in seen)  # target, render and source streams
    assert torch.equal(patched, plain) and (plain - d["output"]).abs().max().item() <= 1e-4
    assert (changed - plain).abs().max().item() > 1e-3
