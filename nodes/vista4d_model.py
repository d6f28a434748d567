"""Vista4D on ComfyUI's Wan: the three-stream DiT, built onto a loaded Wan2.1-T2V-14B model.

The loader builds a plain ComfyUI Wan from the overlay (quantized layers keep wanquant's ops);
when the Vista4D extras are all there this module turns it into upstream's ``model_fn_vista4d``:
tokens ``[target | point-cloud render | source]`` with RoPE time origins 0/31/62, source and
render latents through their own patch convolutions plus the pixel-packed alpha/motion masks,
per block ``cam_encoder(Plücker)`` added to the modulated ``norm1(x)`` and ``projector`` on the
self-attention output before its gate; only the target third of the output is returned. The
extras stay in the file's precision (fp8 ones dequantized to bf16) and are cast per call.
"""

from __future__ import annotations

import logging
import re

import torch

import comfy.ldm.common_dit
import comfy.ldm.wan.model
import comfy.model_base
import comfy.model_management
import comfy.conds
import comfy.ops

from ..errors import WanquantError
from ..vista4d import streams

log = logging.getLogger(__name__)

COND_KEY = "vista4d"  # conditioning entry set by WanQuantVista4DConditioning
_CONDS = ("vista4d_source", "vista4d_render", "vista4d_source_mask", "vista4d_render_mask", "vista4d_cam")
LE = "latent_encoder"
_STREAM_MODULES = {"source": "source_patch_embedding", "point_cloud": "point_cloud_patch_embedding"}


def vista4d_layout(keys) -> dict | None:
    """Which Vista4D modules the extras hold; None unless the model can run as Vista4D (both
    stream patchifiers, a cam_encoder and projector in every block)."""
    keys = set(keys)
    blocks = {int(m.group(1)) for k in keys for m in [re.match(r"^blocks\.(\d+)\.cam_encoder\.weight$", k)] if m}
    proj = {int(m.group(1)) for k in keys for m in [re.match(r"^blocks\.(\d+)\.projector\.weight$", k)] if m}
    rgb = {s: f"{LE}.{m}.rgb_patchify.patch_embedding.weight" in keys for s, m in _STREAM_MODULES.items()}
    if not blocks or blocks != proj or not all(rgb.values()):
        return None
    masks = {s: f"{LE}.{m}.mask_patchify.patch_embedding.weight" in keys for s, m in _STREAM_MODULES.items()}
    return {"blocks": sorted(blocks), "masks": masks}


def _dequant(tensors: dict, layer: str) -> dict:
    """``layer``'s weight/bias as plain tensors (fp8 with a scalar scale → bf16)."""
    w = tensors[f"{layer}.weight"]
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = tensors.get(f"{layer}.weight_scale")
        if scale is None or scale.numel() != 1:
            raise WanquantError("Vista4D extra module in fp8 without a per-tensor scale", layer=layer,
                                expected="weight_scale (one value)", found="none" if scale is None else tuple(scale.shape))
        w = (w.float() * scale.float()).to(torch.bfloat16)
    elif f"{layer}.comfy_quant" in tensors:
        raise WanquantError("Vista4D extra module in a block-scaled format; convert it to fp8 or bf16",
                            layer=layer, expected="bf16 or per-tensor fp8", found="comfy_quant block format")
    out = {"weight": w}
    if f"{layer}.bias" in tensors:
        out["bias"] = tensors[f"{layer}.bias"]
    return out


def _module(kind, tensors: dict, layer: str):
    p = _dequant(tensors, layer)
    w = p["weight"]
    ops = comfy.ops.manual_cast  # cast to the activation's dtype/device per call (offload-safe)
    if kind == "linear":
        m = ops.Linear(w.shape[1], w.shape[0], bias="bias" in p, device="meta")
    else:
        m = ops.Conv3d(w.shape[1], w.shape[0], kernel_size=tuple(w.shape[2:]), stride=tuple(w.shape[2:]),
                       bias="bias" in p, device="meta")
    m.weight = torch.nn.Parameter(w, requires_grad=False)
    if "bias" in p:
        m.bias = torch.nn.Parameter(p["bias"], requires_grad=False)
    return m


def _nest(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, torch.nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, module)


