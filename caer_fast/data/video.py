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


def _check_decodable(container, name) -> None:
    """FFmpeg opens some formats it has no decoder for (an SVG is an "svg_pipe" video stream without a
    codec): refuse those as not a video, with the format's name, instead of failing on the missing codec."""
    stream = container.streams.video[0]
    try:
        cc = stream.codec_context
        ok = cc is not None and cc.codec is not None and cc.name
    except Exception:  # PyAV raises on a stream whose codec it cannot open
        ok = False
    if not ok:
        fmt = getattr(container.format, "name", None) or "unknown"
        container.close()
        raise MediaDecodeError(name, f"not a readable video container (FFmpeg opens it as {fmt!r} but has no "
                                     f"decoder for its stream)")


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
    _check_decodable(container, path)
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


MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before their pixels are decoded


class MediaTooLargeError(MediaDecodeError):
    """Frames (or an image) over a pixel limit: refused before the pixels are decoded."""


# Magic bytes of the formats we accept: a file that starts like one of these and still fails to decode
# is "broken media" (truncated, corrupt), not "not media".
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
_VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3", b"OggS", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"FLV")


def sniff_media(head: bytes) -> Optional[str]:
    """"image", "video" or None from a file's first bytes (at least 12)."""
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head.startswith(_VIDEO_MAGIC) or (head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX")) \
            or head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") or (len(head) > 188 and head[0] == 0x47
                                                                              and head[188] == 0x47):
        return "video"
    return None


