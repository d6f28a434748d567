"""LightX2V NVFP4 layers (Wan2.1-NVFP4, Wan2.2-NVFP4-Sparse, Self-Forcing-NVFP4 releases).

Read from ModelTC/LightX2V at commit f8aee98b (tools/convert/quant/quant.py,
tools/convert/add_scale_to_models.py, lightx2v/common/ops/mm/mm_weight.py and the kernel
lightx2v_kernel/csrc/gemm/nvfp4_quant_kernels_sm120.cu). Per Linear ``L``:

- ``L.weight``: uint8 ``[N, K/2]``; the kernel packs with ``cvt.rn.satfinite.e2m1x2.f32 byte, a1, a0``,
  which puts the **even** element in the **low** nibble (ComfyUI / comfy-kitchen: high nibble).
  The canonical form swaps the nibbles (lossless).
- ``L.weight_scale``: fp8 e4m3 block scales (16 inputs each) ``[roundup(N,128), roundup(K/16,4)]`` in
  the kernel's ``[mTiles, kTiles, 32, 4, 4]`` swizzle, which is cuBLAS's blocked layout ComfyUI uses:
  taken as is.
- global scales, one of three spellings (LightX2V's loader prefers ``input_absmax`` when present):
  ``weight_global_scale`` (= 2688 / amax(W), the converter's raw output), plus either
  ``input_absmax`` (LightX2V derives ``input_global_scale = 2688 / input_absmax`` and
  ``alpha = 1 / (input_global_scale * weight_global_scale)``) or, as in the published files,
  ``input_global_scale`` + ``alpha`` with ``weight_global_scale`` dropped.

LightX2V's GEMM is ``alpha * sum(qa * sa) * (qw * sw)`` with activations quantized against
``input_global_scale``; so the weight is ``E2M1 * sw / weight_global_scale`` and ComfyUI's scalars are
``weight_scale_2 = 1 / weight_global_scale`` (``= alpha * input_global_scale`` when only those are
stored) and ``input_scale = 1 / input_global_scale``. Each is computed in fp64 from the stored values
and rounded once to fp32 (at most half an fp32 ulp from LightX2V's own factor).
"""

from __future__ import annotations

from ..errors import WanquantError

import torch

from .containers import TensorRef

#: LightX2V's per-layer scalar names (what ``detect._split`` leaves as the param role)
ROLES = ("weight_global_scale", "input_global_scale", "alpha", "input_absmax")
#: 6 * 448: LightX2V's global-scale constant (E2M1 max times E4M3 max)
SCALE_CONST = 2688.0

SPELL_ALPHA = "LightX2V NVFP4 (input_global_scale + alpha)"
SPELL_ABSMAX = "LightX2V NVFP4 (input_absmax + weight_global_scale)"
SPELL_WEIGHT_ONLY = "LightX2V NVFP4 (weight_global_scale only, no input scale)"
SPELLINGS = (SPELL_ALPHA, SPELL_ABSMAX, SPELL_WEIGHT_ONLY)


def _scalar_ref(key: str, file: str, value: float) -> TensorRef:
    t = torch.tensor(value, dtype=torch.float64).to(torch.float32)
    return TensorRef(key, (), torch.float32, file, lambda t=t: t.clone())


def global_scales(module: str, roles: dict[str, TensorRef], file: str) -> tuple[str, float, float | None]:
    """(spelling, weight_scale_2, input_scale or None) from a layer's LightX2V scalars, or one error."""
    from .detect import check_scalar_scale

    def val(role):
        return check_scalar_scale(roles[role], file, module, f"LightX2V {role}")

    if "input_absmax" in roles:  # mm_weight.py takes this branch first
        if "weight_global_scale" not in roles:
            raise WanquantError("LightX2V NVFP4 layer has input_absmax but no weight_global_scale", file=file,
                                layer=module, expected=f"{module}.weight_global_scale next to input_absmax",
                                found=", ".join(sorted(roles)))
        absmax = val("input_absmax")
        wgs = float(val("weight_global_scale").to(torch.float64))
        igs = float((SCALE_CONST / absmax).to(torch.float32).to(torch.float64))  # LightX2V's own op order
        return SPELL_ABSMAX, 1.0 / wgs, 1.0 / igs
    if "input_global_scale" in roles or "alpha" in roles:
        if not ("input_global_scale" in roles and "alpha" in roles):
            have = "input_global_scale" if "input_global_scale" in roles else "alpha"
            raise WanquantError(f"LightX2V NVFP4 layer has {have} without its partner", file=file, layer=module,
                                expected="input_global_scale and alpha together", found=", ".join(sorted(roles)))
        igs = float(val("input_global_scale").to(torch.float64))
        alpha = float(val("alpha").to(torch.float64))
        return SPELL_ALPHA, alpha * igs, 1.0 / igs
    if "weight_global_scale" in roles:
        return SPELL_WEIGHT_ONLY, 1.0 / float(val("weight_global_scale").to(torch.float64)), None
    raise WanquantError("NVFP4 layer without its global scales", file=file, layer=module,
                        expected="weight_scale_2 (ComfyUI) or LightX2V's weight_global_scale / "
                                 "input_global_scale + alpha / input_absmax + weight_global_scale",
                        found="only weight + block weight_scale" + (f" and {', '.join(sorted(roles))}" if roles else ""))


def classify(module: str, weight: TensorRef, sides: dict[str, TensorRef], others: dict[str, TensorRef], file: str):
    """The canonical NVFP4 :class:`~.detect.Layer` for a LightX2V layer (its weight still low-nibble-first)."""
    from .detect import Layer, _roundup
    from .nvfp4_layout import BLOCKED

    roles = {r: others.pop(r) for r in ROLES if r in others}
    ws = sides["weight_scale"]
    extra = set(sides) - {"weight_scale"}
    if extra:
        raise WanquantError("unexpected side tensor on a LightX2V NVFP4 layer", file=file, layer=module,
                            expected="weight_scale + LightX2V global scales",
                            found=", ".join(sides[r].key for r in sorted(extra)))
    if len(weight.shape) != 2:
        raise WanquantError("LightX2V NVFP4 weight must be a packed matrix", file=file, layer=module,
                            expected="uint8 [N, K/2]", found=f"{list(weight.shape)}")
    n, half = weight.shape
    want = (_roundup(n, 128), _roundup(half * 2 // 16, 4))
    if n % 16 or (half * 2) % 16 or tuple(ws.shape) != want:
        raise WanquantError("LightX2V NVFP4 block scales do not fit the weight", file=file, layer=module,
                            expected=f"weight [N, K/2] with N, K multiples of 16 and fp8 scales {list(want)} "
                                     "(the kernel's swizzled layout)",
                            found=f"weight {list(weight.shape)}, scales {list(ws.shape)}")
    spelling, s2, inp = global_scales(module, roles, file)
    new_sides = {"weight_scale": ws,
                 "weight_scale_2": _scalar_ref(f"{module}.weight_scale_2 (from LightX2V scales)", file, s2)}
    if inp is not None:
        new_sides["input_scale"] = _scalar_ref(f"{module}.input_scale (from LightX2V scales)", file, inp)
    return Layer(module, "nvfp4", spelling, weight, new_sides, {"format": "nvfp4"}, others,
                 nibble_order="low_first", scale_layout=BLOCKED)
