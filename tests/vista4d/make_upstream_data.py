"""Maintainer script (never run by the tests): remake ``data/upstream_forward.safetensors``.

    python tests/vista4d/make_upstream_data.py /path/to/Vista4D-checkout [/path/to/its/bare-git-dir]

Runs upstream Vista4D's own forward (``diffsynth.models.wan_video_dit.DiTBlock``,
``diffsynth.models.latent_encoder.LatentEncoder``, ``diffsynth.pipelines.wan_video_vista4d.
model_fn_vista4d``) on CPU in fp32 with the tiny weights of ``tiny.py``. Modules the forward
never touches (torchvision, imageio, pandas, modelscope, peft, accelerate, ftfy: data loading,
downloads, LoRA, prompt cleaning) are replaced by empty stand-ins, outside the checkout.
"""
import importlib
import importlib.machinery
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import BLOCKS, DIM, digest, tiny_vista4d  # noqa: E402


def upstream(checkout):
    sys.path.insert(0, checkout)
    for _ in range(40):
        try:
            return importlib.import_module("diffsynth.pipelines.wan_video_vista4d")
        except ModuleNotFoundError as e:
            for k in [k for k in sys.modules if k.startswith("diffsynth")]:
                del sys.modules[k]
            m = mock.MagicMock(name=e.name)
            m.__path__, m.__spec__ = [], importlib.machinery.ModuleSpec(e.name, None)
            sys.modules[e.name] = m
    raise SystemExit("could not import upstream")


def main(checkout, git_dir=None):
    vp = upstream(checkout)
    from diffsynth.models import wan_video_dit as wdit
    from diffsynth.models.latent_encoder import LatentEncoder
    sd = tiny_vista4d()
    dit = wdit.WanModel(dim=DIM, in_dim=16, ffn_dim=512, out_dim=16, text_dim=4096, freq_dim=256, eps=1e-6,
                          patch_size=(1, 2, 2), num_heads=DIM // 128, num_layers=BLOCKS, has_image_input=False)
    dit.positional_embedding_offset = 31  # release config.yaml
    dit.latent_encoder = LatentEncoder(source_init_mode="wan_patch_embed", point_cloud_init_mode="wan_patch_embed",
                                         mask_init_mode="zero_init", use_source_masks=True, use_point_cloud_masks=True,
                                         wan_patch_embedding=dit.patch_embedding, rgb_in_channels=16, mask_in_channels=512)
    for block in dit.blocks:
        block.cam_encoder = torch.nn.Linear(6, DIM)
        block.projector = torch.nn.Linear(DIM, DIM)
    missing, unexpected = dit.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    dit = dit.float().eval()
    
    g = torch.Generator().manual_seed(7)
    f, h, w = 2, 4, 6  # latent: 5 pixel frames of 48x32
    inp = {
        "latents": torch.randn(1, 16, f, h, w, generator=g),
        "source_video_latents": torch.randn(1, 16, f, h, w, generator=g),
        "point_cloud_video_latents": torch.randn(1, 16, f, h, w, generator=g),
        "source_mask_latents": (torch.rand(1, 512, f, h, w, generator=g) > 0.5).float(),
        "point_cloud_mask_latents": (torch.rand(1, 512, f, h, w, generator=g) > 0.5).float(),
        "cam_emb": torch.randn(1, f, h // 2, w // 2, 6, generator=g),
        "context": torch.randn(1, 4, 4096, generator=g),
        "timestep": torch.tensor([700.0]),
    }
    with torch.no_grad():
        out = vp.model_fn_vista4d(dit, **inp)
    commit = subprocess.check_output(["git", "--git-dir", git_dir or f"{checkout}/.git", "rev-parse", "HEAD"]).decode().strip()
    save_file({**{k: v.contiguous() for k, v in inp.items()}, "output": out.contiguous()},
              str(Path(__file__).resolve().parent / "data" / "upstream_forward.safetensors"),
              metadata={"upstream": f"github.com/Eyeline-Labs/Vista4D@{commit}", "weights_digest": digest(sd),
                        "made_by": "model_fn_vista4d on CPU, fp32, SDPA attention"})
    print(out.shape, out.abs().mean(), digest(sd))


if __name__ == "__main__":
    main(*sys.argv[1:3])
