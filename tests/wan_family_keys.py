"""Extra modules of each Wan family, as key → shape for a model of width ``dim``.

Written by hand from ComfyUI 0.33.0 (commit 783545f6): ``comfy/model_detection.py`` (the keys
that decide the model_type) and ``comfy/ldm/wan/model.py`` (the modules and their shapes:
``VaceWanModel``, ``CameraWanModel``/``WanCamAdapter``, ``WanModel_S2V`` with
``CausalAudioEncoder``/``AudioInjector_WAN``/``FramePackMotioner``, ``HumoWanModel``'s
``AudioProjModel``, ``WanModel.ref_conv``), ``comfy/ldm/wan/model_animate.py`` (Animate's
face adapter). Only a few keys per module; the relations ComfyUI reads are the real ones
(``vace_patch_embedding.weight.shape[1]`` = VACE input channels, ``ref_conv.weight.shape[1]``,
``control_adapter.conv`` = Conv2d(in_dim_control_adapter * 64, dim, 2, 2)).
"""

from __future__ import annotations

import torch


def extras(kind: str, dim: int, *, vace_in: int = 96, vace_layers: int = 2) -> dict[str, tuple[int, ...]]:
    if kind == "vace":
        out = {"vace_patch_embedding.weight": (dim, vace_in, 1, 2, 2), "vace_patch_embedding.bias": (dim,)}
        for i in range(vace_layers):
            out[f"vace_blocks.{i}.after_proj.weight"] = (dim, dim)
            out[f"vace_blocks.{i}.self_attn.q.weight"] = (dim, dim)
        out["vace_blocks.0.before_proj.weight"] = (dim, dim)
        return out
    if kind == "camera":  # WanCamAdapter(in_dim_control_adapter=24, dim, kernel (2, 2), stride (2, 2))
        return {"control_adapter.conv.weight": (dim, 24 * 64, 2, 2), "control_adapter.conv.bias": (dim,),
                "control_adapter.residual_blocks.0.conv1.weight": (dim, dim, 3, 3)}
    if kind == "s2v":  # audio_dim 1024, num_audio_token 4, cond_dim 16, 25 wav2vec2 layers
        return {"casual_audio_encoder.weights": (1, 25, 1, 1),
                "casual_audio_encoder.encoder.conv1_local.conv.weight": (dim // 4 * 4, 1024, 3),
                "casual_audio_encoder.encoder.final_linear.weight": (dim, dim),
                "casual_audio_encoder.encoder.final_linear.bias": (dim,),
                "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, dim),
                "trainable_cond_mask.weight": (3, dim),
                "cond_encoder.weight": (dim, 16, 1, 2, 2),
                "audio_injector.injector.0.q.weight": (dim, dim),
                "audio_injector.injector_adain_layers.0.linear.weight": (2 * dim, dim),
                "frame_packer.proj.weight": (dim, 16, 1, 2, 2),
                "frame_packer.proj_2x.weight": (dim, 16, 2, 4, 4)}
    if kind == "humo":  # AudioProjModel(seq_len=8, blocks=5, channels=1280, intermediate 512, output 1536)
        return {"audio_proj.audio_proj_glob_1.layer.weight": (512, 8 * 5 * 1280),
                "audio_proj.audio_proj_glob_1.layer.bias": (512,)}
    if kind == "animate":
        return {"face_adapter.fuser_blocks.0.k_norm.weight": (128,),
                "face_adapter.fuser_blocks.0.linear1_kv.weight": (2 * dim, 512),
                "pose_patch_embedding.weight": (dim, 16, 1, 2, 2)}
    if kind == "ref_conv":  # WanModel.ref_conv: Conv2d(in_dim_ref_conv, dim, (2, 2))
        return {"ref_conv.weight": (dim, 16, 2, 2), "ref_conv.bias": (dim,)}
    raise KeyError(kind)


def tensors(kind: str, dim: int, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    """The same keys as small bf16 tensors, for files on disk."""
    g = torch.Generator().manual_seed(seed)
    return {k: (0.02 * torch.randn(s, generator=g)).to(torch.bfloat16) for k, s in extras(kind, dim, **kw).items()}
