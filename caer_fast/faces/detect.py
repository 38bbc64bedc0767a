"""Detect faces in a CAER (video) or CAER-S (image) tree and write the box files (API.md "Face boxes on disk").

The implementation behind :mod:`caer_fast.faces` (which re-exports every name here).
``python -m caer_fast.faces --data ROOT`` finds the layout by itself:

- CAER: ``ROOT/{train,validation,test}/<Emotion>/*.avi`` → ``ROOT/<split>.faces.csv``
  (``path,frame,x1,y1,x2,y2,score``, path relative to ROOT, one line per frame with a face).
- CAER-S: ``ROOT/{train,test}/<Emotion>/*.png`` → ``ROOT/<split>.txt``, the community CSV
  ``path,label,x1,y1,x2,y2`` (path relative to the split folder, label from the emotion folder).

One face per frame is kept: the largest among the confident detections (:func:`best_face`).

Videos: the detector runs on every k-th frame (``--every``, default 5: frames 0, k, 2k, …; 0.2 s at
25 fps, a time in which a face in a TV shot barely moves, and 5× less detector time). Every other frame
takes the box of the nearest sampled frame, or, when both sampled frames around it found a face and
those two boxes are near each other (centres closer than the larger box side), a linear interpolation
of the two (box and score). A frame whose nearest sampled frame found no face gets no box (ties go to
"no box"), so no face is invented: a box is never carried more than k/2 frames away from a detection,
nor across a sampled frame that found none.

Resuming: each finished file is appended as one JSON line to ``ROOT/.faces-<split>.log.jsonl``
(first line: the settings). A second run with the same settings skips the files listed there, processes
the rest and rewrites the box file, atomically, from the log. ``--overwrite`` starts afresh.
Bad files (zero-byte, corrupt, undecodable, not in an emotion folder) are skipped, counted and named in
the summary; ``--strict`` stops at the first one with an error naming it. A video that breaks off midway,
or decodes fewer frames than its header lists, keeps the boxes of the frames it decoded and is counted and
named as "truncated / partly decodable" (``--strict``: an error). A split whose emotion folders are missing,
misnamed (``sad``) or joined by others (``Contempt``) gets a warning naming them (``--strict``: an error).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..constants import CLASSES
from ..data.boxes import (format_image_boxes, format_video_boxes, image_boxes_path, video_boxes_path,
                          _atomic_write_text)
from ..data.detectors import DETECTORS, Detection, best_face, make_detector
from ..data.tree import check_class_folders
from ..data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaDecodeError, _open, read_image

DEFAULT_EVERY = 5
TRUNCATED = "truncated / partly decodable"  # the start of a note on a file that decodes only in part
VIDEO_SPLITS = ("train", "validation", "test")
IMAGE_SPLITS = ("train", "test")

Box = Tuple[int, int, int, int]


class FacesError(RuntimeError):
    """A problem that stops the run (``--strict`` bad file, settings clash, unknown layout)."""


# ---------------------------------------------------------------- boxes between sampled frames

def same_face(a: Box, b: Box) -> bool:
    """Same face? Centres closer than the larger box side (a shot cut or another person is not)."""
    side = max(a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1])
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    return (dx * dx + dy * dy) ** 0.5 < side


def fill_track(samples: Dict[int, Optional[Detection]], num_frames: int, max_gap: int
               ) -> Dict[int, Tuple[Box, float]]:
    """Boxes for all frames from detections on sampled frames (see the module docstring).

    Args:
        samples: sampled frame index → the kept detection ``(x1, y1, x2, y2, score)`` or None.
        num_frames: frames in the video.
        max_gap: the sampling stride k; no box goes to a frame more than k frames from a detection.
    Returns:
        {frame: (box, score)} for the frames that get a box.
    """
    keys = sorted(k for k in samples if 0 <= k < num_frames)
    out: Dict[int, Tuple[Box, float]] = {}
    for k in keys:
        d = samples[k]
        if d is not None:
            out[k] = (tuple(int(v) for v in d[:4]), float(d[4]))
    for j, a in enumerate(keys):
        b = keys[j + 1] if j + 1 < len(keys) else None
        da = samples[a]
        stop = num_frames if b is None else b
        for f in range(a + 1, stop):
            if b is None:  # after the last sampled frame
                if da is not None and f - a <= max_gap:
                    out[f] = (tuple(int(v) for v in da[:4]), float(da[4]))
                continue
            db = samples[b]
            if da is not None and db is not None and b - a <= max_gap and same_face(da[:4], db[:4]):
                t = (f - a) / (b - a)
                box = tuple(int(round((1 - t) * p + t * q)) for p, q in zip(da[:4], db[:4]))
                out[f] = (box, (1 - t) * da[4] + t * db[4])
                continue
            # Nearest sampled frame decides; a tie means the face may have left: no box.
            near, dist = (da, f - a) if f - a < b - f else (db, b - f) if b - f < f - a else (None, 0)
            if near is not None and dist <= max_gap:
                out[f] = (tuple(int(v) for v in near[:4]), float(near[4]))
    return out


# ---------------------------------------------------------------- one file

@dataclass
class FileResult:
    path: str  # relative path as written to the box file
    status: str  # "ok" or "bad"
    frames: int = 0
    detected: int = 0  # frames the detector ran on
    rows: List[list] = field(default_factory=list)  # [frame, x1, y1, x2, y2, score]
    label: Optional[int] = None
    reason: str = ""  # bad: why; ok: a note such as "truncated after N frames"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))


def detect_video(path, detector, every: int = DEFAULT_EVERY) -> Tuple[int, int, Dict[int, Tuple[Box, float]], str]:
    """Run ``detector`` on every ``every``-th frame of ``path`` and fill the frames between.

    Returns (frames decoded, frames detected on, {frame: (box, score)}, note). A video that fails
    midway keeps what it decoded and says so in the note; one with no decodable frame raises
    :class:`MediaDecodeError`.
    """
    container = _open(path)
    samples: Dict[int, Optional[Detection]] = {}
    n, note = 0, ""
    try:
        stream = container.streams.video[0]
        header = int(stream.frames or 0)
        try:
            for i, frame in enumerate(container.decode(stream)):
                n = i + 1
                if i % every == 0:
                    samples[i] = best_face(detector.detect(frame.to_ndarray(format="rgb24")))
        except MediaDecodeError:
            raise
        except Exception as exc:  # FFmpeg errors on a damaged stream
            if n == 0:
                raise MediaDecodeError(path, f"decoding failed ({exc.__class__.__name__}: {exc})") from None
            note = f"{TRUNCATED}: decoding failed after {n} frames ({exc.__class__.__name__}); boxes for those"
    finally:
        container.close()
    if n == 0:
        raise MediaDecodeError(path, "no decodable frames")
    if not note and header > 0 and n < header - max(2, header // 20):  # cut off quietly: FFmpeg just stops
        note = f"{TRUNCATED}: {n} of the {header} frames its header lists decode; boxes for those"
    return n, len(samples), fill_track(samples, n, every), note


def label_of(rel_in_split: Path) -> int:
    """The class index of a file from its emotion folder (path relative to the split folder)."""
    if len(rel_in_split.parts) < 2 or rel_in_split.parts[0] not in CLASSES:
        raise MediaDecodeError(rel_in_split, f"not inside an emotion folder ({', '.join(CLASSES)})")
    return CLASSES.index(rel_in_split.parts[0])


# Worker state: one detector per process, built once.
_DETECTOR = None
_SETTINGS: dict = {}


def init_worker(settings: dict) -> None:
    """Set up a worker process (or this one): one detector, built once, and the run's settings."""
    global _DETECTOR, _SETTINGS
    try:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from the worker processes
    except ImportError:
        pass
    _SETTINGS = settings
    _DETECTOR = make_detector(settings["detector"], settings["min_size"], settings["detect_height"])


