"""The tiny Vista4D the parity test data was made with (dim 256, 2 blocks, real key names and
shape relations: 16-channel RGB patchifiers, 512-channel mask patchifiers, Linear(6, dim)
cam_encoder, Linear(dim, dim) projector). Deterministic, so only inputs/outputs are stored."""

import hashlib

import torch

from wanquant.loaders import synthetic as syn

DIM, BLOCKS = 256, 2


def tiny_vista4d() -> dict[str, torch.Tensor]:
    sd = syn.vista4d_extras(syn.wan_state_dict(dim=DIM, ffn_dim=512, num_blocks=BLOCKS, seed=40), DIM, BLOCKS,
                            seed=41, mask_channels=512)
    g = torch.Generator().manual_seed(42)
    for k in list(sd):  # non-zero biases, and weights large enough that the Vista4D paths matter
        if k.startswith("latent_encoder.") or ".cam_encoder." in k or ".projector." in k:
            t = sd[k].float()
            t = t + 0.05 * torch.randn(t.shape, generator=g) if k.endswith(".bias") else t * 10
            sd[k] = t.to(torch.bfloat16)
    return sd


def digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].float().numpy().tobytes())
    return h.hexdigest()[:16]
