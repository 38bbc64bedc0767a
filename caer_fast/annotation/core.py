"""Inputs, the result store (atomic part files, resume, merge) and the embedded run.

The store: finished videos go to ``OUT/parts/<hash>.clips.parquet`` then ``OUT/parts/<hash>.videos.parquet``
(each written to a temporary name and renamed); a videos part is the commit mark of its block, so a block
killed between the two renames is simply done again. At the end the parts are merged, one row per path,
into ``OUT/videos.parquet`` / ``OUT/clips.parquet`` (+ ``.csv``), again through a rename. A rerun reads the
videos parts, skips every path they hold and does the rest.
"""
from __future__ import annotations

import csv
import hashlib
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from ._predictor import BoxIndex, Item, Options, error_row, finish, make_predictor, preprocess
from ._predictor import model as run_model

MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
MANIFEST_EXTENSIONS = (".txt", ".csv", ".lst", ".list")


class AnnotateError(RuntimeError):
    """A problem with the job itself (no inputs, an unreadable manifest, ``--out`` not writable)."""


# -- inputs -----------------------------------------------------------------------------------------
def _manifest(path: Path) -> List[Path]:
    """Paths listed in a text file (one a line) or a CSV (the ``path`` column, else the first); relative
    paths are relative to the manifest's folder; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotateError(f"{path}: cannot read the manifest ({exc})") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and r[0].strip() and not r[0].lstrip().startswith("#")]
    col = 0
    if rows and "path" in [c.strip().lower() for c in rows[0]]:
        col = [c.strip().lower() for c in rows[0]].index("path")
        rows = rows[1:]
    return [(path.parent / r[col].strip()) if not os.path.isabs(r[col].strip()) else Path(r[col].strip())
            for r in rows if len(r) > col]


def find_inputs(inputs: Iterable) -> List[str]:
    """Absolute paths (posix, sorted, unique) of the files to annotate: files as given (a bad one becomes an
    error row), folders searched recursively for the video and image types predict reads, manifests
    (``.txt`` / ``.csv`` / ``.lst``) read as lists of paths."""
    found: Dict[str, None] = {}
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.suffix.lower() in MEDIA_EXTENSIONS and f.is_file():
                    found[f.resolve().as_posix()] = None
        elif p.suffix.lower() in MANIFEST_EXTENSIONS and p.is_file():
            for f in _manifest(p):
                found[f.resolve().as_posix()] = None
        elif p.exists() or p.suffix.lower() in MEDIA_EXTENSIONS:
            found[p.resolve().as_posix()] = None  # a missing media file is reported as its own error row
        else:
            raise AnnotateError(f"{raw}: no such file or folder")
    return sorted(found)


# -- the store --------------------------------------------------------------------------------------
def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.csv  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise AnnotateError("writing Parquet needs pyarrow: pip install 'caer_fast[ray]' (or pyarrow)") from None
    return pyarrow


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _schemas(classes: Sequence[str]):
    pa = _pyarrow()
    probs = [(f"p_{c}", pa.float64()) for c in classes]
    videos = pa.schema([("path", pa.string()), ("status", pa.string()), ("error", pa.string()), ("kind", pa.string()),
                        ("emotion", pa.string()), ("confidence", pa.float64()), *probs, ("clips", pa.int32()),
                        ("seconds", pa.float64()), ("frames_used", pa.int32()), ("frames_with_face", pa.int32()),
                        ("face_found", pa.bool_()), ("note", pa.string()), ("detector", pa.string()),
                        ("engine", pa.string())])
    clips = pa.schema([("path", pa.string()), ("person", pa.int32()), ("clip", pa.int32()), ("start", pa.float64()),
                       ("end", pa.float64()), ("first_frame", pa.int64()), ("last_frame", pa.int64()),
                       ("emotion", pa.string()), *probs, ("lambda_face", pa.float64()),
                       ("lambda_context", pa.float64()), ("face_found", pa.bool_())])
    return videos, clips


class Store:
    """Finished rows → part files (every ``part_videos`` videos or ``part_seconds``) → merged outputs."""

    def __init__(self, out, classes: Sequence[str], part_videos: int = 16, part_seconds: float = 5.0):
        self.out = Path(out)
        self.parts = self.out / "parts"
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AnnotateError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
        self.video_schema, self.clip_schema = _schemas(classes)
        self.part_videos, self.part_seconds = max(1, part_videos), part_seconds
        self.rows: List[dict] = []
        self.clips: List[dict] = []
        self.last_flush = time.monotonic()
        self.written = 0  # parts written by this run
        self.done = self._done()

    def _video_parts(self) -> List[Path]:
        return sorted(self.parts.glob("*.videos.parquet"))

    def _done(self) -> set:
        import pyarrow.parquet as pq

        done = set()
        for f in self._video_parts():
            done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        return done

    def add(self, row: dict, clips: List[dict]) -> None:
        if row["path"] in self.done:  # a duplicate delivery (a retried task) is dropped: exactly once
            return
        self.done.add(row["path"])
        self.rows.append(row)
        self.clips.extend(clips)
        if len(self.rows) >= self.part_videos or time.monotonic() - self.last_flush >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = hashlib.sha1("\n".join(sorted(r["path"] for r in self.rows)).encode()).hexdigest()[:16]
        clips = pa.Table.from_pylist(self.clips, schema=self.clip_schema)
        videos = pa.Table.from_pylist(self.rows, schema=self.video_schema)
        _atomic(self.parts / f"{name}.clips.parquet", lambda t: pq.write_table(clips, t))
        _atomic(self.parts / f"{name}.videos.parquet", lambda t: pq.write_table(videos, t))  # the commit mark
        self.rows, self.clips = [], []
        self.written += 1

    def merge(self) -> Tuple[Path, Path]:
        """One row per path (the first part that holds it), sorted by path; rewritten only when this run
        wrote parts or an output is missing, so a rerun with nothing to do changes nothing."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        self.flush()
        outs = [self.out / n for n in ("videos.parquet", "clips.parquet", "videos.csv", "clips.csv")]
        if not self.written and all(o.exists() for o in outs):
            return outs[0], outs[1]
        videos, clips, seen = [], [], set()
        for f in self._video_parts():
            v = pq.read_table(f, schema=self.video_schema)
            new = [p for p in v.column("path").to_pylist() if p not in seen]
            if not new:
                continue
            keep = pa.array(new, pa.string())
            videos.append(v.filter(pc.is_in(v.column("path"), value_set=keep)))
            cf = f.with_name(f.name.replace(".videos.", ".clips."))
            c = pq.read_table(cf, schema=self.clip_schema)
            clips.append(c.filter(pc.is_in(c.column("path"), value_set=keep)))
            seen.update(new)
        v = pa.concat_tables(videos) if videos else self.video_schema.empty_table()
        c = pa.concat_tables(clips) if clips else self.clip_schema.empty_table()
        v = v.sort_by([("path", "ascending")])
        c = c.sort_by([("path", "ascending"), ("person", "ascending"), ("clip", "ascending")])
        _atomic(outs[0], lambda t: pq.write_table(v, t))
        _atomic(outs[1], lambda t: pq.write_table(c, t))
        _atomic(outs[2], lambda t: pcsv.write_csv(v, t))
        _atomic(outs[3], lambda t: pcsv.write_csv(c, t))
        return outs[0], outs[1]