def make_vista4d(patcher, tensors: dict, layout: dict) -> list[str]:
    """Turn a freshly loaded Wan patcher into Vista4D (in place); returns the report lines."""
    dm = patcher.model.diffusion_model
    if len(layout["blocks"]) != len(dm.blocks):
        raise WanquantError("Vista4D extras do not cover every block", expected=f"{len(dm.blocks)} blocks",
                            found=f"cam_encoder/projector in {len(layout['blocks'])}")
    for b in layout["blocks"]:
        dm.blocks[b].add_module("cam_encoder", _module("linear", tensors, f"blocks.{b}.cam_encoder"))
        dm.blocks[b].add_module("projector", _module("linear", tensors, f"blocks.{b}.projector"))
    mask_ch = None
    for mod in _STREAM_MODULES.values():
        for part in ("rgb_patchify", "mask_patchify"):
            layer = f"{LE}.{mod}.{part}.patch_embedding"
            if f"{layer}.weight" in tensors:
                conv = _module("conv", tensors, layer)
                _nest(dm, layer, conv)
                if part == "mask_patchify":
                    mask_ch = conv.weight.shape[1]
        if f"{LE}.{mod}.projector.weight" in tensors:
            _nest(dm, f"{LE}.{mod}.projector", _module("linear", tensors, f"{LE}.{mod}.projector"))
    if mask_ch not in (None, streams.MASK_CHANNELS):
        raise WanquantError("Vista4D mask patchifier has an unexpected input width", layer=f"{LE}.*.mask_patchify",
                            expected=f"{streams.MASK_CHANNELS} channels (2 masks x 4x8x8 pixels)", found=mask_ch)
    dm.__class__ = Vista4DWanModel
    dm.wq_vista4d_masks = layout["masks"]
    dm.wq_rope_offset = streams.ROPE_OFFSET
    patcher.model.__class__ = Vista4DWAN21
    patcher.size = 0  # new modules: let ComfyUI measure the model again
    patcher.model.wanquant_vista4d = True
    masks = [s for s, on in layout["masks"].items() if on]
    return [f"Vista4D: three-stream reshoot model (cam_encoder + projector in {len(layout['blocks'])} blocks, "
            f"latent_encoder for source and point cloud{', masks for ' + ' and '.join(masks) if masks else ''}); "
            "expects 'Vista4D conditioning' on positive and negative: source video latents, point-cloud render "
            "latents with alpha/motion masks, target-camera Plücker rays"]


class Vista4DWAN21(comfy.model_base.WAN21):
    """ComfyUI model wrapper: passes the Vista4D conditioning to the diffusion model."""

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        v = kwargs.get(COND_KEY)
        if v is not None:
            out["vista4d_source"] = comfy.conds.CONDRegular(self.process_latent_in(v["source"]))
            out["vista4d_render"] = comfy.conds.CONDRegular(self.process_latent_in(v["render"]))
            out["vista4d_source_mask"] = comfy.conds.CONDRegular(v["source_mask"])
            out["vista4d_render_mask"] = comfy.conds.CONDRegular(v["render_mask"])
            out["vista4d_cam"] = comfy.conds.CONDRegular(v["cam"])
        return out


def _patchify(conv, x, dtype):
    return conv(x.float()).to(dtype).flatten(2).transpose(1, 2)


