"""Writing real video files with PyAV, for the tests and benchmarks that need clips with known frames."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np


def write_clip(path, frames, codec: str, fps: int = 25, pix_fmt: str = None, options=None, bit_rate: int = None) -> Path:
    """Encode uint8 T×H×W×3 RGB ``frames`` (an array, or any iterable of H×W×3 frames: encoded one at a time)
    to ``path`` (container from the suffix) with ``codec``.

    ``pix_fmt`` defaults to what the codec takes (``yuvj420p`` for MJPEG, else ``yuv420p``, whose
    4:2:0 chroma needs even sizes); ``options`` are the encoder's (e.g. ``{"crf": "4"}``).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = iter(frames)
    first = next(frames)
    h, w = np.asarray(first).shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps, options=dict(options or {}))
        s.width, s.height = w, h
        s.pix_fmt = pix_fmt or ("yuvj420p" if codec == "mjpeg" else "yuv420p")
        if bit_rate:
            s.bit_rate = bit_rate
        for f in itertools.chain([first], frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode())
    return path