# -- collecting outputs into rows -------------------------------------------------------------------
class Collector:
    """Items + model outputs, in any order, → one (video row, clip rows) per video, handed to ``store``
    once all its items are in (the last item says how many there are)."""

    def __init__(self, predictor, store: Store, detector: str, on_video: Optional[Callable[[dict], None]] = None):
        self.p, self.store, self.detector, self.on_video = predictor, store, detector, on_video
        self.pending: Dict[str, Dict[int, tuple]] = {}
        self.count: Dict[str, int] = {}

    def add(self, item: "Item", output, engine: str) -> None:
        if item.path in self.store.done:
            return
        got = self.pending.setdefault(item.path, {})
        got[item.seq] = (item, output)
        if item.last:
            self.count[item.path] = item.seq + 1
        n = self.count.get(item.path)
        if n is not None and len(got) >= n and all(k in got for k in range(n)):
            seq = [got[k] for k in range(n)]
            self.finish_rows(*finish(self.p, [s[0] for s in seq], [s[1] for s in seq], engine, self.detector))
            del self.pending[item.path], self.count[item.path]

    def error(self, path: str, reason: str) -> None:
        self.pending.pop(path, None)
        self.count.pop(path, None)
        if path not in self.store.done:
            self.finish_rows(error_row(self.p, path, reason), [])

    def finish_rows(self, row: dict, clips: List[dict]) -> None:
        self.store.add(row, clips)
        if self.on_video is not None:
            self.on_video(row)


