"""Tiny Wan-shaped checkpoints built with each producer's own recipe.

Used by the tests (every format, made not downloaded), by the benchmarks and by ``wanquant``
without arguments (a newcomer sees detection and conversion work without a 20 GB download).
Key names and shape relations are Wan's real ones; only the sizes are small. ComfyUI derives
``num_heads = dim // 128``, so the default dim is 256; ``text_embedding.0`` keeps its real
4096-wide input so ComfyUI's default ``text_dim`` fits without a config override.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

FP8_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# kijai WanVideoWrapper / WorldStereo exclusion keywords (seed 001)
KIJAI_EXCLUDE = ("norm", "bias", "time_in", "time_", "patch_embedding", "img_emb", "modulation",
                 "text_embedding", "adapter", "add", "ref_conv", "audio_proj")


def wan_state_dict(dim: int = 256, ffn_dim: int = 512, num_blocks: int = 2, in_dim: int = 16, out_dim: int = 16,
                   text_dim: int = 4096, freq_dim: int = 256, i2v: bool = False, seed: int = 0,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A native-key Wan DiT state dict with Wan's layer structure and small random weights."""
    g = torch.Generator().manual_seed(seed)

    def lin(name, o, i, bias=True):
        sd[f"{name}.weight"] = (torch.randn(o, i, generator=g) / i ** 0.5).to(dtype)
        if bias:
            sd[f"{name}.bias"] = (torch.randn(o, generator=g) * 0.02).to(dtype)

    def norm(name, n, bias=False):
        sd[f"{name}.weight"] = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
        if bias:
            sd[f"{name}.bias"] = (0.02 * torch.randn(n, generator=g)).to(dtype)

    sd: dict[str, torch.Tensor] = {}
    sd["patch_embedding.weight"] = (torch.randn(dim, in_dim, 1, 2, 2, generator=g) / (in_dim * 4) ** 0.5).to(dtype)
    sd["patch_embedding.bias"] = torch.zeros(dim, dtype=dtype)
    lin("text_embedding.0", dim, text_dim)
    lin("text_embedding.2", dim, dim)
    lin("time_embedding.0", dim, freq_dim)
    lin("time_embedding.2", dim, dim)
    lin("time_projection.1", dim * 6, dim)
    for b in range(num_blocks):
        p = f"blocks.{b}"
        for att in ("self_attn", "cross_attn"):
            for m in ("q", "k", "v", "o"):
                lin(f"{p}.{att}.{m}", dim, dim)
            norm(f"{p}.{att}.norm_q", dim)
            norm(f"{p}.{att}.norm_k", dim)
        if i2v:
            lin(f"{p}.cross_attn.k_img", dim, dim)
            lin(f"{p}.cross_attn.v_img", dim, dim)
            norm(f"{p}.cross_attn.norm_k_img", dim)
        norm(f"{p}.norm3", dim, bias=True)
        lin(f"{p}.ffn.0", ffn_dim, dim)
        lin(f"{p}.ffn.2", dim, ffn_dim)
        sd[f"{p}.modulation"] = (torch.randn(1, 6, dim, generator=g) / dim ** 0.5).to(dtype)
    lin("head.head", out_dim * 4, dim)
    sd["head.modulation"] = (torch.randn(1, 2, dim, generator=g) / dim ** 0.5).to(dtype)
    if i2v:
        norm("img_emb.proj.0", 1280, bias=True)
        lin("img_emb.proj.1", 1280, 1280)
        lin("img_emb.proj.3", dim, 1280)
        norm("img_emb.proj.4", dim, bias=True)
    return sd


def vista4d_extras(sd: dict[str, torch.Tensor], dim: int, num_blocks: int, seed: int = 1, cam_in: int = 6,
                   dtype: torch.dtype = torch.bfloat16, mask_channels: int = 8) -> dict[str, torch.Tensor]:
    """Vista4D's new modules (seed 000): latent encoder patchifiers, per-block cam_encoder/projector.
    The real mask patchifier reads 2 masks x 4x8x8 pixels = 512 channels; 8 keeps files small."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for src in ("source", "point_cloud"):
        for kind, ch in (("rgb", 16), ("mask", mask_channels)):
            base = f"latent_encoder.{src}_patch_embedding.{kind}_patchify.patch_embedding"
            out[f"{base}.weight"] = (0.02 * torch.randn(dim, ch, 1, 2, 2, generator=g)).to(dtype)
            out[f"{base}.bias"] = torch.zeros(dim, dtype=dtype)
    for b in range(num_blocks):
        out[f"blocks.{b}.cam_encoder.weight"] = (0.02 * torch.randn(dim, cam_in, generator=g)).to(dtype)
        out[f"blocks.{b}.cam_encoder.bias"] = torch.zeros(dim, dtype=dtype)
        out[f"blocks.{b}.projector.weight"] = (0.02 * torch.randn(dim, dim, generator=g)).to(dtype)
        out[f"blocks.{b}.projector.bias"] = torch.zeros(dim, dtype=dtype)
    return out


def fp8_quantize(w: torch.Tensor, fp8=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared fp8 recipe of kijai, Vista4D and MagiHuman: s = amax/448, W/s clamped, cast."""
    fmax = torch.finfo(fp8).max
    scale = w.float().abs().amax() / fmax
    q = (w.float() / scale).clamp(-fmax, fmax).to(fp8)
    return q, scale


