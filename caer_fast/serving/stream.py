"""Streaming inference: sampled frames → detect → ``face_context`` → clips → model → one result, in bounded chunks.

The one inference path of ``predict``, ``serve`` and the timeline, for every input: a video streams from
its decoder, an image is a one-frame stream, in-memory frames are a stream over an array. Memory is
O(chunk): a decoded frame is dropped as soon as it is sampled (or skipped), preprocessed frames as soon as
the clips that need them are formed, and the model sees ``chunk`` inputs at a time; only the per-clip
results (a few hundred bytes each) grow with the input's length.

- :class:`Preprocessor` (the producer: detection, preprocessing, :class:`~.clips.ClipSampler`) yields
  :class:`~.clips.Chunk` objects; it needs no model, so it can run in another thread or process;
- :class:`Accumulator` (the consumer's side) turns each chunk's model outputs into :class:`ClipResult`
  objects (:class:`~.clips.ClipPooler`) and, at the end, the :class:`Prediction`: the one result builder;
- :func:`run_stream` runs the producer in a worker thread and the model in the calling thread, with a
  bounded queue between them, so the slower side sets the pace (the server batches chunks of concurrent
  requests instead: :class:`~.app.MicroBatcher`).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..constants import CLIP_FPS, TEST_CLIP_STRIDE
from ..data.detectors import best_face, make_detector, resolve_detector
from ..data.tracking import PersonTracker, person_inputs
from ..ops import face_context
from .clips import Chunk, ClipPooler, ClipSampler

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
    person: int = 0  # whose clip (multi-person: the tracker's id; not in to_dict, the people list says it)

    def to_dict(self) -> dict:
        return {"clip": self.clip, "first_frame": self.first_frame, "last_frame": self.last_frame,
                "start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3), "emotion": self.emotion,
                "probabilities": {c: round(float(v), 6) for c, v in self.probabilities.items()},
                "fusion_weights": {k: round(float(v), 6) for k, v in self.fusion_weights.items()},
                "face_found": self.face_found}


#: the keys of every answer (``Prediction.to_dict()``), image or video, CLI or server
RESULT_KEYS = ("kind", "model", "checkpoint_kind", "emotion", "confidence", "probabilities", "fusion_weights",
               "face_found", "frames_with_face", "frames_used", "note", "truncated", "fps", "detector", "engine",
               "face_boxes", "attention", "clips", "people")

#: the keys of each entry of an answer's ``people`` list
PERSON_KEYS = ("id", "start", "end", "emotion", "confidence", "probabilities", "clips", "fusion_weights",
               "face_boxes")

def parse_people(value) -> Optional[int]:
    """``people`` ("main", "all", or N ≥ 1, as str or int) → -1 for main, None for all, N for at most N
    (the largest faces first). A bad value raises ValueError naming it."""
    if value is None or value == "main":
        return -1
    if value == "all":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"people must be main, all or a number >= 1, got {value!r}") from None
    if n < 1 or str(value).strip() != str(n):
        raise ValueError(f"people must be main, all or a number >= 1, got {value!r}")
    return n


@dataclass
class PersonResult:
    """One person of an answer: their span (seconds), the mean of their clips, their clips."""

    id: int
    start: float
    end: float
    emotion: str
    confidence: float
    probabilities: Dict[str, float]
    fusion_weights: Dict[str, float]
    clips: List[ClipResult]
    face_boxes: List[list] = field(default_factory=list)  # [frame, x1, y1, x2, y2, score] where they are seen

    def to_dict(self) -> dict:
        return {"id": self.id, "start": round(self.start, 3), "end": round(self.end, 3), "emotion": self.emotion,
                "confidence": round(float(self.confidence), 6),
                "probabilities": {c: round(float(v), 6) for c, v in self.probabilities.items()},
                "clips": [c.to_dict() for c in self.clips],
                "fusion_weights": {k: round(float(v), 6) for k, v in self.fusion_weights.items()},
                "face_boxes": self.face_boxes}


@dataclass
class Prediction:
    """The predictor's answer, for images and videos alike. :meth:`to_dict` is the JSON ``predict --json``
    and ``POST /predict`` give (the same keys for every input: :data:`RESULT_KEYS`); ``result["key"]``
    still works (it reads the dict) for code written against the dict."""

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
    engine: str = "eager"  # what ran the model (Predictor.engine_name)
    visual: Optional[dict] = None  # numpy arrays for pictures (``with_arrays``), not JSON
    people: List[PersonResult] = field(default_factory=list)  # main: one entry; all/N: every tracked person

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
             "fps": self.fps, "detector": self.detector, "engine": self.engine, "face_boxes": self.face_boxes,
             "attention": self.attention, "clips": [c.to_dict() for c in self.clips],
             "people": [p.to_dict() for p in self.people]}
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


class StageTimer:
    """Seconds spent per stage (thread-safe enough: each stage is timed by one thread)."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def add(self, stage: str, dt: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt


def timed(items: Iterable, timer: StageTimer, stage: str) -> Iterator:
    """``items``, with the time spent producing each (decoding, for frames) added to ``timer``'s ``stage``."""
    it = iter(items)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            timer.add(stage, time.perf_counter() - t0)
            return
        timer.add(stage, time.perf_counter() - t0)
        yield item


@dataclass
class Preprocessor:
    """Sampled frames → detection → :func:`~caer_fast.ops.face_context` → :class:`~.clips.ClipSampler` →
    :class:`~.clips.Chunk` objects. Needs no model: plain settings (picklable when ``detector`` is a name
    or None), so it can run in another thread or process than the model. :meth:`Predictor.preprocessor
    <caer_fast.serving.inference.Predictor.preprocessor>` makes the one that matches a checkpoint.

    Detection runs on every ``detect_every``-th sampled frame, the box held in between.
    """

    face_size: Tuple[int, int]
    context_size: Tuple[int, int]
    crop: Optional[Tuple[int, int, int, int]]  # (top, left, h, w) of the context crop, or None
    clip_frames: int
    video_model: bool
    detector: object = "haar"  # a name (caer_fast.data.detectors), an object with detect(rgb), or None
    detect_every: int = 4
    chunk_inputs: int = 4  # model inputs per chunk

    def __post_init__(self):
        self._local = threading.local()  # one detector per thread: OpenCV cascades are not shared safely

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def get_detector(self, people: bool = False):
        """This thread's detector; ``people``: for :meth:`people_chunks` (``auto`` is MTCNN there, Haar for
        :meth:`chunks`: :func:`~caer_fast.data.detectors.resolve_detector`)."""
        spec = self.detector
        if spec is None or not isinstance(spec, str):
            return spec
        name = resolve_detector(spec, people)
        cache = self._local.__dict__.setdefault("detectors", {})
        det = cache.get(name)
        if det is None:
            det = cache[name] = make_detector(spec, people=people)
        return det

    def detector_label(self, people: bool = False) -> str:
        """The name of the detector :meth:`chunks` (``people`` False) or :meth:`people_chunks` runs."""
        det = self.get_detector(people)
        return "none" if det is None else getattr(det, "name", None) or type(det).__name__

    def chunks(self, frames: Iterable, known_boxes=None, keep_frames: bool = False,
               timer: Optional[StageTimer] = None, person: int = 0) -> Iterator[Chunk]:
        """Chunks of at most ``chunk_inputs`` model inputs from sampled frames ``(k, decode index, rgb)``
        (k = 0, 1, …); the last one has ``last=True`` (possibly with no inputs). ``known_boxes``
        ({decode index: xyxy}; frames without an entry have no face) replaces the detector."""

        timer = timer or StageTimer()
        sampler = ClipSampler(self.clip_frames, self.video_model, keep_frames=keep_frames, person=person)
        det = self.get_detector() if known_boxes is None else None
        every = max(1, int(self.detect_every))
        box, score = (0, 0, 0, 0), float("nan")
        pend_rgb, pend_box, pend_meta, pend_px = [], [], [], 0  # raw frames waiting to be preprocessed together

        def flush():
            nonlocal pend_rgb, pend_box, pend_meta, pend_px
            if not pend_rgb:
                return
            t0 = time.perf_counter()
            face, context = face_context(torch.from_numpy(np.stack(pend_rgb)), torch.tensor(pend_box, dtype=torch.int64),
                                         face_size=self.face_size, context_size=self.context_size, crop=self.crop)
            timer.add("preprocess", time.perf_counter() - t0)
            sampler.add(face, context, pend_meta, pend_rgb)
            pend_rgb, pend_box, pend_meta, pend_px = [], [], [], 0

        for k, index, rgb in timed(frames, timer, "decode"):
            if known_boxes is not None:
                b = tuple(int(v) for v in known_boxes.get(int(index), (0, 0, 0, 0)))
                box, score = b, (1.0 if b[2] > b[0] and b[3] > b[1] else float("nan"))
            elif det is not None and k % every == 0:
                t0 = time.perf_counter()
                best = best_face(det.detect(rgb))
                timer.add("detect", time.perf_counter() - t0)
                box, score = ((0, 0, 0, 0), float("nan")) if best is None else (tuple(int(v) for v in best[:4]),
                                                                                 float(best[4]))
            pend_meta.append((k, int(index), *box, score))
            pend_rgb.append(rgb)
            pend_box.append(box)
            pend_px += rgb.shape[0] * rgb.shape[1]
            if pend_px >= GROUP_PIXELS or len(pend_rgb) >= TEST_CLIP_STRIDE:
                flush()
                while sampler.pending >= self.chunk_inputs:
                    yield sampler.take(self.chunk_inputs)
        flush()
        sampler.close()
        while sampler.pending > self.chunk_inputs:
            yield sampler.take(self.chunk_inputs)
        yield sampler.take()


    def people_chunks(self, frames: Iterable, max_people: Optional[int] = None, keep_frames: bool = False,
                      timer: Optional[StageTimer] = None, max_miss_s: float = 2.0) -> Iterator[List[Chunk]]:
        """Every person's chunks from sampled frames ``(k, decode index, rgb)``, one list per step (all the
        people's inputs of that step: run them in one model call, e.g. by :func:`run_stream`).

        The detector's faces (all of them) go to :class:`~caer_fast.data.tracking.PersonTracker` every
        ``detect_every`` sampled frames (``max_people``: the largest that many, None: all); each person
        gets their own :class:`~.clips.ClipSampler` from their first frame on, fed with their face and the
        context with only their face masked (:func:`~caer_fast.data.tracking.person_inputs`: one
        ``face_context`` call for everybody), an empty box on frames where they are not seen, until they
        are gone for ``max_miss_s`` (the tracker then forgets them) or the input ends; frames after the
        last one they are seen on are dropped (their clips end with them). Until the first
        person appears, person -1 gets the frames with no face (the context-only answer if nobody is
        found). Memory: O(chunk × people)."""

        timer = timer or StageTimer()
        det = self.get_detector(people=True)
        every = max(1, int(self.detect_every))
        tracker = PersonTracker(max_people=max_people, fps=CLIP_FPS, detect_every=every, max_miss_s=max_miss_s)
        # after this many sampled frames unseen the tracker has dropped the track: the person is gone
        gone_after = (tracker.max_miss_updates + 1) * every
        samplers: Dict[int, ClipSampler] = {-1: ClipSampler(self.clip_frames, self.video_model, keep_frames=keep_frames,
                                                            person=-1)}
        start: Dict[int, int] = {-1: 0}
        deferred: Dict[int, list] = {}  # person → preprocessed frames since they were last seen (bounded: gone_after)
        last_seen: Dict[int, int] = {}
        ended: set = set()
        held: list = []
        pend_rgb, pend_meta, pend_boxes, pend_px = [], [], [], 0  # pend_boxes: {person: (box, score)} per frame

        def flush():
            nonlocal pend_rgb, pend_meta, pend_boxes, pend_px
            if not pend_rgb:
                return
            open_ids = list(samplers)
            if open_ids:
                t0 = time.perf_counter()
                none = ((0, 0, 0, 0), float("nan"))
                per = {pid: [fb.get(pid, none) for fb in pend_boxes] for pid in open_ids}
                face, context, ids = person_inputs(
                    torch.from_numpy(np.stack(pend_rgb)),
                    {pid: torch.tensor([b for b, _ in per[pid]]) for pid in open_ids}, face_size=self.face_size,
                    context_size=self.context_size, crop=self.crop)
                timer.add("preprocess", time.perf_counter() - t0)
                n = len(pend_rgb)
                face, context = face.view(len(ids), n, *face.shape[1:]), context.view(len(ids), n, *context.shape[1:])
                for p, pid in enumerate(ids):
                    j0 = next((j for j, m in enumerate(pend_meta) if m[0] >= start[pid]), n)
                    # frames where the person is not seen wait until they are seen again (then they fill
                    # the gap); a person who is gone ends at their last frame, not 2 s of frames later
                    wait = deferred.setdefault(pid, [])
                    go = []
                    for j in range(j0, n):
                        (k, i), (b, sc) = pend_meta[j], per[pid][j]
                        row = (face[p, j], context[p, j], (k, i, *b, sc), pend_rgb[j] if keep_frames else None)
                        if pid == -1 or (b[2] > b[0] and b[3] > b[1]):
                            go.extend(wait)
                            wait.clear()
                            go.append(row)
                        else:
                            wait.append(row)
                    if go:
                        samplers[pid].add(torch.stack([g[0] for g in go]), torch.stack([g[1] for g in go]),
                                          [g[2] for g in go], [g[3] for g in go])
            pend_rgb, pend_meta, pend_boxes, pend_px = [], [], [], 0

        seen = 0  # sampled frames of the input so far

        def tag(chunks: List[Chunk]) -> List[Chunk]:
            for c in chunks:
                c.input_frames = seen
            return chunks

        def ready() -> List[Chunk]:
            out = []
            for s in samplers.values():
                while s.pending >= self.chunk_inputs:
                    out.append(s.take(self.chunk_inputs))
            return tag(out)

        def close(pids) -> List[Chunk]:
            out = []
            for pid in pids:
                deferred.pop(pid, None), start.pop(pid, None), last_seen.pop(pid, None)
                s = samplers.pop(pid)  # done with: memory stays bounded by the people present
                ended.add(pid)
                s.close()
                while s.pending > self.chunk_inputs:
                    out.append(s.take(self.chunk_inputs))
                out.append(s.take())
            return tag(out)

        for k, index, rgb in timed(frames, timer, "decode"):
            if det is not None and k % every == 0:
                t0 = time.perf_counter()
                faces = det.detect(rgb)
                timer.add("detect", time.perf_counter() - t0)
                held = tracker.update(k, faces)
            elif det is not None:
                tracker.hold(k, held)
            for pid, _, _ in held:
                if pid in ended:  # (the tracker never revives a dropped id)
                    continue
                last_seen[pid] = k
                if pid not in samplers:
                    samplers[pid] = ClipSampler(self.clip_frames, self.video_model, keep_frames=keep_frames, person=pid)
                    start[pid] = k
            gone = [pid for pid in samplers if pid >= 0 and k - last_seen[pid] > gone_after]
            if -1 in samplers and (len(samplers) > 1 or ended):
                del samplers[-1]  # somebody is here: the context-only answer is not needed
            if gone:  # their frames so far, then their last chunks
                flush()
                step = close(gone) + ready()
                if step:
                    yield step
            seen = k + 1
            pend_meta.append((k, int(index)))
            pend_rgb.append(rgb)
            pend_boxes.append({pid: (tuple(int(v) for v in box), float(score)) for pid, box, score in held})
            pend_px += rgb.shape[0] * rgb.shape[1]
            if pend_px >= GROUP_PIXELS or len(pend_rgb) >= TEST_CLIP_STRIDE:
                flush()
                step = ready()
                if step:
                    yield step
        flush()
        # nobody found: the context-only answer; else the people still here (or, all gone, the frame count)
        yield close([-1] if -1 in samplers else list(samplers)) or tag(
            [Chunk(torch.empty(0), torch.empty(0), [], 0, [], last=True, total=seen, person=-1)])


