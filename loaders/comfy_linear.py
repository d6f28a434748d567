"""Which layers ComfyUI can run quantized: only those it builds as ``operations.Linear``.

``comfy.ops.mixed_precision_ops`` gives ``comfy_quant`` handling to ``Linear`` (and ``Embedding`` /
``MoEExperts``) only (COMFYUI.md; ``comfy/ops.py``). Every other module loads a quantized weight as
plain data and ignores its scale, so stock ComfyUI runs raw fp8 values there. In Wan and
Wan2.2-Animate (``comfy/ldm/wan/model.py``, ``model_animate.py``) the weight-bearing modules that
are *not* ``operations.Linear`` are:

* every convolution: ``patch_embedding`` / ``pose_patch_embedding`` / VACE and other patch
  embeddings (Conv3d), ``ref_conv`` (Conv2d), Animate's ``face_encoder.conv*.conv`` (Conv1d) and
  the motion encoder's ``EqualConv2d`` layers: all have rank-3+ weights;
* Animate's motion encoder as a whole (``motion_encoder.*``): plain ``torch.nn.Module`` classes
  (``EqualConv2d``, ``EqualLinear`` for ``enc.fc.*``, ``Direction`` for ``dec.direction``) that
  read ``self.weight`` directly, so even its 2-D weights are not ``Linear``.

The canonical form therefore dequantizes such layers (exactly: the producer's own formula, fp32)
instead of writing ``comfy_quant`` for them. The real-ComfyUI test checks this rule against the
module types of ComfyUI's own ``WanModel`` and ``AnimateWanModel``.
"""

from __future__ import annotations

CUSTOM_MODULE_PREFIXES = ("motion_encoder.",)


def runs_quantized(module: str, weight_rank: int) -> bool:
    """Whether ComfyUI builds ``module`` (native name) as a Linear that honours ``comfy_quant``."""
    return weight_rank == 2 and not module.startswith(CUSTOM_MODULE_PREFIXES)
