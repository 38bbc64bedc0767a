"""Probe results of video files (frame count, rate, size, codec), kept between runs.

Indexing a CAER split decodes every video once to count its frames (exact, but minutes on the full
dataset); the next run reads the counts back instead. Entries are keyed by the file's path, size and
modification time, so a changed file is probed again; files that failed to probe are never cached
(they are reported, and skipped, on every run). The cache lives in ``$CAER_FAST_CACHE_DIR`` (default
``$XDG_CACHE_HOME/caer_fast`` or ``~/.cache/caer_fast``), one JSON file per dataset split, written
atomically; a cache that cannot be read or written only costs the probing time (a warning says so).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

from .video import VideoInfo

log = logging.getLogger(__name__)
ENV_VAR = "CAER_FAST_CACHE_DIR"
VERSION = 1


def cache_dir() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caer_fast"


class ProbeCache:
    """``get(path)`` → cached :class:`VideoInfo` or None; ``put(path, info)``; ``save()`` once at the end."""

    def __init__(self, root, split: str, count_frames: bool, enabled: bool = True):
        self.enabled = enabled
        where = f"{Path(root).resolve() / split}|count_frames={bool(count_frames)}"
        self.path = cache_dir() / "index" / f"{hashlib.sha1(where.encode()).hexdigest()[:20]}.json"
        self._entries: Dict[str, dict] = {}
        self._dirty = False
        self.hits = self.misses = 0
        if enabled and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == VERSION and data.get("for") == where:
                    self._entries = data["files"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable index cache %s (%s)", self.path, exc)
        self._where = where

    @staticmethod
    def _stamp(path: Path):
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def get(self, path) -> Optional[VideoInfo]:
        if not self.enabled:
            return None
        path = Path(path)
        entry = self._entries.get(str(path.resolve()))
        try:
            fresh = entry is not None and entry["stamp"] == self._stamp(path)
        except OSError:
            fresh = False
        if not fresh:
            self.misses += 1
            return None
        self.hits += 1
        return VideoInfo(**entry["info"])

    def put(self, path, info: VideoInfo) -> None:
        if self.enabled:
            path = Path(path)
            self._entries[str(path.resolve())] = {"stamp": self._stamp(path), "info": asdict(info)}
            self._dirty = True

    def save(self) -> None:
        if not (self.enabled and self._dirty):
            return
        payload = json.dumps({"version": VERSION, "for": self._where, "files": self._entries})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(payload)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self._dirty = False
        except OSError as exc:
            log.warning("could not write the index cache %s (%s); the next run probes the videos again",
                        self.path, exc)
