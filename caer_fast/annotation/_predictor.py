"""The one place annotation touches the inference API (re-point these when the serving API changes).

Three steps, split so decoding runs in worker processes / Ray CPU stages and the model batches across videos:

- :func:`preprocess` (worker): open + decode + detect + ``face_context`` → picklable :class:`Item` objects, one
  per chunk of model inputs, the last one marked ``last`` (or a single ``error`` item);
- :func:`model` (the model process / actor): the outputs of chunks from any number of videos, in one batch;
- :func:`finish` (wherever the outputs meet): one video's items and outputs → (video row, clip rows).

They wrap ``Predictor.open`` + ``Predictor.preprocessor().chunks``, ``Predictor.forward`` and
:class:`caer_fast.serving.stream.Accumulator`; the engine comes from
:func:`caer_fast.serving.engines.cli.engine_from_args`, fed by :class:`Options` (it has the flags' fields).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..constants import CLIP_FPS
from ..data import boxes as boxes_io
from ..data.video import MediaDecodeError
from ..serving.clips import Chunk
from ..serving.engines.cli import engine_from_args
from ..serving.inference import Predictor
from ..serving.stream import Accumulator


@dataclass
class Options:
    """What every stage needs to build its predictor (picklable: it travels to workers and Ray actors)."""

    checkpoint: str
    device: Optional[str] = None  # the model's device (None: CUDA if available); decoding is always CPU
    detector: Optional[str] = "haar"  # None: no detection (context only)
    detect_every: int = 4
    boxes: Optional[str] = None  # a box file (predict --boxes): skips the detector
    engine: str = "eager"  # a registered engine name (--engine; int8 needs ``calibrate``)
    calibrate: Optional[str] = None  # the int8 engine's calibration tree (--calibrate)
    calibrate_samples: int = 64
    batch_size: int = 16  # model inputs per model call (across videos)


@dataclass
class Item:
    """One message from :func:`preprocess`: a chunk of one video, or the reason the video failed."""

    path: str
    seq: int  # 0, 1, … within the video
    chunk: Optional[Chunk] = None
    last: bool = False
    kind: str = "video"
    fps: Optional[float] = None
    notes: List[str] = field(default_factory=list)  # on the last item
    truncated: bool = False
    error: Optional[str] = None

    @property
    def inputs(self) -> int:
        return 0 if self.chunk is None else self.chunk.n


Output = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # probabilities, attention, fusion weights


def make_predictor(opts: Options, for_model: bool) -> Predictor:
    """A predictor for the model stage (``for_model``: device, ``opts.engine``) or for preprocessing and
    finishing rows (CPU, eager: only its preprocessing settings, limits and detector are used)."""
    detector = None if (opts.detector in (None, "none") or opts.boxes) else opts.detector
    if not for_model:
        return Predictor(opts.checkpoint, device="cpu", batch_size=opts.batch_size, detector=detector,
                         detect_every=opts.detect_every)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # model calls run up to batch_size inputs (chunks of several videos), the rest of a batch may be 1
    ckpt, engine = engine_from_args(opts, opts.checkpoint, device=device, batch_sizes=(1, opts.batch_size),
                                    out=sys.stderr)
    return Predictor(ckpt, device=device, batch_size=opts.batch_size, detector=detector,
                     detect_every=opts.detect_every, engine=engine)


def _reason(exc: BaseException) -> str:
    """The row's ``error``: our errors already name the file and the problem; others get their type."""
    if isinstance(exc, (MediaDecodeError, LookupError)) or type(exc).__module__.startswith("caer_fast"):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def preprocess(p: Predictor, path: str, boxes: Optional["BoxIndex"] = None) -> Iterator[Item]:
    """Items of one file, in order; never raises for a bad file (its last item carries ``error``)."""
    seq = 0
    try:
        # opening reads the header (or the image): a garbage file fails here, before any box lookup
        with p.open(path) as source:
            known = None if boxes is None else boxes.lookup(Path(path))
            pending = None
            for chunk in p.preprocessor().chunks(source.frames, known_boxes=known):
                if pending is not None:
                    yield pending
                    seq += 1
                pending = Item(path, seq, chunk, last=chunk.last, kind=source.kind, fps=source.fps)
            if pending is None or pending.chunk.total == 0:
                raise MediaDecodeError(path, "no frames could be decoded")
            pending.notes, pending.truncated = source.notes, source.truncated  # final once the stream is read
            yield pending
    except Exception as exc:  # a bad file is a row with its reason, never the end of the job
        yield Item(path, seq, last=True, error=_reason(exc))