class Progress:
    """tqdm bar: videos done (of all inputs), clips/s, ETA; on a terminal only."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.clips, self.t0 = 0, time.monotonic()
        self.ok = self.errors = 0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="video", file=sys.stderr, dynamic_ncols=True,
                            desc="annotate")

    def video(self, row: dict) -> None:
        self.clips += int(row["clips"] or 0)
        self.ok += row["status"] == "ok"
        self.errors += row["status"] != "ok"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(clips_s=f"{self.clips / max(time.monotonic() - self.t0, 1e-9):.1f}",
                                 errors=self.errors, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the embedded run -------------------------------------------------------------------------------
def _worker(opts: "Options", conn_in, conn_out) -> None:
    """A decode worker: paths in, items out, until it reads None."""
    torch.set_num_threads(1)  # the model process owns the cores' thread pools
    p = make_predictor(opts, for_model=False)
    boxes = BoxIndex(opts.boxes) if opts.boxes else None
    while True:
        path = conn_in.recv()
        if path is None:
            return
        for item in preprocess(p, path, boxes):
            conn_out.send(item)


class _Slot:
    """One decode worker process, its pipes and the paths assigned to it (the first is in progress)."""

    def __init__(self, ctx, opts):
        task_r, self.task_w = ctx.Pipe(duplex=False)
        self.out_r, out_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_worker, args=(opts, task_r, out_w), daemon=True)
        self.proc.start()
        task_r.close()
        out_w.close()
        self.assigned: deque = deque()

    def give(self, path: str) -> None:
        self.assigned.append(path)
        self.task_w.send(path)

    def stop(self) -> None:
        try:
            self.task_w.send(None)
        except OSError:
            pass


def run_embedded(opts: "Options", todo: Sequence[str], collector: Collector, workers: int = 2,
                 prefetch: int = 2) -> None:
    """Decode + detect in ``workers`` processes, the model here, batched across videos. A worker that
    dies takes only its current video with it: it is tried once more, then it is an error row."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    # fork: workers start in milliseconds, before this process has run any torch op (no thread pools yet)
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    queue = deque(todo)
    tries: Dict[str, int] = {}
    slots = [_Slot(ctx, opts) for _ in range(max(1, min(workers, len(todo))))]
    predictor = collector.p
    engine = getattr(predictor, "engine_name", "eager")
    batch: List["Item"] = []
    left = len(todo)

    def refill(s: _Slot) -> None:
        while queue and len(s.assigned) < prefetch:
            s.give(queue.popleft())

    def run_batch() -> None:
        nonlocal batch
        if not batch:
            return
        outs = run_model(predictor, [it.chunk for it in batch if it.chunk is not None])
        k = 0
        for it in batch:
            out = None
            if it.chunk is not None:
                out, k = outs[k], k + 1
            collector.add(it, out, engine)
        batch = []

    try:
        for s in slots:
            refill(s)
        while left:
            ready = wait([s.out_r for s in slots] + [s.proc.sentinel for s in slots], timeout=0.02 if batch else 1.0)
            got = False
            for s in list(slots):
                if s.out_r not in ready and s.proc.sentinel not in ready:
                    continue
                try:
                    while s.out_r.poll():
                        it = s.out_r.recv()
                        got = True
                        batch.append(it)
                        if it.last:
                            s.assigned.popleft()
                            left -= 1
                            refill(s)
                        if sum(b.inputs for b in batch) >= predictor.batch_size:
                            run_batch()
                except (EOFError, OSError):
                    pass
                if not s.proc.is_alive() and s.proc.exitcode is not None:
                    run_batch()  # what it sent before dying belongs to finished videos or is dropped below
                    slots.remove(s)
                    if s.assigned:
                        path = s.assigned.popleft()
                        tries[path] = tries.get(path, 0) + 1
                        if tries[path] >= 2:
                            collector.error(path, f"{path}: the decode worker died twice while reading it "
                                                  f"(exit code {s.proc.exitcode})")
                            left -= 1
                        else:
                            collector.pending.pop(path, None)
                            collector.count.pop(path, None)
                            queue.appendleft(path)
                        queue.extendleft(reversed(s.assigned))
                    if queue or any(x.assigned for x in slots) or not slots:
                        ns = _Slot(ctx, opts)
                        slots.append(ns)
                        refill(ns)
            if batch and (not got or sum(b.inputs for b in batch) >= predictor.batch_size):
                run_batch()
        run_batch()
    finally:
        for s in slots:
            s.stop()
        for s in slots:
            s.proc.join(timeout=5)
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join()
