"""Streaming inference: decode → sample at 10 fps → detect → ``face_context`` → model, in bounded chunks.

One pipeline for ``predict``, ``serve`` and the timeline. Memory is O(chunk): a decoded frame is dropped as
soon as it is sampled (or skipped), preprocessed frames as soon as the clips that need them are formed,
and the model sees ``chunk`` inputs at a time; only the per-clip results (a few hundred bytes each) grow
with the input's length.

- :func:`iter_chunks` (the producer: decoding, detection, preprocessing) yields :class:`Chunk` objects;
- :class:`Accumulator` (the consumer's side) turns each chunk's model outputs into :class:`ClipResult`
  objects and, at the end, the :class:`Prediction`;
- :func:`run_stream` runs the producer in a worker thread and the model in the calling thread, with a
  bounded queue between them, so the slower side sets the pace.

The clips, boxes and the overall answer (the mean of the clip probabilities) are those of the whole-input
path (:meth:`Predictor.prepare_frames` + :meth:`Predictor.finish`); ``tests/test_streaming.py`` checks it.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..constants import CLIP_FPS, TEST_CLIP_STRIDE

GROUP_PIXELS = 8 * 640 * 360  # raw frames preprocessed together (a huge frame goes alone)


@dataclass
class ClipResult:
    """One clip of the timeline."""

    clip: int
    first_frame: int  # decode-order index of its first and last sampled frame
    last_frame: int
    start_s: float  # sampled-frame position / 10 fps
    end_s: float
    emotion: str
    probabilities: Dict[str, float]
    fusion_weights: Dict[str, float]  # λ face / λ context
    face_found: bool

    def to_dict(self) -> dict:
        return {"clip": self.clip, "first_frame": self.first_frame, "last_frame": self.last_frame,
                "start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3), "emotion": self.emotion,
                "probabilities": {c: round(float(v), 6) for c, v in self.probabilities.items()},
                "fusion_weights": {k: round(float(v), 6) for k, v in self.fusion_weights.items()},
                "face_found": self.face_found}


@dataclass
class Prediction:
    """The predictor's answer. :meth:`to_dict` is the JSON ``predict --json`` and ``POST /predict`` give;
    ``result["key"]`` still works (it reads the dict) for code written against the dict."""

    kind: str  # "image" or "video"
    model: str  # "caer" or "caers"
    checkpoint_kind: str
    emotion: str
    confidence: float
    probabilities: Dict[str, float]
    fusion_weights: Dict[str, float]
    face_found: bool
    frames_with_face: int
    frames_used: int
    fps: Optional[float]
    detector: str
    face_boxes: List[list]  # [frame, x1, y1, x2, y2, score] for sampled frames with a face
    attention: dict  # {"clip", "shape", "values"} of the most confident clip
    clips: List[ClipResult]
    notes: List[str] = field(default_factory=list)  # truncation, size changes, no face …
    truncated: bool = False
    visual: Optional[dict] = None  # numpy arrays for pictures (``with_arrays``), not JSON

    @property
    def note(self) -> Optional[str]:
        return "; ".join(self.notes) or None

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "model": self.model, "checkpoint_kind": self.checkpoint_kind,
             "emotion": self.emotion, "confidence": round(float(self.confidence), 6),
             "probabilities": {c: round(float(v), 6) for c, v in self.probabilities.items()},
             "fusion_weights": {k: round(float(v), 6) for k, v in self.fusion_weights.items()},
             "face_found": self.face_found, "frames_with_face": self.frames_with_face,
             "frames_used": self.frames_used, "note": self.note, "truncated": self.truncated,
             "fps": self.fps, "detector": self.detector, "face_boxes": self.face_boxes,
             "attention": self.attention, "clips": [c.to_dict() for c in self.clips]}
        if self.visual is not None:
            d["_visual"] = self.visual
        return d

    # dict-style reading, for callers of the earlier dict result
    def __getitem__(self, key):
        if key == "_visual":
            if self.visual is None:
                raise KeyError(key)
            return self.visual
        return self.to_dict()[key]

    def __contains__(self, key) -> bool:
        return key in self.to_dict()

    def get(self, key, default=None):
        return self.to_dict().get(key, default)

    def keys(self):
        return self.to_dict().keys()


@dataclass
class Chunk:
    """Model inputs for a run of clips (video model) or sampled frames (image model)."""

    face: torch.Tensor
    context: torch.Tensor
    clips: List[Tuple[int, int]]  # (first, last) sampled positions of clips complete once these inputs ran
    first_input: int  # position of the first input (image model: sampled frame; video model: clip number)
    frames: List[tuple]  # (position, decode index, x1, y1, x2, y2, score) of newly sampled frames
    mid_frames: Dict[int, np.ndarray] = field(default_factory=dict)  # clip number → middle RGB frame
    last: bool = False  # no more chunks; ``total`` sampled frames
    total: int = 0

    @property
    def n(self) -> int:
        return int(self.face.shape[0])


class StageTimer:
    """Seconds spent per stage (thread-safe enough: each stage is timed by one thread)."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def add(self, stage: str, dt: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt


