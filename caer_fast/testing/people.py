"""A real-face video with several people and its ground truth, for the multi-person tests (issue 26).

Three real photographs that ship with installed packages (no download): scikit-image's astronaut
(``skimage.data.astronaut``), matplotlib's Grace Hopper (``sample_data/grace_hopper.jpg``) and the first
LFW face of ``skimage.data.lfw_subset`` (25×25 grey, upscaled 4×). Each is pasted, its face about
85-100 px, over scikit-image's brick texture (a background where Haar finds face-like false positives):

- person 0 (astronaut) walks left → right along the top for the whole clip;
- person 1 (Grace Hopper) walks right → left along the bottom for the whole clip and rises towards the
  middle around t = 7.8 s, so the two pass each other closely (face boxes about 20 px apart, same x) but
  never overlap: an occluded face is invisible to any detector, and "visible" would need a partial rule;
- person 2 (LFW) enters from the right edge at t = 4 s, stays, and leaves to the right by t ≈ 14.3 s.

Longer versions (``seconds`` > 15, for the benchmarks) play the 15 s choreography forwards, then backwards,
and so on, so every motion stays continuous (no one jumps across the frame): in each 30 s, persons 0 and 1
cross twice and person 2 leaves and comes back.

It lives in tests/ (not caer_fast.data.synthetic): it needs test-only packages (scikit-image) and exists
to score detectors and trackers against a known truth, which users have no use for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .media import write_clip

W, H, FPS, SECONDS = 640, 360, 10, 15
N_FRAMES = FPS * SECONDS

Box = Tuple[int, int, int, int]


@dataclass
class Person:
    patch: np.ndarray  # RGB uint8 h×w×3 pasted as is
    face: Box  # the face box inside the patch (xyxy)


def _resize(img, scale):
    import cv2

    h, w = img.shape[:2]
    return cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA if scale < 1
                      else cv2.INTER_CUBIC)


def _person(img, crop, face, scale) -> Person:
    """Cut ``crop`` (y1, y2, x1, x2) of a photo whose face box is ``face`` (full-photo xyxy), scale it."""
    y1, y2, x1, x2 = crop
    patch = _resize(np.ascontiguousarray(img[y1:y2, x1:x2]), scale)
    fx1, fy1, fx2, fy2 = face
    return Person(patch, tuple(round(v * scale) for v in (fx1 - x1, fy1 - y1, fx2 - x1, fy2 - y1)))


def people() -> List[Person]:
    """The three people. Face boxes on the stills: the mean of MTCNN's and OpenCV Haar's boxes (which
    overlap each other at IoU ≥ 0.75 on each still), so the truth favours neither detector."""
    import matplotlib
    from matplotlib import image as mpimg
    from skimage import data

    astronaut = data.astronaut()
    grace = np.asarray(mpimg.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")))
    lfw = (data.lfw_subset()[0] * 255).round().astype(np.uint8)[..., None].repeat(3, 2)
    return [
        _person(astronaut, (30, 200, 140, 310), (179, 64, 270, 166), 0.9),
        _person(grace, (80, 360, 130, 390), (162, 108, 366, 328), 0.43),
        _person(lfw, (0, 25, 0, 25), (1.25, 0, 22, 24), 4.0),
    ]


def _lerp(t, t0, t1, a, b):
    u = min(1.0, max(0.0, (t - t0) / (t1 - t0)))
    return a + (b - a) * u


def _positions(t: float, ps: List[Person]) -> List[Optional[Tuple[int, int]]]:
    """Top-left corner of each patch at time t (s), None while the person is off screen."""
    t = t % (2 * SECONDS)
    if t > SECONDS:  # the way back (longer videos); t < 15 s is the 15 s video unchanged
        t = 2 * SECONDS - t
    h1 = ps[1].patch.shape[0]
    p0 = (_lerp(t, 0, SECONDS, 10, 640 - ps[0].patch.shape[1] - 10), 8 + 6 * np.sin(t * 1.3))
    # bottom lane, rising around the crossing (t = 7.8 s) so its face passes ~20 px under person 0's face
    rise = max(0.0, 1 - abs(t - 7.8) / 2.0)
    top1 = H - h1 - 4
    meet = 8 + ps[0].face[3] + 20 - ps[1].face[1]
    p1 = (_lerp(t, 0, SECONDS, 640 - ps[1].patch.shape[1] - 10, 10), top1 + (meet - top1) * rise)
    p2 = None
    if 4.0 <= t < 14.5:
        w2 = ps[2].patch.shape[1]
        x = _lerp(t, 4.0, 4.8, W, W - w2 - 30) if t < 13.2 else _lerp(t, 13.2, 14.3, W - w2 - 30, W + 5)
        p2 = (x, H - ps[2].patch.shape[0] - 120)
    return [(round(p[0]), round(p[1])) if p is not None else None for p in (p0, p1, p2)]


def _background() -> np.ndarray:
    import cv2
    from skimage import data

    g = cv2.resize(data.brick(), (W, H), interpolation=cv2.INTER_AREA)
    tint = np.array([1.0, 0.9, 0.8], np.float32)
    return np.clip(g[..., None].astype(np.float32) * tint, 0, 255).astype(np.uint8)


def frames(seconds: float = SECONDS, fps: int = FPS) -> Iterator[Tuple[np.ndarray, Dict[int, Box], Dict[int, Box]]]:
    """``(frame, full, partial)`` one frame at a time (H×W×3 uint8; truth as :func:`render` gives it), at
    ``fps`` for ``seconds``: memory does not grow with the length."""
    ps = people()
    bg = _background()
    for i in range(round(seconds * fps)):
        img = bg.copy()
        f, p = {}, {}
        for pid, (person, pos) in enumerate(zip(ps, _positions(i / fps, ps))):
            if pos is None:
                continue
            x, y = pos
            ph, pw = person.patch.shape[:2]
            # paste the part of the patch that is on screen
            sx1, sy1, sx2, sy2 = max(0, -x), max(0, -y), min(pw, W - x), min(ph, H - y)
            if sx2 <= sx1 or sy2 <= sy1:
                continue
            img[y + sy1:y + sy2, x + sx1:x + sx2] = person.patch[sy1:sy2, sx1:sx2]
            fx1, fy1, fx2, fy2 = person.face
            box = (x + fx1, y + fy1, x + fx2, y + fy2)
            if box[0] >= 0 and box[1] >= 0 and box[2] <= W and box[3] <= H:
                f[pid] = box
            elif box[2] > 0 and box[0] < W:
                p[pid] = box
        yield img, f, p


def render(seconds: float = SECONDS, fps: int = FPS) -> Tuple[np.ndarray, List[Dict[int, Box]], List[Dict[int, Box]]]:
    """Frames (N×H×W×3 uint8) and per frame the truth: ``{person: face box}`` for faces wholly inside the
    frame, and ``{person: face box}`` of faces cut by the frame edge (neither required nor counted wrong)."""
    n = round(seconds * fps)
    out = np.empty((n, H, W, 3), np.uint8)
    full, partial = [], []
    for i, (img, f, p) in enumerate(frames(seconds, fps)):
        out[i] = img
        full.append(f)
        partial.append(p)
    return out, full, partial


def write_people_video(path, codec: str = "h264", seconds: float = SECONDS, fps: int = FPS, preset: str = "veryfast"):
    """Render and encode the clip (PyAV, ``codec`` h264 or mjpeg, 640×360, ``fps``, ``seconds``; frame by
    frame, so a 10-minute one needs no more memory than 15 s); returns ``(path, truth, partial)`` as
    :func:`render` describes them."""
    options = {"crf": "18", "preset": preset} if codec in ("h264", "libx264") else None
    full, partial = [], []

    def images():
        for img, f, p in frames(seconds, fps):
            full.append(f)
            partial.append(p)
            yield img

    return write_clip(path, images(), codec, fps=fps, options=options), full, partial


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
