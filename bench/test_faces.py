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
IMPLEMENTATIONS = [("haar", -1), ("haar", 0), ("mtcnn", -1), ("dlib-hog", -1), ("dlib-cnn", -1)]


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


# ---------------------------------------------------------------- every face: recall, false positives, speed
# Issue 26: several people per frame, so recall over many faces matters more than one big face.
# Frames: 640×360, scikit-image's brick texture with 8 real LFW faces (skimage.data.lfw_subset, 25×25 grey,
# upscaled to 40-120 px) and 2 LFW non-face patches each, plus frames of the multi-person test video
# (caer_fast/testing/people.py: astronaut, Grace Hopper, an LFW face over bricks).
# Run: PYTHONPATH=tests pytest bench/test_faces.py -k every_face -s
RECALL_DETECTORS = ["haar", "mtcnn", "dlib-hog", "dlib-cnn"]
SIZES = (40, 56, 72, 88, 104, 120)
MIN_SIZE = 24  # the same smallest face for every detector


def _people_media():
    from caer_fast.testing import people

    return people


def _lfw_frames(n_frames=4, seed=0):
    _background = _people_media()._background

    lfw = (skdata.lfw_subset() * 255).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    frames, truths = [], []
    k = 0
    for f in range(n_frames):
        img = _background().copy()
        truth = []
        cells = [(c, r) for r in range(2) for c in range(5)]  # a 5×2 grid of 128×180 cells
        for j, (c, r) in enumerate(cells[i] for i in rng.permutation(len(cells))):
            size = SIZES[(f + j) % len(SIZES)] if j < 8 else 64
            x = c * 128 + int(rng.integers(0, 128 - size + 1))
            y = r * 180 + int(rng.integers(0, 180 - size + 1))
            src = lfw[k % 100] if j < 8 else lfw[100 + (k + j) % 100]  # 100+: non-faces
            img[y:y + size, x:x + size] = cv2.resize(src, (size, size), interpolation=cv2.INTER_CUBIC)[..., None]
            if j < 8:
                # the LFW crops are tight: the face is about the middle 85 % wide, all the height
                truth.append((x + 0.05 * size, y, x + 0.88 * size, y + 0.96 * size))
                k += 1
        frames.append(img)
        truths.append(truth)
    return frames, truths


def _score(found, truth, partial=()):
    """(hits, false positives): a truth box is found by a detection with IoU ≥ 0.5 (each used once);
    a detection matching no truth (IoU < 0.3) nor a face cut by the frame edge is a false positive."""
    iou = _people_media().iou
    used, hits = set(), 0
    for t in truth:
        best = max(((iou(d[:4], t), i) for i, d in enumerate(found) if i not in used), default=(0, None))
        if best[0] >= 0.5:
            used.add(best[1])
            hits += 1
    fps = sum(1 for i, d in enumerate(found) if i not in used
              and max((iou(d[:4], t) for t in list(truth) + list(partial)), default=0) < 0.3)
    return hits, fps


def test_every_face_recall_false_positives_speed(tmp_path, capsys):
    """The detector table of bench/RESULTS.md "Every face": run with -s to see it."""
    import time

    import torch

    render = _people_media().render

    torch.set_num_threads(2)
    cv2.setNumThreads(2)
    frames, truths = _lfw_frames()
    vf, vfull, vpart = render()
    video_idx = list(range(0, len(vf), 12))
    dets = {}
    for name in RECALL_DETECTORS:
        try:
            dets[name] = make_detector(name, min_size=MIN_SIZE)
        except DetectorUnavailable as exc:
            print(f"{name}: skipped ({exc})")
    rows = {n: dict(hits=0, faces=0, fp=0, vhits=0, vfaces=0, vfp=0, ms=[]) for n in dets}
    work = [(f, t, (), "lfw") for f, t in zip(frames, truths)]
    work += [(vf[i], list(vfull[i].values()), list(vpart[i].values()), "video") for i in video_idx]
    for n, d in dets.items():
        d.detect(work[0][0])  # warm-up
    for img, truth, partial, kind in work:
        for n, d in dets.items():  # alternate the contenders frame by frame: the load drifts
            t0 = time.perf_counter()
            found = d.detect(img)
            rows[n]["ms"].append((time.perf_counter() - t0) * 1e3)
            h, fp = _score(found, truth, partial)
            pre = "v" if kind == "video" else ""
            rows[n][pre + "hits"] += h
            rows[n][pre + "faces"] += len(truth)
            rows[n][pre + "fp"] += fp
    with capsys.disabled():
        print(f"\n{'detector':10} {'LFW recall':>12} {'LFW FP/frame':>13} {'video recall':>13} "
              f"{'video FP/frame':>15} {'ms/frame (median)':>18}")
        for n, r in rows.items():
            lfw = f"{r['hits']:>5}/{r['faces']:<3} ({r['hits'] / r['faces']:.0%}) {r['fp'] / len(frames):>8.2f}"
            vid = f"{r['vhits']:>4}/{r['vfaces']:<3} ({r['vhits'] / r['vfaces']:.0%}) {r['vfp'] / len(video_idx):>9.2f}"
            print(f"{n:10} {lfw}  {vid}  {float(np.median(r['ms'])):>14.0f}")
    # the chosen multi-person detector must beat Haar on recall and find every face of the test video
    assert rows["mtcnn"]["hits"] > rows["haar"]["hits"]
    assert rows["mtcnn"]["vhits"] >= 0.95 * rows["mtcnn"]["vfaces"]


