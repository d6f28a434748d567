"""Which Wan variant a checkpoint is, told from its keys and shapes as ComfyUI tells it, and what
each variant still needs around it to run.

Why a table of its own: a user holding a 14B file wants to know *what* it is (S2V? VACE? one of
two A14B experts?) and which ComfyUI nodes and side models it needs, before a 20 GB load fails
in a sampler. Shapes only: nothing is read, so ``inspect`` can call it on a header.

Sources (read, not copied; commits of the snapshots in /work/shared/comfyui):

* ComfyUI 0.33.0 (commit 783545f6) ``comfy/model_detection.py``, Wan section (keyed on
  ``head.modulation``): ``in_dim = patch_embedding.weight.shape[1]``, ``out_dim =
  head.head.weight.shape[0] // 4``; ``model_type`` by the first key present, in this order:
  ``vace_patch_embedding.weight`` → vace, ``control_adapter.conv.weight`` → camera (with
  ``img_emb.proj.0.bias``) / camera_2.2 (without), ``casual_audio_encoder.encoder.final_linear.weight``
  → s2v, ``audio_proj.audio_proj_glob_1.layer.bias`` → humo,
  ``face_adapter.fuser_blocks.0.k_norm.weight`` → animate, ``patch_embedding_mask.weight`` →
  scail2, ``patch_embedding_pose.weight`` → scail, ``patch_embedding_global.weight`` → wandancer,
  else ``img_emb.proj.0.bias`` → i2v, else t2v; a safetensors ``config`` metadata entry's
  ``transformer`` dict then overrides any of it. ComfyUI 0.29.0 (commit 4f874c5) has the same
  section, line for line.
* ``comfy/supported_models.py`` (both versions): ``WAN22_T2V`` = t2v with ``out_dim`` 48 (the
  Wan2.2 VAE's 48 latent channels: TI2V-5B); ``WAN21_FunControl2V`` = i2v with ``in_dim`` 48;
  ``WAN21_Camera`` in_dim 32, ``WAN22_Camera`` in_dim 36. Only 0.33 has ``WAN_Animate2``
  (``model_type`` "animate2", added in ComfyUI commit a464ac33): its weights are Wan2.1-I2V-14B
  shaped (``comfy/ldm/wan/model_animate2.py``: "the checkpoint is i2v-shaped"), so nothing but
  that ``config`` metadata selects it.
* ``comfy_extras/nodes_wan.py``: the node names below; ``Wan22FunControlToVideo`` concatenates
  control latents (16) + mask (4) + start-image latents (16) to the 16 noise channels, hence
  in_dim 52 for Wan2.2-Fun-A14B-Control; ``WanFunControlToVideo`` control (16) + start (16): 48.

Wan2.2-A14B ships every model as a high-noise and a low-noise expert with identical keys and
shapes: which one a file is cannot be told from the weights, and no producer metadata naming it
is known to us, so it is reported as undecidable, never guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# A14B: two experts, one file each, same shapes.
EXPERT_NOTE = ("Wan2.2-A14B {kind} expert: high- or low-noise cannot be told from the weights; load both "
               "(ComfyUI: two loaders + KSamplerAdvanced split)")
# ComfyUI's model_type values 0.29.0 has no model class for (supported_models.py of each snapshot).
NOT_IN_029 = {"animate2": "ComfyUI 0.29 has no Wan-Animate-2 (WAN_Animate2 and WanAnimate2ToVideo arrived in 0.33)"}


@dataclass
class Variant:
    name: str            # e.g. "Wan2.2-S2V-14B"
    comfy_type: str      # the model_type ComfyUI's model_detection gives it
    needs: str           # one plain-English line: what else it takes to run
    notes: list[str] = field(default_factory=list)


def _has(shapes, prefix: str) -> bool:
    return any(k == prefix or k.startswith(prefix + ".") for k in shapes)


def _count(shapes, group: str) -> int:
    return len({k.split(".")[1] for k in shapes if k.startswith(group + ".") and k.split(".")[1].isdigit()})


def config_model_type(metadata: dict | None) -> str | None:
    """``model_type`` from a safetensors ``config`` metadata entry, the override ComfyUI applies
    (``dit_config.update(json.loads(metadata["config"]).get("transformer", {}))``)."""
    raw = (metadata or {}).get("config")
    if not raw:
        return None
    try:
        mt = json.loads(raw).get("transformer", {}).get("model_type")
    except (ValueError, AttributeError):
        return None
    return mt if isinstance(mt, str) else None


def classify(shapes, dim, in_dim, out_dim, size: str, metadata: dict | None = None) -> Variant:
    """``shapes``: canonical key → logical shape; ``size``: "-14B", "-1.3B", " (dim 64)"."""
    a14b = dim == 5120
    v = _by_modules(shapes, dim, in_dim, size)
    if v is None:
        v = _by_channels(shapes, dim, in_dim, out_dim, size)
    if _has(shapes, "ref_conv"):
        v.notes.append(f"ref_conv present (reference-image input, {_ch(shapes, 'ref_conv.weight')} channels)")
    declared = config_model_type(metadata)
    if declared == "animate2" and v.comfy_type == "i2v":
        v = Variant("Wan-Animate-2-14B (Wan2.1-I2V-14B shapes; the file's config metadata says animate2)", "animate2",
                    "a driving video and a reference image through WanAnimate2ToVideo (optionally WanAnimate2Cache); "
                    "no pose extraction")
    elif declared and declared != v.comfy_type:
        v.notes.append(f"the file's config metadata sets model_type '{declared}' (ComfyUI applies it over the shapes)")
    elif v.comfy_type == "i2v" and a14b and in_dim == 36 and "img_emb.emb_pos" not in shapes:
        v.notes.append("Wan-Animate-2 has these exact shapes; ComfyUI 0.33 runs a file as Animate-2 only when its "
                       "config metadata says model_type 'animate2'")
    if v.comfy_type in NOT_IN_029:
        v.notes.append(NOT_IN_029[v.comfy_type])
    return v


def _ch(shapes, key):
    shape = tuple(shapes.get(key, ()))
    return shape[1] if len(shape) > 1 else "?"


def _by_modules(shapes, dim, in_dim, size) -> Variant | None:
    """The module-keyed variants, in ComfyUI's order."""
    a14b = dim == 5120
    if _has(shapes, "vace_patch_embedding"):
        return Variant(f"Wan2.1-VACE{size} ({_count(shapes, 'vace_blocks')} VACE blocks, VACE input "
                       f"{_ch(shapes, 'vace_patch_embedding.weight')} channels)", "vace",
                       "control video / mask / reference image through WanVaceToVideo, then TrimVideoLatent "
                       "after sampling")
    if _has(shapes, "control_adapter"):
        if _has(shapes, "img_emb.proj.0"):
            return Variant(f"Wan2.1-Fun-Control-Camera{size}", "camera",
                           "camera poses: WanCameraEmbedding into WanCameraImageToVideo, a start image and CLIP vision")
        v = Variant("Wan2.2-Fun-A14B-Control-Camera" if a14b else f"Wan2.2-Fun-Control-Camera{size}", "camera_2.2",
                    "camera poses: WanCameraEmbedding into WanCameraImageToVideo and a start image")
        if a14b:
            v.notes.append(EXPERT_NOTE.format(kind="Fun-Control-Camera"))
        return v
    if _has(shapes, "casual_audio_encoder"):
        return Variant(f"Wan2.2-S2V{size}", "s2v",
                       "audio features from a wav2vec2 audio encoder (AudioEncoderLoader, AudioEncoderEncode), a "
                       "reference image and WanSoundImageToVideo (WanSoundImageToVideoExtend for longer clips)")
    if _has(shapes, "audio_proj"):
        return Variant(f"Wan2.1-HuMo{size}", "humo",
                       "audio features from a Whisper audio encoder (AudioEncoderLoader, AudioEncoderEncode) and "
                       "WanHuMoImageToVideo")
    if _has(shapes, "face_adapter") or _has(shapes, "motion_encoder") or _has(shapes, "pose_patch_embedding"):
        return Variant(f"Wan2.2-Animate{size}", "animate",
                       "pose_video and face_video for WanAnimateToVideo (our WanQuantPoseDetect + WanQuantDrawPose "
                       "make both), a reference image and CLIP vision")
    if _has(shapes, "patch_embedding_mask"):
        return Variant(f"Wan2.1-SCAIL-2{size}", "scail2", "pose renders and colored masks: WanSCAILToVideo "
                       "(SCAIL2ColoredMask)")
    if _has(shapes, "patch_embedding_pose"):
        return Variant(f"Wan2.1-SCAIL{size}", "scail", "pose renders through WanSCAILToVideo")
    if _has(shapes, "patch_embedding_global"):
        return Variant(f"WanDancer{size}", "wandancer", "music features (WanDancerEncodeAudio) and WanDancerVideo")
    return None