class Accumulator:
    """Model outputs of one input's chunks → :class:`ClipResult` objects → the :class:`Prediction`: the one
    result builder of images, in-memory frames and videos, on the CLI and the server.

    ``predictor`` is read through its documented read-only properties (``classes``, ``model_type``,
    ``checkpoint_kind``, ``detector_name``, ``engine_name``, ``context_size``, ``crop``, ``is_video_model``).
    """

    def __init__(self, predictor, kind: str = "video", fps: Optional[float] = None, keep_frames: bool = False,
                 detector: Optional[str] = None, person: int = 0):
        self.p, self.person = predictor, person
        self.kind, self.fps, self.keep_frames = kind, fps, keep_frames
        self.detector = detector or predictor.detector_name
        self.pooler = ClipPooler(predictor.is_video_model)
        self.frames: List[tuple] = []  # (k, index, x1, y1, x2, y2, score) per sampled frame
        self.clips: List[ClipResult] = []
        self.prob_sum: Optional[torch.Tensor] = None
        self.w_sum: Optional[torch.Tensor] = None
        self.best: Dict[int, tuple] = {}  # class → (prob, clip number, attention, middle frame, box)
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
        return [self._clip(a, b, cp, cw, ca) for a, b, cp, cw, ca in self.pooler.add(chunk, probs, attention, weights)]

    def _clip(self, a: int, b: int, cp: torch.Tensor, cw: torch.Tensor, ca: torch.Tensor) -> ClipResult:
        k = len(self.clips)
        cp = cp.double()
        self.prob_sum = cp.clone() if self.prob_sum is None else self.prob_sum + cp
        self.w_sum = cw.double().clone() if self.w_sum is None else self.w_sum + cw.double()
        for c in range(cp.shape[0]):  # the most confident clip per class, for the attention picture
            if c not in self.best or float(cp[c]) > self.best[c][0]:
                mid = (a + b) // 2
                self.best[c] = (float(cp[c]), k, ca.clone(), self._mid.get(k), list(self.frames[mid][2:6]),
                                int(self.frames[mid][1]))
        self._mid.pop(k, None)
        classes = self.p.classes
        dt = 1.0 / CLIP_FPS
        # times from the sampled positions the frames carry (a person tracked from later on starts later)
        r = ClipResult(k, self.frames[a][1], self.frames[b][1], self.frames[a][0] * dt, (self.frames[b][0] + 1) * dt,
                       classes[int(cp.argmax())], {c: float(v) for c, v in zip(classes, cp.tolist())},
                       {"face": float(cw[0]), "context": float(cw[1])},
                       any(self._has_face(q) for q in range(a, b + 1)), person=self.person)
        self.clips.append(r)
        return r

    @property
    def face_frames(self) -> int:
        return sum(self._has_face(q) for q in range(len(self.frames)))

    def face_boxes(self) -> List[list]:
        """[decode index, x1, y1, x2, y2, score] of the sampled frames with a face."""
        return [[int(f[1]), *map(int, f[2:6]), round(float(f[6]), 4)] for q, f in enumerate(self.frames)
                if self._has_face(q)]

    def person_result(self) -> PersonResult:
        """This input's person: the span from their first to their last sampled frame with a face (the
        whole input when there is none), the mean of the clips."""
        if not self.clips:
            raise ValueError("no clips: the input gave no frames")
        overall = (self.prob_sum / len(self.clips)).float()
        w_mean = (self.w_sum / len(self.clips)).float()
        seen = [f[0] for q, f in enumerate(self.frames) if self._has_face(q)] or [f[0] for f in self.frames]
        dt = 1.0 / CLIP_FPS
        classes = self.p.classes
        top = int(overall.argmax())
        return PersonResult(self.person, min(seen) * dt, (max(seen) + 1) * dt, classes[top], float(overall[top]),
                            {c: float(v) for c, v in zip(classes, overall.tolist())},
                            {"face": float(w_mean[0]), "context": float(w_mean[1])}, self.clips, self.face_boxes())

    def result(self, notes: Optional[List[str]] = None, truncated: bool = False) -> Prediction:
        if not self.clips:
            raise ValueError("no clips: the input gave no frames")
        overall = (self.prob_sum / len(self.clips)).float()
        w_mean = (self.w_sum / len(self.clips)).float()
        top = int(overall.argmax())
        _, best, att, frame, box, frame_index = self.best[top]
        att = att[0]  # 1×(T'×)h×w → (T'×)h×w
        att2d = att.mean(0) if att.dim() == 3 else att
        has = [self._has_face(q) for q in range(len(self.frames))]
        boxes = self.face_boxes()
        notes = list(notes or [])
        if not any(has):
            notes.append("no face found: context-only prediction (face input is zeros)")
        classes = self.p.classes
        visual = None
        if self.keep_frames:
            visual = {"frame": frame, "frame_index": frame_index, "box": box, "attention": att2d.numpy(),
                      "context_size": self.p.context_size, "crop": self.p.crop,
                      "clip_probs": np.array([[c.probabilities[n] for n in classes] for c in self.clips], np.float32),
                      "clip_times": [(c.start_s + c.end_s) / 2 for c in self.clips]}
        return Prediction(
            kind=self.kind, model=self.p.model_type, checkpoint_kind=self.p.checkpoint_kind, emotion=classes[top],
            confidence=float(overall[top]), probabilities={c: float(v) for c, v in zip(classes, overall.tolist())},
            fusion_weights={"face": float(w_mean[0]), "context": float(w_mean[1])}, face_found=any(has),
            frames_with_face=int(sum(has)), frames_used=len(self.frames),
            fps=self.fps if self.kind == "video" else None, detector=self.detector, engine=self.p.engine_name,
            face_boxes=boxes,
            attention={"clip": best, "shape": list(att2d.shape),
                       "values": [[round(float(v), 5) for v in row] for row in att2d.tolist()]},
            clips=self.clips, notes=notes, truncated=truncated, visual=visual, people=[self.person_result()])