def process_file(task: Tuple[str, str, str]) -> FileResult:
    """Detect faces in one file. ``task`` = (layout, absolute path, relative path). Never raises on bad media."""
    layout, abspath, rel = task
    try:
        if layout == "video":
            n, ran, track, note = detect_video(abspath, _DETECTOR, _SETTINGS["every"])
            rows = [[f, *box, round(score, 4)] for f, (box, score) in sorted(track.items())]
            return FileResult(rel, "ok", n, ran, rows, reason=note)
        label = label_of(Path(rel))
        note = ""
        try:
            image = read_image(abspath)
        except MediaDecodeError as exc:
            if "truncated" not in exc.problem:
                raise
            image, note = read_truncated_image(abspath), f"{TRUNCATED}: {exc.problem}; boxes for the part that decodes"
        d = best_face(_DETECTOR.detect(image))
        rows = [] if d is None else [[0, *d[:4], round(float(d[4]), 4)]]
        return FileResult(rel, "ok", 1, 1, rows, label=label, reason=note)
    except MediaDecodeError as exc:
        return FileResult(rel, "bad", reason=exc.problem)
    except Exception as exc:  # a detector or library error on odd input: count it, keep going
        return FileResult(rel, "bad", reason=f"{exc.__class__.__name__}: {exc}")


