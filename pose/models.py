"""Pose model files: the catalog, finding them, sha256 verification and first-use download.

Wan's detector and the ViTPose wholebody exports are large public files with known hashes
(POSE.md §2). They are looked up under their canonical flat names in every ``detection``
folder first (the names kijai's users already have, so nothing is downloaded twice), verified
once by sha256 (cached, see :func:`cached_sha256`), and otherwise
downloaded with ``huggingface_hub`` straight into that folder. A corrupt download is deleted
and reported with both hashes; it is never used. Offline, the error says which file to put where.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import WanquantError

log = logging.getLogger(__name__)

CHUNK = 16 * 1024 * 1024
DOWNLOAD_SUBDIR = ".wanquant_download"
AUTO_SUFFIX = " (auto-download)"


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: where it lives on the Hub, its local flat name, size and sha256."""
    repo_id: str
    filename: str
    flat_name: str
    size: int
    sha256: str

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"


@dataclass(frozen=True)
class ModelSpec:
    """A catalog entry; ``files[0]`` is the ``.onnx`` to open, the rest must sit beside it."""
    label: str
    role: str  # "detector" or "pose"
    files: tuple[ModelFile, ...]

    @property
    def choice(self) -> str:
        return self.label + AUTO_SUFFIX


_WAN = "Wan-AI/Wan2.2-Animate-14B"
_KIJAI = "Kijai/vitpose_comfy"
_EASY = "JunkyByte/easy_ViTPose"

CATALOG: tuple[ModelSpec, ...] = (
    ModelSpec("yolov10m", "detector", (
        ModelFile(_WAN, "process_checkpoint/det/yolov10m.onnx", "yolov10m.onnx", 61_659_339,
                  "89b526498a6d55f869a6ab52e3a2eb20ad45b3711c1f7de3dd9ca0b399dfd6d7"),)),
    ModelSpec("ViTPose-H wholebody", "pose", (
        ModelFile(_KIJAI, "onnx/vitpose_h_wholebody_model.onnx", "vitpose_h_wholebody_model.onnx", 420_252,
                  "f21466cd6c93d0066782ad5923c14a4e6569133def212dc2895c73596c2e553b"),
        # The graph references its weights by this exact name: keep it, beside the .onnx.
        ModelFile(_KIJAI, "onnx/vitpose_h_wholebody_data.bin", "vitpose_h_wholebody_data.bin", 2_548_958_740,
                  "f6a9e7cb3a87ed65a098b096029e70150408acfafc3d695019a66b289d7719e1"))),
    ModelSpec("ViTPose-L wholebody", "pose", (
        ModelFile(_EASY, "onnx/wholebody/vitpose-l-wholebody.onnx", "vitpose-l-wholebody.onnx", 1_234_579_166,
                  "89bdf6692d9224dbd5004dcef23a9ba2d54c5776212b359d5a5b5068ac14fd08"),)),
    ModelSpec("ViTPose-B wholebody", "pose", (
        ModelFile(_EASY, "onnx/wholebody/vitpose-b-wholebody.onnx", "vitpose-b-wholebody.onnx", 360_242_862,
                  "017c08e161bfa2c72a96297b3b6de975ecd83c65c4fd56fb5b0bfc1298709069"),)),
    ModelSpec("ViTPose-S wholebody", "pose", (
        ModelFile(_EASY, "onnx/wholebody/vitpose-s-wholebody.onnx", "vitpose-s-wholebody.onnx", 97_427_067,
                  "ccac893a8ad6da7d43f9655047acf48e482e66922db7f4273a3b615cea989127"),)),
)

# Files known by name but not by content: never accepted as the catalog model.
KNOWN_IMPOSTORS = {
    "afcdfe8c": "a different 'yolov10m.onnx' export (61,659,689 bytes) that is not Wan's detector",
}
# Wan's own folder form of ViTPose-H is the same export as easy_ViTPose's H file.
WAN_VITPOSE_H_GRAPH_SHA = "e5dab9693f9fb437516955c42040ebb13664e66ca49ee7b619dde4a9972fa3e4"


def choices(role: str) -> list[str]:
    """The stable auto-download entries of a role, default first (saved workflows rely on them)."""
    return [s.choice for s in CATALOG if s.role == role]


def spec_for_choice(choice: str) -> ModelSpec | None:
    for s in CATALOG:
        if choice == s.choice:
            return s
    return None


def known_file(name: str) -> ModelFile | None:
    """The catalog entry whose flat name is ``name`` (basename), if any."""
    base = os.path.basename(name)
    for s in CATALOG:
        for f in s.files:
            if f.flat_name == base:
                return f
    return None