def test_every_face_speed_by_threads():
    """The speed table of bench/RESULTS.md "Every face": 24 frames of the people video, the same frames
    for every setting, alternating; at 1 and 2 torch/OpenCV threads. Run with -s."""
    import time

    import torch

    frames = _people_media().render()[0][::4][:24]
    settings = {"haar (240 px, min 32)": ("haar", 32, -1), "mtcnn (full, min 32)": ("mtcnn", 32, -1),
                "mtcnn (full, min 48)": ("mtcnn", 48, -1), "mtcnn (240 px, min 32)": ("mtcnn", 32, 240)}
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            cv2.setNumThreads(threads)
            dets = {k: make_detector(n, min_size=m, detect_height=h) for k, (n, m, h) in settings.items()}
            ms = {k: [] for k in dets}
            found = {k: 0 for k in dets}
            for d in dets.values():
                d.detect(frames[0])
            for f in frames:
                for k, d in dets.items():
                    t0 = time.perf_counter()
                    found[k] += len(d.detect(f))
                    ms[k].append((time.perf_counter() - t0) * 1e3)
            base = float(np.median(ms["haar (240 px, min 32)"]))
            for k in dets:
                print(f"threads={threads} {k:24} {np.median(ms[k]):8.1f} ms ({np.median(ms[k]) / base:4.2f}× haar), "
                      f"{found[k]} faces")
            assert all(v >= 0.95 * 2.5 * len(frames) for v in found.values()), found  # ≈ 2.5 people per frame
    finally:
        torch.set_num_threads(before)


def test_tracker_comparison():
    """The tracker table of bench/RESULTS.md "Every face": ByteTrack vs norfair replaying the real MTCNN and
    Haar detections of the people video (detect every 4th sampled frame), all of them and with 20 % dropped
    at random (3 seeds). Run with -s."""
    import time
    from collections import Counter

    import torch

    from caer_fast.data.tracking import PersonTracker, TrackerUnavailable

    pm = _people_media()
    iou = pm.iou
    frames, truth, _ = pm.render()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recorded = {name: {i: make_detector(name).detect(frames[i]) for i in range(0, len(frames), 4)}
                    for name in ("mtcnn", "haar")}
    finally:
        torch.set_num_threads(before)

    def run(backend, dets, drop, seed):
        rng = np.random.default_rng(seed)
        tr = PersonTracker(fps=10, detect_every=4, backend=backend)
        tracks, ms = [], []
        for f in sorted(dets):
            d = [x for x in dets[f] if rng.random() >= drop]
            t0 = time.perf_counter()
            tracks += [tr.update(f, d)] * 4
            ms.append((time.perf_counter() - t0) * 1e3)
        cov, switches, frags = [], 0, 0
        for p in (0, 1, 2):
            ids = []
            for f, people in enumerate(truth):
                if p in people:
                    best = max(((iou(b, people[p]), pid) for pid, b, _ in tracks[f]), default=(0, None))
                    ids.append(best[1] if best[0] >= 0.3 else None)
            m = [i for i in ids if i is not None]
            cov.append(Counter(m).most_common(1)[0][1] / len(ids) if m else 0.0)
            switches += sum(a != b for a, b in zip(m, m[1:]))
            frags += len(set(m)) - 1
        return np.array(cov), switches, frags, float(np.median(ms))

    results = {}
    for det, dets in recorded.items():
        for drop in (0.0, 0.2):
            for backend in ("bytetrack", "norfair"):
                try:
                    res = [run(backend, dets, drop, s) for s in range(3 if drop else 1)]
                except TrackerUnavailable as exc:
                    print(f"{backend}: skipped ({exc})")
                    continue
                cov = np.mean([r[0] for r in res], 0)
                sw, fr = np.mean([r[1] for r in res]), np.mean([r[2] for r in res])
                results[det, drop, backend] = sw
                print(f"{det:6} drop={drop:.1f} {backend:9} coverage p0/p1/p2 = {np.round(cov, 2)} switches={sw:.1f} "
                      f"extra fragments={fr:.1f} ms/update={np.median([r[3] for r in res]):.2f}")
    # the default tracker: no switch on the clean detections of either detector
    assert results["mtcnn", 0.0, "bytetrack"] == 0 and results["haar", 0.0, "bytetrack"] == 0