def read_truncated_image(path):
    """The part of a cut-off image file that decodes (PIL fills the rest with black), as uint8 H×W×3 RGB."""
    import numpy as np
    from PIL import Image, ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # process-wide switch: set only around this one read
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise MediaDecodeError(path, f"truncated and not decodable ({exc.__class__.__name__}: {exc})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


# ---------------------------------------------------------------- trees, logs, runs

def media_files(folder: Path, exts: Sequence[str]) -> List[Path]:
    """Files under ``folder`` with one of ``exts`` (any case), hidden ones left out, sorted."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def detect_layout(root) -> str:
    """"video" (CAER) or "image" (CAER-S), from what the split folders hold."""
    root = Path(root)
    splits = [root / s for s in VIDEO_SPLITS if (root / s).is_dir()]
    has_video = any(media_files(s, VIDEO_EXTENSIONS) for s in splits)
    has_image = any(media_files(s, IMAGE_EXTENSIONS) for s in splits)
    if has_video and has_image:
        raise FacesError(f"{root} holds both videos and images; choose with --layout video|image")
    if not (has_video or has_image):
        raise FacesError(f"no CAER videos ({', '.join(VIDEO_EXTENSIONS)}) or CAER-S images "
                         f"({', '.join(IMAGE_EXTENSIONS)}) under {root}/{{{','.join(VIDEO_SPLITS)}}}/<Emotion>/")
    return "video" if has_video else "image"


def log_path(root, split: str) -> Path:
    return Path(root) / f".faces-{split}.log.jsonl"


def read_log(path: Path) -> Tuple[Optional[dict], Dict[str, FileResult]]:
    """(settings, {relpath: result}) from a resume log; a torn last line (killed run) is ignored."""
    settings, done = None, {}
    if not path.is_file():
        return None, {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):  # a damaged log: lines that are not records are ignored
                continue
            if "settings" in rec:
                settings = settings or rec["settings"]
            elif isinstance(rec.get("path"), str):
                try:
                    res = FileResult(**rec)
                except TypeError:
                    continue
                if isinstance(res.reason, str) and isinstance(res.rows, list) and res.status in ("ok", "bad"):
                    done[res.path] = res
    return settings, done


@dataclass
class SplitSummary:
    split: str
    layout: str
    files: int = 0
    processed: int = 0
    resumed: int = 0
    bad: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[Tuple[str, str]] = field(default_factory=list)
    truncated: List[Tuple[str, str]] = field(default_factory=list)  # partly decodable: boxes for that part
    warnings: List[str] = field(default_factory=list)
    frames: int = 0
    with_face: int = 0
    detected: int = 0
    output: Optional[Path] = None
    seconds: float = 0.0

    def lines(self) -> List[str]:
        unit = "frames" if self.layout == "video" else "images"
        pct = 100.0 * self.with_face / self.frames if self.frames else 0.0
        s = self.split
        out = [f"[{s}] warning: {w}" for w in self.warnings]
        out += [f"[{s}] {self.files} files: {self.processed} processed now, {self.resumed} already done "
                f"(skipped, from an earlier run), {len(self.bad)} skipped as bad (unreadable), "
                f"{len(self.truncated)} {TRUNCATED} (boxes for the frames that decode)",
               f"[{s}] {unit} with a face: {self.with_face} of {self.frames} ({pct:.1f} %)"
               + (f"; detector ran on {self.detected} frames" if self.layout == "video" else "")
               + f"; {self.seconds:.1f} s"]
        out += [f"[{s}] skipped {p}: {r}" for p, r in self.bad]
        out += [f"[{s}] {TRUNCATED}: {p}: {r[len(TRUNCATED) + 2:] if r.startswith(TRUNCATED) else r}"
                for p, r in self.truncated]
        out += [f"[{s}] note {p}: {r}" for p, r in self.notes]
        if self.output is not None:
            out.append(f"[{s}] wrote {self.output} ({self.with_face} boxes)")
        return out


def open_log(path: Path, settings: dict):
    """The resume log, opened for appending (settings line first when new; a torn last line closed)."""
    fresh = not path.exists() or path.stat().st_size == 0
    f = open(path, "a+", encoding="utf-8")
    if fresh:
        f.write(json.dumps({"settings": settings}) + "\n")
    else:
        f.seek(f.tell() - 1)  # a run killed mid-line leaves no newline: start on a fresh line
        if f.read(1) != "\n":
            f.write("\n")
    f.flush()
    return f


def run_split(root: Path, split: str, layout: str, settings: dict, workers: int = 1, strict: bool = False,
              overwrite: bool = False, progress: Optional[bool] = None) -> SplitSummary:
    """Detect faces in one split, resuming from its log, and write its box file atomically."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    out_path = video_boxes_path(root, split) if layout == "video" else image_boxes_path(root, split)
    logp = log_path(root, split)
    for p in (out_path, logp):
        if p.exists() and not p.is_file():
            raise FacesError(f"{p} is a folder, not a file: move it away, the box file and its log go there")
    if overwrite:
        logp.unlink(missing_ok=True)
    elif out_path.exists() and not logp.exists():
        raise FacesError(f"{out_path} exists and has no resume log {logp.name}: it was not written by an "
                         f"unfinished run of this tool; pass --overwrite to replace it")
    old_settings, done = read_log(logp)
    if old_settings is not None and old_settings != settings:
        raise FacesError(f"{logp} was made with {old_settings}, this run asks for {settings}: rerun with the "
                         f"same settings to resume, or pass --overwrite to start again")

    split_dir = root / split
    problem = check_class_folders(split_dir)
    if problem is not None and strict:
        raise FacesError(f"{problem} (--strict)")
    files = media_files(split_dir, VIDEO_EXTENSIONS if layout == "video" else IMAGE_EXTENSIONS)
    # CAER paths are relative to ROOT, CAER-S paths to the split folder (API.md).
    base = root if layout == "video" else split_dir
    rels = [p.relative_to(base).as_posix() for p in files]
    todo = [(layout, str(p), r) for p, r in zip(files, rels) if r not in done]
    summary = SplitSummary(split, layout, files=len(files), resumed=len(files) - len(todo))
    if problem is not None:
        summary.warnings.append(problem)
    if not files:
        summary.warnings.append(f"{split_dir}: no {'videos' if layout == 'video' else 'images'} found "
                                f"(layout {layout}); its box file is empty")

    log = open_log(logp, settings)
    pool = None
    try:
        if workers > 1 and len(todo) > 1:
            import multiprocessing as mp

            pool = mp.Pool(min(workers, len(todo)), initializer=init_worker, initargs=(settings,))
            results: Iterable[FileResult] = pool.imap_unordered(process_file, todo, chunksize=1)
        else:
            init_worker(settings)
            results = map(process_file, todo)
        # progress None: a bar only on a terminal; True / False force it on / off.
        bar = tqdm(results, total=len(todo), desc=f"faces {split}", unit="file",
                   disable=None if progress is None else not progress, file=sys.stderr)
        for res in bar:
            if strict and (res.status == "bad" or res.reason.startswith(TRUNCATED)):
                raise FacesError(f"{base / res.path}: {res.reason} (--strict)")
            log.write(res.to_json() + "\n")
            log.flush()  # one line per finished file: a killed run loses at most the files in flight
            done[res.path] = res
            summary.processed += 1
    finally:
        log.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    kept = [done[r] for r in rels]  # files since deleted from the tree drop out
    for res in kept:
        if res.status == "bad":
            summary.bad.append((res.path, res.reason))
            continue
        if res.reason.startswith(TRUNCATED) or res.reason.startswith("truncated"):  # (older logs: "truncated:")
            summary.truncated.append((res.path, res.reason))
        elif res.reason:
            summary.notes.append((res.path, res.reason))
        summary.frames += res.frames
        summary.detected += res.detected
        summary.with_face += len(res.rows)
    if layout == "video":
        text = format_video_boxes((r.path, row[0], tuple(row[1:5]), row[5]) for r in kept if r.status == "ok"
                                  for row in r.rows)
    else:
        text = format_image_boxes((r.path, r.label, tuple(r.rows[0][1:5])) for r in kept
                                  if r.status == "ok" and r.rows)
    _atomic_write_text(out_path, text)
    summary.output = out_path
    summary.seconds = time.perf_counter() - t0
    return summary


def check_writable(root: Path) -> None:
    """The box files and resume logs go to ``root``: refuse a read-only tree before detecting anything."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".faces-write-test-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FacesError(f"--data {root}: cannot write the box files there ({exc.strerror or exc})") from None


def run(root, layout: str = "auto", splits: Optional[Sequence[str]] = None, detector: str = "haar",
        every: int = DEFAULT_EVERY, min_size: int = 32, detect_height: Optional[int] = -1, workers: int = 1,
        strict: bool = False, overwrite: bool = False, progress: Optional[bool] = None) -> List[SplitSummary]:
    """Detect faces in every split of a CAER / CAER-S tree; returns one summary per split."""
    root = Path(root)
    if not root.is_dir():
        raise FacesError(f"--data {root}: no such folder")
    if every < 1:
        raise FacesError(f"--every must be ≥ 1, got {every}")
    if min_size < 1:
        raise FacesError(f"--min-size must be ≥ 1 pixel, got {min_size}")
    if detect_height is not None and detect_height < -1:
        raise FacesError(f"--detect-height must be a height in pixels, 0 (full resolution) or -1 (the detector's "
                         f"default), got {detect_height}")
    check_writable(root)
    if layout == "auto":
        layout = detect_layout(root)
    if splits is None:
        splits = [s for s in (VIDEO_SPLITS if layout == "video" else IMAGE_SPLITS) if (root / s).is_dir()]
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        raise FacesError(f"no split folder {', '.join(str(root / s) for s in missing)}")
    # Built once here to fail early, in the parent, when its package is missing.
    det = make_detector(detector, min_size, detect_height)
    settings = {"layout": layout, "detector": detector, "min_size": int(min_size),
                "detect_height": int(det.detect_height or 0), "every": int(every) if layout == "video" else None}
    return [run_split(root, s, layout, settings, workers, strict, overwrite, progress) for s in splits]
