"""Annotate a corpus: every video / image under some folders → ``videos.parquet`` and ``clips.parquet``.

:func:`annotate` runs embedded (decode workers feeding one model process) or on Ray Data (``ray=True`` or an
address); ``python -m caer_fast.annotate`` is its command line. Results are written atomically per block of
videos and a rerun over the same ``out`` does only what is missing (see :mod:`.core`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from ._predictor import BoxIndex, Options, make_predictor
from .core import AnnotateError, Collector, Progress, Store, find_inputs, run_embedded
from .ray_run import run_ray

__all__ = ["AnnotateError", "Options", "Summary", "annotate", "find_inputs"]


@dataclass
class Summary:
    total: int  # inputs found
    skipped: int  # already in ``out`` from an earlier run
    ok: int  # annotated by this run
    errors: int  # error rows written by this run
    videos: Path  # OUT/videos.parquet
    clips: Path


def annotate(inputs: Iterable, out, opts: Options, ray: Union[bool, str, None] = None, workers: int = 2,
             progress: bool = False, part_videos: int = 16, model_actors: int = 1) -> Summary:
    """Annotate ``inputs`` (files, folders, manifests) into ``out``.

    ``ray``: None/False runs embedded; True starts a local Ray for the job; a string is a cluster address.
    ``workers``: decode processes (embedded) or decode actors (Ray); ``model_actors``: Ray model actors.
    """
    paths = find_inputs(inputs)
    if not paths:
        raise AnnotateError("no inputs: the folders hold no video or image files "
                            "(.avi, .mp4, … / .png, .jpg, …) and no files were listed")
    opts.boxes = None if opts.boxes is None else str(opts.boxes)
    if opts.boxes:
        BoxIndex(opts.boxes)  # a missing box file is the job's error, not 10,000 error rows
    # the model process's predictor (embedded); with Ray the driver only finishes rows with it
    predictor = make_predictor(opts, for_model=not ray)
    store = Store(out, predictor.classes, part_videos=part_videos)
    todo = [p for p in paths if p not in store.done]
    bar = Progress(len(paths), len(paths) - len(todo), progress)
    detector = f"boxes from {Path(opts.boxes).name}" if opts.boxes else (opts.detector or "none")
    collector = Collector(predictor, store, detector, on_video=bar.video)
    try:
        if todo and ray:
            run_ray(opts, todo, collector, address=ray if isinstance(ray, str) else None, workers=workers,
                    model_actors=model_actors)
        elif todo:
            run_embedded(opts, todo, collector, workers=workers)
    finally:
        bar.close()
        store.flush()  # what is finished survives an interruption
    videos, clips = store.merge()
    return Summary(len(paths), len(paths) - len(todo), bar.ok, bar.errors, videos, clips)
