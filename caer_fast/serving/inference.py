"""Inference on a video or an image: one :class:`Predictor`, used by ``predict`` and ``serve``.

Pipeline (the paper's test protocol):

- video: decode with PyAV, sample at 10 fps, detect a face every ``detect_every`` sampled frames (the
  box is held for the frames in between), cut clips of the model's clip length with an 8-frame stride,
  preprocess with :func:`caer_fast.ops.face_context` (centre crop), average the clips' probabilities;
- image: one frame; the video model sees it as a still clip of its clip length;
- the image model (CAER-Net-S) on a video classifies each sampled frame and averages within each clip.

A frame without a face gets an empty box: the face input is zeros and nothing is masked, so the
prediction rests on the context alone. That is normal (dlib finds faces in about 2/3 of CAER-S),
and the result says so (``face_found``), it does not fail.

The work is split so a server can batch several requests into one model call:
:meth:`Predictor.prepare_file` / :meth:`Predictor.prepare_frames` (decode, detect, preprocess),
:meth:`Predictor.forward` (the model, on any batch of prepared inputs), :meth:`Predictor.finish`
(the result dict). :meth:`Predictor.predict_file` chains them.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..constants import CLASSES, CLIP_FPS, CLIP_FRAMES, CONTEXT_CROP, CONTEXT_SIZE, FACE_SIZE, TEST_CLIP_STRIDE
from ..data.datasets import clip_starts as _dataset_clip_starts, resample_indices
from ..data.video import (MAX_IMAGE_PIXELS, MediaDecodeError, MediaTooLargeError, VideoStream, decode_video,
                          image_size, is_url, open_source, probe_video, sample_positions, sniff_media)
from ..models.caer_net import CAERNet
from ..models.checkpoint import load_checkpoint, read_checkpoint
from ..ops import face_context
from .stream import Accumulator, ClipResult, Prediction, StageTimer, iter_chunks, run_stream

MAX_PIXELS = MAX_IMAGE_PIXELS  # refuse frames larger than this (memory: a decoded frame is H·W·3 bytes)


class MediaTooLongError(ValueError):
    """A video with more frames than the configured limit."""


def _prediction_from_dict(d: dict) -> Prediction:
    """The typed result of the whole-input path's dict (:meth:`Predictor.finish`)."""
    clips = [ClipResult(**c) for c in d["clips"]]
    notes = [] if not d.get("note") else [d["note"]]
    return Prediction(d["kind"], d["model"], d["checkpoint_kind"], d["emotion"], d["confidence"], d["probabilities"],
                      d["fusion_weights"], d["face_found"], d["frames_with_face"], d["frames_used"], d["fps"],
                      d["detector"], d["face_boxes"], d["attention"], clips, notes, bool(d.get("truncated", False)),
                      d.get("_visual"))


def _pair(v, default) -> Tuple[int, int]:
    if v is None:
        return tuple(default)
    if isinstance(v, int):
        return (v, v)
    v = list(v)
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


