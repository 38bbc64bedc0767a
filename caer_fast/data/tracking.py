"""Identities over time: every person's face box, with a small stable id, through a video (issue 26).

Detections (``detect(rgb)`` of :mod:`caer_fast.data.detectors`) on the sampled frames go to a tracker
library, not a hand-written matcher:

- ``bytetrack`` (default): supervision's ByteTrack (Kalman filter + two-round IoU matching, which keeps
  low-score detections for existing tracks). supervision==0.30.9 is pinned: the last release that has it
  (0.31 moved it to the ``trackers`` package, which requires opencv-python and would clash with the
  pinned opencv-python-headless).
- ``norfair``: norfair's Tracker with IoU distance, optional and measured only (bench/RESULTS.md "Every
  face"): its wheel pins numpy<2, so it can only be installed with ``--no-deps``.

Person ids are small integers from 0 in order of first appearance (the tracker's own ids are not). With
``detect_every=k`` the tracker sees one update every k sampled frames; :func:`track_video` holds each
person's box between them, as the one-face Predictor holds its box. A person missed by the detector for
up to ``max_miss_s`` seconds keeps their id when found again.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..constants import CONTEXT_SIZE, FACE_SIZE
from ..ops import face_context
from .detectors import Detection, faces_by_size

Box = Tuple[int, int, int, int]
Track = Tuple[int, Box, float]  # (person id, xyxy box, detector score)
TRACKERS = ("bytetrack", "norfair")
TRACKER_INSTALL = {"bytetrack": "pip install supervision==0.30.9",
                   "norfair": "pip install --no-deps norfair==2.3.0 filterpy==1.4.5 && pip install rich"}


class TrackerUnavailable(RuntimeError):
    """The tracker's package is missing; the message says what to install."""


def _area(b) -> float:
    return float((b[2] - b[0]) * (b[3] - b[1]))


