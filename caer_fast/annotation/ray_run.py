"""The same job on Ray Data: read (the path list) → decode + detect (CPU actors) → model (actors, one GPU each
where the cluster has GPUs) → rows, written by the driver through the same :class:`~.core.Store`.

Ray restarts a dead actor (``max_restarts``) and reruns the batch it was working on (``max_task_retries``);
the driver keeps a video until all its chunks are in and the store drops a path it already holds, so each
video ends up in the output exactly once.
"""
from __future__ import annotations

import os
import pickle
from typing import Optional, Sequence

import numpy as np
import torch

from ._predictor import BoxIndex, Options, make_predictor, preprocess, strip
from ._predictor import model as run_model
from .core import AnnotateError, Collector

RETRIES = {"max_restarts": -1, "max_task_retries": -1}
VIDEOS_PER_BLOCK = 4


class _Decode:
    """Ray CPU stage: one path → its items (pickled)."""

    def __init__(self, opts: "Options"):
        torch.set_num_threads(1)
        self.p = make_predictor(opts, for_model=False)
        self.boxes = BoxIndex(opts.boxes) if opts.boxes else None

    def __call__(self, row: dict) -> list:
        return [{"path": it.path, "seq": it.seq, "payload": pickle.dumps(it, protocol=pickle.HIGHEST_PROTOCOL)}
                for it in preprocess(self.p, row["path"], self.boxes)]


class _Model:
    """Ray model stage: a batch of items, from any videos → the same rows with the outputs attached."""

    def __init__(self, opts: "Options"):
        self.p = make_predictor(opts, for_model=True)
        self.engine = getattr(self.p, "engine_name", "eager")

    def __call__(self, batch: dict) -> dict:
        items = [pickle.loads(b) for b in batch["payload"]]
        outs = iter(run_model(self.p, [it.chunk for it in items if it.chunk is not None]))
        payload = [pickle.dumps((strip(it), None if it.chunk is None else next(outs), self.engine),
                                protocol=pickle.HIGHEST_PROTOCOL) for it in items]
        return {"path": batch["path"], "seq": batch["seq"], "payload": np.array(payload, dtype=object)}


def run_ray(opts: "Options", todo: Sequence[str], collector: Collector, address: Optional[str] = None,
            workers: int = 2, model_actors: int = 1) -> None:
    """``address``: a running cluster (``ray start --head`` prints it; "auto" finds the local one), or None
    for a Ray started for this job on this machine (stopped at the end)."""
    if address and address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]"):
        # Ray swaps a loopback address for this machine's network address, where a head started with
        # --node-ip-address=127.0.0.1 does not listen; this (misnamed) switch keeps loopback as given.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise AnnotateError("--ray needs Ray Data: pip install 'caer_fast[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise AnnotateError(f"--ray: could not start or reach {where}: {exc}") from None
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts videos
        gpus = ray.cluster_resources().get("GPU", 0) if opts.device != "cpu" else 0
        per_chunk = collector.p.stream_chunk  # model inputs per chunk: a model batch is batch_size inputs
        # a few videos per block: fewer tasks to schedule than one per video, and a dead actor redoes few
        blocks = max(1, -(-len(todo) // VIDEOS_PER_BLOCK))
        ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
        # decode actors scale between 1 and ``workers`` with the CPUs the model actors leave free
        ds = ds.flat_map(_Decode, fn_constructor_kwargs={"opts": opts}, num_cpus=1,
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)), **RETRIES)
        ds = ds.map_batches(_Model, fn_constructor_kwargs={"opts": opts}, batch_format="numpy",
                            batch_size=max(1, opts.batch_size // per_chunk),
                            compute=ray.data.ActorPoolStrategy(size=max(1, model_actors)),
                            num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0, **RETRIES)
        for row in ds.iter_rows():
            item, output, engine = pickle.loads(row["payload"])
            collector.add(item, output, engine)
    finally:
        if started:
            ray.shutdown()
