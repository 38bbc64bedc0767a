"""Face detector speed, frames/s on one 400×712 (H×W) RGB frame, one thread.

Run: ``OMP_NUM_THREADS=1 pytest bench/test_faces.py --benchmark-only --benchmark-group-by=group``.
The frame is scikit-image's astronaut portrait pasted on its brick texture; every implementation must
still find that face (IoU ≥ 0.5) so a fast-but-blind setting cannot win.
"""
import numpy as np
import pytest

skdata = pytest.importorskip("skimage.data")
cv2 = pytest.importorskip("cv2")

from caer_fast.data.detectors import DetectorUnavailable, best_face, make_detector  # noqa: E402

H, W = 400, 712
# (detector, detect_height): -1 = the detector's default (haar: 240 px high; dlib: full resolution).
IMPLEMENTATIONS = [("haar", -1), ("haar", 0), ("dlib-hog", -1), ("dlib-cnn", -1)]


def _frame():
    img = cv2.resize(skdata.brick(), (W, H), interpolation=cv2.INTER_AREA)[..., None].repeat(3, 2)
    img[100:310, 300:470] = skdata.astronaut()[20:230, 140:310]
    return np.ascontiguousarray(img), (300 + 37, 100 + 46, 300 + 132, 100 + 141)


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("name,detect_height", IMPLEMENTATIONS,
                         ids=[f"{n}-{'default' if h == -1 else 'full'}" for n, h in IMPLEMENTATIONS])
def test_detector_fps(benchmark, name, detect_height):
    cv2.setNumThreads(1)
    try:
        det = make_detector(name, min_size=32, detect_height=detect_height)
    except DetectorUnavailable as exc:
        pytest.skip(str(exc))
    frame, truth = _frame()
    benchmark.group = "faces: detect one 400x712 frame"
    benchmark.extra_info["detect_height"] = det.detect_height or H
    rounds = 2 if name == "dlib-cnn" else 10  # the CNN takes seconds per frame on a CPU
    found = benchmark.pedantic(det.detect, args=(frame,), rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["frames_per_s"] = round(1.0 / benchmark.stats.stats.mean, 2)
    face = best_face(found)
    assert face is not None and _iou(face[:4], truth) >= 0.5, (found, truth)