class PeopleAccumulator:
    """Every tracked person's chunk outputs → one :class:`Accumulator` per person (by ``chunk.person``) →
    the :class:`Prediction`: its ``people`` list has every person (by id), the top-level answer is the
    main person's (the one seen on the most sampled frames; ties: the smaller id), and ``frames_used``
    counts the input's sampled frames. Person -1 (context only, fed until the first person appears) is
    the answer when nobody is found."""

    def __init__(self, predictor, kind: str = "video", fps: Optional[float] = None, keep_frames: bool = False,
                 detector: Optional[str] = None):
        self.p, self.kind, self.fps, self.keep_frames, self.detector = predictor, kind, fps, keep_frames, detector
        self.accs: Dict[int, Accumulator] = {}
        self.positions = 0  # sampled frames of the input seen so far

    def add(self, chunk: Chunk, probs: torch.Tensor, attention: torch.Tensor,
            weights: torch.Tensor) -> List[ClipResult]:
        acc = self.accs.get(chunk.person)
        if acc is None:
            acc = self.accs[chunk.person] = Accumulator(self.p, self.kind, self.fps, self.keep_frames, self.detector,
                                                        person=chunk.person)
        self.positions = max(self.positions, chunk.input_frames)
        if not (chunk.n or chunk.frames or chunk.clips):  # nothing of anybody's (the end of an input nobody is in)
            return []
        return acc.add(chunk, probs, attention, weights)

    def result(self, notes: Optional[List[str]] = None, truncated: bool = False) -> Prediction:
        people = {pid: a for pid, a in sorted(self.accs.items()) if pid >= 0 and a.clips}
        if people:
            main = max(people, key=lambda pid: (people[pid].face_frames, -pid))
            out = people[main].result(notes=notes, truncated=truncated)
        elif -1 in self.accs and self.accs[-1].clips:
            out = self.accs[-1].result(notes=notes, truncated=truncated)
        else:
            raise ValueError("no clips: the input gave no frames")
        out.people = [a.person_result() for a in people.values()]
        out.frames_used = max(out.frames_used, self.positions)
        return out


