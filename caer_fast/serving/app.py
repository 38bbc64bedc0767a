"""The HTTP inference server: FastAPI app with micro-batching.

- ``GET /health`` → model, limits and batching statistics.
- ``POST /predict`` (multipart field ``file``: a video or an image) → the :class:`~.inference.Predictor`
  result as JSON (``?timeline=1`` adds the per-clip ``timeline`` rows). Bad uploads get a 4xx JSON
  ``{"error": reason, "detail": …}``: missing field (400), empty (400), too big (413), not an image or
  video (415), a known format that does not decode (422), too long / frames too large / over the
  decoded-pixel or memory budget (413), server busy (503), slow client (408).

Images and videos take one path, ``predict``'s (:mod:`.stream`; an image is a one-frame stream), and give
the same keys (``Prediction.to_dict()``): a worker thread decodes and preprocesses one chunk of inputs at a
time while the previous chunk waits for the model; each chunk goes onto an asyncio queue. One batching task takes what is queued (up to ``max_batch`` inputs, waiting at most
``max_wait_ms`` after the first) and runs one model call for all of them, so concurrent requests share
a forward pass. Memory: a request reserves an estimate of its peak against ``memory_budget`` before it
decodes anything: the decoder's part by the largest frame the server accepts (a stream may switch to larger
frames after its header; FFmpeg refuses frames over that size before allocating them), the rest by the
header's frame size (every frame is rescaled to it). Uploads are written to a private temp
directory under a fixed name: nothing from the request (file name, path) is ever used as a path.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, List, Optional

import torch

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..data.video import DECODER_MAX_FRAMES, MediaDecodeError, MediaTooLargeError, image_size, sniff_media
from .engines.auto import BackgroundAuto
from .inference import Predictor, is_image_file
from .stream import concat_chunks, parse_people, split_outputs
from .timeline import timeline_rows


def machine_memory_bytes() -> int:
    """RAM this process may use: the cgroup limit when there is one, else MemTotal."""
    total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        pass
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = open(p).read().strip()
            if v.isdigit() and (total is None or int(v) < total):
                total = int(v)
        except OSError:
            pass
    return total or 8 * 2**30


def default_memory_budget_mb() -> int:
    """Half the machine's memory, at least 1 GiB: the server's default resident-memory budget."""
    return max(1024, machine_memory_bytes() // 2 // 2**20)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# Peak bytes one streaming request adds: the decoder's frame pool and threads (DECODER_MAX_FRAMES YUV frames
# at 1.5 B/px, at the largest frame size the decoder accepts), RGB frames of one preprocessing group (3 B/px,
# 8 frames at most) and the float copy face_context makes of them (12 B/px) at the header's size; plus a fixed
# part for the chunk's clips and the model's activations at the largest batch. tests/test_serve_limits.py
# measures RSS under the budget, also for a stream whose frames grow after the header.
STREAM_BYTES_PER_PIXEL = DECODER_MAX_FRAMES * 1.5 + 8 * 3 + 8 * 12
STREAM_FIXED_BYTES = 96 * 2**20


def request_memory_estimate(width: int, height: int, model_batch_bytes: int = 0,
                            max_frame_pixels: Optional[int] = None, people: int = 1) -> int:
    """Peak bytes of one streamed video whose header says ``width``×``height``; ``max_frame_pixels``: the
    largest frame the decoder accepts (frames may grow after the header: the decoder is sized for that);
    ``people``: the most people followed (each adds a float copy of the group and a chunk of clips)."""
    known = int(width) > 0 and int(height) > 0
    px = int(width) * int(height) if known else int(max_frame_pixels or 1)
    decoder_px = max(px, int(max_frame_pixels or 0))
    group = max(1, min(8, (8 * 640 * 360) // px))  # frames preprocessed together (stream.GROUP_PIXELS)
    people = max(1, int(people))
    return int(decoder_px * DECODER_MAX_FRAMES * 1.5 + px * (group * 3 + people * group * 12)
               + people * STREAM_FIXED_BYTES + model_batch_bytes)


# An image's peak: PIL's decoded copy and our RGB array (3-4 B/px each) and the float copies preprocessing
# makes (measured: 13 B/px over the process's base for a 4096×4096 PNG).
IMAGE_BYTES_PER_PIXEL = 16


def image_memory_estimate(path) -> int:
    """Peak bytes of one image upload, from its header (the fixed part alone when PIL cannot tell its size)."""
    size = image_size(path)
    return int((size[0] * size[1] if size else 0) * IMAGE_BYTES_PER_PIXEL + STREAM_FIXED_BYTES)


def trim_heap() -> None:
    """Give freed heap back to the system (glibc keeps a decoder's large frames in its arenas otherwise, and
    resident memory stays high after the request)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class MemoryBudget:
    """Admission control: requests reserve their estimated peak; one that does not fit waits (up to
    ``wait_s``) for others to finish, one that could never fit is refused. Waiters are served in arrival
    order: a big reservation (a large video, ``auto``'s measurement) is not overtaken for ever by a stream
    of small ones that each fit beside the others."""

    def __init__(self, budget_bytes: int, base_bytes: int, wait_s: float = 30.0):
        self.budget, self.base, self.wait_s = int(budget_bytes), int(base_bytes), float(wait_s)
        self.reserved = 0
        self.peak_reserved = 0
        self._cond: Optional[asyncio.Condition] = None
        self._line: Deque[object] = deque()  # the waiting acquirers' tickets, first come first

    @property
    def available(self) -> int:
        return self.budget - self.base

    async def acquire(self, n: int, wait_s: Optional[float] = -1.0) -> None:
        """Reserve ``n`` bytes, waiting up to ``wait_s`` (default: the budget's; None: as long as it takes)."""
        wait_s = self.wait_s if wait_s is not None and wait_s < 0 else wait_s
        if n > self.available:
            raise MemoryError(f"needs about {n / 2**20:.0f} MiB, more than the server's memory budget allows "
                              f"({self.available / 2**20:.0f} MiB above its {self.base / 2**20:.0f} MiB at rest)")
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            ticket = object()
            self._line.append(ticket)
            try:
                await asyncio.wait_for(self._cond.wait_for(
                    lambda: self._line[0] is ticket and self.reserved + n <= self.available), wait_s)
            except asyncio.TimeoutError:
                raise TimeoutError("server busy: its memory budget is taken by other requests") from None
            finally:  # served, timed out or cancelled: out of the line, and the next one may fit now
                self._line.remove(ticket)
                self._cond.notify_all()
            self.reserved += n
            self.peak_reserved = max(self.peak_reserved, self.reserved)

    async def release(self, n: int) -> None:
        async with self._cond:
            self.reserved -= n
            self._cond.notify_all()