def kijai_scaled_fp8(sd, *, scale_dtype=torch.bfloat16, marker="bf16_zero", fp8=torch.float8_e4m3fn,
                     with_input_scale: bool = False):
    """WorldStereo/kijai recipe: exclusion keywords, '.scale_weight' siblings, a 'scaled_fp8' marker."""
    out = {}
    for k, t in sd.items():
        if k.endswith(".weight") and t.dim() >= 2 and not any(x in k for x in KIJAI_EXCLUDE):
            q, s = fp8_quantize(t, fp8)
            layer = k[: -len(".weight")]
            out[k] = q
            out[f"{layer}.scale_weight"] = s.to(scale_dtype)
            if with_input_scale:
                out[f"{layer}.scale_input"] = torch.tensor(1.0, dtype=torch.float32)
        else:
            out[k] = t
    if marker == "bf16_zero":
        out["scaled_fp8"] = torch.zeros((), dtype=torch.bfloat16)
    elif marker == "two":
        out["scaled_fp8"] = torch.zeros(2, dtype=fp8)
    elif marker == "empty":
        out["scaled_fp8"] = torch.zeros(0, dtype=fp8)
    return out


def vista4d_fp8(sd, *, layer_level: bool = False):
    """Vista4D mirror recipe (seed 000): only 2-D Linear weights inside the DiT blocks' attention and
    FFN, fp32 scalar scale as '<key>.scale_weight' (the card), no marker."""
    out = {}
    for k, t in sd.items():
        is_lin = (k.endswith(".weight") and t.dim() == 2 and k.startswith("blocks.")
                  and any(f".{m}." in k for m in ("self_attn", "cross_attn", "ffn", "projector"))
                  and "norm" not in k)
        if is_lin:
            q, s = fp8_quantize(t)
            out[k] = q
            out[(k[: -len(".weight")] + ".scale_weight") if layer_level else f"{k}.scale_weight"] = s.float()
        else:
            out[k] = t
    return out


def magihuman_fp8(sd, *, min_numel: int = 1_000_000):
    """MagiHuman convert_fp8.py recipe (seed 002): ndim >= 2, >= min_numel elements, name without
    norm/bands/bias/embedder; scale as '<param>.__fp8_scale' (fp32 0-d)."""
    out = {}
    for k, t in sd.items():
        if t.dim() >= 2 and t.numel() >= min_numel and not any(x in k for x in ("norm", "bands", "bias", "embedder")):
            q, s = fp8_quantize(t)
            out[k] = q
            out[f"{k}.__fp8_scale"] = s.float().reshape(())
        else:
            out[k] = t
    return out


