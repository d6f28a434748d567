"""How Vista4D lays out its three token streams (upstream ``wan_video_vista4d.py``).

The DiT sees ``[noisy target | point-cloud render | source video]`` along the sequence; each
stream has its own RoPE temporal origin so the model can tell them apart, and the alpha/motion
masks enter without a VAE, folded pixel-to-channel onto the latent grid.
"""

from __future__ import annotations

import torch

from ..errors import WanquantError

# Release config.yaml (dit.positional_embedding_offset): target frames start at 0, the
# point-cloud stream at 31, the source stream at 62.
ROPE_OFFSET = 31
STREAMS = ("target", "point_cloud", "source")
VAE_T, VAE_S = 4, 8  # Wan VAE compression: 4 frames, 8x8 pixels per latent cell
MASKS = 2  # alpha mask, motion mask
MASK_CHANNELS = MASKS * VAE_T * VAE_S * VAE_S  # 512: the mask Conv3d's input channels


def stream_t_starts(offset: int = ROPE_OFFSET) -> tuple[int, int, int]:
    """RoPE temporal start of each stream, in the order the streams are concatenated."""
    return 0, offset, 2 * offset


def check_frames(frames: int, what: str) -> int:
    """Wan video length: 1 + 4k pixel frames. Returns the latent frame count."""
    if frames < 1 or (frames - 1) % VAE_T:
        raise WanquantError(f"{what}: Wan needs 1 + 4k frames (e.g. 49)", expected="1 + 4k frames", found=frames)
    return (frames - 1) // VAE_T + 1


def pack_masks(alpha: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """Two ``f h w`` masks (values 0..1) → ``1 (2*4*8*8) f' h/8 w/8``, exactly upstream's
    ``shuffle_mask``: the first frame is repeated 4x (Wan's VAE keeps frame 0 alone), then every
    4x8x8 pixel block becomes channels ordered (mask, frame, row, column)."""
    if alpha.shape != motion.shape or alpha.ndim != 3:
        raise WanquantError("alpha and motion masks must be f×h×w of one size",
                            expected=f"{tuple(alpha.shape)} for both", found=f"{tuple(motion.shape)}")
    f, h, w = alpha.shape
    check_frames(f, "masks")
    if h % VAE_S or w % VAE_S:
        raise WanquantError("mask size must be a multiple of 8", expected="h, w multiples of 8", found=f"{h}x{w}")
    m = torch.stack((alpha, motion), dim=0).float()  # c f h w
    m = torch.cat((m[:, :1].expand(-1, VAE_T, -1, -1), m[:, 1:]), dim=1)  # c 4f' h w
    fl = m.shape[1] // VAE_T
    m = m.reshape(MASKS, fl, VAE_T, h // VAE_S, VAE_S, w // VAE_S, VAE_S)
    # c f' sf h' sh w' sw -> (c sf sh sw) f' h' w'
    m = m.permute(0, 2, 4, 6, 1, 3, 5).reshape(MASK_CHANNELS, fl, h // VAE_S, w // VAE_S)
    return m[None]


def plucker_for_latents(plucker: torch.Tensor) -> torch.Tensor:
    """``f h' w' 6`` per pixel frame → every 4th frame (one per latent frame), as upstream."""
    return plucker[::VAE_T]


def tokens_for_streams(plucker_tokens: torch.Tensor) -> torch.Tensor:
    """``b f' h' w' 6`` → ``b (3 f' h' w') 6``: one camera embedding per token, the same for all
    three streams (upstream ``cam_emb.repeat(1, 3, 1)``)."""
    b = plucker_tokens.shape[0]
    return plucker_tokens.reshape(b, -1, plucker_tokens.shape[-1]).repeat(1, len(STREAMS), 1)