def reserve_from_thread(memory: MemoryBudget, loop, pending: set) -> Callable[[int], Callable[[], None]]:
    """``admit(n)`` for a thread that is not the server's loop (``auto``'s background measurement): reserves
    ``n`` bytes in ``memory`` (waiting as long as requests hold them; ``MemoryError`` when they never fit)
    and returns the release. ``pending``: the waits in flight, cancelled when the server stops."""

    def admit(n: int) -> Callable[[], None]:
        fut = asyncio.run_coroutine_threadsafe(memory.acquire(n, wait_s=None), loop)
        pending.add(fut)
        try:
            fut.result()
        finally:
            pending.discard(fut)

        def release() -> None:
            if loop.is_closed() or not loop.is_running():
                return  # the server has stopped: nothing to give back to
            asyncio.run_coroutine_threadsafe(memory.release(n), loop).result(timeout=30)
            trim_heap()
            memory.base = max(memory.base, rss_bytes())  # the chosen engine now lives here at rest
        return release
    return admit


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


class BodyTimeout(Exception):
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

    def __init__(self, app, limit: int, counters: Optional[Counter] = None, body_timeout_s: Optional[float] = None):
        self.app, self.limit = app, int(limit)
        self.counters = counters if counters is not None else Counter()
        self.body_timeout = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            self.counters["413 upload too large"] += 1
            try:
                await asyncio.wait_for(_drain(receive, True), self.body_timeout)
            except asyncio.TimeoutError:
                pass
            return await _send_json(send, 413, _too_big(int(length), self.limit))
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(f"no body bytes for {self.body_timeout:g} s") from None
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
                self.counters["413 upload too large"] += 1
                await _send_json(send, 413, {"error": "upload too large", "detail": str(exc)})
        except BodyTimeout as exc:
            if not started:
                self.counters["408 request body too slow"] += 1
                await _send_json(send, 408, {"error": "request body too slow", "detail": str(exc)})


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
               preprocess_threads: int = 2, memory_budget_mb: Optional[float] = None, body_timeout_s: float = 30.0,
               counters: Optional[Counter] = None, max_people: int = 8):
    """The ASGI app (FastAPI wrapped in the upload-size and body-timeout guard).

    ``max_people``: the most people one request follows (``POST /predict?people=all`` follows that many,
    ``?people=N`` at most N of them); a request's memory reservation scales with it.

    ``memory_budget_mb``: resident memory the server keeps under (default: half the machine's memory);
    ``counters``: shared with the connection guard of :func:`run_server` so /health shows its refusals."""
    from contextlib import asynccontextmanager

    batcher = MicroBatcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms)
    max_people = max(1, int(max_people))
    pool = ThreadPoolExecutor(max(1, preprocess_threads), thread_name_prefix="preprocess")
    limit = int(max_upload_mb * 2**20)
    tmp_root = tempfile.mkdtemp(prefix="caer_fast_serve_")  # mode 0700: private to this process's user
    counters = counters if counters is not None else Counter()
    started = time.time()
    budget_mb = float(memory_budget_mb or default_memory_budget_mb())
    # the model's activations at the largest batch are in the fixed part of every estimate: one batch runs at a time
    memory = MemoryBudget(int(budget_mb * 2**20), rss_bytes())
    background = predictor.engine if isinstance(predictor.engine, BackgroundAuto) else None
    measuring: set = set()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        memory.base = max(memory.base, rss_bytes())  # after imports and warm-up
        if background is not None:  # auto measuring in the background reserves its peak like a request
            background.admit = reserve_from_thread(memory, asyncio.get_running_loop(), measuring)
        yield
        for fut in list(measuring):
            fut.cancel()
        await batcher.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(tmp_root, ignore_errors=True)

    app = FastAPI(title="caer_fast", description="CAER-Net emotion recognition", lifespan=lifespan)

    def error(status: int, reason: str, detail: str = "") -> JSONResponse:
        counters[f"{status} {reason}"] += 1
        return JSONResponse({"error": reason, "detail": detail}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": predictor.model_type, "checkpoint_kind": predictor.checkpoint_kind,
                "classes": predictor.classes, "clip_frames": predictor.clip_frames,
                "face_size": list(predictor.face_size), "context_size": list(predictor.context_size),
                "detector": predictor.detector_name, "device": str(predictor.device),
                "precision": "int8" if predictor.engine_name == "int8" else "fp32",
                "engine": predictor.engine_name,
                **({"engine_measurement": background.state} if background is not None else {}),
                "limits": {"max_upload_bytes": limit, "max_frames": predictor.max_frames,
                           "max_frame_pixels": predictor.max_frame_pixels, "max_pixels": predictor.max_pixels,
                           "memory_budget_bytes": memory.budget, "body_timeout_s": body_timeout_s,
                           "max_people": max_people},
                "memory": {"rss_bytes": rss_bytes(), "base_bytes": memory.base, "reserved_bytes": memory.reserved,
                           "peak_reserved_bytes": memory.peak_reserved},
                "uptime_s": round(time.time() - started, 1), "batching": batcher.stats(),
                "errors": dict(counters)}

    def media_error(exc: Exception, path: str) -> JSONResponse:
        if isinstance(exc, MediaTooLargeError):
            problem = exc.problem.replace(path, "upload")
            return error(413, "video too long" if "too long" in problem else "media too large", problem)
        if isinstance(exc, MediaDecodeError):
            problem = exc.problem.replace(path, "upload")  # our temp path is nobody's business
            try:
                with open(path, "rb") as f:
                    known = sniff_media(f.read(512))
            except OSError:
                known = None
            if known is None and (problem.startswith("not a readable video container") or problem == "no video stream"):
                return error(415, "not an image or a video", problem)
            # a known format that does not decode: truncated before its first frame, or corrupt
            return error(422, "undecodable media", problem)
        return error(422, "undecodable media", f"{type(exc).__name__}: {exc}")  # odd frames the op refuses

    async def predict_source(path: str, loop, people: Optional[int] = -1) -> dict:
        """``people``: -1 main (one face per frame), else at most that many people (see parse_people)."""
        # an image is decoded whole when opened: reserve for it (from its header) before that
        image = await loop.run_in_executor(pool, is_image_file, path)
        estimate = await loop.run_in_executor(pool, image_memory_estimate, path) if image else 0
        if estimate:
            await memory.acquire(estimate)
        pre = estimate  # released below only once it is held
        source = gen = fut = None
        need = 0
        try:
            source = await loop.run_in_executor(pool, predictor.open, path)  # header checks: size, frames
            cap = 1 if people == -1 else min(max_people, people or max_people)
            if source.kind == "video":
                estimate = request_memory_estimate(source.width, source.height,
                                                   max_frame_pixels=predictor.max_frame_pixels, people=cap)
                await memory.acquire(estimate)
                need = estimate  # released below only once it is held
            preprocessor = predictor.preprocessor(chunk_inputs=batcher.max_batch)
            if people == -1:
                acc = predictor.accumulator(source)
                gen = preprocessor.chunks(source.frames)
            else:
                acc = predictor.accumulator(source, people=cap)
                gen = preprocessor.people_chunks(source.frames, max_people=cap)
            fut = loop.run_in_executor(pool, next, gen, None)
            while True:
                item = await fut
                fut = None
                if item is None:
                    break
                step = item if isinstance(item, list) else [item]
                if not all(c.last for c in step) or people != -1:  # decode on while this waits for the model
                    fut = loop.run_in_executor(pool, next, gen, None)
                face, context = concat_chunks(step)
                # every person's inputs of the step in one job: one model call (a big job runs alone)
                outs = split_outputs(step, *(await batcher.submit(face, context))) if face is not None \
                    else split_outputs(step, None, None, None)
                for c, (probs, att, weights) in zip(step, outs):
                    acc.add(c, probs, att, weights)
                if people == -1 and step[-1].last:
                    break
            return acc.result(notes=source.notes, truncated=source.truncated).to_dict()
        finally:
            if fut is not None:  # a chunk still decoding: let it end before the decoder is closed
                await asyncio.wait([fut])
                fut = None  # its exception's traceback holds this frame: no cycle keeping decoded frames alive
            if gen is not None:
                gen.close()
            if source is not None:
                source.close()
            source = gen = None
            if need:
                await memory.release(need)
            if pre:
                await memory.release(pre)
            trim_heap()

    @app.post("/predict")
    async def predict(request: Request):
        timeline = request.query_params.get("timeline", "").lower() in ("1", "true", "yes")
        try:
            people = parse_people(request.query_params.get("people", "main").strip().lower())
        except ValueError as exc:
            return error(400, "bad people", str(exc))
        try:
            form = await request.form(max_files=1, max_fields=8)
        except UploadTooLarge as exc:  # a body without Content-Length that grew past the limit
            return error(413, "upload too large", str(exc))
        except BodyTimeout as exc:
            return error(408, "request body too slow", str(exc))
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
                result = await predict_source(path, loop, people)
            except MemoryError as exc:
                return error(413, "media too large", str(exc))
            except TimeoutError as exc:
                counters["503 busy"] += 1
                return JSONResponse({"error": "busy", "detail": str(exc)}, status_code=503,
                                    headers={"Retry-After": "5"})
            except (MediaDecodeError, ValueError, RuntimeError) as exc:
                return media_error(exc, path)
            if timeline:
                result["timeline"] = timeline_rows(result)
            counters["200"] += 1
            return result
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    return BodyLimitMiddleware(app, limit, counters=counters, body_timeout_s=body_timeout_s)