def onnx_choices(names: Iterable[str]) -> list[str]:
    """Only loadable graphs: ``*.onnx`` names (never the ``.bin`` weights, which ORT can't open)."""
    return sorted(n for n in names if n.lower().endswith(".onnx"))


# -- hashing ---------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    """Stream-hash a file in large chunks (2.5 GB files must not be read into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def hash_cache_file() -> Path:
    """Where verified hashes are remembered: the user's cache folder, never the models folder.

    A cache beside the model (the old ``<file>.sha256`` sidecar) can be planted together with a
    wrong file of the right size; this one is only written by wanquant after hashing."""
    root = os.environ.get("WANQUANT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "wanquant")
    return Path(root) / "sha256-cache.json"


def _identity(st: os.stat_result) -> dict:
    """What must be unchanged for a remembered hash to still describe the file. ``ctime`` is set by
    the kernel on every write, rename or ``utime`` and cannot be set back by a user, so rewriting
    the file in place with the same size and a restored mtime still invalidates the entry."""
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _read_cache(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def cached_sha256(path: Path) -> str:
    """sha256 of ``path``, hashed once and then remembered (by real path) while the file's
    identity (device, inode, size, mtime, ctime) is unchanged."""
    key = os.path.realpath(path)
    rec = _read_cache(hash_cache_file()).get(key)
    if isinstance(rec, dict) and rec.get("id") == _identity(os.stat(key)) and isinstance(rec.get("sha256"), str):
        return rec["sha256"]
    digest = sha256_file(path)
    _remember(path, digest)
    return digest


def _remember(path: Path, digest: str) -> None:
    """Record ``digest`` for ``path`` (atomically; a cache that cannot be written costs a re-hash)."""
    cache = hash_cache_file()
    key = os.path.realpath(path)
    try:
        entries = _read_cache(cache)
        entries[key] = {"id": _identity(os.stat(key)), "sha256": digest}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, cache)
    except OSError as exc:
        log.debug("could not write %s: %s", cache, exc)


def verify_file(path: Path, mf: ModelFile, verify_hash: bool = True) -> None:
    """Size check always; sha256 check when asked (cached). Raises WanquantError on mismatch."""
    size = path.stat().st_size
    if size != mf.size:
        raise WanquantError(
            f"is not the expected {mf.flat_name} (wrong size). Delete it to re-download, or put "
            f"the file from {mf.url} there", file=path, expected=f"{mf.size:,} bytes", found=f"{size:,} bytes")
    if verify_hash:
        digest = cached_sha256(path)
        if digest != mf.sha256:
            hint = next((v for k, v in KNOWN_IMPOSTORS.items() if digest.startswith(k)), None)
            raise WanquantError(
                "sha256 mismatch" + (f" ({hint})" if hint else "") + f"; delete it to re-download "
                f"from {mf.url}, or pick the file by name in the node to use it unverified",
                file=path, expected=f"sha256 {mf.sha256}", found=f"sha256 {digest}")


def check_user_file(path: Path, verify_hash: bool = True) -> None:
    """A file the user picked by name: warn (never fail) when a catalog name has other content."""
    mf = known_file(path.name)
    if mf is None or not verify_hash or path.is_dir():
        return
    size = path.stat().st_size
    if size != mf.size or cached_sha256(path) != mf.sha256:
        log.warning("%s is named like %s but is a different file (size %s, expected %s); using it "
                    "as a user-chosen model after checking its inputs and outputs", path, mf.flat_name,
                    f"{size:,}", f"{mf.size:,}")


# -- finding and downloading -----------------------------------------------------------------

def find_local(spec: ModelSpec, folders: Iterable[str | Path]) -> Path | None:
    """The first folder holding every file of ``spec`` under its flat name; its .onnx path."""
    for folder in folders:
        folder = Path(folder)
        paths = [folder / f.flat_name for f in spec.files]
        if all(p.is_file() for p in paths):
            return paths[0]
    return None


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _offline_error(mf: ModelFile, dest: Path, cause: BaseException | None) -> WanquantError:
    reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return WanquantError(
        f"could not download {mf.filename} from the Hugging Face repo {mf.repo_id}{reason}. "
        f"On an offline machine download {mf.url} elsewhere and put it at {dest} "
        f"({mf.size:,} bytes, sha256 {mf.sha256})", file=dest)


def _tqdm_class(progress: Callable[[int, int], None]):
    """A tqdm subclass forwarding bytes to ``progress(done, total)`` (e.g. a ComfyUI ProgressBar)."""
    from tqdm.auto import tqdm

    class _Forward(tqdm):
        # Count bytes ourselves: a disabled bar (HF_HUB_DISABLE_PROGRESS_BARS) does not track n.
        _wq_done = 0

        def update(self, n=1):
            out = super().update(n)
            self._wq_done += int(n or 0)
            try:
                progress(self._wq_done, int(self.total or 0))
            except Exception:  # progress is cosmetic; an interrupt is re-raised by the caller's own check
                log.debug("progress callback failed", exc_info=True)
            return out
    return _Forward


def hf_hub_download(*args, **kwargs):
    """Indirection so tests can replace the Hub call without touching the network."""
    from huggingface_hub import hf_hub_download as _download
    return _download(*args, **kwargs)


def download_file(mf: ModelFile, folder: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Download one file into ``folder/<flat name>``, verifying sha256 before it is put in place."""
    folder = Path(folder)
    dest = folder / mf.flat_name
    staging = folder / DOWNLOAD_SUBDIR
    kwargs = {"local_dir": str(staging)}
    try:
        from huggingface_hub import hf_hub_download as real
        params = inspect.signature(real).parameters
    except Exception:  # huggingface_hub missing: the call below reports it
        params = {}
    if progress is not None and "tqdm_class" in params:
        kwargs["tqdm_class"] = _tqdm_class(progress)
    if _hf_offline():
        kwargs["local_files_only"] = True
    log.info("downloading %s (%s bytes) from %s into %s", mf.filename, f"{mf.size:,}", mf.repo_id, dest)
    try:
        got = Path(hf_hub_download(mf.repo_id, mf.filename, **kwargs))
    except ImportError as exc:
        raise WanquantError("huggingface_hub is not installed; `pip install huggingface_hub` or put "
                            f"{mf.url} at {dest} by hand", file=dest) from exc
    except Exception as exc:  # offline, DNS, HTTP, missing local entry: same advice for all
        raise _offline_error(mf, dest, exc) from exc
    digest = sha256_file(got)
    if digest != mf.sha256 or got.stat().st_size != mf.size:
        size = got.stat().st_size
        got.unlink(missing_ok=True)
        raise WanquantError(f"downloaded file from {mf.url} is corrupt and was deleted; try again",
                            file=dest, expected=f"sha256 {mf.sha256}, {mf.size:,} bytes",
                            found=f"sha256 {digest}, {size:,} bytes")
    os.replace(got, dest)
    _remember(dest, digest)
    log.info("downloaded and verified %s", dest)
    return dest


def ensure_model(spec: ModelSpec, folders: list[str | Path], verify_hash: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Path of the verified ``.onnx`` of ``spec``, downloading missing files into ``folders[0]``.

    Existing files are size-checked on every call and hash-checked once (sidecar cache); a
    mismatch is an error with both hashes, never a silent acceptance."""
    if not folders:
        raise WanquantError("no 'detection' model folder is registered", expected="models/detection")
    found = find_local(spec, folders)
    if found is not None:
        for mf in spec.files:
            verify_file(found.parent / mf.flat_name, mf, verify_hash)
        return found
    target = Path(folders[0])
    target.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock
    with FileLock(str(target / f".{spec.files[0].flat_name}.lock")):
        for mf in spec.files:
            dest = target / mf.flat_name
            if dest.is_file():  # another process finished it while we waited, or a partial set
                verify_file(dest, mf, verify_hash)
                continue
            download_file(mf, target, progress)
    return target / spec.files[0].flat_name


def resolve_user_path(path: str | Path) -> Path:
    """A user-chosen model path: Wan's folder form (``vitpose_h_wholebody.onnx/``) opens its ``end2end.onnx``."""
    p = Path(path)
    if p.is_dir():
        inner = p / "end2end.onnx"
        if not inner.is_file():
            raise WanquantError("is a folder without end2end.onnx", file=p, expected="<folder>/end2end.onnx")
        return inner
    if not p.is_file():
        raise WanquantError("model file not found", file=p)
    return p


def extensions_with_onnx(exts) -> set | None:
    """The extension set a ``detection`` folder needs so ``.onnx`` files are listed.

    Returns a *new* set with ``.onnx`` added, or None when nothing must change: the set already
    has it, or it is empty (ComfyUI's "accept every file"). Never modify ``exts`` in place: in
    ComfyUI it is the shared ``supported_pt_extensions`` object, and adding ``.onnx`` to it
    would put ONNX files into every checkpoint, LoRA and VAE list."""
    if not exts or ".onnx" in exts:
        return None
    return set(exts) | {".onnx"}
