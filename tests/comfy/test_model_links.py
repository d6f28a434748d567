"""Models symlinked into ``models/diffusion_models`` (the usual way to share one model folder between
installs) load like ComfyUI's own UNETLoader loads them: links to files and to folders are followed,
while a name that leaves the folders, a dangling link, or an index whose shard links out of the index's
folder is still one clear error, and a folder link loop does not hang the listing.

Server tests use the shared headless ComfyUI; the resolve/listing cases run in-process against
ComfyUI's real ``folder_paths`` (skip without ComfyUI)."""

from __future__ import annotations

import itertools
import json
import os
import shutil

import pytest
from fixtures import build_seed, loader_node, sampler_prompt

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                reason="COMFYUI_PATH is not set; real-ComfyUI tests skipped")


def _options(server, node, field):
    spec = server.get_json(f"/object_info/{node}")[node]["input"]["required"][field]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 combos vs V1 lists


def _run_loader(server, name):
    return server.run_prompt(sampler_prompt(loader_node(name)))


@pytest.fixture()
def links(comfy_server, tmp_path):
    """A fresh ``diffusion_models/links`` folder and a model store outside every model folder."""
    folder = comfy_server.models / "diffusion_models" / "links"
    if folder.exists() or folder.is_symlink():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    store = tmp_path / "shared_models"
    store.mkdir()
    yield folder, store
    shutil.rmtree(folder)


def test_linked_file_is_listed_and_loads_like_core(comfy_server, links):
    folder, store = links
    real, _, _ = build_seed("kijai_scaled_fp8_diffusers", store)
    (folder / "linked.safetensors").symlink_to(real)
    assert "links/linked.safetensors" in _options(comfy_server, "UNETLoader", "unet_name")  # ComfyUI follows it
    assert "links/linked.safetensors" in _options(comfy_server, "WanQuantLoadDiT", "model_name")
    hist = _run_loader(comfy_server, "links/linked.safetensors")
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
    assert hist["outputs"]["5"]["stats"][0]["finite"]


def test_linked_folder_with_a_sharded_index_loads(comfy_server, links):
    folder, store = links
    idx, _, _ = build_seed("vista4d_sibling_sharded", store)
    (folder / "shared").symlink_to(idx.parent, target_is_directory=True)
    name = f"links/shared/{idx.name}"
    choices = _options(comfy_server, "WanQuantLoadDiT", "model_name")
    assert name in choices and not any(c.startswith("links/shared/") and "-of-" in c for c in choices)
    hist = _run_loader(comfy_server, name)
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]


def test_shard_linking_out_of_its_index_folder_is_still_refused(comfy_server, links):
    folder, store = links
    idx, _, _ = build_seed("vista4d_sibling_sharded", folder / "escape")
    shard = sorted(idx.parent.glob("*-of-*.safetensors"))[0]
    moved = store / shard.name
    shutil.move(shard, moved)
    shard.symlink_to(moved)
    hist = _run_loader(comfy_server, str(idx.relative_to(comfy_server.models / "diffusion_models")))
    assert hist["status"]["status_str"] == "error"
    err = [m for m in hist["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert "links outside its folder" in err["exception_message"] and str(moved.resolve()) in err["exception_message"]


def test_folder_link_loop_keeps_the_listing_finite(comfy_server, links):
    folder, store = links
    real, _, _ = build_seed("kijai_scaled_fp8_diffusers", store)
    (folder / "linked.safetensors").symlink_to(real)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # links/loop -> links
    choices = _options(comfy_server, "WanQuantLoadDiT", "model_name")
    assert "links/linked.safetensors" in choices
    hist = _run_loader(comfy_server, "links/linked.safetensors")
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]


# ---------------------------------------------------------------- in-process: resolve() and the walk

@pytest.fixture()
def model_root(comfy_inprocess, tmp_path, monkeypatch):
    import folder_paths

    root = tmp_path / "diffusion_models"
    root.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(root)], set(folder_paths.supported_pt_extensions)))
    folder_paths.filename_list_cache.pop("diffusion_models", None)
    yield root
    folder_paths.filename_list_cache.pop("diffusion_models", None)


def test_resolve_follows_links_and_keeps_the_name_inside(model_root, tmp_path):
    from wanquant.errors import WanquantError
    from wanquant.nodes.loader_nodes import resolve

    outside = tmp_path / "store"
    outside.mkdir()
    (outside / "m.safetensors").write_bytes(b"x")
    (model_root / "m.safetensors").symlink_to(outside / "m.safetensors")
    (model_root / "dir").symlink_to(outside, target_is_directory=True)
    assert resolve("m.safetensors") == str(model_root / "m.safetensors")
    assert resolve("dir/m.safetensors") == str(model_root / "dir" / "m.safetensors")

    for bad in ("../store/m.safetensors", "dir/../../store/m.safetensors", str(outside / "m.safetensors")):
        with pytest.raises(WanquantError, match="leaves the diffusion_models folders") as e:
            resolve(bad)
        assert repr(bad) in str(e.value)
    (model_root / "gone.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    with pytest.raises(WanquantError, match="is a link to nothing") as e:
        resolve("gone.safetensors")
    assert str(tmp_path / "nowhere.safetensors") in str(e.value)
    with pytest.raises(WanquantError, match="was not found"):
        resolve("dir")  # a folder is not a model file


def test_index_walk_enters_each_real_folder_once(model_root):
    from wanquant.nodes.loader_nodes import _walk_each_folder_once

    sub = model_root / "sub"
    sub.mkdir()
    (sub / "a.safetensors.index.json").write_text("{}")
    (sub / "up").symlink_to(model_root, target_is_directory=True)  # two loops: unguarded, 2**40 paths
    (sub / "up2").symlink_to(model_root, target_is_directory=True)
    walked = list(itertools.islice(_walk_each_folder_once(str(model_root)), 100))
    assert sorted(os.path.realpath(d) for d, _ in walked) == sorted([str(model_root.resolve()), str(sub.resolve())])
    assert ["a.safetensors.index.json"] == [f for _, files in walked for f in files]