def center_crop(context_size: Tuple[int, int], crop: Optional[int]) -> Optional[Tuple[int, int, int, int]]:
    """(top, left, h, w) of the centred ``crop``×``crop`` window, floor-rounded, or None (no crop)."""
    if not crop:
        return None
    h, w = context_size
    crop = min(int(crop), h, w)
    return ((h - crop) // 2, (w - crop) // 2, crop, crop)


def sample_indices(num_frames: int, fps: float, target_fps: float = CLIP_FPS) -> np.ndarray:
    """Decode-order indices that resample a ``fps`` video at 10 fps: the datasets' rule, so a prediction
    sees the frames evaluation sees."""
    return np.asarray(resample_indices(num_frames, fps, target_fps), dtype=np.int64)


def clip_starts(num_frames: int, clip_frames: int, stride: int = TEST_CLIP_STRIDE) -> List[int]:
    """Starts of the test clips (the datasets' rule: stride 8, one padded clip if the video is short)."""
    return _dataset_clip_starts(num_frames, clip_frames, stride) or [0]


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


@dataclass
class Prepared:
    """Model inputs for one file plus what :meth:`Predictor.finish` needs to summarise it."""

    kind: str  # "image" or "video"
    face: torch.Tensor  # model face input, n×…
    context: torch.Tensor  # model context input, n×…
    clips: List[Tuple[int, int]]  # (first, last) sampled-frame positions of each clip (inclusive)
    frame_index: np.ndarray  # decode-order index of every sampled frame
    boxes: np.ndarray  # S×4 int xyxy per sampled frame, zeros = no face
    scores: np.ndarray  # S detection scores (nan: no face)
    fps: float
    size: Tuple[int, int]  # frame H, W
    frames: Optional[np.ndarray] = None  # the sampled frames (kept only when asked, for pictures)
    info: Dict = field(default_factory=dict)

    @property
    def num_inputs(self) -> int:
        return int(self.face.shape[0])


def _existing_file(path) -> Path:
    """``path`` as a Path, or :class:`MediaDecodeError` if it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise MediaDecodeError(path, "no such file")
    if path.stat().st_size == 0:
        raise MediaDecodeError(path, "empty file (0 bytes)")
    return path


class Predictor:
    """Loads a checkpoint once and predicts emotions for videos and images.

    Args:
        checkpoint: path or dict: ours (``model``, ``model_type``, ``model_args``, ``args``) or the
            community CAER-S one (``state_dict``; image model, default input sizes).
        device: "cpu" / "cuda" (default: CUDA if available).
        detector: face detector name (see :mod:`caer_fast.data.detectors`), or an object with
            ``detect(rgb) -> [(x1, y1, x2, y2, score), …]``, or None for no detection (context only).
        detect_every: run the detector on every k-th sampled frame (10 fps → k=4 is 2.5 detections/s).
        max_frames: refuse videos with more decoded frames than this (None: no limit).
        batch_size: largest model batch (inputs are chunked).
        max_frame_pixels: refuse frames (and images) with more pixels than this.
        max_pixels: decoded-pixel budget of one video (frames × width × height; None: no limit), checked
            from the header and while decoding.
        engine: what runs the model, called as ``engine(face, context, return_details=True)`` like the
            model (an exported / compiled / int8 form); default the loaded model itself.
        stream_chunk: model inputs per chunk of the streaming pipeline (clips for the video model,
            frames for the image model; default: 4 clips / ``batch_size`` frames).

    Example:
        >>> p = Predictor("runs/demo/both/checkpoint.pth")                     # doctest: +SKIP
        >>> r = p.predict_file("clip.avi"); r["emotion"], r["probabilities"]    # doctest: +SKIP
    """

    def __init__(self, checkpoint, device: Optional[str] = None, detector="haar", detect_every: int = 4,
                 max_frames: Optional[int] = None, batch_size: int = 16, max_frame_pixels: Optional[int] = MAX_PIXELS,
                 max_pixels: Optional[int] = None, engine=None, stream_chunk: Optional[int] = None):
        ckpt = read_checkpoint(checkpoint)
        self.model = load_checkpoint(ckpt).eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        args = dict(ckpt.get("args") or {})
        self.model_type = ckpt.get("model_type") or ("caer" if isinstance(self.model, CAERNet) else "caers")
        self.face_size = _pair(args.get("face_size"), FACE_SIZE)
        self.context_size = _pair(args.get("context_size"), CONTEXT_SIZE)
        self.crop = center_crop(self.context_size, args.get("crop", CONTEXT_CROP))
        self.clip_frames = int(getattr(self.model, "frames", None) or args.get("clip_frames") or CLIP_FRAMES)
        self.classes = list(ckpt.get("classes") or CLASSES)
        self.source = "ours" if "model" in ckpt else ("community" if "state_dict" in ckpt else "state_dict")
        self.detect_every = max(1, int(detect_every))
        self.max_frames = max_frames
        self.batch_size = max(1, int(batch_size))
        self.max_frame_pixels, self.max_pixels = max_frame_pixels, max_pixels
        self.engine = engine
        # what every result reports: the engine's own name (build_engine's engines have .name and .info)
        self.engine_name = getattr(engine, "name", None) or "eager"
        self.engine_info = dict(getattr(engine, "info", None) or {})
        self.stream_chunk = max(1, int(stream_chunk)) if stream_chunk else (
            min(4, self.batch_size) if self.is_video_model else self.batch_size)
        self._detector_spec = detector
        self._local = threading.local()  # one detector per thread: OpenCV cascades are not shared safely
        self.detector_name = detector if isinstance(detector, str) else (
            "none" if detector is None else getattr(detector, "name", type(detector).__name__))
        if isinstance(detector, str):
            self._detector()  # fail now (unknown name, missing package), not on the first request

    @property
    def is_video_model(self) -> bool:
        return self.model_type == "caer" or isinstance(self.model, CAERNet)

    # -- preprocessing ----------------------------------------------------------------------------
    def _detector(self):
        spec = self._detector_spec
        if spec is None or not isinstance(spec, str):
            return spec
        det = getattr(self._local, "detector", None)
        if det is None:
            from ..data.detectors import make_detector

            det = self._local.detector = make_detector(spec)
        return det

    def detect(self, frames: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """One box per frame (the best face of every ``detect_every``-th frame, held in between)."""
        from ..data.detectors import best_face

        n = len(frames)
        boxes = np.zeros((n, 4), dtype=np.int64)
        scores = np.full(n, np.nan)
        det = self._detector()
        if det is None:
            return boxes, scores
        for start in range(0, n, self.detect_every):
            best = best_face(det.detect(frames[start]))
            if best is not None:
                boxes[start:start + self.detect_every] = best[:4]
                scores[start:start + self.detect_every] = best[4]
        return boxes, scores

    def read_file(self, path) -> Tuple[str, np.ndarray, np.ndarray, float]:
        """(kind, sampled frames S×H×W×3, their decode-order indices, source fps) of an image or video.

        Raises :class:`MediaDecodeError` (unreadable) or :class:`MediaTooLongError` (over ``max_frames``).
        """
        path = _existing_file(path)
        if is_image_file(path):
            from ..data.video import read_image

            return "image", read_image(path, max_pixels=self.max_frame_pixels)[None], np.zeros(1, dtype=np.int64), 0.0
        info = probe_video(path, count_frames=False)  # header only: cheap
        if self.max_frame_pixels is not None and info.width * info.height > self.max_frame_pixels:
            raise MediaTooLargeError(path, f"video frames too large ({info.width}×{info.height} pixels)")
        limit = self.max_frames
        if limit is not None and info.num_frames > limit:
            raise MediaTooLongError(f"video too long: {info.num_frames} frames, the limit is {limit}")
        # Decode up to the limit (+1 to notice a header that under-counts), then resample at 10 fps.
        video = decode_video(path, max_frames=None if limit is None else limit + 1)
        n = len(video.frames)
        if limit is not None and n > limit:
            raise MediaTooLongError(f"video too long: more than {limit} frames")
        idx = sample_indices(n, video.fps)
        return "video", video.frames[idx], video.indices[idx], float(video.fps)

    def prepare_frames(self, frames: np.ndarray, fps: Optional[float] = None, boxes=None, kind: Optional[str] = None,
                       frame_index: Optional[np.ndarray] = None, keep_frames: bool = False) -> Prepared:
        """Model inputs for frames: an image H×W×3, or a video T×H×W×3 already at 10 fps (``fps`` None)
        or at ``fps`` (resampled here). ``boxes`` (S×4 xyxy, zeros = no face) skips the detector."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames, kind = frames[None], kind or "image"
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 H×W×3 or T×H×W×3 RGB, got {frames.dtype} {frames.shape}")
        kind = kind or "video"
        if frame_index is None:
            frame_index = np.arange(len(frames))
            if fps:
                sel = sample_indices(len(frames), fps)
                frames, frame_index = frames[sel], frame_index[sel]
                if boxes is not None:
                    boxes = np.asarray(boxes)[sel]
        if boxes is None:
            boxes, scores = self.detect(frames)
        else:
            boxes = np.asarray(boxes, dtype=np.int64).reshape(len(frames), 4)
            scores = np.where((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]), 1.0, np.nan)
        face, context = face_context(torch.from_numpy(np.require(frames, requirements=("C", "W"))), torch.from_numpy(boxes),
                                     face_size=self.face_size, context_size=self.context_size, crop=self.crop)
        s = len(frames)
        if self.model_type == "caer" or isinstance(self.model, CAERNet):
            t = self.clip_frames
            starts = clip_starts(s, t)
            # clip positions, padded by repeating the last frame when the video is shorter than a clip
            pos = torch.tensor([[min(a + j, s - 1) for j in range(t)] for a in starts])
            face = face[pos].permute(0, 2, 1, 3, 4).contiguous()  # n×T×3×h×w → n×3×T×h×w
            context = context[pos].permute(0, 2, 1, 3, 4).contiguous()
            clips = [(a, min(a + t, s) - 1) for a in starts]
        else:  # image model: one input per sampled frame, grouped into clips afterwards
            clips = [(a, min(a + self.clip_frames, s) - 1) for a in clip_starts(s, self.clip_frames)]
        h, w = frames.shape[1:3]
        return Prepared(kind, face, context, clips, np.asarray(frame_index), boxes, scores, float(fps or CLIP_FPS),
                        (int(h), int(w)), frames if keep_frames else None)

    def prepare_file(self, path, keep_frames: bool = False, known_boxes=None) -> Prepared:
        """``known_boxes``: {decode-order frame index: xyxy box} from a box file; skips the detector
        (frames without an entry have no face)."""
        kind, frames, index, fps = self.read_file(path)
        boxes = None
        if known_boxes is not None:
            boxes = np.array([known_boxes.get(int(i), (0, 0, 0, 0)) for i in index], dtype=np.int64).reshape(-1, 4)
        return self.prepare_frames(frames, kind=kind, frame_index=index, keep_frames=keep_frames, boxes=boxes,
                                   fps=None if kind == "image" else fps)

    # -- model ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, face: torch.Tensor, context: torch.Tensor):
        """(probabilities n×C, attention n×1×(S…), fusion weights n×2) on CPU, in chunks of ``batch_size``."""
        run = self.engine if self.engine is not None else self.model
        probs, att, weights = [], [], []
        for i in range(0, face.shape[0], self.batch_size):
            logits, d = run(face[i:i + self.batch_size].to(self.device),
                            context[i:i + self.batch_size].to(self.device), return_details=True)
            probs.append(torch.softmax(logits.float(), dim=-1).cpu())
            att.append(d["attention"].float().cpu())
            weights.append(d["fusion_weights"].float().cpu())
        return torch.cat(probs), torch.cat(att), torch.cat(weights)

    # -- results ----------------------------------------------------------------------------------
    def _probs_dict(self, p: torch.Tensor) -> Dict[str, float]:
        return {c: round(float(v), 6) for c, v in zip(self.classes, p.tolist())}

    def finish(self, prep: Prepared, probs: torch.Tensor, attention: torch.Tensor, weights: torch.Tensor,
               with_arrays: bool = False) -> dict:
        """The JSON-ready result. ``with_arrays`` adds ``_visual`` (numpy, for pictures; not JSON)."""
        per_frame = self.model_type != "caer" and not isinstance(self.model, CAERNet)
        has_face = (prep.boxes[:, 2] > prep.boxes[:, 0]) & (prep.boxes[:, 3] > prep.boxes[:, 1])
        clip_probs, clip_w, clip_att = [], [], []
        for k, (a, b) in enumerate(prep.clips):
            if per_frame:  # image model: average the frames of the clip
                clip_probs.append(probs[a:b + 1].mean(0))
                clip_w.append(weights[a:b + 1].mean(0))
                clip_att.append(attention[(a + b) // 2])
            else:
                clip_probs.append(probs[k])
                clip_w.append(weights[k])
                clip_att.append(attention[k])
        cp = torch.stack(clip_probs)
        overall = cp.mean(0)
        top = int(overall.argmax())
        dt = 1.0 / CLIP_FPS
        clips = []
        for k, (a, b) in enumerate(prep.clips):
            p = cp[k]
            clips.append({
                "clip": k, "first_frame": int(prep.frame_index[a]), "last_frame": int(prep.frame_index[b]),
                "start_s": round(a * dt, 3), "end_s": round((b + 1) * dt, 3),
                "emotion": self.classes[int(p.argmax())], "probabilities": self._probs_dict(p),
                "fusion_weights": {"face": round(float(clip_w[k][0]), 6), "context": round(float(clip_w[k][1]), 6)},
                "face_found": bool(has_face[a:b + 1].any()),
            })
        # the clip shown in pictures: the most confident one for the overall emotion
        best = int(cp[:, top].argmax())
        att = clip_att[best][0]  # 1×(T'×)h×w → (T'×)h×w
        att2d = att.mean(0) if att.dim() == 3 else att  # video: average the attention over time
        w_mean = torch.stack(clip_w).mean(0)
        boxes = [[int(prep.frame_index[i]), *map(int, prep.boxes[i])] + [round(float(prep.scores[i]), 4)]
                 for i in range(len(prep.boxes)) if has_face[i]]
        result = {
            "kind": prep.kind, "model": self.model_type, "checkpoint_kind": self.source,
            "emotion": self.classes[top], "confidence": round(float(overall[top]), 6),
            "probabilities": self._probs_dict(overall),
            "fusion_weights": {"face": round(float(w_mean[0]), 6), "context": round(float(w_mean[1]), 6)},
            "face_found": bool(has_face.any()),
            "frames_with_face": int(has_face.sum()), "frames_used": int(len(prep.boxes)),
            "note": None if has_face.any() else "no face found: context-only prediction (face input is zeros)",
            "fps": prep.fps if prep.kind == "video" else None,
            "detector": self.detector_name,
            "engine": getattr(self, "engine_name", "eager"),
            "face_boxes": boxes,  # [frame, x1, y1, x2, y2, score] for sampled frames with a face
            "attention": {"clip": best, "shape": list(att2d.shape),
                          "values": [[round(float(v), 5) for v in row] for row in att2d.tolist()]},
            "clips": clips,
        }
        if with_arrays:
            mid = (prep.clips[best][0] + prep.clips[best][1]) // 2
            result["_visual"] = {
                "frame": None if prep.frames is None else prep.frames[mid], "box": prep.boxes[mid].tolist(),
                "attention": att2d.numpy(), "context_size": self.context_size, "crop": self.crop,
                "clip_probs": cp.numpy(), "clip_times": [((a + b + 1) / 2) * dt for a, b in prep.clips],
            }
        return result

    def predict_file(self, path, with_arrays: bool = False, known_boxes=None, on_clip=None, follow: bool = False,
                     timer: Optional[StageTimer] = None, on_start=None) -> Prediction:
        """Emotion of the video or image at ``path`` (a file, ``"-"`` for standard input, or a URL PyAV
        opens); see the module docstring for the pipeline. Videos stream (:meth:`stream`); ``known_boxes``
        as in :meth:`prepare_file`. Returns a :class:`~.stream.Prediction` (``.to_dict()`` is the JSON)."""
        if not follow and path != "-" and not is_url(str(path)) and not hasattr(path, "read"):
            p = _existing_file(path)
            if is_image_file(p):
                prep = self.prepare_file(p, keep_frames=with_arrays, known_boxes=known_boxes)
                result = _prediction_from_dict(self.finish(prep, *self.forward(prep.face, prep.context),
                                                           with_arrays=with_arrays))
                if on_clip is not None:
                    for c in result.clips:
                        on_clip(c)
                return result
        return self.stream(path, with_arrays=with_arrays, known_boxes=known_boxes, on_clip=on_clip, follow=follow,
                           timer=timer, on_start=on_start)

    def open_video(self, source, follow: bool = False) -> VideoStream:
        """The :class:`~caer_fast.data.video.VideoStream` of ``source`` with this predictor's limits."""
        container = open_source(source, follow=follow)
        name = "<stdin>" if source == "-" else str(source)
        try:
            return VideoStream(container, name, max_frame_pixels=self.max_frame_pixels, max_frames=self.max_frames,
                               max_pixels=self.max_pixels)
        except BaseException:
            container.close()
            raise

    def sampled_frames(self, video: VideoStream, timer: Optional[StageTimer] = None):
        """(k, decode index, RGB frame) of the video resampled to 10 fps (RGB conversion timed as decode)."""
        for k, i, frame in sample_positions(video, video.fps, CLIP_FPS):
            yield k, i, video.rgb(frame)

    def stream(self, source, with_arrays: bool = False, known_boxes=None, on_clip=None, follow: bool = False,
               timer: Optional[StageTimer] = None, on_start=None) -> Prediction:
        """Stream a video through the pipeline of :mod:`caer_fast.serving.stream` in bounded memory;
        ``on_start(VideoStream)`` once its header is read, ``on_clip(ClipResult)`` as each clip is ready
        (progress, timelines, ``--follow``)."""
        timer = timer if timer is not None else StageTimer()
        video = self.open_video(source, follow=follow)
        try:
            if on_start is not None:
                on_start(video)
            acc = Accumulator(self, kind="video", fps=video.fps, keep_frames=with_arrays)
            chunks = iter_chunks(self, self.sampled_frames(video, timer), self.stream_chunk, known_boxes=known_boxes,
                                 keep_frames=with_arrays, timer=timer)
            run_stream(self, chunks, acc, on_clip=on_clip, timer=timer)
        finally:
            video.close()
        return acc.result(notes=video.notes, truncated=video.truncated)

    def predict_frames(self, frames, fps: Optional[float] = None, boxes=None, with_arrays: bool = False) -> Prediction:
        """Emotion of in-memory frames (H×W×3 image or T×H×W×3 video, uint8 RGB); see :meth:`prepare_frames`."""
        prep = self.prepare_frames(frames, fps=fps, boxes=boxes, keep_frames=with_arrays)
        return _prediction_from_dict(self.finish(prep, *self.forward(prep.face, prep.context), with_arrays=with_arrays))


def set_threads_from_env() -> None:
    """Respect OMP_NUM_THREADS for torch's intra-op pool (servers on shared machines)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))