def iter_chunks(predictor, frames: Iterator, chunk_inputs: int, known_boxes=None, keep_frames: bool = False,
                timer: Optional[StageTimer] = None) -> Iterator[Chunk]:
    """Model inputs, ``chunk_inputs`` at a time, from sampled frames ``(k, index, rgb)`` (k = 0, 1, …).

    Detection every ``predictor.detect_every``-th sampled frame, the box held in between (the whole-input
    rule); clips of ``predictor.clip_frames`` every 8 sampled frames, or one padded clip for a short input.
    """
    from ..data.detectors import best_face
    from ..ops import face_context

    timer = timer or StageTimer()
    t = predictor.clip_frames
    stride = TEST_CLIP_STRIDE
    video_model = predictor.is_video_model
    det = predictor._detector() if known_boxes is None else None
    every = predictor.detect_every
    box, score = (0, 0, 0, 0), float("nan")

    window_f: List[torch.Tensor] = []  # preprocessed sampled frames from position `base` on
    window_c: List[torch.Tensor] = []
    window_rgb: List[Optional[np.ndarray]] = []
    base = 0
    next_start = 0  # next clip start (sampled position)
    n_clips = 0
    pend_rgb, pend_box, pend_px = [], [], 0  # raw frames waiting to be preprocessed together
    out_f, out_c, out_clips, out_frames, out_mid = [], [], [], [], {}
    first_input = 0
    s = 0  # sampled frames so far

    def flush_group():
        nonlocal pend_rgb, pend_box, pend_px
        if not pend_rgb:
            return
        t0 = time.perf_counter()
        fr = torch.from_numpy(np.stack(pend_rgb))
        face, context = face_context(fr, torch.tensor(pend_box, dtype=torch.int64), face_size=predictor.face_size,
                                     context_size=predictor.context_size, crop=predictor.crop)
        timer.add("preprocess", time.perf_counter() - t0)
        window_f.extend(face.unbind(0))
        window_c.extend(context.unbind(0))
        window_rgb.extend(pend_rgb if keep_frames else [None] * len(pend_rgb))
        if not video_model:  # each sampled frame is a model input
            out_f.extend(face.unbind(0))
            out_c.extend(context.unbind(0))
        pend_rgb, pend_box, pend_px = [], [], 0

    def form_clips(final: bool):
        """Clips whose frames are all preprocessed; drop frames no later clip needs."""
        nonlocal base, next_start, n_clips, window_f, window_c, window_rgb
        end = base + len(window_f)
        while next_start + t <= end:
            a = next_start
            out_clips.append((a, a + t - 1))
            if video_model:
                sl = slice(a - base, a - base + t)
                out_f.append(torch.stack(window_f[sl], 1))  # T×(3×h×w) → 3×T×h×w
                out_c.append(torch.stack(window_c[sl], 1))
            if keep_frames:
                out_mid[n_clips] = window_rgb[a - base + (t - 1) // 2]
            n_clips += 1
            next_start += stride
        if final and n_clips == 0 and end > 0:  # shorter than a clip: one clip padded with its last frame
            out_clips.append((0, end - 1))
            if video_model:
                pos = [min(j, end - 1) for j in range(t)]
                out_f.append(torch.stack([window_f[p] for p in pos], 1))
                out_c.append(torch.stack([window_c[p] for p in pos], 1))
            if keep_frames:
                out_mid[0] = window_rgb[(end - 1) // 2]
            n_clips = 1
        drop = max(0, next_start - base) if not final else 0
        if drop:
            window_f, window_c, window_rgb = window_f[drop:], window_c[drop:], window_rgb[drop:]
            base += drop

    def take(final: bool) -> Optional[Chunk]:
        nonlocal out_f, out_c, out_clips, out_frames, out_mid, first_input
        if not out_f and not final:
            return None
        n = min(len(out_f), chunk_inputs) if not final else len(out_f)
        face = torch.stack(out_f[:n]) if n else torch.empty(0)
        context = torch.stack(out_c[:n]) if n else torch.empty(0)
        last_input = first_input + n  # inputs first_input … last_input-1 go now
        if video_model:
            clips = [c for j, c in enumerate(out_clips) if j < n]
            out_clips = out_clips[n:]
        else:  # a clip of the image model is complete once its last frame has run
            clips = [c for c in out_clips if c[1] < last_input]
            out_clips = [c for c in out_clips if c[1] >= last_input]
        chunk = Chunk(face, context, clips, first_input, out_frames, out_mid, last=final, total=s)
        out_f, out_c = out_f[n:], out_c[n:]
        out_frames, out_mid = [], {}
        first_input = last_input
        return chunk

    it = iter(frames)
    while True:
        t0 = time.perf_counter()
        try:
            k, index, rgb = next(it)
        except StopIteration:
            timer.add("decode", time.perf_counter() - t0)
            break
        timer.add("decode", time.perf_counter() - t0)
        if known_boxes is not None:
            b = tuple(known_boxes.get(int(index), (0, 0, 0, 0)))
            box, score = b, (1.0 if b[2] > b[0] and b[3] > b[1] else float("nan"))
        elif det is not None and k % every == 0:
            t0 = time.perf_counter()
            best = best_face(det.detect(rgb))
            timer.add("detect", time.perf_counter() - t0)
            box, score = ((0, 0, 0, 0), float("nan")) if best is None else (tuple(int(v) for v in best[:4]), float(best[4]))
        out_frames.append((k, int(index), *box, score))
        pend_rgb.append(rgb)
        pend_box.append(box)
        pend_px += rgb.shape[0] * rgb.shape[1]
        s += 1
        if pend_px >= GROUP_PIXELS or len(pend_rgb) >= stride:
            flush_group()
            form_clips(False)
            while len(out_f) >= chunk_inputs:
                yield take(False)
    flush_group()
    form_clips(True)
    while len(out_f) > chunk_inputs:
        yield take(False)
    yield take(True)


class Accumulator:
    """Model outputs of chunks → clip results → the :class:`Prediction` (the whole-input rules)."""

    def __init__(self, predictor, kind: str = "video", fps: Optional[float] = None, keep_frames: bool = False):
        self.p = predictor
        self.kind, self.fps, self.keep_frames = kind, fps, keep_frames
        self.video_model = predictor.is_video_model
        self.frames: List[tuple] = []  # (k, index, x1, y1, x2, y2, score) per sampled frame
        self.clips: List[ClipResult] = []
        self.prob_sum: Optional[torch.Tensor] = None
        self.w_sum: Optional[torch.Tensor] = None
        self.best: Dict[int, tuple] = {}  # class → (prob, clip number, attention, middle frame, box)
        self._per_frame: Dict[int, tuple] = {}  # image model: position → (probs, weights, attention)
        self._mid: Dict[int, np.ndarray] = {}
        self.total = 0

    def _has_face(self, k: int) -> bool:
        f = self.frames[k]
        return f[4] > f[2] and f[5] > f[3]

    def add(self, chunk: Chunk, probs: torch.Tensor, attention: torch.Tensor, weights: torch.Tensor) -> List[ClipResult]:
        """The clips this chunk completes."""
        self.frames.extend(chunk.frames)
        self._mid.update(chunk.mid_frames)
        if chunk.last:
            self.total = chunk.total
        done = []
        if not self.video_model:
            for j in range(chunk.n):
                self._per_frame[chunk.first_input + j] = (probs[j], weights[j], attention[j])
        for j, (a, b) in enumerate(chunk.clips):
            if self.video_model:
                cp, cw, ca = probs[j], weights[j], attention[j]
            else:  # image model: average the clip's frames; the middle frame's attention
                rows = [self._per_frame[q] for q in range(a, b + 1)]
                cp = torch.stack([r[0] for r in rows]).mean(0)
                cw = torch.stack([r[1] for r in rows]).mean(0)
                ca = self._per_frame[(a + b) // 2][2]
            done.append(self._clip(a, b, cp, cw, ca))
        if not self.video_model and self._per_frame:  # frames no later clip needs
            keep_from = (len(self.clips) * TEST_CLIP_STRIDE) if not chunk.last else 0
            for q in [q for q in self._per_frame if q < keep_from]:
                del self._per_frame[q]
        return done

    def _clip(self, a: int, b: int, cp: torch.Tensor, cw: torch.Tensor, ca: torch.Tensor) -> ClipResult:
        k = len(self.clips)
        cp = cp.double()
        self.prob_sum = cp.clone() if self.prob_sum is None else self.prob_sum + cp
        self.w_sum = cw.double().clone() if self.w_sum is None else self.w_sum + cw.double()
        for c in range(cp.shape[0]):  # the most confident clip per class, for the attention picture
            if c not in self.best or float(cp[c]) > self.best[c][0]:
                mid = (a + b) // 2
                self.best[c] = (float(cp[c]), k, ca.clone(), self._mid.get(k), list(self.frames[mid][2:6]))
        self._mid.pop(k, None)
        classes = self.p.classes
        dt = 1.0 / CLIP_FPS
        r = ClipResult(k, self.frames[a][1], self.frames[b][1], a * dt, (b + 1) * dt, classes[int(cp.argmax())],
                       {c: float(v) for c, v in zip(classes, cp.tolist())},
                       {"face": float(cw[0]), "context": float(cw[1])},
                       any(self._has_face(q) for q in range(a, b + 1)))
        self.clips.append(r)
        return r

    def result(self, notes: Optional[List[str]] = None, truncated: bool = False) -> Prediction:
        if not self.clips:
            raise ValueError("no clips: the input gave no frames")
        overall = (self.prob_sum / len(self.clips)).float()
        w_mean = (self.w_sum / len(self.clips)).float()
        top = int(overall.argmax())
        _, best, att, frame, box = self.best[top]
        att = att[0]  # 1×(T'×)h×w → (T'×)h×w
        att2d = att.mean(0) if att.dim() == 3 else att
        has = [self._has_face(q) for q in range(len(self.frames))]
        boxes = [[int(f[1]), *map(int, f[2:6]), round(float(f[6]), 4)] for f, h in zip(self.frames, has) if h]
        notes = list(notes or [])
        if not any(has):
            notes.append("no face found: context-only prediction (face input is zeros)")
        classes = self.p.classes
        visual = None
        if self.keep_frames:
            visual = {"frame": frame, "box": box, "attention": att2d.numpy(), "context_size": self.p.context_size,
                      "crop": self.p.crop,
                      "clip_probs": np.array([[c.probabilities[n] for n in classes] for c in self.clips], np.float32),
                      "clip_times": [(c.start_s + c.end_s) / 2 for c in self.clips]}
        return Prediction(
            kind=self.kind, model=self.p.model_type, checkpoint_kind=self.p.source, emotion=classes[top],
            confidence=float(overall[top]), probabilities={c: float(v) for c, v in zip(classes, overall.tolist())},
            fusion_weights={"face": float(w_mean[0]), "context": float(w_mean[1])}, face_found=any(has),
            frames_with_face=int(sum(has)), frames_used=len(self.frames),
            fps=self.fps if self.kind == "video" else None, detector=self.p.detector_name, face_boxes=boxes,
            attention={"clip": best, "shape": list(att2d.shape),
                       "values": [[round(float(v), 5) for v in row] for row in att2d.tolist()]},
            clips=self.clips, notes=notes, truncated=truncated, visual=visual)


_DONE = object()


def run_stream(predictor, chunks: Iterator[Chunk], acc: Accumulator, on_clip: Optional[Callable] = None,
               depth: int = 2, timer: Optional[StageTimer] = None) -> None:
    """Produce ``chunks`` in a worker thread (decoding, detection, preprocessing), run the model on them
    here, feed ``acc``; ``on_clip(ClipResult)`` as each clip is ready. At most ``depth`` chunks wait
    between the two sides (memory bound). Errors of the worker are raised here."""
    timer = timer or StageTimer()
    q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    failure: List[BaseException] = []

    def produce():
        try:
            for ch in chunks:
                while not stop.is_set():
                    try:
                        q.put(ch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer
            failure.append(exc)
        finally:
            while True:
                try:
                    q.put(_DONE, timeout=0.1)
                    break
                except queue.Full:
                    if stop.is_set():
                        break

    worker = threading.Thread(target=produce, name="caer-stream-producer", daemon=True)
    worker.start()
    try:
        while True:
            t0 = time.perf_counter()
            ch = q.get()
            timer.add("wait_for_input", time.perf_counter() - t0)
            if ch is _DONE:
                break
            t0 = time.perf_counter()
            if ch.n:
                probs, att, w = predictor.forward(ch.face, ch.context)
            else:
                probs = att = w = torch.empty(0)
            timer.add("model", time.perf_counter() - t0)
            for clip in acc.add(ch, probs, att, w):
                if on_clip is not None:
                    on_clip(clip)
    finally:
        stop.set()
        while True:  # unblock the producer, then wait for it
            try:
                q.get_nowait()
            except queue.Empty:
                break
        worker.join(timeout=30)
        close = getattr(chunks, "close", None)
        if close is not None and not worker.is_alive():
            close()
    if failure:
        raise failure[0]
