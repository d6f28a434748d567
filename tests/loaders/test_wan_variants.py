"""Wan family recognition (``loaders/wan_variants.py`` through ``family.recognise``) and the
"what it still needs" line, on shape maps with Wan's real widths and on tiny files end to end.

Expected names, ComfyUI model_types and node names are written by hand from ComfyUI 0.33.0
(commit 783545f6): ``comfy/model_detection.py`` (Wan section), ``comfy/supported_models.py``
and ``comfy_extras/nodes_wan.py``; the family keys come from ``tests/wan_family_keys.py``.
"""

from __future__ import annotations

import json

import pytest
from fixtures import tiny_wan
from wan_family_keys import extras, tensors

from wanquant.cli import main as cli_main
from wanquant.loaders import synthetic as syn
from wanquant.loaders.canonical import load_canonical
from wanquant.loaders.family import recognise

EXPERT = ("Wan2.2-A14B {} expert: high- or low-noise cannot be told from the weights; load both "
          "(ComfyUI: two loaders + KSamplerAdvanced split)")


def real(dim, *, in_dim=16, out_dim=16, i2v=False, kinds=(), flf=False):
    """Shape map of a Wan model of width ``dim`` (tiny_wan's shapes with 256 → dim) plus family keys."""
    s = {k: tuple(dim if d == 256 else d for d in v.shape)
         for k, v in tiny_wan(i2v=i2v, in_dim=in_dim, out_dim=out_dim).items()}
    for kind in kinds:
        s.update(extras(kind, dim))
    if flf:
        s["img_emb.emb_pos"] = (1, 514, 1280)
    return s


CASES = [  # (shapes, variant starts with, ComfyUI model_type, a node or model the needs line names)
    (real(5120), "Wan2.1-T2V-14B (or a Wan2.2-A14B T2V expert)", "t2v", "umT5"),
    (real(1536), "Wan2.1-T2V-1.3B", "t2v", "umT5"),
    (real(5120, in_dim=36, i2v=True), "Wan2.1-I2V-14B (or Wan2.1-Fun-InP-14B", "i2v", "WanImageToVideo"),
    (real(5120, in_dim=36, i2v=True, flf=True), "Wan2.1-I2V-14B (FLF2V)", "i2v", "WanFirstLastFrameToVideo"),
    (real(5120, in_dim=36), "Wan2.2-I2V-A14B expert", "t2v", "WanImageToVideo"),
    (real(3072, in_dim=48, out_dim=48), "Wan2.2-TI2V-5B", "t2v", "Wan2.2 VAE"),
    (real(5120, kinds=("vace",)), "Wan2.1-VACE-14B (2 VACE blocks, VACE input 96 channels)", "vace", "WanVaceToVideo"),
    (real(1536, kinds=("vace",)), "Wan2.1-VACE-1.3B", "vace", "WanVaceToVideo"),
    (real(5120, in_dim=36, kinds=("s2v",)), "Wan2.2-S2V-14B", "s2v", "WanSoundImageToVideo"),
    (real(5120, in_dim=36, kinds=("humo",)), "Wan2.1-HuMo-14B", "humo", "WanHuMoImageToVideo"),
    (real(5120, in_dim=36, i2v=True, kinds=("animate",)), "Wan2.2-Animate-14B", "animate", "WanAnimateToVideo"),
    (real(5120, in_dim=32, i2v=True, kinds=("camera",)), "Wan2.1-Fun-Control-Camera-14B", "camera",
     "WanCameraImageToVideo"),
    (real(5120, in_dim=36, kinds=("camera",)), "Wan2.2-Fun-A14B-Control-Camera", "camera_2.2", "WanCameraEmbedding"),
    (real(5120, in_dim=48, i2v=True, kinds=("ref_conv",)), "Wan2.1-Fun-Control-14B (in_dim 48", "i2v",
     "WanFunControlToVideo"),
    (real(5120, in_dim=52, kinds=("ref_conv",)), "Wan2.2-Fun-A14B-Control", "t2v", "Wan22FunControlToVideo"),
]


@pytest.mark.parametrize("shapes,name,comfy_type,needs", CASES, ids=[c[1][:40] for c in CASES])
def test_variant_comfy_type_and_needs(shapes, name, comfy_type, needs):
    fam = recognise(shapes)
    assert fam.family == "wan" and fam.variant.startswith(name), fam.variant
    assert fam.comfy_type == comfy_type
    assert needs in fam.needs
    assert fam.missing == []


def test_vace_precedes_everything_as_in_comfyui():
    """model_detection checks vace_patch_embedding first: VACE keys win over an Animate face adapter."""
    fam = recognise(real(5120, kinds=("vace", "animate")))
    assert fam.variant.startswith("Wan2.1-VACE-14B") and fam.comfy_type == "vace"


