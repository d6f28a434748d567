"""LoRA files: read any common spelling, map it onto native Wan parameter keys, check it against a model.

Why this exists: ComfyUI maps only ``diffusion_model.<native>`` and ``lora_unet_<native>`` names
for Wan, so diffusers/PEFT/ai-toolkit LoRAs (``transformer.blocks.0.attn1.to_q.lora_A``) and the
lightx2v distill LoRA's ``blocks.N.diff_m`` (modulation) are silently "not loaded", and a LoRA made
for another variant (an I2V LoRA on a T2V model, a 1.3B LoRA on a 14B model) gives no clear sign.
Here every key is resolved once into a :class:`LoraPatch` on a native parameter key
(``blocks.0.self_attn.q.weight``), and :func:`match_lora` checks those patches against a model's
shapes and produces the report the node and the CLI show.

Spellings understood (prefix × module naming × suffix):

* prefixes: ``diffusion_model.``, ``model.diffusion_model.``, ``transformer.``, ``base_model.model.``,
  ``unet.``, none; underscore styles ``lora_unet_`` (kohya/musubi), ``lora_unet__`` (Wan-Fun),
  ``lora_transformer_`` (OneTrainer), ``lycoris_``;
* module names: native Wan or diffusers Wan (``attn1.to_q``, ``ffn.net.0.proj``, ``proj_out``...),
  decided per file (a per-key guess would swap native ``norm3`` into ``norm2``);
* suffixes: ``lora_up/lora_down(.weight)``, ``lora_B/lora_A(.weight|.default.weight)``,
  ``lora.up/down.weight``, ``_lora.up/down.weight``, ``lora_linear_layer.up/down.weight``, ``alpha``,
  ``diff`` (full weight delta), ``diff_b`` (bias delta), ``diff_m`` (modulation delta, lightx2v),
  ``lora_B.bias`` (PEFT ``lora_bias``: a bias delta scaled like the LoRA).

No alpha means scale 1 (convert_to_quant's error-compensation LoRA has none). Adapter types that
are not plain LoRA (LoHa, LoKr, DoRA, LoCon mid) are reported, never half-applied.

Pure: no ComfyUI import; tensors stay on CPU in their file dtype until a delta is asked for.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import WanquantError
from ..loaders import keymap
from ..loaders.lora_sniff import _SUFFIX_ROLES, _SUFFIXES, _UNSUPPORTED_MARKERS, lora_key_example

log = logging.getLogger(__name__)

#: dotted prefixes, longest first (``model.`` last: it is a prefix of the first one)
DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.",
                   "model.")
#: underscore (kohya-like) prefixes, longest first; ``lora_unet__`` is Wan-Fun's spelling
UNDERSCORE_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")


# Native Wan modules and parameters a LoRA can target (for underscore names, which lose the dots).
BLOCK_MODULES = tuple(
    [f"{a}.{m}" for a in ("self_attn", "cross_attn") for m in ("q", "k", "v", "o", "norm_q", "norm_k")]
    + ["cross_attn.k_img", "cross_attn.v_img", "cross_attn.norm_k_img", "ffn.0", "ffn.2", "norm3", "modulation"])
TOP_MODULES = ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
               "time_projection.1", "head.head", "head.modulation", "img_emb.proj.0", "img_emb.proj.1",
               "img_emb.proj.3", "img_emb.proj.4", "img_emb.emb_pos")
#: names that are parameters themselves (a patch on them targets the name, not ``name.weight``)
_PARAM_MODULES = re.compile(r"(^|\.)(modulation|emb_pos)$")
#: modules only image-conditioned Wan models (I2V / FLF2V) have
I2V_ONLY = re.compile(r"(\.cross_attn\.(k_img|v_img|norm_k_img)\.|^img_emb\.)")

_BLOCK_US = {m.replace(".", "_"): m for m in BLOCK_MODULES}
_BLOCK_US.update({k.replace(".", "_"): v for k, v in keymap.BLOCK_DIFFUSERS_TO_NATIVE.items()
                  if not k.startswith("norm")})  # diffusers norm2/norm3 clash with native: native wins
_TOP_US = {m.replace(".", "_"): m for m in TOP_MODULES}
_TOP_US.update({k.replace(".", "_"): v for k, v in keymap.TOP_DIFFUSERS_TO_NATIVE.items()})
_US_BLOCK = re.compile(r"^blocks_(\d+)_(.+)$")


@dataclass
class LoraPatch:
    """One additive change to one native parameter.

    ``kind == "lora"``: delta = scale · up @ down (flattened to 2-D, reshaped to the target);
    ``kind == "diff"``: delta = scale · diff. ``scale`` is alpha/rank (1 without alpha).
    """

    target: str  # native parameter key, e.g. "blocks.0.self_attn.q.weight", "blocks.0.modulation"
    kind: str  # "lora" | "diff"
    keys: tuple[str, ...]  # LoRA file keys this patch came from (for errors and the report)
    up: torch.Tensor | None = None  # [out, rank, ...]
    down: torch.Tensor | None = None  # [rank, in, ...]
    alpha: float | None = None
    diff: torch.Tensor | None = None
    scale: float = 1.0

    @property
    def rank(self) -> int | None:
        return int(self.down.shape[0]) if self.kind == "lora" else None

    @property
    def module(self) -> str:
        return self.target[: -len(".weight")] if self.target.endswith(".weight") else self.target

    def delta_shape_ok(self, shape: tuple[int, ...]) -> bool:
        n = math.prod(shape)
        if self.kind == "diff":
            return self.diff.numel() == n and (tuple(self.diff.shape) == tuple(shape)
                                               or tuple(s for s in self.diff.shape if s != 1)
                                               == tuple(s for s in shape if s != 1))
        if len(shape) < 2:
            return False
        return (int(self.up.shape[0]) == shape[0] and self.up[0].numel() == self.rank
                and math.prod(self.down.shape[1:]) == math.prod(shape[1:]))

    def delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor:
        """The full delta for a target of ``shape`` (scale included, strength not); always a fresh
        tensor, so callers may scale or accumulate into it without touching the LoRA."""
        if self.kind == "diff":
            d = self.diff.to(device=device, dtype=dtype, copy=True)
            return (d.mul_(self.scale) if self.scale != 1.0 else d).reshape(shape)
        up = self.up.to(device=device, dtype=dtype).reshape(self.up.shape[0], -1)
        down = self.down.to(device=device, dtype=dtype).reshape(self.down.shape[0], -1)
        if self.scale != 1.0:
            up = up * self.scale  # rank-sized product: cheaper than scaling the full delta
        return (up @ down).reshape(shape)


@dataclass
class LoraFile:
    """A LoRA resolved to native keys (before looking at any model)."""

    path: str
    patches: list[LoraPatch]
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (file key, reason)
    styles: Counter = field(default_factory=Counter)  # naming style → keys
    metadata: dict[str, str] = field(default_factory=dict)
    num_keys: int = 0

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "<lora>"

    def style(self) -> str:
        return ", ".join(s for s, _ in self.styles.most_common()) or "none"


@dataclass
class LoraMatch:
    """A LoRA checked against one model: what applies, what not, and why."""

    lora: LoraFile
    patches: list[LoraPatch]
    unmatched: list[tuple[str, str]]  # (file key or target, reason)
    warnings: list[str]
    strength: float = 1.0
    mode: str = ""

    @property
    def ranks(self) -> dict[str, int]:
        """module → rank for every applied low-rank patch."""
        return {p.module: p.rank for p in self.patches if p.kind == "lora"}

    @property
    def used_keys(self) -> int:
        return sum(len(p.keys) for p in self.patches)

    def summary(self) -> dict:
        kinds = Counter(p.kind for p in self.patches)
        return {"lora": self.lora.path, "style": self.lora.style(), "strength": self.strength, "mode": self.mode,
                "keys": self.lora.num_keys, "keys_used": self.used_keys, "patches": len(self.patches),
                "patch_kinds": dict(kinds), "rank_counts": dict(Counter(self.ranks.values())),
                "ranks": self.ranks, "unmatched": [list(u) for u in self.unmatched], "warnings": self.warnings}

    def text(self, max_list: int = 8) -> str:
        kinds = Counter(p.kind for p in self.patches)
        ranks = Counter(self.ranks.values())
        lines = [f"LoRA {self.lora.name}: {self.lora.style()} keys, strength {self.strength:g}"
                 + (f", mode {self.mode}" if self.mode else ""),
                 f"  matched: {self.used_keys} of {self.lora.num_keys} keys → {len(self.patches)} "
                 f"patch{'es' if len(self.patches) != 1 else ''} "
                 f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})"]
        if ranks:
            lines.append("  ranks: " + ", ".join(f"rank {r} × {n} modules" for r, n in sorted(ranks.items())))
        if self.unmatched:
            lines.append(f"  unmatched: {len(self.unmatched)} keys")
            for key, why in self.unmatched[:max_list]:
                lines.append(f"    {key}: {why}")
            if len(self.unmatched) > max_list:
                lines.append(f"    ... and {len(self.unmatched) - max_list} more")
        for w in self.warnings:
            lines.append(f"  WARNING: {w}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------- key mapping

def split_key(key: str) -> tuple[str, str, str]:
    """LoRA file key → (module spelling without prefix, role, naming prefix).

    role is one of up, down, alpha, diff, diff_b, diff_m, up_bias, mid, dora_scale, unsupported,
    unknown."""
    if _UNSUPPORTED_MARKERS.search(key):
        return key, "unsupported", ""
    role, module = "unknown", key
    for suf in _SUFFIXES:
        if key.endswith(suf):
            role, module = _SUFFIX_ROLES[suf], key[: -len(suf)]
            break
    for p in UNDERSCORE_PREFIXES:
        if module.startswith(p):
            return module[len(p):], role, p
    for p in DOTTED_PREFIXES:
        if module.startswith(p):
            return module[len(p):], role, p
    return module, role, ""


def underscore_to_native(name: str) -> str | None:
    """``blocks_0_self_attn_q`` → ``blocks.0.self_attn.q`` (Wan's own module names only)."""
    m = _US_BLOCK.match(name)
    if m:
        rest = _BLOCK_US.get(m.group(2))
        return f"blocks.{m.group(1)}.{rest}" if rest else None
    return _TOP_US.get(name)


def _target(module: str, role: str) -> str:
    if role == "diff_m":
        return f"{module}.modulation"
    if role in ("diff_b", "up_bias"):
        return f"{module}.bias"
    if _PARAM_MODULES.search(module):
        return module
    return f"{module}.weight"


def _style_name(prefix: str, dotted_style: str) -> str:
    if prefix == "lora_unet__":
        return "Wan-Fun (lora_unet__)"
    if prefix in UNDERSCORE_PREFIXES:
        return f"kohya ({prefix})"
    pre = prefix or "no prefix"
    if dotted_style == "diffusers":
        return f"diffusers/PEFT ({pre})"
    return f"ComfyUI native ({pre})"


# --------------------------------------------------------------------------------- parsing

def read_lora(path) -> LoraFile:
    """Read a LoRA file (.safetensors, or a weights-only .pt/.pth) and resolve its keys."""
    from ..loaders.containers import open_source

    src = open_source(path)
    try:
        sd = {}
        for k, ref in src.tensors.items():
            try:
                sd[k] = ref.load()
            except WanquantError:
                raise
            except Exception as exc:  # noqa: BLE001 - a truncated file fails inside the reader
                raise WanquantError(f"cannot read LoRA tensor ({exc})".splitlines()[0][:300], file=str(path),
                                    layer=k) from exc
    finally:
        src.close()
    return parse_lora(sd, file=str(path), metadata=src.metadata)


def parse_lora(sd: Mapping[str, torch.Tensor], *, file: str = "", metadata: dict | None = None) -> LoraFile:
    """Resolve a LoRA state dict into patches on native Wan keys.

    Raises :class:`WanquantError` naming the key for anything that cannot be applied correctly:
    an up without its down (or the reverse), ranks that disagree, a non-scalar alpha, NaN/Inf
    values, a DoRA scale or LoCon mid weight (applying the rest would silently be wrong)."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    unmatched: list[tuple[str, str]] = []
    parsed = []
    for key, t in sd.items():
        if not isinstance(key, str):
            raise WanquantError("LoRA key is not a string", file=file, layer=repr(key)[:100], found=type(key).__name__)
        if not isinstance(t, torch.Tensor):
            raise WanquantError("LoRA entry is not a tensor", file=file, layer=key, found=type(t).__name__)
        if t.dtype in FP8_DTYPES:
            t = t.to(torch.bfloat16)  # fp8-stored factors: exact in bf16, and torch does little math in fp8
        module, role, prefix = split_key(key)
        if role == "unsupported":
            unmatched.append((key, "unsupported adapter type (LoHa/LoKr/OFT/set_weight): use ComfyUI's LoRA loader"))
            continue
        if role == "unknown":
            unmatched.append((key, "not a LoRA key (unknown suffix)"))
            continue
        parsed.append((key, t, module, role, prefix))

    dotted = [m for _, _, m, _, p in parsed if p not in UNDERSCORE_PREFIXES]
    dotted_style, _, _ = keymap.detect_style(m + ".weight" for m in dotted)
    styles: Counter = Counter()
    for key, t, module, role, prefix in parsed:
        if prefix in UNDERSCORE_PREFIXES:
            native = underscore_to_native(module)
            if native is None:
                # kept in underscore form; match_lora resolves it against the model's own names
                native = "~" + module
        elif dotted_style == "diffusers":
            mapped, ok = keymap.map_diffusers_key(module)
            native = mapped if ok else module  # a native name in a mixed file, or unknown: match_lora reports it
        else:
            native = module
        styles[_style_name(prefix, dotted_style)] += 1
        slot = groups[native]
        if role in slot:
            raise WanquantError("two LoRA keys give the same role for one module", file=file, layer=key,
                                expected=f"one {role}", found=f"{slot[role][0]} and {key}")
        slot[role] = (key, t)

    patches: list[LoraPatch] = []
    for module, roles in groups.items():
        patches.extend(_module_patches(module, roles, file, unmatched))
    seen: dict[str, LoraPatch] = {}
    for p in patches:
        tag = (p.target, p.kind)
        if tag in seen:
            raise WanquantError("two LoRA entries patch the same parameter the same way", file=file, layer=p.keys[0],
                                found=f"{seen[tag].keys[0]} and {p.keys[0]}")
        seen[tag] = p
    return LoraFile(str(file), patches, unmatched, styles, dict(metadata or {}), num_keys=len(sd))


#: fp8 dtypes a LoRA may store factors in (upcast exactly to bf16 on read)
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))
#: |alpha / rank| beyond this is not a LoRA scale anyone trains with; it only overflows the merge
MAX_LORA_SCALE = 1e4
#: ComfyUI's LoraLoader allows strengths in [-100, 100]
MAX_STRENGTH = 100.0


def _check_finite(key: str, t: torch.Tensor, file: str) -> None:
    if not t.is_floating_point():
        raise WanquantError("LoRA tensor is not floating point", file=file, layer=key, found=str(t.dtype))
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise WanquantError("LoRA tensor holds NaN or Inf values", file=file, layer=key,
                            found=f"{int(bad.sum())} non-finite of {t.numel()}")


def _module_patches(module: str, roles: dict[str, tuple[str, torch.Tensor]], file: str,
                    unmatched: list[tuple[str, str]]) -> list[LoraPatch]:
    for bad_role, what in (("dora_scale", "DoRA (dora_scale)"), ("mid", "LoCon/Tucker (lora_mid)")):
        if bad_role in roles:
            raise WanquantError(f"{what} LoRAs are not supported; applying the rest would be wrong",
                                file=file, layer=roles[bad_role][0])
    for key, t in roles.values():
        _check_finite(key, t, file)
    alpha = None
    if "alpha" in roles:
        key, t = roles["alpha"]
        if t.numel() != 1:
            raise WanquantError("LoRA alpha must be a scalar", file=file, layer=key, found=str(tuple(t.shape)))
        alpha = float(t.reshape(()).float())
        rank_hint = roles["down"][1].shape[0] if "down" in roles and roles["down"][1].ndim else 1
        if not math.isfinite(alpha) or abs(alpha) / max(int(rank_hint), 1) > MAX_LORA_SCALE:
            raise WanquantError("LoRA alpha is out of range", file=file, layer=key,
                                expected=f"|alpha / rank| <= {MAX_LORA_SCALE:g}", found=f"alpha {alpha:g}")
    out: list[LoraPatch] = []
    has_up, has_down = "up" in roles, "down" in roles
    rank = None
    if has_up != has_down:
        have, miss = ("up", "down") if has_up else ("down", "up")
        raise WanquantError(f"LoRA has its {have} matrix but no {miss} matrix", file=file, layer=roles[have][0],
                            expected=f"a matching lora_{miss}")
    if has_up:
        (ku, up), (kd, down) = roles["up"], roles["down"]
        if up.ndim < 2 or down.ndim < 2:
            raise WanquantError("LoRA up/down must be at least 2-D", file=file, layer=ku,
                                found=f"up {tuple(up.shape)}, down {tuple(down.shape)}")
        rank = int(down.shape[0])
        if up[0].numel() != rank or up.shape[1] != rank:
            raise WanquantError("LoRA rank mismatch between up and down", file=file, layer=ku,
                                expected=f"up [out, {rank}] to match down {list(down.shape)} ({kd})",
                                found=f"up {list(up.shape)}")
        if rank == 0:
            raise WanquantError("LoRA has rank 0", file=file, layer=kd)
        scale = alpha / rank if alpha is not None else 1.0
        keys = (ku, kd) + ((roles["alpha"][0],) if alpha is not None else ())
        out.append(LoraPatch(_target(module, "up"), "lora", keys, up=up, down=down, alpha=alpha, scale=scale))
    elif "alpha" in roles and not any(r in roles for r in ("diff", "diff_b", "diff_m", "up_bias")):
        unmatched.append((roles["alpha"][0], "alpha without lora_up/lora_down"))
    for role in ("diff", "diff_b", "diff_m"):
        if role in roles:
            key, t = roles[role]
            out.append(LoraPatch(_target(module, role), "diff", (key,), diff=t))
    if "up_bias" in roles:
        key, t = roles["up_bias"]
        if rank is None:
            raise WanquantError("lora_B.bias without its lora_A/lora_B matrices", file=file, layer=key)
        # PEFT's lora_bias lives inside lora_B, so it is scaled by alpha/rank like the product
        out.append(LoraPatch(_target(module, "up_bias"), "diff", (key,), diff=t,
                             scale=(alpha / rank) if alpha is not None else 1.0))
    return out


# --------------------------------------------------------------------------------- matching

def match_lora(lora: LoraFile, model_shapes: Mapping[str, tuple[int, ...]], *, strength: float = 1.0,
               mode: str = "", allow_empty: bool = False) -> LoraMatch:
    """Check ``lora`` against a model given as native parameter key → logical shape.

    Targets the model lacks are reported (and warned about loudly when they say the LoRA was made
    for another variant); a target whose shape does not fit refuses the whole LoRA with an error
    naming the key, so nothing is half-applied; a LoRA that matches nothing is refused too unless
    ``allow_empty``."""
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
        raise WanquantError("LoRA strength is out of range", file=lora.path,
                            expected=f"a finite number within ±{MAX_STRENGTH:g} (ComfyUI's LoRA loader range)",
                            found=repr(strength))
    shapes = dict(model_shapes)
    us_names = None
    patches: list[LoraPatch] = []
    unmatched = list(lora.unmatched)
    missing_targets: list[LoraPatch] = []
    bad: list[tuple[LoraPatch, tuple]] = []
    for p in lora.patches:
        target = p.target
        if target.startswith("~"):  # underscore name not in Wan's table: try the model's own modules
            if us_names is None:
                us_names = _underscore_index(shapes)
            resolved = _resolve_underscore(target[1:], us_names)
            if resolved is None:
                missing_targets.append(p)
                continue
            p = _retarget(p, resolved)
            target = p.target
        if target not in shapes and target.endswith(".weight") and target[: -len(".weight")] in shapes:
            p = _retarget(p, target[: -len(".weight")])
            target = p.target
        if target not in shapes:
            missing_targets.append(p)
            continue
        if not p.delta_shape_ok(tuple(shapes[target])):
            bad.append((p, tuple(shapes[target])))
            continue
        patches.append(p)
    if bad:
        p, shape = bad[0]
        got = f"diff {list(p.diff.shape)}" if p.kind == "diff" else f"up {list(p.up.shape)} @ down {list(p.down.shape)}"
        more = f"; {len(bad) - 1} more modules do not fit either" if len(bad) > 1 else ""
        raise WanquantError("LoRA does not fit this model (made for another model size or variant?); "
                            "nothing was applied" + more, file=lora.path, layer=p.keys[0],
                            expected=f"{p.target} {list(shape)}", found=got)
    for p in missing_targets:
        tgt = p.target.lstrip("~")
        unmatched.extend((k, f"model has no {tgt}") for k in p.keys)
    warnings = _variant_warnings(missing_targets, shapes)
    if not patches and not allow_empty:
        first = unmatched[0] if unmatched else ("(empty file)", "no keys")
        raise WanquantError("LoRA matches none of this model's parameters (wrong model, or an unknown naming "
                            "style); nothing was applied", file=lora.path, layer=first[0], found=first[1],
                            expected="keys naming Wan modules")
    for w in warnings:  # wrong-variant LoRAs: loud in the log too
        log.warning("%s: %s", lora.name, w)
    if unmatched and not any("unmatched" in w for w in warnings):
        # said once, by the report that lists them (logging it as well printed it twice in the CLI)
        warnings.append(f"{len(unmatched)} LoRA keys were not applied (see 'unmatched')")
    return LoraMatch(lora, patches, unmatched, warnings, strength, mode)


def _retarget(p: LoraPatch, target: str) -> LoraPatch:
    return LoraPatch(target, p.kind, p.keys, p.up, p.down, p.alpha, p.diff, p.scale)


def _underscore_index(shapes: Mapping[str, tuple]) -> dict[str, str]:
    """underscored module (or parameter) name → its dotted name, for every model key."""
    out: dict[str, str] = {}
    for k in shapes:
        out.setdefault(k.replace(".", "_"), k)
        if "." in k:
            mod = k.rsplit(".", 1)[0]
            out.setdefault(mod.replace(".", "_"), mod)
    return out


def _resolve_underscore(target: str, index: Mapping[str, str]) -> str | None:
    """``blocks_0_projector.weight`` → ``blocks.0.projector.weight`` if the model has that module."""
    for suffix in (".weight", ".bias", ".modulation"):
        if target.endswith(suffix):
            mod = index.get(target[: -len(suffix)])
            return mod + suffix if mod is not None else None
    return index.get(target)


def _variant_warnings(missing: list[LoraPatch], shapes: Mapping[str, tuple]) -> list[str]:
    """Loud, specific words for the usual wrong-model cases."""
    out = []
    i2v = [p for p in missing if I2V_ONLY.search("." + p.target.lstrip("~"))]
    if i2v:
        out.append(f"this LoRA was made for an image-to-video (I2V/FLF2V) Wan model: it patches "
                   f"{len(i2v)} image cross-attention modules (e.g. {i2v[0].target}) that the loaded model does not "
                   f"have, so those parts are ignored and the result may differ from what the LoRA was trained for")
    lora_blocks = {int(m.group(1)) for p in missing if (m := re.match(r"blocks\.(\d+)\.", p.target))}
    model_blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if lora_blocks and model_blocks and max(lora_blocks) > max(model_blocks):
        out.append(f"this LoRA has blocks up to {max(lora_blocks)} but the model only {max(model_blocks) + 1} "
                   f"blocks: it was made for a deeper Wan model")
    deep = max(model_blocks) if model_blocks else -1
    other = [p for p in missing if p not in i2v and not ((m := re.match(r"blocks\.(\d+)\.", p.target))
                                                          and int(m.group(1)) > deep)]
    if other:
        out.append(f"{len(other)} LoRA patches target parameters this model does not have "
                   f"(e.g. {other[0].target.lstrip('~')}); they are ignored")
    return out


# --------------------------------------------------------------------------------- writing

STYLES = ("comfy", "kohya", "wan_fun", "diffusers", "peft", "ai_toolkit", "error_comp")


def render_lora(modules: Mapping[str, dict], style: str = "comfy") -> dict[str, torch.Tensor]:
    """Write a logical LoRA in one file spelling (the inverse of :func:`parse_lora`).

    ``modules`` maps a native module (``blocks.0.self_attn.q``) or parameter (``blocks.0.modulation``)
    to a dict with any of ``up``, ``down``, ``alpha``, ``diff``, ``diff_b``. Used to build test
    fixtures and benchmark inputs in every spelling from one definition; ``error_comp`` is
    convert_to_quant's spelling (ComfyUI names, no alpha: alpha is dropped, so scale must be 1)."""
    if style not in STYLES:
        raise WanquantError("unknown LoRA spelling", expected=" | ".join(STYLES), found=style)
    out: dict[str, torch.Tensor] = {}
    for module, parts in modules.items():
        diffusers = style in ("diffusers", "peft", "ai_toolkit")
        name = keymap.native_to_diffusers(module)[0] if diffusers else module
        is_mod = bool(_PARAM_MODULES.search(module))
        if style in ("comfy", "error_comp"):
            base = f"diffusion_model.{name}"
            up, down = ".lora_up.weight", ".lora_down.weight"
        elif style in ("kohya", "wan_fun"):
            base = ("lora_unet__" if style == "wan_fun" else "lora_unet_") + name.replace(".", "_")
            up, down = ".lora_up.weight", ".lora_down.weight"
        elif style == "diffusers":
            base, up, down = f"transformer.{name}", ".lora_B.weight", ".lora_A.weight"
        elif style == "peft":
            base, up, down = f"base_model.model.{name}", ".lora_B.weight", ".lora_A.weight"
        else:  # ai-toolkit: diffusers module names under ComfyUI's prefix
            base, up, down = f"diffusion_model.{name}", ".lora_B.weight", ".lora_A.weight"
        if "up" in parts:
            out[base + up] = parts["up"]
            out[base + down] = parts["down"]
            if parts.get("alpha") is not None and style != "error_comp":
                out[base + ".alpha"] = torch.tensor(float(parts["alpha"]))
        if "diff" in parts:
            lightx2v = style in ("comfy", "error_comp") and module.startswith("blocks.")
            if is_mod and lightx2v and module.endswith(".modulation"):
                out[f"diffusion_model.{module[: -len('.modulation')]}.diff_m"] = parts["diff"]  # lightx2v spelling
            else:
                out[base + ".diff"] = parts["diff"]
        if "diff_b" in parts:
            if style in ("diffusers", "peft", "ai_toolkit") and "up" in parts and parts.get("alpha") is None:
                out[base + ".lora_B.bias"] = parts["diff_b"]  # PEFT lora_bias (scale 1 without alpha)
            else:
                out[base + ".diff_b"] = parts["diff_b"]
    return out

