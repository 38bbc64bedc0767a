"""Inference on a video or an image: one :class:`Predictor`, used by ``predict``, ``serve`` and ``annotate``.

Every input is a stream of sampled frames (:class:`MediaSource`): a video from its decoder (a file,
standard input, a URL, a file still being written), an image as a one-frame stream, in-memory frames as a
stream over the array. One path for all (:meth:`Predictor.predict_source`): sample at 10 fps → detect a
face every ``detect_every`` sampled frames (the box held in between) → :func:`caer_fast.ops.face_context`
(centre crop) → clips (:mod:`.clips`: the test protocol; an image is a still clip of the clip length; the
image model classifies each frame and averages within each clip) → the model (``engine``) in chunks →
one :class:`~.stream.Accumulator` → one :class:`~.stream.Prediction` (the mean of the clips' probabilities).

A frame without a face gets an empty box: the face input is zeros and nothing is masked, so the
prediction rests on the context alone. That is normal (dlib finds faces in about 2/3 of CAER-S),
and the result says so (``face_found``, ``note``), it does not fail.

The work splits so a server can batch several requests into one model call and preprocessing can run
elsewhere: :meth:`Predictor.open` (a :class:`MediaSource`), :meth:`Predictor.preprocessor` (a picklable
:class:`~.stream.Preprocessor`: frames → :class:`~.clips.Chunk` objects, no model), :meth:`Predictor.forward`
(the model, on any batch of chunk inputs), :meth:`Predictor.accumulator` (chunk outputs → the result).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple

import numpy as np
import torch

from ..constants import CLASSES, CLIP_FPS
from ..data.detectors import AUTO
from ..data.video import (MAX_IMAGE_PIXELS, MediaDecodeError, VideoStream, image_size, is_url, open_source,
                          read_image, sample_positions, sniff_media)
from ..models.caer_net import CAERNet
from ..models.checkpoint import input_sizes, load_checkpoint, read_checkpoint
from .clips import clip_starts, sample_indices  # noqa: F401  (re-exported: the test protocol's rules)
from .engines.torch_engines import TorchEngine
from .stream import Accumulator, PeopleAccumulator, Prediction, Preprocessor, StageTimer, parse_people, run_stream

MAX_PIXELS = MAX_IMAGE_PIXELS  # refuse frames larger than this (memory: a decoded frame is H·W·3 bytes)


def is_image_file(path) -> bool:
    """Sniff the content (not the name): an image format's magic bytes, or PIL reads it as an image.
    Size is not judged here: a 20000×20000 PNG is an image (refused as too large by the reader)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    kind = sniff_media(head)
    if kind is not None:
        return kind == "image"
    if image_size(path) is None:
        return False
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # size is the reader's business
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # any failure means "not an image we can read"; video decoding is tried next
        return False
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _existing_file(path) -> Path:
    """``path`` as a Path, or :class:`MediaDecodeError` if it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise MediaDecodeError(path, "no such file")
    if path.stat().st_size == 0:
        raise MediaDecodeError(path, "empty file (0 bytes)")
    return path


@dataclass
class MediaSource:
    """One input as a stream of sampled frames: what :meth:`Predictor.predict_source` (and the server)
    consume. ``notes`` and ``truncated`` are final once ``frames`` is exhausted."""

    kind: str  # "image" or "video"
    frames: Iterable  # (k, decode index, uint8 H×W×3 RGB) of the sampled frames, k = 0, 1, …
    fps: Optional[float]  # the video's frame rate (None for an image)
    width: int
    height: int
    video: Optional[VideoStream] = None  # the decoder of a streamed video (header, notes, truncation)

    @property
    def notes(self):
        return list(self.video.notes) if self.video is not None else []

    @property
    def truncated(self) -> bool:
        return bool(self.video.truncated) if self.video is not None else False

    def close(self) -> None:
        if self.video is not None:
            self.video.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_video(source, follow: bool = False, max_frame_pixels: Optional[int] = MAX_PIXELS,
               max_frames: Optional[int] = None, max_pixels: Optional[int] = None) -> VideoStream:
    """The :class:`~caer_fast.data.video.VideoStream` of ``source`` (a path, ``"-"``, a URL, a file object)."""
    container = open_source(source, follow=follow)
    name = "<stdin>" if source == "-" else str(source)
    try:
        return VideoStream(container, name, max_frame_pixels=max_frame_pixels, max_frames=max_frames,
                           max_pixels=max_pixels)
    except BaseException:
        container.close()
        raise


def sampled_frames(video: VideoStream):
    """(k, decode index, RGB frame) of the video resampled to 10 fps."""
    for k, i, frame in sample_positions(video, video.fps, CLIP_FPS):
        yield k, i, video.rgb(frame)


def open_media(source, follow: bool = False, max_frame_pixels: Optional[int] = MAX_PIXELS,
               max_frames: Optional[int] = None, max_pixels: Optional[int] = None) -> MediaSource:
    """``source`` (a file, ``"-"`` for standard input, a URL PyAV opens, a binary file object) as a
    :class:`MediaSource`: an image file (sniffed by content) is a one-frame stream, anything else a video
    decoded as it is read (``follow``: a file still being written). Needs no model: a preprocessing
    process opens its inputs with this. Raises :class:`~caer_fast.data.video.MediaDecodeError`
    (unreadable) or :class:`~caer_fast.data.video.MediaTooLargeError` (over the limits)."""
    if not follow and source != "-" and not is_url(str(source)) and not hasattr(source, "read"):
        path = _existing_file(source)
        if is_image_file(path):
            rgb = read_image(path, max_pixels=max_frame_pixels)
            return MediaSource("image", [(0, 0, rgb)], None, int(rgb.shape[1]), int(rgb.shape[0]))
        source = path
    video = open_video(source, follow=follow, max_frame_pixels=max_frame_pixels, max_frames=max_frames,
                       max_pixels=max_pixels)
    return MediaSource("video", sampled_frames(video), float(video.fps), video.width, video.height, video)


class Predictor:
    """Loads a checkpoint once and predicts emotions for videos and images.

    Args:
        checkpoint: path or dict: ours (``model``, ``model_type``, ``model_args``, ``args``) or the
            community CAER-S one (``state_dict``; image model, default input sizes).
        device: "cpu" / "cuda" (default: CUDA if available).
        detector: face detector name (see :mod:`caer_fast.data.detectors`; ``auto``: Haar for one face per
            frame, MTCNN for every person), or an object with
            ``detect(rgb) -> [(x1, y1, x2, y2, score), …]``, or None for no detection (context only).
        detect_every: run the detector on every k-th sampled frame (10 fps → k=4 is 2.5 detections/s).
        max_frames: refuse videos with more decoded frames than this (None: no limit).
        batch_size: largest model batch (inputs are chunked).
        max_frame_pixels: refuse frames (and images) with more pixels than this.
        max_pixels: decoded-pixel budget of one video (frames × width × height; None: no limit), checked
            from the header and while decoding.
        engine: what runs the model: an object called like the model, ``engine(face, context,
            return_details=True) -> (logits, {"attention", "fusion_weights"})``, with ``.name`` and ``.info``
            (:mod:`caer_fast.serving.engines`); None: the ``eager`` engine of the loaded model.
        stream_chunk: model inputs per chunk of the streaming pipeline (clips for the video model,
            frames for the image model; default: 4 clips / ``batch_size`` frames).

    The rest of the library reads a predictor through its read-only properties (``model_type``,
    ``classes``, ``face_size``, ``context_size``, ``crop``, ``clip_frames``, ``is_video_model``,
    ``input_shapes``, ``checkpoint_kind``, ``detector_name``, ``engine_name``, ``engine_info``, ``device``,
    ``batch_size``, ``stream_chunk``, the limits) and never writes it: :meth:`with_engine` gives a predictor
    with another engine.

    Example:
        >>> p = Predictor("runs/demo/both/checkpoint.pth")                     # doctest: +SKIP
        >>> r = p.predict_file("clip.avi"); r.emotion, r.probabilities          # doctest: +SKIP
    """

    def __init__(self, checkpoint, device: Optional[str] = None, detector=AUTO, detect_every: int = 4,
                 max_frames: Optional[int] = None, batch_size: int = 16, max_frame_pixels: Optional[int] = MAX_PIXELS,
                 max_pixels: Optional[int] = None, engine=None, stream_chunk: Optional[int] = None):
        ckpt = read_checkpoint(checkpoint)
        self._model = load_checkpoint(ckpt).eval()
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model.to(self._device)
        sizes = input_sizes(ckpt, self._model)  # what the checkpoint was trained with
        self._model_type = ckpt.get("model_type") or ("caer" if isinstance(self._model, CAERNet) else "caers")
        self._face_size, self._context_size = sizes["face_size"], sizes["context_size"]
        self._crop = sizes["crop_box"]
        self._clip_frames = sizes["clip_frames"]
        self._classes = tuple(ckpt.get("classes") or CLASSES)
        self._checkpoint_kind = "ours" if "model" in ckpt else ("community" if "state_dict" in ckpt else "state_dict")
        self._detect_every = max(1, int(detect_every))
        self._max_frames = max_frames
        self._batch_size = max(1, int(batch_size))
        self._max_frame_pixels, self._max_pixels = max_frame_pixels, max_pixels
        self._engine = engine
        self._eager = TorchEngine(self._model)  # what runs without an engine: slices big CPU batches like one
        self._stream_chunk = max(1, int(stream_chunk)) if stream_chunk else (
            min(4, self._batch_size) if self.is_video_model else self._batch_size)
        self._preprocessor = Preprocessor(self._face_size, self._context_size, self._crop, self._clip_frames,
                                          self.is_video_model, detector, self._detect_every, self._stream_chunk)
        self._detector_name = detector if isinstance(detector, str) else (
            "none" if detector is None else getattr(detector, "name", type(detector).__name__))
        if isinstance(detector, str):  # fail now (unknown name, missing package), not on the first request
            self._preprocessor.get_detector()
            if detector == AUTO:
                self._preprocessor.get_detector(people=True)

    # -- the read-only surface ---------------------------------------------------------------------
    model_type = property(lambda self: self._model_type, doc='"caer" (video model) or "caers" (image model)')
    classes = property(lambda self: list(self._classes), doc="class names, in the model's output order")
    face_size = property(lambda self: self._face_size, doc="(h, w) of the face input")
    context_size = property(lambda self: self._context_size, doc="(h, w) the context is resized to")
    crop = property(lambda self: self._crop, doc="(top, left, h, w) of the context's centre crop, or None")
    clip_frames = property(lambda self: self._clip_frames, doc="frames per clip")
    checkpoint_kind = property(lambda self: self._checkpoint_kind, doc='"ours", "community" or "state_dict"')
    source = checkpoint_kind  # the earlier name
    device = property(lambda self: self._device)
    detect_every = property(lambda self: self._detect_every)
    detector_name = property(lambda self: self._detector_name)
    batch_size = property(lambda self: self._batch_size, doc="largest model batch of :meth:`forward`")
    stream_chunk = property(lambda self: self._stream_chunk, doc="model inputs per streamed chunk")
    max_frames = property(lambda self: self._max_frames)
    max_frame_pixels = property(lambda self: self._max_frame_pixels)
    max_pixels = property(lambda self: self._max_pixels)

    @property
    def is_video_model(self) -> bool:
        return self._model_type == "caer" or isinstance(self._model, CAERNet)

    @property
    def input_shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(face, context) shapes of one model input, without the batch dimension (to build an engine)."""
        crop = self._crop[2:] if self._crop else self._context_size
        if self.is_video_model:
            t = self._clip_frames
            return (3, t, *self._face_size), (3, t, *crop)
        return (3, *self._face_size), (3, *crop)

    @property
    def engine(self) -> Callable:
        """What :meth:`forward` calls: the engine passed in, else the ``eager`` engine of the loaded model."""
        return self._engine if self._engine is not None else self._eager

    @property
    def engine_name(self) -> str:
        if self._engine is None:
            return "eager"
        return str(getattr(self._engine, "name", None) or type(self._engine).__name__)

    @property
    def engine_info(self) -> dict:
        return dict(getattr(self._engine, "info", None) or {"engine": self.engine_name})

    @property
    def model(self) -> torch.nn.Module:
        """The loaded (eager) model."""
        return self._model

    def with_engine(self, engine) -> "Predictor":
        """This predictor (same model, detector, limits) with ``engine`` running the model."""
        other = copy.copy(self)
        other._engine = engine
        return other

    def preprocessor(self, chunk_inputs: Optional[int] = None) -> Preprocessor:
        """The :class:`~.stream.Preprocessor` of this checkpoint (frames → chunks of ``chunk_inputs`` model
        inputs, default ``stream_chunk``); picklable when the detector is given by name."""
        if chunk_inputs is None or int(chunk_inputs) == self._stream_chunk:
            return self._preprocessor
        return dataclasses.replace(self._preprocessor, chunk_inputs=max(1, int(chunk_inputs)))

    def accumulator(self, source: "MediaSource", keep_frames: bool = False,
                    detector: Optional[str] = None, people="main"):
        """The result builder of one input (``detector``: the label the result gives, default the detector's;
        ``people`` other than "main": a :class:`~.stream.PeopleAccumulator` for :meth:`Preprocessor.people_chunks
        <caer_fast.serving.stream.Preprocessor.people_chunks>`)."""
        main = parse_people(people) == -1
        cls = Accumulator if main else PeopleAccumulator
        if detector is None and self._detector_name == AUTO:  # the detector that ran, not "auto"
            detector = self._preprocessor.detector_label(people=not main)
        return cls(self, kind=source.kind, fps=source.fps if source.kind == "video" else None,
                   keep_frames=keep_frames, detector=detector)

    # -- model ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, face: torch.Tensor, context: torch.Tensor):
        """(probabilities n×C, attention n×1×(S…), fusion weights n×2) on CPU, in chunks of ``batch_size``."""
        run = self.engine
        probs, att, weights = [], [], []
        for i in range(0, face.shape[0], self._batch_size):
            logits, d = run(face[i:i + self._batch_size].to(self._device),
                            context[i:i + self._batch_size].to(self._device), return_details=True)
            probs.append(torch.softmax(logits.float(), dim=-1).cpu())
            att.append(d["attention"].float().cpu())
            weights.append(d["fusion_weights"].float().cpu())
        return torch.cat(probs), torch.cat(att), torch.cat(weights)

    # -- inputs -----------------------------------------------------------------------------------
    def open_video(self, source, follow: bool = False) -> VideoStream:
        """The :class:`~caer_fast.data.video.VideoStream` of ``source`` with this predictor's limits."""
        return open_video(source, follow=follow, max_frame_pixels=self._max_frame_pixels, max_frames=self._max_frames,
                          max_pixels=self._max_pixels)

    def open(self, source, follow: bool = False) -> MediaSource:
        """:func:`open_media` with this predictor's limits."""
        return open_media(source, follow=follow, max_frame_pixels=self._max_frame_pixels, max_frames=self._max_frames,
                          max_pixels=self._max_pixels)

    @staticmethod
    def frames_source(frames, fps: Optional[float] = None) -> MediaSource:
        """In-memory frames as a :class:`MediaSource`: an image H×W×3, or a video T×H×W×3 already at 10 fps
        (``fps`` None) or at ``fps`` (resampled here), uint8 RGB. Decode indices are array indices."""
        frames = np.asarray(frames)
        kind = "video"
        if frames.ndim == 3:
            frames, kind, fps = frames[None], "image", None
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 H×W×3 or T×H×W×3 RGB, got {frames.dtype} {frames.shape}")
        index = sample_indices(len(frames), fps) if fps else np.arange(len(frames))
        sampled = ((k, int(i), np.ascontiguousarray(frames[i])) for k, i in enumerate(index))
        h, w = frames.shape[1:3]
        return MediaSource(kind, sampled, float(fps or CLIP_FPS) if kind == "video" else None, int(w), int(h))

    # -- the one path -----------------------------------------------------------------------------
    def predict_source(self, source: MediaSource, with_arrays: bool = False, known_boxes=None, on_clip=None,
                       timer: Optional[StageTimer] = None, detector: Optional[str] = None,
                       people="main") -> Prediction:
        """Stream ``source`` through the pipeline of :mod:`caer_fast.serving.stream` in bounded memory:
        ``known_boxes`` ({decode index: xyxy box}, frames without an entry have no face) replaces the
        detector; ``on_clip(ClipResult)`` as each clip is ready (progress, timelines, ``--follow``; its
        ``person`` says whose); ``with_arrays`` adds ``Prediction.visual`` (numpy, for pictures).

        ``people``: "main" (default) one face per frame, the largest confident one (``Prediction.people``
        has that one person); "all" every tracked person, or N at most N (largest faces first): each gets
        their own clips, all people's inputs of a step run in one model call, and ``Prediction.people``
        lists them (the top-level answer is the person seen longest)."""
        n_people = parse_people(people)
        if n_people != -1:
            if known_boxes is not None:
                raise ValueError("known boxes give one face per frame: use people='main' with them")
            acc = self.accumulator(source, keep_frames=with_arrays, detector=detector, people=people)
            steps = self._preprocessor.people_chunks(source.frames, max_people=n_people, keep_frames=with_arrays,
                                                     timer=timer)
            run_stream(self.forward, steps, acc, on_clip=on_clip, timer=timer)
            return acc.result(notes=source.notes, truncated=source.truncated)
        acc = self.accumulator(source, keep_frames=with_arrays, detector=detector)
        chunks = self._preprocessor.chunks(source.frames, known_boxes=known_boxes, keep_frames=with_arrays, timer=timer)
        run_stream(self.forward, chunks, acc, on_clip=on_clip, timer=timer)
        return acc.result(notes=source.notes, truncated=source.truncated)

    def predict_file(self, path, with_arrays: bool = False, known_boxes=None, on_clip=None, follow: bool = False,
                     on_start=None, timer: Optional[StageTimer] = None, people="main") -> Prediction:
        """Emotion of the video or image at ``path`` (see :meth:`open`); ``on_start(VideoStream)`` once a
        video's header is read; the rest as in :meth:`predict_source`. Returns a
        :class:`~.stream.Prediction` (``.to_dict()`` is the JSON)."""
        with self.open(path, follow=follow) as source:
            if on_start is not None and source.video is not None:
                on_start(source.video)
            return self.predict_source(source, with_arrays=with_arrays, known_boxes=known_boxes, on_clip=on_clip,
                                       timer=timer, people=people)

    def predict_frames(self, frames, fps: Optional[float] = None, boxes=None, with_arrays: bool = False,
                       people="main") -> Prediction:
        """Emotion of in-memory frames (see :meth:`frames_source`); ``boxes``: one xyxy box per given frame
        (zeros = no face) instead of the detector."""
        source = self.frames_source(frames, fps)
        known = None
        if boxes is not None:
            n = 1 if np.asarray(frames).ndim == 3 else len(frames)
            known = {i: tuple(b) for i, b in enumerate(np.asarray(boxes, dtype=np.int64).reshape(n, 4).tolist())}
        return self.predict_source(source, with_arrays=with_arrays, known_boxes=known, people=people)


def set_threads_from_env() -> None:
    """Respect OMP_NUM_THREADS for torch's intra-op pool (servers on shared machines)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))