@pytest.mark.parametrize("shapes,kind", [(real(5120), "T2V"), (real(5120, in_dim=36), "I2V"),
                                         (real(5120, in_dim=52), "Fun-Control"),
                                         (real(5120, in_dim=36, kinds=("camera",)), "Fun-Control-Camera")])
def test_a14b_expert_is_never_guessed(shapes, kind):
    notes = recognise(shapes).notes
    assert any(n.startswith(EXPERT.format(kind)) for n in notes), notes
    assert not any("high-noise expert" in n.lower() or "low-noise expert" in n.lower() for n in notes)


@pytest.mark.parametrize("shapes", [real(1536), real(3072, in_dim=48, out_dim=48), real(5120, in_dim=36, i2v=True),
                                    real(5120, in_dim=36, kinds=("s2v",))])
def test_no_expert_note_where_there_is_one_model(shapes):
    assert not any("expert" in n for n in recognise(shapes).notes)


def test_animate2_has_i2v_shapes_and_is_told_only_by_config_metadata():
    shapes = real(5120, in_dim=36, i2v=True)
    plain = recognise(shapes)
    assert plain.comfy_type == "i2v" and any("model_type 'animate2'" in n for n in plain.notes)
    a2 = recognise(shapes, {"config": json.dumps({"transformer": {"model_type": "animate2"}})})
    assert a2.variant.startswith("Wan-Animate-2-14B") and a2.comfy_type == "animate2"
    assert "WanAnimate2ToVideo" in a2.needs
    assert any("ComfyUI 0.29 has no Wan-Animate-2" in n for n in a2.notes)
    for other in (real(5120, in_dim=48, i2v=True), real(5120, in_dim=36, i2v=True, flf=True), real(5120, in_dim=36)):
        assert not any("animate2" in n for n in recognise(other).notes)


@pytest.mark.parametrize("metadata", [{"config": "not json"}, {"config": json.dumps([1, 2])}, {"other": "x"}, None])
def test_unusable_config_metadata_changes_nothing(metadata):
    fam = recognise(real(5120, in_dim=36, i2v=True), metadata)
    assert fam.comfy_type == "i2v" and fam.variant.startswith("Wan2.1-I2V-14B")


def test_other_declared_model_type_is_reported_not_applied():
    fam = recognise(real(5120), {"config": json.dumps({"transformer": {"model_type": "vace"}})})
    assert fam.comfy_type == "t2v" and any("config metadata sets model_type 'vace'" in n for n in fam.notes)


def test_partial_family_file_still_says_what_is_missing():
    s = {k: v for k, v in real(5120, in_dim=36, kinds=("s2v",)).items() if not k.startswith("head.")}
    fam = recognise(s)
    assert fam.variant.startswith("Wan2.2-S2V-14B") and "head.head" in fam.missing
    assert fam.needs_base == "Wan2.1-T2V-14B"


# ------------------------------------------------------------------ end to end: tiny files

def _file(tmp_path, name, *, kinds=(), metadata=None, **kw):
    sd = tiny_wan(**kw)
    for kind in kinds:
        sd.update(tensors(kind, 256))
    return syn.save(sd, tmp_path / f"{name}.safetensors", metadata=metadata)


E2E = [  # (file builder kwargs, variant start, needs text)
    (dict(name="s2v", in_dim=36, kinds=("s2v",)), "Wan2.2-S2V (dim 256)", "WanSoundImageToVideo"),
    (dict(name="humo", in_dim=36, kinds=("humo",)), "Wan2.1-HuMo (dim 256)", "WanHuMoImageToVideo"),
    (dict(name="vace", kinds=("vace",)), "Wan2.1-VACE (dim 256) (2 VACE blocks, VACE input 96 channels)",
     "WanVaceToVideo"),
    (dict(name="cam21", in_dim=32, i2v=True, kinds=("camera",)), "Wan2.1-Fun-Control-Camera (dim 256)",
     "WanCameraImageToVideo"),
    (dict(name="cam22", in_dim=36, kinds=("camera",)), "Wan2.2-Fun-Control-Camera (dim 256)", "WanCameraEmbedding"),
    (dict(name="fun21", in_dim=48, i2v=True), "Wan2.1-Fun-Control (dim 256)", "WanFunControlToVideo"),
    (dict(name="fun22", in_dim=52, kinds=("ref_conv",)), "Wan2.2-Fun-Control (dim 256)", "Wan22FunControlToVideo"),
    (dict(name="ti2v", in_dim=48, out_dim=48), "Wan2.2-TI2V (dim 256)", "Wan2.2 VAE"),
    (dict(name="anim2", in_dim=36, i2v=True,
          metadata={"config": json.dumps({"transformer": {"model_type": "animate2"}})}),
     "Wan-Animate-2", "WanAnimate2ToVideo"),
]