class PersonTracker:
    """Tracks face boxes across sampled frames and names each person with a stable small integer.

    Args:
        max_people: report at most this many people per frame, the largest faces first (None: all).
            The tracker itself follows up to 4× as many, so that a person ranked out for a moment keeps
            their id when they come back into the top ``max_people``.
        fps: sampled frames per second (the Predictor samples 10).
        detect_every: the detector runs on every k-th sampled frame; :meth:`update` is called on those.
        max_miss_s: how long a person may go undetected and still keep their id.
        min_score: detections below this score (the detector's units) are ignored; None keeps all.
        hold_missed_s: a person tracked on the previous update but not matched now (a missed detection)
            keeps their last box for up to this long, as between detection frames (0: off).
        backend: one of :data:`TRACKERS`.
    """

    def __init__(self, max_people: Optional[int] = None, fps: float = 10.0, detect_every: int = 1,
                 max_miss_s: float = 2.0, min_score: Optional[float] = None, hold_missed_s: float = 0.5,
                 backend: str = "bytetrack"):
        if max_people is not None and max_people < 1:
            raise ValueError(f"max_people must be >= 1 or None, got {max_people}")
        if fps <= 0 or detect_every < 1:
            raise ValueError(f"need fps > 0 and detect_every >= 1, got fps={fps}, detect_every={detect_every}")
        if backend not in TRACKERS:
            raise ValueError(f"unknown tracker {backend!r}; choose one of {', '.join(TRACKERS)}")
        self.max_people, self.fps, self.detect_every = max_people, float(fps), int(detect_every)
        self.min_score, self.backend = min_score, backend
        self.updates_per_s = self.fps / self.detect_every
        self.max_miss_updates = max(1, math.ceil(max_miss_s * self.updates_per_s))
        self.hold_updates = int(hold_missed_s * self.updates_per_s + 1e-9)
        self._n = 0  # updates so far
        self._last: Dict[int, Tuple[int, Box, float]] = {}  # track id -> (update number, box, score) last matched
        self._ids: Dict[int, int] = {}  # the library's track id -> person id
        self._spans: Dict[int, List[int]] = {}
        self._seen_now: set = set()  # person ids detected (not held) at the last update
        self._tracker = self._make()

    def _make(self):
        if self.backend == "bytetrack":
            try:
                from supervision import ByteTrack
            except ImportError:
                raise TrackerUnavailable(f"the bytetrack tracker needs supervision: {TRACKER_INSTALL['bytetrack']}") \
                    from None
            import warnings

            with warnings.catch_warnings():  # "deprecated": it moved to `trackers` (see the module docstring)
                warnings.simplefilter("ignore", FutureWarning)
                # frame_rate=30 makes lost_track_buffer a count of updates (ByteTrack scales it by rate / 30)
                return ByteTrack(track_activation_threshold=0.25, lost_track_buffer=self.max_miss_updates,
                                 minimum_matching_threshold=0.8, frame_rate=30, minimum_consecutive_frames=1)
        try:
            import norfair
        except ImportError:
            raise TrackerUnavailable(f"the norfair tracker needs norfair: {TRACKER_INSTALL['norfair']}") from None
        self._norfair = norfair
        return norfair.Tracker(distance_function="iou", distance_threshold=0.8, hit_counter_max=self.max_miss_updates,
                               initialization_delay=1)

    def _track(self, dets: Sequence[Detection]) -> List[Tuple[int, np.ndarray, float]]:
        """The library's (track id, float xyxy, score) for the tracks matched in this update."""
        if self.backend == "bytetrack":
            import supervision as sv

            xyxy = np.array([d[:4] for d in dets], np.float32).reshape(-1, 4)
            conf = np.array([d[4] for d in dets], np.float32)
            out = self._tracker.update_with_detections(
                sv.Detections(xyxy=xyxy, confidence=conf, class_id=np.zeros(len(dets), int)))
            return [(int(t), b, float(s)) for t, b, s in zip(out.tracker_id, out.xyxy, out.confidence)]
        nf = self._norfair
        now = [nf.Detection(np.array([d[:2], d[2:4]], np.float64), scores=np.array([d[4]] * 2), data=d) for d in dets]
        objs = self._tracker.update(now)
        mine = {id(d) for d in now}
        # only objects matched now (a coasting object's box is a prediction, not a face)
        return [(o.id, np.asarray(o.last_detection.points, np.float32).reshape(4), float(o.last_detection.data[4]))
                for o in objs if o.id is not None and id(o.last_detection) in mine]

    def update(self, frame_index: int, detections: Sequence[Detection]) -> List[Track]:
        """Feed one detection frame; returns ``[(person_id, (x1, y1, x2, y2), score), ...]`` of the people
        seen in it (and those held through a brief miss), largest face first, at most ``max_people``.

        A new person appears from their second detection on (ByteTrack confirms a track before naming
        it; the first frame of the video is the exception): their start lags by one detection interval."""
        dets = faces_by_size(list(detections), None if self.max_people is None else 4 * self.max_people,
                             self.min_score)
        self._n += 1
        seen = []
        for tid, box, score in self._track(dets):
            box = tuple(int(round(v)) for v in box)
            self._last[tid] = (self._n, box, score)
            seen.append((tid, box, score))
        now = {tid for tid, _, _ in seen}
        for tid in [t for t, (n, _, _) in self._last.items() if self._n - n > self.hold_updates]:
            del self._last[tid]  # gone for longer than the hold: forget (bounded memory on long streams)
        held = [(tid, box, score) for tid, (n, box, score) in self._last.items() if tid not in now]
        out = sorted(seen + held, key=lambda t: -_area(t[1]))
        if self.max_people is not None:
            out = out[:self.max_people]
        result = []
        self._seen_now = set()
        for tid, box, score in out:
            pid = self._ids.setdefault(tid, len(self._ids))  # ids only for people reported
            span = self._spans.setdefault(pid, [frame_index, frame_index])
            if tid in now:  # a held box is not a sighting: spans end at the last detection
                span[1] = max(span[1], frame_index)
                self._seen_now.add(pid)
            result.append((pid, box, score))
        return result

    def hold(self, frame_index: int, tracks: Sequence[Track]) -> None:
        """Record that ``tracks`` (from the last update) are held on ``frame_index``: extends the spans of
        the people detected at that update (frames between detections count as seen, as in the Predictor)."""
        for pid, _, _ in tracks:
            if pid in self._seen_now:
                self._spans[pid][1] = max(self._spans[pid][1], frame_index)

    def person_spans(self) -> Dict[int, Tuple[int, int]]:
        """{person id: (first, last sampled frame index)} over everything seen so far."""
        return {pid: (a, b) for pid, (a, b) in sorted(self._spans.items())}


