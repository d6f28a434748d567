"""Model files: catalog, sha256 verification (with its cache), download via a faked Hub call,
offline errors, external-data layouts and the folder/combos rules (POSE.md §2, §12)."""

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from wanquant.errors import WanquantError
from wanquant.pose import models
from wanquant.pose.sessions import open_model
from onnx_fakes import gaussian_maps, vitpose_const


def spec_for(content: bytes, name="tiny.onnx", repo="Org/Name", filename="sub/dir/tiny.onnx"):
    mf = models.ModelFile(repo, filename, name, len(content), hashlib.sha256(content).hexdigest())
    return models.ModelSpec("tiny", "detector", (mf,))


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download: writes ``payload`` where the Hub would."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.calls = []

    def __call__(self, repo_id, filename, local_dir=None, tqdm_class=None, **kw):
        self.calls.append((repo_id, filename, kw))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.payload)
        if tqdm_class is not None:
            bar = tqdm_class(total=len(self.payload), disable=True)
            bar.update(len(self.payload))
            bar.close()
        return str(path)


def test_catalog_defaults_and_names():
    assert models.choices("detector")[0] == "yolov10m (auto-download)"
    assert models.choices("pose")[0] == "ViTPose-H wholebody (auto-download)"
    h = models.spec_for_choice("ViTPose-H wholebody (auto-download)")
    assert [f.flat_name for f in h.files] == ["vitpose_h_wholebody_model.onnx", "vitpose_h_wholebody_data.bin"]
    assert models.known_file("some/dir/yolov10m.onnx").size == 61_659_339


def test_combos_list_only_onnx_graphs():
    names = ["yolov10m.onnx", "vitpose_h_wholebody_data.bin", "vitpose_h_wholebody_model.onnx",
             "notes.txt", "vitpose_h_wholebody.onnx/end2end.onnx", "x.ONNX", "model.pt"]
    assert models.onnx_choices(names) == ["vitpose_h_wholebody.onnx/end2end.onnx",
                                          "vitpose_h_wholebody_model.onnx", "x.ONNX", "yolov10m.onnx"]


def test_detection_extension_patch_never_touches_the_shared_set():
    shared = {".ckpt", ".pt", ".safetensors"}
    new = models.extensions_with_onnx(shared)
    assert new == {".ckpt", ".pt", ".safetensors", ".onnx"}
    assert ".onnx" not in shared and new is not shared
    assert models.extensions_with_onnx(set()) is None          # empty = accept all: leave alone
    assert models.extensions_with_onnx({".onnx", ".pt"}) is None


def test_download_verifies_moves_and_reports_progress(tmp_path, monkeypatch):
    payload = b"onnx-bytes" * 1000
    hub = FakeHub(payload)
    monkeypatch.setattr(models, "hf_hub_download", hub)
    seen = []
    spec = spec_for(payload)
    path = models.ensure_model(spec, [tmp_path / "det"], progress=lambda d, t: seen.append((d, t)))
    assert path == tmp_path / "det" / "tiny.onnx" and path.read_bytes() == payload
    assert hub.calls[0][:2] == ("Org/Name", "sub/dir/tiny.onnx")
    assert not (tmp_path / "det" / models.DOWNLOAD_SUBDIR / "sub/dir/tiny.onnx").exists()  # moved, not copied
    assert seen[-1] == (len(payload), len(payload))
    # second use: found locally, no download
    assert models.ensure_model(spec, [tmp_path / "det"]) == path and len(hub.calls) == 1


def test_corrupt_download_is_rejected_and_deleted(tmp_path, monkeypatch):
    good = b"the real file"
    monkeypatch.setattr(models, "hf_hub_download", FakeHub(b"the fake file"))  # same size, wrong bytes
    with pytest.raises(WanquantError) as ei:
        models.ensure_model(spec_for(good), [tmp_path])
    msg = str(ei.value)
    assert hashlib.sha256(good).hexdigest() in msg and hashlib.sha256(b"the fake file").hexdigest() in msg
    assert not (tmp_path / "tiny.onnx").exists()
    assert not (tmp_path / models.DOWNLOAD_SUBDIR / "sub/dir/tiny.onnx").exists()


def test_existing_file_with_wrong_content_is_an_error_not_used(tmp_path, monkeypatch):
    good = b"0123456789"
    (tmp_path / "tiny.onnx").write_bytes(b"9876543210")
    monkeypatch.setattr(models, "hf_hub_download", FakeHub(good))
    with pytest.raises(WanquantError, match="sha256 mismatch"):
        models.ensure_model(spec_for(good), [tmp_path])
    (tmp_path / "tiny.onnx").write_bytes(b"short")
    with pytest.raises(WanquantError, match="wrong size"):
        models.ensure_model(spec_for(good), [tmp_path])


def test_hash_is_cached_and_invalidated_by_any_change(tmp_path):
    content = b"abc" * 100
    f = tmp_path / "tiny.onnx"
    f.write_bytes(content)
    spec = spec_for(content)
    models.verify_file(f, spec.files[0])
    cache = models.hash_cache_file()
    assert cache.is_file() and not (tmp_path / "tiny.onnx.sha256").exists()  # nothing beside the model
    # The cache is used (proved by corrupting the remembered hash in wanquant's own cache file).
    cache.write_text(cache.read_text().replace(spec.files[0].sha256, "0" * 64))
    with pytest.raises(WanquantError, match="sha256 mismatch"):
        models.verify_file(f, spec.files[0])
    # Touching the file invalidates the entry: it is hashed again and passes.
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    models.verify_file(f, spec.files[0])