def image_size(path) -> Optional[tuple]:
    """(width, height) from an image header without decoding its pixels, or None if PIL can't tell.

    PIL's decompression-bomb guard is off here on purpose: the caller compares the size with its own
    limit, so a 20000×20000 PNG is refused as a too-large image instead of being taken for a video."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # not an image PIL knows
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _to_rgb8(im) -> np.ndarray:
    """RGB uint8 of a PIL image, scaling 16-bit and 32-bit integer modes instead of clipping them
    (``convert("RGB")`` clips a 16-bit grey value of 40000 to 255: a photo turns white)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "I" and a.size and a.max() <= 255 and a.min() >= 0:
            scale = 1.0  # an "I" image holding 8-bit values
        else:
            scale = 255.0 / 65535.0  # 16-bit samples (PNG, TIFF) come as I;16 or I
        g = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        g = np.zeros(a.shape, np.uint8) if hi <= lo else np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def read_image(path, max_pixels: Optional[int] = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file as uint8 H×W×3 RGB; :class:`MediaDecodeError` naming the file otherwise.

    16-bit images are scaled to 8 bits (not clipped); images over ``max_pixels`` raise
    :class:`MediaTooLargeError` before their pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaDecodeError(path, "no such file")
    size = image_size(path)
    if size is not None and max_pixels is not None and size[0] * size[1] > max_pixels:
        raise MediaTooLargeError(path, f"image too large ({size[0]}×{size[1]} pixels; the limit is "
                                       f"{max_pixels} pixels)")
    try:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None if max_pixels is not None else old  # our own limit was checked above
        try:
            with Image.open(path) as im:
                return _to_rgb8(im)
        finally:
            Image.MAX_IMAGE_PIXELS = old
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaDecodeError(path, f"not a readable image ({exc.__class__.__name__}: {exc})") from None


# -- streaming ------------------------------------------------------------------------------------
class FollowReader:
    """A growing file read like a pipe: at the end it waits for more bytes, and ends once the file has
    not grown for ``idle_s`` seconds (the writer is done). No ``seek``: the demuxer reads it as a stream,
    so the container must be a streamable one (MPEG-TS, Matroska/WebM, fragmented MP4)."""

    def __init__(self, path, idle_s: float = 5.0, poll_s: float = 0.05):
        self._f = open(path, "rb")
        self.idle_s, self.poll_s = float(idle_s), float(poll_s)
        self.name = str(path)

    def read(self, n: int = -1) -> bytes:
        import time

        waited = 0.0
        while True:
            data = self._f.read(n)
            if data:
                return data
            if waited >= self.idle_s:
                return b""
            time.sleep(self.poll_s)
            waited += self.poll_s

    def close(self) -> None:
        self._f.close()


def is_url(source) -> bool:
    return isinstance(source, str) and "://" in source and not Path(source).exists()


def open_source(source, follow: bool = False, idle_s: float = 5.0, timeout_s: float = 30.0):
    """A PyAV input container for a path, ``"-"`` (standard input), a URL PyAV opens (rtsp://, http://,
    …), or a binary file object. ``follow`` reads a file that is still being written (see
    :class:`FollowReader`). Raises :class:`MediaDecodeError` naming the source."""
    import av
    import sys

    name = "<stdin>" if source == "-" else str(getattr(source, "name", source))
    if source == "-":
        target = sys.stdin.buffer
    elif hasattr(source, "read"):
        target = source
    elif is_url(source):
        target = source
    else:
        path = Path(source)
        if not path.is_file():
            raise MediaDecodeError(path, "no such file")
        if path.stat().st_size == 0 and not follow:
            raise MediaDecodeError(path, "empty file (0 bytes)")
        target = FollowReader(path, idle_s) if follow else str(path)
    try:
        kwargs = {"timeout": timeout_s} if isinstance(target, str) and is_url(target) else {}
        if not isinstance(target, str):  # a pipe or a growing file: start after a short probe, not 5 s of stream
            kwargs["container_options"] = {"probesize": "65536", "analyzeduration": "500000"}
        container = av.open(target, "r", **kwargs)
    except Exception as exc:  # av.error.InvalidDataError, network errors, …
        what = "could not open the stream" if is_url(source) else "not a readable video container"
        raise MediaDecodeError(name, f"{what} ({exc.__class__.__name__}: {exc})") from None
    if not container.streams.video:
        container.close()
        raise MediaDecodeError(name, "no video stream")
    _check_decodable(container, name)
    return container


# Decoder threads of a streamed video: each frame thread holds its own frames, so the decoder's memory grows
# with them (measured on a 4096×4096 H.264 stream: +73 MB at 1 thread, +120 MB at 2, +170 MB at FFmpeg's
# automatic 3 on a 2-core machine, more on bigger machines). The server's memory estimate counts on this bound.
DECODER_THREADS = 2
# Frames the decoder may hold at once, for the server's memory estimate: H.264's 16 reference frames plus the
# threads' frames (measured: 24.6 frames' worth at 2 threads on a 4096×4096 stream encoded with ref=16).
DECODER_MAX_FRAMES = 25


class VideoStream:
    """Decoded frames of a video, one at a time, with their position on the nominal frame grid.

    Iterating yields ``(index, position, frame)``: ``index`` counts decoded frames (decode order, as in
    :func:`decode_video`), ``position`` is the presentation time × the stream's average rate (equal to
    ``index`` for a constant-rate file; a variable-rate file is placed by its timestamps; AVI files and
    timestamps that do not increase fall back to the frame grid) and ``frame`` is
    the ``av.VideoFrame`` (convert with :meth:`rgb`, only for frames that are used: conversion costs
    as much as decoding).

    Limits, checked from the header before decoding and again while decoding: ``max_frame_pixels`` (one
    frame's width × height; :class:`MediaTooLargeError`), ``max_frames`` and ``max_pixels`` (decoded frames,
    and their summed width × height; :class:`MediaTooLargeError`). A decoding error after some frames ends
    the stream with ``truncated`` set and a line in ``notes`` (the frames before it are kept); a header
    that announces more frames than arrive is noted too. A change of frame size mid-stream is rescaled to
    the first size (noted): the header's size when it has one, so the frames handed on are never larger
    than the header says. ``max_frame_pixels`` is also FFmpeg's own ``max_pixels``: a stream that switches to
    larger frames after its header is refused by the decoder before it allocates them.
    """

    def __init__(self, container, name: str, max_frame_pixels: Optional[int] = MAX_IMAGE_PIXELS,
                 max_frames: Optional[int] = None, max_pixels: Optional[int] = None):
        self.container, self.name = container, str(name)
        self.stream = stream = container.streams.video[0]
        cc = stream.codec_context
        cc.thread_type = "AUTO"
        cc.thread_count = DECODER_THREADS  # bounded: FFmpeg's default grows with the machine's cores
        if max_frame_pixels is not None:
            cc.options = dict(cc.options or {}, max_pixels=str(int(max_frame_pixels)))
        self.fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        self.codec = cc.name
        self.width, self.height = int(cc.width or 0), int(cc.height or 0)
        self.header_frames = int(stream.frames or 0)
        dur = stream.duration * stream.time_base if stream.duration and stream.time_base else None
        if dur is None and container.duration:
            dur = container.duration / 1_000_000
        self.duration_s = float(dur) if dur else None
        self.max_frame_pixels, self.max_frames, self.max_pixels = max_frame_pixels, max_frames, max_pixels
        self.notes: list = []
        self.truncated = False
        self.decoded = 0
        self.decoded_pixels = 0
        # (H, W) every frame is given at: the header's (what a server reserves memory for), else the first frame's
        self.size: Optional[tuple] = (self.height, self.width) if self.width > 0 and self.height > 0 else None
        self._check_frame(self.width, self.height)
        n = self.header_frames
        if max_frames is not None and n > max_frames:
            raise MediaTooLargeError(self.name, f"video too long: {n} frames, the limit is {max_frames}")
        if max_pixels is not None and n * self.width * self.height > max_pixels:
            raise MediaTooLargeError(self.name, f"video over the decoded-pixel budget: {n} frames × {self.width}×"
                                                f"{self.height} = {n * self.width * self.height} pixels, the budget "
                                                f"is {max_pixels}")

    def _check_frame(self, w: int, h: int) -> None:
        if self.max_frame_pixels is not None and w * h > self.max_frame_pixels:
            raise MediaTooLargeError(self.name, f"video frames too large ({w}×{h} pixels; the limit is "
                                                f"{self.max_frame_pixels} pixels per frame)")

    def __iter__(self):
        from fractions import Fraction

        stream = self.stream
        tb = Fraction(stream.time_base) if stream.time_base else None
        rate = Fraction(self.fps).limit_denominator(100000)
        pts0, last_pts, last_pos = None, None, -1.0
        # AVI has no presentation timestamps (B-frames come out with shuffled ones): its frames are on the
        # nominal grid, which is also what the whole-file path (decode order) assumes
        use_pts = "avi" not in (self.container.format.name or "")
        it = self.container.decode(stream)
        i = 0
        while True:
            try:
                frame = next(it)
            except StopIteration:
                break
            except Exception as exc:  # corrupt or truncated data: keep what came before
                cc = stream.codec_context  # the decoder refused a frame over max_pixels: say so, not "corrupt"
                self._check_frame(int(cc.width or 0), int(cc.height or 0))
                if i == 0:
                    raise MediaDecodeError(self.name, f"decoding failed before the first frame "
                                                      f"({exc.__class__.__name__}: {exc})") from None
                self.truncated = True
                self.notes.append(f"truncated or corrupt: decoding stopped after frame {i - 1} "
                                  f"({exc.__class__.__name__}); results cover the frames before it")
                break
            w, h = frame.width, frame.height
            self._check_frame(w, h)
            if self.size is None:
                self.size = (h, w)
            if (h, w) != self.size:
                if not any(n.startswith("frame size changed") for n in self.notes):
                    self.notes.append(f"frame size changed at frame {i} ({self.size[1]}×{self.size[0]} → {w}×{h}): "
                                      f"rescaled to the first size")
            if self.max_frames is not None and i >= self.max_frames:
                raise MediaTooLargeError(self.name, f"video too long: more than {self.max_frames} frames")
            self.decoded_pixels += w * h
            if self.max_pixels is not None and self.decoded_pixels > self.max_pixels:
                raise MediaTooLargeError(self.name, f"video over the decoded-pixel budget: more than "
                                                    f"{self.max_pixels} pixels after {i + 1} frames")
            if use_pts and (frame.pts is None or tb is None or (last_pts is not None and frame.pts <= last_pts)):
                use_pts = False  # no timestamps, or ones that do not increase: the frame grid from here on
            if use_pts:
                if pts0 is None:
                    pts0 = frame.pts
                last_pts = frame.pts
                pos = float((frame.pts - pts0) * tb * rate)
            else:
                pos = last_pos + 1.0
            last_pos = pos
            self.decoded = i + 1
            yield i, pos, frame
            i += 1
        if self.decoded == 0:
            raise MediaDecodeError(self.name, "no decodable frames")
        if not self.truncated and self.header_frames > 1 and self.decoded < self.header_frames - 1:
            self.truncated = True
            self.notes.append(f"truncated: the header announces {self.header_frames} frames, {self.decoded} "
                              f"decoded; results cover those")

    def rgb(self, frame) -> np.ndarray:
        """H×W×3 uint8 RGB of a frame at the stream's first frame size."""
        h, w = self.size
        if (frame.height, frame.width) != (h, w):
            return frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
        return frame.to_ndarray(format="rgb24")

    def close(self) -> None:
        self.container.close()


def sample_positions(stream, fps: float, target_fps: float = 10.0):
    """Resample ``(index, position, frame)`` items (a :class:`VideoStream`) to ``target_fps``.

    Yields ``(k, index, frame)`` for sampled frame k: the last frame whose position is at most
    ``k · fps / target_fps``, the datasets' rule (:func:`caer_fast.data.datasets.resample_indices`,
    same epsilons), applied to timestamps, so a variable-rate input is sampled by time. A stream at or
    below ``target_fps`` keeps every frame.
    """
    import math

    if not fps or fps <= target_fps:
        for k, (i, _pos, frame) in enumerate(stream):
            yield k, i, frame
        return
    step = fps / target_fps
    k, prev = 0, None
    for i, pos, frame in stream:
        if prev is not None:
            while k * step + 1e-6 < pos:
                yield k, prev[0], prev[2]
                k += 1
        prev = (i, pos, frame)
    if prev is not None:
        end = prev[1] + 1.0  # the last frame lasts one nominal frame
        count = math.ceil(end / step - 1e-9)
        while k < count and k * step + 1e-6 < end:
            yield k, prev[0], prev[2]
            k += 1
