"""Test-only ComfyUI nodes (never shipped): a stand-in text conditioning, so a prompt can run
without a 10 GB text encoder, and an output node that reports latent statistics."""

import torch


class WanQuantTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8}),
                             "width": ("INT", {"default": 4096})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "wanquant_test"

    def make(self, seed, tokens, width):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=g), {}]],)


class WanQuantTestLatentStats:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "stats"
    OUTPUT_NODE = True
    CATEGORY = "wanquant_test"

    def stats(self, samples):
        x = samples["samples"].float()
        return {"ui": {"stats": [{"mean": float(x.mean()), "std": float(x.std()), "shape": list(x.shape),
                                  "finite": bool(torch.isfinite(x).all()), "checksum": float(x.abs().sum())}]}}


class WanQuantTestImageStats:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "stats"
    OUTPUT_NODE = True
    CATEGORY = "wanquant_test"

    def stats(self, images):
        x = images.float()
        return {"ui": {"stats": [{"shape": list(x.shape), "mean": float(x.mean()), "finite": bool(torch.isfinite(x).all())}]}}


NODE_CLASS_MAPPINGS = {"WanQuantTestConditioning": WanQuantTestConditioning,
                       "WanQuantTestLatentStats": WanQuantTestLatentStats,
                       "WanQuantTestImageStats": WanQuantTestImageStats}