@pytest.mark.parametrize("kw,variant,needs", E2E, ids=[e[0]["name"] for e in E2E])
def test_inspect_names_the_family(tmp_path, capsys, kw, variant, needs):
    p = _file(tmp_path, **kw)
    assert cli_main(["inspect", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "wan" and out["variant"].startswith(variant), out["variant"]
    assert out["missing"] == [] and out["errors"] == [] and out["verdict"].startswith("loadable")
    assert any(n.startswith("to run: ") and needs in n for n in out["notes"]), out["notes"]
    assert cli_main(["inspect", str(p)]) == 0
    text = capsys.readouterr().out
    assert f"family:     wan - {variant}" in text and "note: to run: " in text


def test_overlay_reports_family_notes_once(tmp_path):
    base = _file(tmp_path, "base", in_dim=36)
    sd = {k: v for k, v in tiny_wan(in_dim=36, seed=3).items() if k.startswith("blocks.0.")}
    part = syn.save(sd, tmp_path / "part.safetensors")
    from wanquant.loaders.canonical import overlay

    with load_canonical(str(part)) as f, load_canonical(str(base)) as b:
        assert f.report.missing  # partial alone
        m = overlay(f, b)
        notes = m.report.notes
        assert m.report.missing == [] and m.report.variant.startswith("Wan2.2-I2V (dim 256)")
        assert sum(n.startswith("to run: ") for n in notes) == 1, notes
        assert not any("block weights missing" in n for n in notes)


# ------------------------------------------------------------------ GGUF: real shapes, not block bytes

def test_gguf_reshaped_head_is_read_at_its_real_shape(tmp_path):
    """city96's shape_fix stores a Q4_K head.head [4*48, 64] as [48, 256] blocks; out_dim comes from
    orig_shape (192 // 4 = 48: TI2V), not from the 48 stored rows (which would read as 12)."""
    gguf = pytest.importorskip("gguf")  # noqa: F841
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "make_gguf", Path(__file__).resolve().parents[1] / "data" / "gguf" / "make_gguf.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    sd = syn.wan_state_dict(dim=64, ffn_dim=128, num_blocks=1, text_dim=256, in_dim=48, out_dim=48, seed=2)
    path = tmp_path / "ti2v.gguf"
    recipe.write_wan_gguf(path, sd, {"head.head.weight": "Q4_K", "blocks.0.self_attn.q.weight": "Q8_0"})
    with load_canonical(str(path)) as m:
        assert m.entries["head.head.weight"].shape[0] == 48  # the stored block rows
        assert m.layers["head.head"].conf["orig_shape"] == [192, 64]
        assert m.report.variant == "Wan2.2-TI2V (dim 64)" and not m.report.errors
    fam_bytes = recognise({k: e for k, e in {**{k: tuple(v.shape) for k, v in sd.items()},
                                              "head.head.weight": (48, 256)}.items()})
    assert not fam_bytes.variant.startswith("Wan2.2-TI2V")  # what the byte shape alone would have said


def test_gguf_committed_mix_file_keeps_its_variant():
    from pathlib import Path

    pytest.importorskip("gguf")
    mix = Path(__file__).resolve().parents[1] / "data" / "gguf" / "wan_tiny_mix.gguf"
    with load_canonical(str(mix)) as m:
        assert m.report.variant == "Wan2.1-T2V (dim 64)"


def test_config_metadata_reaches_comfyui_and_survives_convert(tmp_path, capsys):
    """Only the "config" entry is handed on (ComfyUI's model override), and a converted file keeps it."""
    from safetensors import safe_open

    from wanquant.loaders.convert import convert

    cfg = json.dumps({"transformer": {"model_type": "animate2"}})
    p = _file(tmp_path, "anim2", in_dim=36, i2v=True, metadata={"config": cfg, "other": "dropped"})
    with load_canonical(str(p)) as m:
        assert m.metadata == {"config": cfg}
    with load_canonical(str(_file(tmp_path, "plain", in_dim=36, i2v=True, metadata={"other": "x"}))) as m:
        assert m.metadata == {}
    dst = tmp_path / "out.safetensors"
    convert(p, dst, to="float8_e4m3fn")
    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["config"] == cfg
    assert cli_main(["inspect", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variant"].startswith("Wan-Animate-2")


def test_out_dim_48_with_other_input_channels_is_not_called_plain_ti2v():
    fam = recognise(real(3072, in_dim=100, out_dim=48))
    assert fam.variant == "Wan2.2-TI2V-5B family (in_dim 100, not TI2V's 48)" and fam.comfy_type == "t2v"
