"""Video decoding with PyAV (bundled FFmpeg: H.264, MPEG-4 Part 2, MJPEG, VP8/VP9, …)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class MediaDecodeError(RuntimeError):
    """A file that cannot be decoded; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


@dataclass
class VideoInfo:
    path: str
    num_frames: int  # frames in decode order (counted by decoding when the header does not say)
    fps: float
    width: int
    height: int
    codec: str


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 T×H×W×3, RGB
    indices: np.ndarray  # 0-based decode-order index of each returned frame
    fps: float
    codec: str


def _open(path):
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaDecodeError(path, "no such file")
    if path.stat().st_size == 0:
        raise MediaDecodeError(path, "empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except Exception as exc:  # av.error.InvalidDataError and friends
        raise MediaDecodeError(path, f"not a readable video container ({exc.__class__.__name__}: {exc})") from None
    if not container.streams.video:
        container.close()
        raise MediaDecodeError(path, "no video stream")
    return container


def probe_video(path, count_frames: bool = True) -> VideoInfo:
    """Frame count, rate, size and codec of ``path`` (decoding it if the header has no frame count)."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        n = int(stream.frames or 0)
        if count_frames or n <= 0:
            try:
                n = sum(1 for _ in container.decode(stream))
            except Exception as exc:
                raise MediaDecodeError(path, f"decoding failed ({exc.__class__.__name__}: {exc})") from None
        if n <= 0:
            raise MediaDecodeError(path, "no decodable frames")
        return VideoInfo(str(path), n, fps, stream.codec_context.width, stream.codec_context.height,
                         stream.codec_context.name)
    finally:
        container.close()


def decode_video(path, indices: Optional[Sequence[int]] = None, max_frames: Optional[int] = None) -> DecodedVideo:
    """Decode ``path`` to RGB frames.

    Args:
        indices: decode-order frame indices to keep (sorted or not, repeats allowed); default all.
        max_frames: stop after this many frames in decode order.

    Raises:
        MediaDecodeError: the file is missing, empty, not a video, or fails to decode before
            yielding the frames asked for (a truncated file still yields the frames it holds
            when no ``indices`` are asked for).
    """
    container = _open(path)
    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    last = None if wanted is None else (wanted[-1] if wanted else -1)
    frames, kept = [], []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        codec = stream.codec_context.name
        wanted_set = None if wanted is None else set(wanted)
        try:
            for i, frame in enumerate(container.decode(stream)):
                if max_frames is not None and i >= max_frames:
                    break
                if last is not None and i > last:
                    break
                if wanted_set is None or i in wanted_set:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    kept.append(i)
        except Exception as exc:
            if not frames or wanted is not None:
                raise MediaDecodeError(path, f"decoding failed after {len(frames)} frames "
                                             f"({exc.__class__.__name__}: {exc})") from None
    finally:
        container.close()
    if not frames:
        raise MediaDecodeError(path, "no decodable frames")
    if wanted is not None and len(kept) < len(wanted):
        raise MediaDecodeError(path, f"has {kept[-1] + 1 if kept else 0} frames, frame {wanted[len(kept)]} asked for")
    out = np.stack(frames)
    idx = np.asarray(kept, dtype=np.int64)
    if indices is not None:  # back to the caller's order, repeats included
        pos = {k: j for j, k in enumerate(kept)}
        sel = [pos[int(i)] for i in indices]
        out, idx = out[sel], idx[sel]
    return DecodedVideo(out, idx, fps, codec)


def read_image(path) -> np.ndarray:
    """An image file as uint8 H×W×3 RGB; :class:`MediaDecodeError` naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaDecodeError(path, "no such file")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaDecodeError(path, f"not a readable image ({exc.__class__.__name__}: {exc})") from None