def comfy_quant_bytes(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def quantizable_linears(sd) -> list[str]:
    """Linear layers ComfyUI can quantize (2-D weights; not patch embedding / norms / modulation)."""
    return [k[: -len(".weight")] for k, t in sd.items()
            if k.endswith(".weight") and t.dim() == 2 and "norm" not in k and not k.startswith("img_emb.proj.0")]


def comfy_native(sd, formats: dict[str, str] | str = "float8_e4m3fn", *, header_metadata: bool = False):
    """convert_to_quant --comfy_quant recipe, through comfy-kitchen's own quantizers.

    ``formats`` is one format for every quantizable Linear or a per-layer map (layers not in it
    stay high precision), which is how the NVFP4 seed mixes nvfp4, mxfp8 and bf16.
    Returns (state dict, safetensors metadata)."""
    ck = importlib.import_module("comfy_kitchen")  # the producer's quantizers (a kernel library, not ComfyUI)

    layers = quantizable_linears(sd)
    fmt_of = {l: formats for l in layers} if isinstance(formats, str) else dict(formats)
    out, meta_layers = {}, {}
    for k, t in sd.items():
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        fmt = fmt_of.get(layer) if layer else None
        if not fmt:
            out[k] = t
            continue
        w = t.float()
        conf = {"format": fmt}
        if fmt in ("float8_e4m3fn", "float8_e5m2"):
            dt = torch.float8_e4m3fn if fmt == "float8_e4m3fn" else torch.float8_e5m2
            scale = (w.abs().amax() / torch.finfo(dt).max).float()
            out[k] = ck.quantize_per_tensor_fp8(w, scale, dt)
            out[f"{layer}.weight_scale"] = scale.reshape(())
        elif fmt == "nvfp4":
            gscale = (w.abs().amax() / (448.0 * 6.0)).float()
            q, bs = ck.quantize_nvfp4(w, gscale, pad_16x=True)
            out[k], out[f"{layer}.weight_scale"], out[f"{layer}.weight_scale_2"] = q, bs, gscale.reshape(())
            conf["orig_dtype"] = "torch.bfloat16"
            conf["orig_shape"] = list(t.shape)
        elif fmt == "mxfp8":
            q, bs = ck.quantize_mxfp8(w, pad_32x=True)
            out[k], out[f"{layer}.weight_scale"] = q, bs.view(torch.uint8)
        else:
            raise ValueError(fmt)
        if header_metadata:
            meta_layers[layer] = conf
        else:
            out[f"{layer}.comfy_quant"] = comfy_quant_bytes(conf)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": meta_layers})} if header_metadata else {}
    return out, meta


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest E2M1 code (sign in bit 3) for values already divided by their group scale."""
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    idx = (x.abs().unsqueeze(-1) - values).abs().argmin(-1)
    return (idx | ((x < 0).to(torch.int64) << 3)).to(torch.uint8)


def fp4_g32(sd, layers: list[str] | None = None, *, order: str = "low_first", scale_dtype=torch.bfloat16,
            key_suffix: str = "weight"):
    """Naive FP4 RTN, group 32 (seed 004): scale = group amax / 6, codes packed two per byte."""
    layers = quantizable_linears(sd) if layers is None else layers
    out = dict(sd)
    for layer in layers:
        w = sd[f"{layer}.weight"].float()
        o, i = w.shape
        groups = w.reshape(o, i // 32, 32)
        scale = (groups.abs().amax(-1) / 6.0).clamp(min=1e-12).to(scale_dtype)
        codes = e2m1_codes(groups / scale.float().unsqueeze(-1)).reshape(o, i)
        even, odd = codes[:, 0::2], codes[:, 1::2]
        packed = (even | (odd << 4)) if order == "low_first" else ((even << 4) | odd)
        del out[f"{layer}.weight"]
        out[f"{layer}.{key_suffix}"] = packed.to(torch.uint8)
        out[f"{layer}.weight_scale"] = scale
    return out


def to_diffusers(sd):
    """Rename native keys to diffusers' Wan names (WorldStereo / Animate releases use those)."""
    from .keymap import native_to_diffusers

    return {native_to_diffusers(k)[0]: v for k, v in sd.items()}


def save(sd, path, metadata=None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def save_sharded(sd, folder, *, name="diffusion_pytorch_model", shards: int = 2, index_metadata=None) -> Path:
    """Split into ``shards`` files plus '<name>.safetensors.index.json' (the Vista4D/MagiHuman layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    per = (len(keys) + shards - 1) // shards
    weight_map = {}
    for s in range(shards):
        fname = f"{name}-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s * per:(s + 1) * per]}
        save(part, folder / fname)
        weight_map.update({k: fname for k in part})
    index = {"metadata": index_metadata or {}, "weight_map": weight_map}
    idx = folder / f"{name}.safetensors.index.json"
    idx.write_text(json.dumps(index, indent=1))
    return idx


def demo_checkpoint(folder: str | os.PathLike) -> Path:
    """The example ``wanquant`` runs on without arguments: a WorldStereo-style file (kijai scaled
    fp8, diffusers keys, bf16 scales, marker) of a tiny Wan2.1-I2V."""
    sd = wan_state_dict(dim=256, ffn_dim=512, num_blocks=2, in_dim=36, i2v=True)
    return save(kijai_scaled_fp8(to_diffusers(sd)), Path(folder) / "tiny-worldstereo-fp8_e4m3fn_scaled.safetensors")
