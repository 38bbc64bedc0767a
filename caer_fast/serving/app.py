"""The HTTP inference server: FastAPI app with micro-batching.

- ``GET /health`` → model, limits and batching statistics.
- ``POST /predict`` (multipart field ``file``: a video or an image) → the :class:`~.inference.Predictor`
  result as JSON. Bad uploads get a 4xx JSON ``{"error": reason, "detail": …}``: missing field (400),
  empty (400), too big (413), not an image or video (415), undecodable (422), too long (413).

Each request is decoded and preprocessed in a worker thread; its model inputs then go onto an asyncio
queue. One batching task takes what is queued (up to ``max_batch`` inputs, waiting at most
``max_wait_ms`` after the first) and runs one model call for all of them, so concurrent requests share
a forward pass. Uploads are written to a private temp directory under a fixed name: nothing from the
request (file name, path) is ever used as a path.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..data.video import MediaDecodeError
from .inference import MediaTooLongError, Predictor


class _Job:
    __slots__ = ("face", "context", "future", "n")

    def __init__(self, face, context, future):
        self.face, self.context, self.future, self.n = face, context, future, int(face.shape[0])


class MicroBatcher:
    """Gathers queued model inputs into batches of at most ``max_batch`` (a bigger job runs alone)."""

    def __init__(self, predictor: Predictor, max_batch: int = 8, max_wait_ms: float = 10.0):
        self.predictor = predictor
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._carry: Optional[_Job] = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")  # one model call at a time
        self.calls = 0
        self.jobs = 0
        self.inputs = 0
        self.max_jobs_per_call = 0
        self.jobs_per_call = Counter()  # requests per model call → how many calls
        self.model_seconds = 0.0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._model_thread.shutdown(wait=True)

    async def submit(self, face: torch.Tensor, context: torch.Tensor):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(face, context, fut))
        return await fut

    async def _next_batch(self) -> List[_Job]:
        job = self._carry or await self.queue.get()
        self._carry = None
        batch, n = [job], job.n
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if n + nxt.n > self.max_batch:
                self._carry = nxt  # would overflow: first of the next batch
                break
            batch.append(nxt)
            n += nxt.n
        return batch

    def _forward(self, batch: List[_Job]):
        face = torch.cat([j.face for j in batch]) if len(batch) > 1 else batch[0].face
        context = torch.cat([j.context for j in batch]) if len(batch) > 1 else batch[0].context
        t = time.perf_counter()
        out = self.predictor.forward(face, context)
        return out, time.perf_counter() - t

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [j for j in batch if not j.future.cancelled()]  # client went away
            if not batch:
                continue
            try:
                (probs, att, weights), dt = await loop.run_in_executor(self._model_thread, self._forward, batch)
            except Exception as exc:  # a model failure fails these requests, not the server
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            self.calls += 1
            self.jobs += len(batch)
            self.inputs += sum(j.n for j in batch)
            self.max_jobs_per_call = max(self.max_jobs_per_call, len(batch))
            self.jobs_per_call[len(batch)] += 1
            self.model_seconds += dt
            i = 0
            for j in batch:
                if not j.future.done():
                    j.future.set_result((probs[i:i + j.n], att[i:i + j.n], weights[i:i + j.n]))
                i += j.n

    def stats(self) -> dict:
        return {"model_calls": self.calls, "requests": self.jobs, "inputs": self.inputs,
                "max_requests_per_call": self.max_jobs_per_call,
                "mean_requests_per_call": round(self.jobs / self.calls, 3) if self.calls else None,
                "requests_per_call_histogram": {str(k): v for k, v in sorted(self.jobs_per_call.items())},
                "model_seconds": round(self.model_seconds, 3), "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000.0}


class UploadTooLarge(Exception):
    pass


DRAIN_LIMIT = 256 * 2**20  # read (and drop) at most this much of a refused body before answering


async def _drain(receive, more: bool) -> None:
    """Read and drop the rest of a refused body, so the client sees our 413 instead of a reset socket."""
    dropped = 0
    while more and dropped < DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        more = message.get("more_body", False)


class BodyLimitMiddleware:
    """Refuses request bodies over ``limit`` bytes with 413, by Content-Length or while streaming,
    before the multipart parser spools them to disk."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _drain(receive, True)
            return await _send_json(send, 413, _too_big(int(length), self.limit))
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    await _drain(receive, message.get("more_body", False))
                    raise UploadTooLarge(_too_big(seen, self.limit)["detail"])
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except UploadTooLarge as exc:  # raised outside the /predict handler's own catch
            if not started:
                await _send_json(send, 413, {"error": "upload too large", "detail": str(exc)})