def _by_channels(shapes, dim, in_dim, out_dim, size) -> Variant:
    """Plain Wan: I2V / FLF2V / Fun-InP / Fun-Control / TI2V / T2V, from img_emb and the channels."""
    a14b = dim == 5120
    if _has(shapes, "img_emb.proj.0"):
        if in_dim == 48:
            return Variant(f"Wan2.1-Fun-Control{size} (in_dim 48: control + start-image latents)", "i2v",
                           "a control video (depth/pose/edges) through WanFunControlToVideo, optionally a start "
                           "image, and CLIP vision")
        if "img_emb.emb_pos" in shapes:
            return Variant(f"Wan2.1-I2V{size} (FLF2V)", "i2v",
                           "first and last frames through WanFirstLastFrameToVideo and CLIP vision of both")
        return Variant(f"Wan2.1-I2V{size} (or Wan2.1-Fun-InP{size}: same keys and shapes)", "i2v",
                       "a start image through WanImageToVideo (Fun-InP: WanFunInpaintToVideo) and CLIP vision "
                       "(clip_vision_h)")
    if out_dim == 48:
        name = "Wan2.2-TI2V-5B" if dim == 3072 else f"Wan2.2-TI2V{size}"
        if in_dim not in (None, 48):
            name += f" family (in_dim {in_dim}, not TI2V's 48)"
        return Variant(name, "t2v", "the Wan2.2 VAE (48 latent channels, wan2.2_vae); an optional start image "
                                    "through Wan22ImageToVideoLatent")
    if in_dim == 52:
        v = Variant("Wan2.2-Fun-A14B-Control" if a14b else f"Wan2.2-Fun-Control{size}", "t2v",
                    "a control video through Wan22FunControlToVideo (ref_image optional)")
        if a14b:
            v.notes.append(EXPERT_NOTE.format(kind="Fun-Control"))
        return v
    if in_dim == 48:
        return Variant(f"Wan-Fun-Control{size} (in_dim 48, no CLIP image embedding)", "t2v",
                       "a control video through WanFunControlToVideo")
    if in_dim == 36:
        if a14b:
            v = Variant("Wan2.2-I2V-A14B expert (no CLIP image embedding; Wan2.2-Fun-A14B-InP has the same "
                        "keys and shapes)", "t2v",
                        "a start image through WanImageToVideo (Fun-InP: WanFunInpaintToVideo); no CLIP vision")
            v.notes.append(EXPERT_NOTE.format(kind="I2V"))
            return v
        return Variant(f"Wan2.2-I2V{size} (no CLIP image embedding)", "t2v",
                       "a start image through WanImageToVideo; no CLIP vision")
    if in_dim is None and a14b:
        return Variant("Wan2.1-T2V-14B family (patch embedding absent)", "t2v",
                       "its base model for the missing patch embedding")
    if a14b:
        v = Variant(f"Wan2.1-T2V{size} (or a Wan2.2-A14B T2V expert)", "t2v",
                    "only the umT5 text encoder and the Wan2.1 VAE")
        v.notes.append(EXPERT_NOTE.format(kind="T2V") + " (a Wan2.1-T2V-14B file is a single model)")
        return v
    return Variant(f"Wan2.1-T2V{size}", "t2v", "only the umT5 text encoder and the Wan2.1 VAE")
