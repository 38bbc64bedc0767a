"""The engines' on-disk cache: its root, the key of one entry, atomic JSON, file digests, a lock.

One entry (``cache_root() / engine_key(...)``) holds what an engine build produced for one model on one
machine: ``model.onnx`` (our export), ``model.ort-optimized.onnx`` (ONNX Runtime's graph optimised for
this CPU), ``openvino/`` (OpenVINO's compiled model) and ``decision-*.json`` (what ``auto`` measured).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ...data.index_cache import cache_dir
from ...devices import cpu_flags

# 2: the export pools over the position axes (OpenVINO computed version 1's model.onnx wrongly at batch >= 2)
# 3: every file of an entry is recorded with its sha256 in manifest.json (version 2 entries had none)
CACHE_VERSION = 3
MANIFEST = "manifest.json"


def model_hash(model: nn.Module) -> str:
    """sha256 of the model's class, configuration and every state_dict tensor (names, shapes, bytes)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for attr in ("frames",):
        h.update(repr(getattr(model, attr, None)).encode())
    fusion = getattr(model, "fusion_net", None)
    if fusion is not None:
        h.update(repr((fusion.use_face, fusion.use_context, fusion.concat)).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def library_versions() -> Dict[str, str]:
    """torch's and the installed engines' versions (read from their metadata: nothing is imported)."""
    out = {"torch": torch.__version__}
    for package in ("onnxruntime", "openvino"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def engine_key(model: nn.Module, face_shape, context_shape, batch_sizes: Sequence[int],
               threads: Optional[int] = None, model_digest: Optional[str] = None) -> str:
    """The cache key: model weights (``model_digest``: :func:`model_hash`, computed when not given), input
    shapes, batch range, threads, CPU flags, versions."""
    threads = threads or torch.get_num_threads()
    doc = {"v": CACHE_VERSION, "model": model_digest or model_hash(model), "face": list(face_shape), "context": list(context_shape),
           "batch": [min(batch_sizes), max(batch_sizes)], "threads": int(threads), "cpu": cpu_flags(),
           "versions": library_versions()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def cache_root() -> Path:
    """``$CAER_FAST_CACHE_DIR/engines`` (default ``~/.cache/caer_fast/engines``)."""
    return cache_dir() / "engines"


def write_json_atomic(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` through a temporary file and a rename: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def usable_cache_dir(root: Path, warn: Callable[[str], None]) -> Optional[Path]:
    """``root`` when it is (or can be made) a writable folder; else None after one warning line: the
    engines then work in a temporary folder (no cache) rather than fail."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warn(f"engine cache {root} is unusable ({exc.strerror or exc}): building without a cache")
        return None
    if not os.access(root, os.W_OK | os.X_OK):
        warn(f"engine cache {root} is not writable: building without a cache")
        return None
    return root


@contextlib.contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """An exclusive lock on one cache entry (``flock`` on ``entry/.lock``): two processes building the
    same entry take turns, and the second finds the first one's files (and checks them)."""
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Manifest:
    """``entry/manifest.json``: the model's digest and the sha256 of every file this cache wrote into the
    entry. A file that is not recorded, or whose bytes differ from the record (another model's export
    copied in, a truncated write, an edit), is deleted and rebuilt, with one warning line naming it."""

    def __init__(self, entry: Path, model_digest: str, warn: Callable[[str], None]):
        self.entry, self.model, self.warn = Path(entry), model_digest, warn
        self.path = self.entry / MANIFEST
        self.doc = {"model": model_digest, "files": {}}
        try:
            doc = json.loads(self.path.read_text())
            if isinstance(doc, dict) and doc.get("model") == model_digest and isinstance(doc.get("files"), dict):
                self.doc = doc
            elif self.path.exists():
                warn(f"engine cache: {self.path} belongs to another model: its files are rebuilt")
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            warn(f"engine cache: {self.path} is unreadable ({exc}): its files are rebuilt")

    def _rel(self, path: Path) -> str:
        return Path(path).relative_to(self.entry).as_posix()

    def check(self, path: Path) -> bool:
        """True when ``path`` exists and holds what was recorded; a file that does not is removed (with a
        warning) so the caller rebuilds it."""
        path = Path(path)
        if not path.exists():
            return False
        want = self.doc["files"].get(self._rel(path))
        try:
            got = file_digest(path) if path.is_file() else None
        except OSError:
            got = None
        if want is not None and got == want:
            return True
        why = "was not written by this cache" if want is None else \
            f"does not match what was built for this model (sha256 {str(got)[:12]}…, recorded {want[:12]}…)"
        self.warn(f"engine cache: {path} {why}: rebuilding it")
        self.forget(path)
        return False

    def check_tree(self, folder: Path) -> None:
        """:meth:`check` every file under ``folder`` (OpenVINO's compiled models)."""
        folder = Path(folder)
        if folder.is_dir():
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    self.check(f)

    def record(self, *paths: Path) -> None:
        for path in paths:
            path = Path(path)
            files = [f for f in sorted(path.rglob("*")) if f.is_file()] if path.is_dir() else [path]
            for f in files:
                if f.is_file() and not f.name.startswith("."):
                    self.doc["files"][self._rel(f)] = file_digest(f)
        self.save()

    def forget(self, path: Path) -> None:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        prefix = self._rel(path)
        for k in [k for k in self.doc["files"] if k == prefix or k.startswith(prefix + "/")]:
            del self.doc["files"][k]
        self.save()

    # -- digests of source files (calibration.pt) by their stat, so a warm start need not read them ---------
    @staticmethod
    def _stat_key(path: Path):
        st = Path(path).stat()
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def source_digest(self, path: Path) -> Optional[str]:
        """The digest :meth:`remember_source` recorded for ``path``, while its size, mtime and inode are
        unchanged; None otherwise (then the caller reads the file and digests it)."""
        sources = self.doc.get("sources")
        rec = sources.get(str(Path(path).resolve())) if isinstance(sources, dict) else None
        try:
            same = isinstance(rec, dict) and rec.get("stat") == self._stat_key(path)
        except OSError:
            return None
        digest = rec.get("digest") if same else None
        # it names files in the entry: a hex digest only (an edited manifest cannot point elsewhere)
        return digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{8,64}", digest) else None

    def remember_source(self, path: Path, digest: str) -> None:
        try:
            stat = self._stat_key(path)
        except OSError:
            return
        if not isinstance(self.doc.get("sources"), dict):
            self.doc["sources"] = {}
        self.doc["sources"][str(Path(path).resolve())] = {"stat": stat, "digest": digest}
        self.save()

    def save(self) -> None:
        try:
            write_json_atomic(self.path, self.doc)
        except OSError as exc:  # a full disk: the next start finds unrecorded files and rebuilds them
            self.warn(f"engine cache: could not write {self.path} ({exc.strerror or exc})")