def track_video(frames: Iterable[np.ndarray], detector, detect_every: int = 4, max_people: Optional[int] = None,
                fps: float = 10.0, tracker: Optional[PersonTracker] = None
                ) -> Iterator[Tuple[int, np.ndarray, List[Track]]]:
    """Track every person through sampled RGB frames.

    Yields ``(index, frame, tracks)`` per sampled frame: the detector runs on frames 0, k, 2k, ...
    (``detect_every=k``) and every frame in between gets the boxes of the last detection frame. Pass your
    own ``tracker`` to read :meth:`PersonTracker.person_spans` afterwards (else it is made from the
    arguments, and the spans are lost).
    """
    tracker = tracker or PersonTracker(max_people=max_people, fps=fps, detect_every=detect_every)
    held: List[Track] = []
    for i, frame in enumerate(frames):
        if i % detect_every == 0:
            held = tracker.update(i, detector.detect(frame))
        else:
            tracker.hold(i, held)
        yield i, frame, held


# ---------------------------------------------------------------- per-person model inputs

def boxes_by_person(tracks_per_frame: Sequence[Sequence[Track]]) -> Dict[int, torch.Tensor]:
    """``{person id: N×4 int64 boxes}`` from N frames of :func:`track_video` tracks; a frame where the
    person is absent gets the empty box (0, 0, 0, 0), which :func:`caer_fast.ops.face_context` reads as
    "no face" (zero face, nothing masked)."""
    n = len(tracks_per_frame)
    out: Dict[int, torch.Tensor] = {}
    for i, tracks in enumerate(tracks_per_frame):
        for pid, box, _ in tracks:
            out.setdefault(pid, torch.zeros(n, 4, dtype=torch.int64))[i] = torch.tensor(box)
    return dict(sorted(out.items()))


def person_inputs(frames: torch.Tensor, boxes_per_person: Dict[int, torch.Tensor], face_size=FACE_SIZE,
                  context_size=CONTEXT_SIZE, crop: Optional[Tuple[int, int, int, int]] = None,
                  dtype: torch.dtype = torch.float32, **kwargs) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Face and context inputs of every person for one chunk of frames, in ONE face_context call.

    Each frame is repeated once per person, each copy with that person's box, so each person's context
    masks only their own face; the other people's faces stay visible (they are context).

    Args:
        frames: uint8 N×H×W×3 RGB.
        boxes_per_person: ``{person id: N×4 integer xyxy boxes}`` (empty box: absent on that frame),
            e.g. from :func:`boxes_by_person`.
        face_size, context_size, crop, dtype, kwargs: as :func:`caer_fast.ops.face_context`.

    Returns:
        ``(face, context, person_ids)``: face (P·N)×3×fh×fw and context (P·N)×3×h×w, person-major
        (``face.view(P, N, ...)[k]`` is person ``person_ids[k]``'s clip), person_ids sorted.
    """
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 \
            or frames.shape[-1] != 3:
        raise ValueError(f"frames must be a uint8 N×H×W×3 tensor, got "
                         f"{getattr(frames, 'dtype', type(frames))} {tuple(getattr(frames, 'shape', ()))}")
    n = frames.shape[0]
    ids = sorted(boxes_per_person)
    boxes = [torch.as_tensor(boxes_per_person[pid]).to(torch.int64).reshape(-1, 4) for pid in ids]
    for pid, b in zip(ids, boxes):
        if b.shape[0] != n:
            raise ValueError(f"person {pid}: {b.shape[0]} boxes for {n} frames")
    if not ids:
        return (torch.zeros(0, 3, *face_size, dtype=dtype), torch.zeros(0, 3, *(crop[2:] if crop else context_size),
                dtype=dtype), [])
    face, context = face_context(frames.repeat(len(ids), 1, 1, 1), torch.cat(boxes).to(frames.device),
                                 face_size=face_size, context_size=context_size, crop=crop, dtype=dtype, **kwargs)
    return face, context, ids
