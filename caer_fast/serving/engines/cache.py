"""The engines' on-disk cache: its root, the key of one entry, atomic JSON, file digests, a lock.

One entry (``cache_root() / engine_key(...)``) holds what an engine build produced for one model on one
machine: ``model.onnx`` (our export), ``model.ort-optimized.onnx`` (ONNX Runtime's graph optimised for
this CPU), ``openvino/`` (OpenVINO's compiled model) and ``decision-*.json`` (what ``auto`` measured).
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from ...data.index_cache import cache_dir
from ...devices import cpu_flags

# 2: the export pools over the position axes (OpenVINO computed version 1's model.onnx wrongly at batch >= 2)
CACHE_VERSION = 2


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
               threads: Optional[int] = None) -> str:
    """The cache key: model weights, input shapes, batch range, threads, CPU flags, versions."""
    threads = threads or torch.get_num_threads()
    doc = {"v": CACHE_VERSION, "model": model_hash(model), "face": list(face_shape), "context": list(context_shape),
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