_DONE = object()


def concat_chunks(step: List[Chunk]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The model inputs of several chunks as one batch (None, None when they have none)."""
    full = [c for c in step if c.n]
    if not full:
        return None, None
    if len(full) == 1:
        return full[0].face, full[0].context
    return torch.cat([c.face for c in full]), torch.cat([c.context for c in full])


def split_outputs(step: List[Chunk], probs, att, w) -> List[tuple]:
    """The outputs of :func:`concat_chunks`'s batch, back per chunk (empty tensors for empty chunks)."""
    out, i = [], 0
    empty = torch.empty(0)
    for c in step:
        out.append((probs[i:i + c.n], att[i:i + c.n], w[i:i + c.n]) if c.n else (empty, empty, empty))
        i += c.n
    return out


def forward_chunks(forward: Callable, step: List[Chunk]) -> List[tuple]:
    """``forward`` once on all of ``step``'s inputs; the outputs per chunk."""
    face, context = concat_chunks(step)
    if face is None:
        return split_outputs(step, None, None, None)
    return split_outputs(step, *forward(face, context))


def run_stream(forward: Callable, chunks: Iterator[Chunk], acc: Accumulator, on_clip: Optional[Callable] = None,
               depth: int = 2, timer: Optional[StageTimer] = None) -> None:
    """Produce ``chunks`` in a worker thread (decoding, detection, preprocessing), run the model on them
    here (``forward(face, context) -> (probabilities, attention, fusion weights)``, e.g.
    :meth:`Predictor.forward <caer_fast.serving.inference.Predictor.forward>`), feed ``acc``; ``on_clip(ClipResult)`` as each clip is ready. At most ``depth`` chunks wait
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
            step = ch if isinstance(ch, list) else [ch]  # a multi-person step: one model call for all of it
            outs = forward_chunks(forward, step)
            timer.add("model", time.perf_counter() - t0)
            for c, (probs, att, w) in zip(step, outs):
                for clip in acc.add(c, probs, att, w):
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
