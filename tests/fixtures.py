"""Shared test data builders and *independent* fp64 references.

Checkpoints are built with the producers' recipes (wanquant.loaders.synthetic follows each
model card); the reference dequantizers below are written from the specs in FORMATS.md /
COMFYUI.md, not from wanquant's own ops, so a test comparing the two can fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from wanquant.loaders import synthetic as syn  # noqa: F401  (re-exported for tests)

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def ref_fp8(q: torch.Tensor, scale) -> torch.Tensor:
    """Every fp8 producer's reload formula: fp8 → float, times the per-tensor scale."""
    return q.to(torch.float64) * torch.as_tensor(scale).to(torch.float64)


def _e2m1(codes: torch.Tensor) -> torch.Tensor:
    mag = E2M1[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def unpack_nibbles(packed: torch.Tensor, order: str) -> torch.Tensor:
    """[N, K/2] bytes → [N, K] 4-bit codes in element order."""
    hi, lo = (packed >> 4) & 0xF, packed & 0xF
    first, second = (hi, lo) if order == "high_first" else (lo, hi)
    return torch.stack([first, second], dim=-1).reshape(packed.shape[0], -1)


def ref_fp4_g32(packed: torch.Tensor, scale: torch.Tensor, order: str) -> torch.Tensor:
    codes = unpack_nibbles(packed, order)
    vals = _e2m1(codes)
    return vals * scale.to(torch.float64).repeat_interleave(32, dim=1)


def unblock(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """cuBLAS 128x4 tiled scale layout → row-major [rows, cols], by the offset formula in COMFYUI.md:
    offset(r,c) = ((r//128)*nColTiles + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4."""
    flat = blocked.reshape(-1)
    n_col_tiles = (cols + 3) // 4
    r = torch.arange(rows).unsqueeze(1)
    c = torch.arange(cols).unsqueeze(0)
    off = ((r // 128) * n_col_tiles + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return flat[off]


def ref_nvfp4(w: torch.Tensor, block_scales: torch.Tensor, scale2, orig_shape) -> torch.Tensor:
    n_pad, half = w.shape
    k_pad = half * 2
    codes = unpack_nibbles(w, "high_first")
    bs = unblock(block_scales.view(torch.float8_e4m3fn), n_pad, k_pad // 16).to(torch.float64)
    vals = _e2m1(codes) * bs.repeat_interleave(16, dim=1) * float(scale2)
    return vals[: orig_shape[0], : orig_shape[1]]


def ref_lightx2v_nvfp4(packed: torch.Tensor, sf: torch.Tensor, inv_global: float) -> torch.Tensor:
    """LightX2V's NVFP4 weight in fp64, from its code (ModelTC/LightX2V f8aee98b,
    nvfp4_quant_kernels_sm120.cu): the even element in the LOW nibble, block scale (r, k) at the
    offset of ``cvt_quant_to_fp4_get_sf_out_offset``, times ``inv_global`` (1 / weight_global_scale,
    i.e. alpha * input_global_scale)."""
    n, half = packed.shape
    vals = _e2m1(unpack_nibbles(packed, "low_first"))
    kb = half * 2 // 16
    n_ktiles = sf.shape[1] // 4
    r = torch.arange(n).unsqueeze(1)
    k = torch.arange(kb).unsqueeze(0)
    off = (r // 128) * n_ktiles * 512 + (k // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + k % 4
    scales = sf.reshape(-1).view(torch.float8_e4m3fn).to(torch.float64)[off]
    return vals * scales.repeat_interleave(16, dim=1) * float(inv_global)


LIGHTX2V_BLOCKS = Path(__file__).resolve().parent / "data" / "lightx2v" / "lightx2v_nvfp4_blocks.safetensors"


def ref_mxfp8(w: torch.Tensor, block_scales: torch.Tensor, orig_shape) -> torch.Tensor:
    n_pad, k_pad = w.shape
    e = unblock(block_scales.view(torch.uint8), n_pad, k_pad // 32).to(torch.int64)
    scale = torch.where(e == 0, torch.zeros((), dtype=torch.float64), torch.pow(2.0, (e - 127).to(torch.float64)))
    vals = w.to(torch.float64) * scale.repeat_interleave(32, dim=1)
    return vals[: orig_shape[0], : orig_shape[1]]


def ref_scale_grid(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp64 ``q[i, j] * s[cell(i, j)]`` by explicit indices, the cell read off the scale's shape: one
    scale, one per row (``[n]`` / ``[n, 1]``), a ``[n/bs, k/bs]`` tile grid or block3d's ``[n, k/bs, 1]``
    (the per-row / block fp8 and int8 producers' reload formula)."""
    n, k = q.shape
    i = torch.arange(n).unsqueeze(1).expand(n, k)
    j = torch.arange(k).unsqueeze(0).expand(n, k)
    s = s.double()
    if s.numel() == 1:
        cell = s.reshape(()).expand(n, k)
    elif tuple(s.shape) in ((n,), (n, 1)):
        cell = s.reshape(-1)[i]
    elif s.dim() == 3:
        cell = s[i, j // (k // s.shape[1]), 0]
    else:
        cell = s[i // (n // s.shape[0]), j // (k // s.shape[1])]
    return q.double() * cell


def mutation_outcome(path, dst, **convert_kw) -> str:
    """What one fuzzed file does to the loader: "ok" (read, and converted to ``dst`` when it reports
    no errors), "error" (exactly one one-line WanquantError), else the traceback (a finding)."""
    import traceback

    from wanquant.errors import WanquantError
    from wanquant.loaders.canonical import load_canonical
    from wanquant.loaders.convert import convert

    try:
        model = load_canonical(path, collect_errors=True)
        if not model.report.errors:
            convert(path, dst, **convert_kw)
        return "ok"
    except WanquantError as err:
        return "error" if "\n" not in str(err) else f"multi-line WanquantError: {err!r}"
    except Exception:  # noqa: BLE001 - the point of the fuzz tests
        return traceback.format_exc(limit=-3)


def mapped_files(ptr: int) -> list[str]:
    """Files whose mapping in this process contains address ``ptr`` (Linux ``/proc/self/maps``)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi and len(parts) >= 6:
                out.append(parts[5])
    return out


def tiny_wan(**kw) -> dict[str, torch.Tensor]:
    kw.setdefault("dim", 256)
    kw.setdefault("ffn_dim", 512)
    kw.setdefault("num_blocks", 2)
    return syn.wan_state_dict(**kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, for bit-exact comparisons."""
    return t.contiguous().reshape(-1).view(torch.uint8)


# ---- seed checkpoints as the real-ComfyUI tests use them (shared by several test files)

def _mixed_formats(sd):
    fmts = {}
    for i, l in enumerate(l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")):
        fmts[l] = ("nvfp4", "mxfp8", "float8_e4m3fn")[i % 3]
    return fmts


def build_seed(kind: str, folder):
    """(path to load, base path or None, fp64 reference state dict in native keys)."""
    sd = tiny_wan(seed=11)
    ref = {k: v.double() for k, v in sd.items()}
    folder.mkdir(parents=True, exist_ok=True)

    def fp8_ref(q, scale_key):
        out = dict(ref)
        for k, t in q.items():
            if t.dtype == torch.float8_e4m3fn:
                out[k] = ref_fp8(t, q[scale_key(k)].float())
        return out

    if kind == "kijai_scaled_fp8_diffusers":  # WorldStereo-style
        q = syn.kijai_scaled_fp8(sd, scale_dtype=torch.bfloat16)
        path = syn.save(syn.to_diffusers(q), folder / "worldstereo_fp8_e4m3fn_scaled.safetensors")
        return path, None, fp8_ref(q, lambda k: k[:-7] + ".scale_weight")
    if kind == "vista4d_sibling_sharded":
        q = syn.vista4d_fp8(sd)
        idx = syn.save_sharded(q, folder / "vista4d-fp8", shards=2)
        return idx, None, fp8_ref(q, lambda k: k + ".scale_weight")
    if kind == "magihuman_fp8_scale":
        q = syn.magihuman_fp8(sd, min_numel=60_000)
        path = syn.save(q, folder / "magi_recipe_wan_fp8.safetensors")
        return path, None, fp8_ref(q, lambda k: k + ".__fp8_scale")
    if kind == "comfy_nvfp4_mxfp8_mix":
        q, _ = syn.comfy_native(sd, _mixed_formats(sd))
        path = syn.save(q, folder / "wan_nvfp4_mix.safetensors")
        out = dict(ref)
        for l, f in _mixed_formats(sd).items():
            shape = tuple(sd[f"{l}.weight"].shape)
            if f == "nvfp4":
                out[f"{l}.weight"] = ref_nvfp4(q[f"{l}.weight"], q[f"{l}.weight_scale"], q[f"{l}.weight_scale_2"], shape)
            elif f == "mxfp8":
                out[f"{l}.weight"] = ref_mxfp8(q[f"{l}.weight"], q[f"{l}.weight_scale"], shape)
            else:
                out[f"{l}.weight"] = ref_fp8(q[f"{l}.weight"], q[f"{l}.weight_scale"])
        return path, None, out
    if kind == "fp4_g32_diffusers":
        layers = [l for l in syn.quantizable_linears(sd) if l.startswith("blocks.")]
        q = syn.fp4_g32(sd, layers, order="low_first")
        path = syn.save(syn.to_diffusers(q), folder / "animate_fp4" / "quantized_transformer.safetensors")
        out = dict(ref)
        for l in layers:
            out[f"{l}.weight"] = ref_fp4_g32(q[f"{l}.weight"], q[f"{l}.weight_scale"], "low_first")
        return path, None, out
    if kind == "vista4d_partial_over_base":
        ft = syn.vista4d_extras(tiny_wan(seed=12), 256, 2)
        keep = {k: v for k, v in ft.items() if ".self_attn." in k or "cam_encoder" in k or "projector" in k}
        qf = syn.vista4d_fp8(keep)
        idx = syn.save_sharded(qf, folder / "vista4d-partial", shards=1)
        qb = syn.kijai_scaled_fp8(sd, scale_dtype=torch.float32)
        base = syn.save(qb, folder / "wan2.1_t2v_fp8_scaled.safetensors")
        out = fp8_ref(qb, lambda k: k[:-7] + ".scale_weight")
        for k, t in qf.items():
            if k.startswith("blocks.") and ".self_attn." in k and not k.endswith(".scale_weight"):
                out[k] = ref_fp8(t, qf[k + ".scale_weight"]) if t.dtype == torch.float8_e4m3fn else t.double()
        return idx, base, out
    if kind == "lightx2v_nvfp4_partial_over_base":  # producer-made blocks (tests/data/lightx2v) over a bf16 base
        from safetensors.torch import load_file

        path = folder / "wan_lightx2v_nvfp4_blocks.safetensors"
        shutil.copyfile(LIGHTX2V_BLOCKS, path)
        sd_base = tiny_wan(dim=128, ffn_dim=256, seed=3)
        base = syn.save(sd_base, folder / "wan_tiny_dim128_bf16.safetensors")
        out = {k: v.double() for k, v in sd_base.items()}
        q = load_file(str(LIGHTX2V_BLOCKS))
        quantized = {k[: -len(".alpha")] for k in q if k.endswith(".alpha")}
        for k, t in q.items():
            layer, param = k.rsplit(".", 1)
            if layer in quantized and param == "weight":
                inv = float(q[f"{layer}.alpha"].double() * q[f"{layer}.input_global_scale"].double())
                out[k] = ref_lightx2v_nvfp4(t, q[f"{layer}.weight_scale"], inv)
            elif layer not in quantized or param == "bias":
                out[k] = t.double()  # the distill's own high-precision tensors win over the base
        return path, base, out
    raise ValueError(kind)


SEEDS = ["kijai_scaled_fp8_diffusers", "vista4d_sibling_sharded", "magihuman_fp8_scale",
         "comfy_nvfp4_mxfp8_mix", "fp4_g32_diffusers", "vista4d_partial_over_base",
         "lightx2v_nvfp4_partial_over_base"]
# Relative error of the denoiser output vs the fp32 model built from the dequantized weights.
# On CPU every path dequantizes and computes in fp32, so only summation order differs.
TOLERANCE = {k: 1e-3 for k in SEEDS}


def denoise(patcher, seed=0):
    """Denoiser output of a ComfyUI model patcher for a fixed random latent, timestep and context."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 1, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    t = torch.tensor([0.6])
    with torch.inference_mode():
        return patcher.model.apply_model(x, t, c_crossattn=ctx).float()




def loader_node(model_name, base_name="(none)", policy="auto") -> dict:
    """API-format node for wanquant's loader."""
    return {"class_type": "WanQuantLoadDiT", "inputs": {"model_name": model_name, "base_name": base_name,
                                                        "op_policy": policy, "compute_dtype": "auto",
                                                        "fp4_nibble_order": "auto"}}


def sampler_prompt(load: dict, seed: int = 0) -> dict:
    """API prompt: node "1" (the given loader) → KSampler (2 steps, 64x64x1 empty Wan latent, stand-in
    conditioning) → "5" latent statistics. Callers may insert nodes between "1" and KSampler ("4")."""
    return {
        "1": load,
        "2": {"class_type": "WanQuantTestConditioning", "inputs": {"seed": seed, "tokens": 8, "width": 4096}},
        "3": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
                                                   "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "WanQuantTestLatentStats", "inputs": {"samples": ["4", 0]}},
    }