def model(p: Predictor, chunks: Sequence[Chunk]) -> List[Output]:
    """Outputs of each chunk, the chunks' inputs run as one batch (split by ``batch_size`` inside)."""
    sizes = [c.n for c in chunks]
    full = [c for c in chunks if c.n]
    if not full:
        return [(torch.empty(0),) * 3 for _ in chunks]
    probs, att, w = p.forward(torch.cat([c.face for c in full]), torch.cat([c.context for c in full]))
    out, i = [], 0
    for n in sizes:
        out.append((probs[i:i + n], att[i:i + n], w[i:i + n]) if n else (torch.empty(0),) * 3)
        i += n
    return out


def strip(item: Item) -> Item:
    """The item without its model inputs (what :func:`finish` needs), so outputs travel light."""
    if item.chunk is not None:
        item.chunk = dataclasses.replace(item.chunk, face=torch.empty(item.chunk.n, 0), context=torch.empty(0))
    return item


VIDEO_COLUMNS = ("path", "status", "error", "kind", "emotion", "confidence")  # then p_<class>, then the rest


def error_row(p: Predictor, path: str, reason: str) -> dict:
    row = {"path": path, "status": "error", "error": reason, "kind": None, "emotion": None, "confidence": None}
    row.update({f"p_{c}": None for c in p.classes})
    row.update({"clips": 0, "seconds": None, "frames_used": 0, "frames_with_face": 0, "face_found": None,
                "note": None, "detector": None, "engine": None})
    return row


def finish(p: Predictor, items: Sequence[Item], outputs: Sequence[Output], engine: str,
           detector: str) -> Tuple[dict, List[dict]]:
    """(video row, clip rows) of one video from its items (in ``seq`` order) and their outputs."""
    first = items[0]
    bad = next((it for it in items if it.error), None)
    if bad is not None:
        return error_row(p, first.path, bad.error), []
    acc = Accumulator(p, kind=first.kind, fps=first.fps, detector=detector)
    try:
        for it, out in zip(items, outputs):
            acc.add(it.chunk, *out)
        r = acc.result(notes=items[-1].notes, truncated=items[-1].truncated)
    except Exception as exc:
        return error_row(p, first.path, f"{first.path}: {_reason(exc)}"), []
    row = {"path": first.path, "status": "ok", "error": None, "kind": r.kind, "emotion": r.emotion,
           "confidence": float(r.confidence)}
    row.update({f"p_{c}": float(v) for c, v in r.probabilities.items()})
    row.update({"clips": len(r.clips), "seconds": r.frames_used / CLIP_FPS if r.kind == "video" else 0.0,
                "frames_used": r.frames_used, "frames_with_face": r.frames_with_face, "face_found": r.face_found,
                "note": r.note, "detector": detector, "engine": engine})
    clips = []
    for c in r.clips:
        d = {"path": first.path, "person": 0, "clip": c.clip, "start": float(c.start_s), "end": float(c.end_s),
             "first_frame": c.first_frame, "last_frame": c.last_frame, "emotion": c.emotion}
        d.update({f"p_{k}": float(v) for k, v in c.probabilities.items()})
        d.update({"lambda_face": float(c.fusion_weights["face"]), "lambda_context": float(c.fusion_weights["context"]),
                  "face_found": bool(c.face_found)})
        clips.append(d)
    return row, clips


class BoxIndex:
    """A box file (CAER ``.faces.csv`` or CAER-S ``.txt``, as predict ``--boxes`` reads) parsed once, looked
    up by path suffix like :func:`caer_fast.predict.boxes_for` (which parses the file on every call)."""

    def __init__(self, box_file):
        box_file = Path(box_file)
        self.name = box_file.name
        entries, _ = boxes_io.read_box_entries(box_file)
        self.entries: Dict[str, dict] = {k.lstrip("/"): v for k, v in entries.items()}
        self.file = str(box_file)

    def lookup(self, path) -> dict:
        parts = path.resolve().as_posix().split("/")
        for i in range(len(parts) - 1, 0, -1):  # shortest suffix first
            hit = self.entries.get("/".join(parts[i:]))
            if hit is not None:
                return hit
        raise LookupError(f"{self.file} has no boxes for {path}")