def _too_big(size: int, limit: int) -> dict:
    return {"error": "upload too large", "detail": f"{size} bytes or more; the limit is {limit} bytes "
                                                   f"({limit / 2**20:.0f} MiB)"}


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def create_app(predictor: Predictor, max_batch: int = 8, max_wait_ms: float = 10.0, max_upload_mb: float = 50.0,
               preprocess_threads: int = 2):
    """The ASGI app (FastAPI wrapped in the upload-size guard)."""
    from contextlib import asynccontextmanager

    batcher = MicroBatcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms)
    pool = ThreadPoolExecutor(max(1, preprocess_threads), thread_name_prefix="preprocess")
    limit = int(max_upload_mb * 2**20)
    tmp_root = tempfile.mkdtemp(prefix="caer_fast_serve_")  # mode 0700: private to this process's user
    counters = Counter()
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(tmp_root, ignore_errors=True)

    app = FastAPI(title="caer_fast", description="CAER-Net emotion recognition", lifespan=lifespan)

    def error(status: int, reason: str, detail: str = "") -> JSONResponse:
        counters[f"{status} {reason}"] += 1
        return JSONResponse({"error": reason, "detail": detail}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": predictor.model_type, "checkpoint_kind": predictor.source,
                "classes": predictor.classes, "clip_frames": predictor.clip_frames,
                "face_size": list(predictor.face_size), "context_size": list(predictor.context_size),
                "detector": predictor.detector_name, "device": str(predictor.device),
                "precision": "int8" if getattr(predictor, "int8_info", None) else "fp32",
                "engine": getattr(predictor, "engine_name", "eager"),
                "limits": {"max_upload_bytes": limit, "max_frames": predictor.max_frames},
                "uptime_s": round(time.time() - started, 1), "batching": batcher.stats(),
                "errors": dict(counters)}

    def _prepare(path: str):
        return predictor.prepare_file(path)

    @app.post("/predict")
    async def predict(request: Request):
        try:
            form = await request.form(max_files=1, max_fields=8)
        except UploadTooLarge as exc:  # a body without Content-Length that grew past the limit
            return error(413, "upload too large", str(exc))
        except Exception as exc:  # not multipart, malformed body
            return error(400, "bad multipart body", f"{type(exc).__name__}: {exc}")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            await form.close()
            return error(400, "missing file", "send the video or image as the multipart field 'file'")
        workdir = tempfile.mkdtemp(dir=tmp_root)
        path = os.path.join(workdir, "upload")  # fixed name: the client's file name is never a path
        try:
            size = 0
            with open(path, "wb") as f:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    f.write(chunk)
            await form.close()
            if size == 0:
                return error(400, "empty upload", "the file has 0 bytes")
            loop = asyncio.get_running_loop()
            try:
                prep = await loop.run_in_executor(pool, _prepare, path)
            except MediaTooLongError as exc:
                return error(413, "video too long", str(exc))
            except MediaDecodeError as exc:
                problem = exc.problem.replace(path, "upload")  # our temp path is nobody's business
                if problem.startswith("not a readable video container") or problem == "no video stream":
                    return error(415, "not an image or a video", problem)
                return error(422, "undecodable media", problem)
            except (ValueError, RuntimeError) as exc:  # odd frames (e.g. a 1-pixel video) the op refuses
                return error(422, "undecodable media", f"{type(exc).__name__}: {exc}")
            probs, att, weights = await batcher.submit(prep.face, prep.context)
            result = predictor.finish(prep, probs, att, weights)
            counters["200"] += 1
            return result
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    return BodyLimitMiddleware(app, limit)