class Vista4DWanModel(comfy.ldm.wan.model.WanModel):
    """ComfyUI's WanModel with Vista4D's streams (instances are converted by ``make_vista4d``)."""

    def _forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        missing = [k for k in _CONDS if kwargs.get(k) is None]
        if missing:
            raise WanquantError("this Vista4D model was sampled without its conditioning: connect 'Vista4D "
                                "conditioning' to both positive and negative", expected=", ".join(_CONDS),
                                found="missing " + ", ".join(missing))
        bs, c, t, h, w = x.shape
        x = comfy.ldm.common_dit.pad_to_patch_size(x, self.patch_size)
        freqs = torch.cat([self.rope_encode(t, h, w, t_start=s, device=x.device, dtype=x.dtype,
                                            transformer_options=transformer_options)
                           for s in streams.stream_t_starts(self.wq_rope_offset)], dim=1)
        out = self._wq_forward(x, timestep, context, freqs, {k: kwargs[k] for k in _CONDS}, transformer_options)
        return out[:, :, :t, :h, :w]

    def _wq_stream(self, name, rgb, mask, dtype, batch):
        emb = getattr(self.latent_encoder, _STREAM_MODULES[name])
        tok = _patchify(emb.rgb_patchify.patch_embedding, rgb, dtype)
        if self.wq_vista4d_masks[name]:
            m = _patchify(emb.mask_patchify.patch_embedding, mask, dtype)
            tok = tok + (emb.projector(m) if hasattr(emb, "projector") else m)
        return tok.expand(batch, -1, -1) if tok.shape[0] == 1 else tok

    def _wq_forward(self, x, t, context, freqs, v, transformer_options):
        target = self.patch_embedding(x.float()).to(x.dtype)
        grid = target.shape[2:]
        target = target.flatten(2).transpose(1, 2)
        b, n = target.shape[:2]
        for key in ("vista4d_source", "vista4d_render", "vista4d_source_mask", "vista4d_render_mask"):
            if tuple(v[key].shape[2:]) != tuple(x.shape[2:]):
                raise WanquantError("Vista4D conditioning does not match the latent being sampled",
                                    expected=f"{key} frames x h x w {tuple(x.shape[2:])}", found=tuple(v[key].shape[2:]))
        cam = v["vista4d_cam"]
        if tuple(cam.shape[1:4]) != tuple(grid):
            raise WanquantError("Vista4D camera rays do not match the latent grid",
                                expected=f"{tuple(grid)} (frames, h/2, w/2)", found=tuple(cam.shape[1:4]))
        render = self._wq_stream("point_cloud", v["vista4d_render"], v["vista4d_render_mask"], x.dtype, b)
        source = self._wq_stream("source", v["vista4d_source"], v["vista4d_source_mask"], x.dtype, b)
        x = torch.cat((target, render, source), dim=1)
        cam = streams.tokens_for_streams(cam.to(x.dtype)).expand(b, -1, -1)

        e = self.time_embedding(comfy.ldm.wan.model.sinusoidal_embedding_1d(self.freq_dim, t.flatten()).to(dtype=x.dtype))
        e = e.reshape(t.shape[0], -1, e.shape[-1])
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))
        context = self.text_embedding(context)
        x = self._wq_blocks(x, e0, freqs, context, cam, transformer_options)
        x = self.head(x, e)[:, :n]
        return self.unpatchify(x, grid)

    def _wq_blocks(self, x, e0, freqs, context, cam, transformer_options):
        """The block loop with ComfyUI's extension points, as ``WanModel.forward_orig`` offers
        them: a ``("double_block", i)`` replace patch gets the block as ``original_block`` (over
        all three streams' tokens), and ``double_block`` patches see each block's output."""
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        after = transformer_options.get("patches", {}).get("double_block", [])
        x_input = x
        transformer_options["total_blocks"] = len(self.blocks)
        transformer_options["block_type"] = "double"
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
            if ("double_block", i) in blocks_replace:
                def original(args, block=block):
                    return {"img": _wq_block(block, args["img"], args["vec"], args["pe"], args["txt"], cam,
                                             args["transformer_options"])}

                x = blocks_replace[("double_block", i)]({"img": x, "txt": context, "vec": e0, "pe": freqs,
                                                         "transformer_options": transformer_options},
                                                        {"original_block": original})["img"]
            else:
                x = _wq_block(block, x, e0, freqs, context, cam, transformer_options)
            for p in after:
                x = p({"img": x, "x": x_input, "vec": e0, "block_index": i, "img_offset": 0,
                       "transformer_options": transformer_options})["img"]
        return x


def _wq_block(block, x, e, freqs, context, cam, transformer_options):
    """ComfyUI's WanAttentionBlock.forward with upstream Vista4D's two insertions."""
    repeat_e = comfy.ldm.wan.model.repeat_e
    mod = comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device)
    e = (mod + e).chunk(6, dim=1) if e.ndim < 4 else (mod.unsqueeze(0) + e).unbind(2)
    x = x.contiguous()
    h = torch.addcmul(repeat_e(e[0], x), block.norm1(x), 1 + repeat_e(e[1], x))
    h = h + block.cam_encoder(cam)  # Vista4D: camera rays added to the modulated norm1(x)
    y = block.projector(block.self_attn(h, freqs, transformer_options=transformer_options))  # Vista4D
    x = torch.addcmul(x, y, repeat_e(e[2], x))
    x = x + block.cross_attn(block.norm3(x), context, context_img_len=None, transformer_options=transformer_options)
    for p in transformer_options.get("patches", {}).get("attn2_patch", []):
        x = p({"x": x, "transformer_options": transformer_options})
    y = block.ffn(torch.addcmul(repeat_e(e[3], x), block.norm2(x), 1 + repeat_e(e[4], x)))
    return torch.addcmul(x, y, repeat_e(e[5], x))
