"""Producer recipes for the scale-grid formats (test and demo data; follows each producer's code).

* ``ctq_*``: silveroxides/convert_to_quant (``--comfy_quant``, simple rounding): per-row fp8
  (``quant_scale = 448 / rowmax``, ``weight_scale = 1 / quant_scale`` [N]), 2-D block fp8
  ([N/bs, K/bs]), the legacy block3d grid ([N, K/bs, 1], tagged plain ``float8_e4m3fn``), int8
  tensor-wise / per-row (``int8_tensorwise``, [N, 1] with ``per_row``) and block-wise
  (``int8_blockwise`` + placeholder ``input_scale`` 1.0).
* ``lightx2v_*``: ModelTC/LightX2V per-channel fp8 / int8, no comfy_quant: ``weight_scale`` [out, 1]
  (``amax / qmax`` per row; int8 rounds to nearest).
* ``fp8_scale_rows``: the ``.weight.__fp8_scale`` [N] caches (SCAIL-2 / Bernini).
"""

from __future__ import annotations

import json

import torch

from .synthetic import quantizable_linears

E4M3 = torch.float8_e4m3fn


def _cq(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def _rows(w, qmax):
    return w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)


def _blocks(w, bs):
    n, k = w.shape
    return w.reshape(n // bs, bs, k // bs, bs).abs().amax(dim=(1, 3)).clamp_min(1e-12)


def _apply(sd, layers, fn):
    out = {}
    chosen = set(layers if layers is not None else quantizable_linears(sd))
    for key, t in sd.items():
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        got = fn(t.float()) if layer in chosen else None
        if got is not None:
            out.update({f"{layer}.{s}": v for s, v in got.items()})
        else:
            out[key] = t
    return out


def ctq(sd, mode: str, *, block: int = 64, layers=None):
    """convert_to_quant output (layers a block does not divide stay as they are) for ``mode`` in fp8_row / fp8_block / fp8_block3d / int8_tensor /
    int8_row / int8_block."""
    def one(w):
        n, k = w.shape
        if mode in ("fp8_block", "int8_block") and (n % block or k % block) or mode == "fp8_block3d" and k % block:
            return None  # convert_to_quant leaves layers the block does not divide in high precision
        if mode == "fp8_row":
            qs = 448.0 / _rows(w, 448.0)
            return {"weight": (w * qs).clamp(-448, 448).to(E4M3), "weight_scale": (1.0 / qs).squeeze(1),
                    "comfy_quant": _cq({"format": "float8_e4m3fn_rowwise"})}
        if mode == "fp8_block":
            qs = 448.0 / _blocks(w, block)
            wb = w.reshape(n // block, block, k // block, block) * qs[:, None, :, None]
            return {"weight": wb.clamp(-448, 448).to(E4M3).reshape(n, k), "weight_scale": 1.0 / qs,
                    "comfy_quant": _cq({"format": "float8_e4m3fn_blockwise", "group_size": block})}
        if mode == "fp8_block3d":
            wb = w.reshape(n, k // block, block)
            qs = 448.0 / wb.abs().amax(dim=2, keepdim=True).clamp_min(1e-12)
            return {"weight": (wb * qs).clamp(-448, 448).to(E4M3).reshape(n, k), "weight_scale": 1.0 / qs,
                    "comfy_quant": _cq({"format": "float8_e4m3fn"})}
        if mode == "int8_tensor":
            s = w.abs().max().clamp_min(1e-12) / 127.0
            return {"weight": (w / s).clamp(-127, 127).round().to(torch.int8), "weight_scale": s,
                    "comfy_quant": _cq({"format": "int8_tensorwise"})}
        if mode == "int8_row":
            qs = 127.0 / _rows(w, 127.0)
            return {"weight": (w * qs).clamp(-127, 127).round().to(torch.int8), "weight_scale": 1.0 / qs,
                    "comfy_quant": _cq({"format": "int8_tensorwise", "per_row": True})}
        if mode == "int8_block":
            s = _blocks(w, block) / 127.0
            wb = w.reshape(n // block, block, k // block, block) / s[:, None, :, None]
            return {"weight": wb.round().clamp(-127, 127).to(torch.int8).reshape(n, k), "weight_scale": s,
                    "input_scale": torch.tensor(1.0), "comfy_quant": _cq({"format": "int8_blockwise",
                                                                          "group_size": block})}
        raise ValueError(mode)
    return _apply(sd, layers, one)


def lightx2v(sd, kind: str = "int8", *, layers=None):
    """LightX2V per-channel fp8 / int8: ``weight`` + ``weight_scale`` [out, 1], no comfy_quant."""
    def one(w):
        if kind == "int8":
            s = _rows(w, 127.0) / 127.0
            return {"weight": torch.round(w / s).clamp(-128, 127).to(torch.int8), "weight_scale": s}
        s = _rows(w, 448.0) / 448.0
        return {"weight": (w / s).clamp(-448, 448).to(E4M3), "weight_scale": s}
    return _apply(sd, layers, one)


def fp8_scale_rows(sd, *, layers=None):
    """``.weight`` fp8 + ``.weight.__fp8_scale`` [N] fp32 (SCAIL-2 / Bernini per-row caches)."""
    def one(w):
        s = (_rows(w, 448.0) / 448.0).squeeze(1)
        return {"weight": (w / s[:, None]).clamp(-448, 448).to(E4M3), "weight.__fp8_scale": s}
    return _apply(sd, layers, one)