def test_planted_sidecar_beside_a_wrong_file_does_not_pass(tmp_path):
    good = b"the real model " * 20
    wrong = b"x" * len(good)  # right size, wrong content
    spec = spec_for(good)
    f = tmp_path / "tiny.onnx"
    f.write_bytes(wrong)
    st = f.stat()
    (tmp_path / "tiny.onnx.sha256").write_text(
        '{"sha256": "%s", "size": %d, "mtime_ns": %d}' % (spec.files[0].sha256, st.st_size, st.st_mtime_ns))
    with pytest.raises(WanquantError, match="sha256 mismatch"):
        models.verify_file(f, spec.files[0], verify_hash=True)


def test_rewrite_in_place_with_restored_mtime_is_rehashed(tmp_path):
    good = b"the real model " * 20
    spec = spec_for(good)
    f = tmp_path / "tiny.onnx"
    f.write_bytes(good)
    models.verify_file(f, spec.files[0])  # remembered as good
    st = f.stat()
    time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms)
    with open(f, "r+b") as fh:  # same inode, same size
        fh.write(b"X")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    with pytest.raises(WanquantError, match="sha256 mismatch"):
        models.verify_file(f, spec.files[0])


def test_offline_gives_repo_file_url_and_destination(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real hf_hub_download, local files only
    spec = models.spec_for_choice("yolov10m (auto-download)")
    with pytest.raises(WanquantError) as ei:
        models.ensure_model(spec, [tmp_path])
    msg = str(ei.value)
    assert "Wan-AI/Wan2.2-Animate-14B" in msg and "process_checkpoint/det/yolov10m.onnx" in msg
    assert "https://huggingface.co/Wan-AI/Wan2.2-Animate-14B/resolve/main/process_checkpoint/det/yolov10m.onnx" in msg
    assert str(tmp_path / "yolov10m.onnx") in msg
    assert not (tmp_path / "yolov10m.onnx").exists()


def test_network_error_gives_the_same_advice(tmp_path, monkeypatch):
    def unreachable(*a, **k):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(models, "hf_hub_download", unreachable)
    with pytest.raises(WanquantError, match="put it at .*tiny.onnx"):
        models.ensure_model(spec_for(b"x"), [tmp_path])


def test_local_file_in_a_second_folder_is_found(tmp_path, monkeypatch):
    content = b"payload"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tiny.onnx").write_bytes(content)

    def forbidden(*a, **k):
        raise AssertionError("must not download")
    monkeypatch.setattr(models, "hf_hub_download", forbidden)
    assert models.ensure_model(spec_for(content), [tmp_path / "a", tmp_path / "b"]) == tmp_path / "b" / "tiny.onnx"


MAPS = gaussian_maps({0: (24, 8), 100: (3.5, 60)})


def _check_runs(path):
    m = open_model(models.resolve_user_path(path), "pose", "cpu")
    out = m.run(np.zeros((2, 3, 256, 192), np.float32))
    np.testing.assert_allclose(out, np.repeat(MAPS, 2, axis=0), atol=1e-6)


def test_kijai_external_data_layout_loads(tmp_path):
    p = vitpose_const(tmp_path / "renamed_model.onnx", MAPS,
                      external={"all_tensors_to_one_file": True, "location": "vitpose_h_wholebody_data.bin"})
    assert (tmp_path / "vitpose_h_wholebody_data.bin").stat().st_size >= MAPS.nbytes
    assert p.stat().st_size < 10_000
    _check_runs(p)


def test_wan_folder_layout_loads(tmp_path):
    folder = tmp_path / "vitpose_h_wholebody.onnx"
    vitpose_const(folder / "end2end.onnx", MAPS, external={"all_tensors_to_one_file": False})
    assert len(list(folder.iterdir())) >= 2
    _check_runs(folder)


def test_hf_cache_symlink_layout_loads(tmp_path):
    build = tmp_path / "build"
    vitpose_const(build / "m.onnx", MAPS, external={"all_tensors_to_one_file": True,
                                                    "location": "vitpose_h_wholebody_data.bin"})
    repo = tmp_path / "models--Kijai--vitpose_comfy"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("a" * 40) / "onnx"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for src, name in ((build / "m.onnx", "vitpose_h_wholebody_model.onnx"),
                      (build / "vitpose_h_wholebody_data.bin", "vitpose_h_wholebody_data.bin")):
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        os.replace(src, blobs / digest)
        os.symlink(os.path.relpath(blobs / digest, snap), snap / name)
    _check_runs(snap / "vitpose_h_wholebody_model.onnx")


def test_folder_without_end2end_is_a_clear_error(tmp_path):
    (tmp_path / "vitpose_h_wholebody.onnx").mkdir()
    with pytest.raises(WanquantError, match="end2end.onnx"):
        models.resolve_user_path(tmp_path / "vitpose_h_wholebody.onnx")