def guarded_protocol(header_timeout_s: float, counters: Counter):
    """uvicorn's h11 protocol with a deadline for each request's headers (a client that trickles them is
    answered 408 and dropped), its refusals counted instead of logged one line each."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = b'{"error": "request headers too slow", "detail": "the headers did not arrive in time"}'
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None
        _waiting_headers = False
        _got_bytes = False

        def _arm(self) -> None:
            self._disarm()
            self._waiting_headers = True
            self._got_bytes = False
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._waiting_headers and not self.transport.is_closing():
                if self._got_bytes:  # a request started and stalled; an idle keep-alive is just closed
                    counters["408 header timeout"] += 1
                    self.transport.write(answer)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            self._got_bytes = True
            super().data_received(data)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers are complete
                self._waiting_headers = False
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


class _CountRefusals:
    """A logging filter: uvicorn's one-line-per-request warnings for refused connections become a count."""

    def __init__(self, counters: Counter):
        self.counters = counters

    def filter(self, record) -> bool:
        msg = record.getMessage()
        if msg.startswith("Exceeded concurrency limit"):
            self.counters["503 too many connections"] += 1
            return False
        return True


def run_server(predictor: Predictor, host: str, port: int, log_level: str = "warning", max_connections: int = 64,
               header_timeout_s: float = 10.0, keep_alive_s: float = 5.0, **app_kwargs) -> None:
    """Serve with uvicorn: connection limit (503 beyond it), header / body / keep-alive timeouts."""
    import logging

    import uvicorn

    counters = Counter()
    app = create_app(predictor, counters=counters, **app_kwargs)
    logging.getLogger("uvicorn.error").addFilter(_CountRefusals(counters))
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                http=guarded_protocol(header_timeout_s, counters), limit_concurrency=max_connections,
                timeout_keep_alive=keep_alive_s, backlog=max(128, 2 * max_connections))
