"""Everyone in the scene (issue 26): every face, identities over time, per-person model inputs.

The video is real: three real face photographs moving over a brick texture (caer_fast/testing/people.py),
encoded to H.264 with PyAV and decoded back by caer_fast.data.video. Detection runs on every 4th
sampled frame at 10 fps, as the Predictor does (detect_every=4).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("skimage.data")
pytest.importorskip("av")
pytest.importorskip("supervision")

from caer_fast.data.detectors import faces_by_size, make_detector, resolve_detector  # noqa: E402
from caer_fast.data.tracking import PersonTracker, track_video  # noqa: E402
from caer_fast.data.video import decode_video  # noqa: E402
from caer_fast.devices import thread_openmp_threads  # noqa: E402
from caer_fast.predict import get_args_parser  # noqa: E402
from caer_fast.testing.people import FPS, iou, write_people_video  # noqa: E402

DETECT_EVERY = 4
DEFAULT = get_args_parser().get_default("detector")  # what `predict --people all` detects with by default
DETECTOR = resolve_detector(DEFAULT, people=True)


@pytest.fixture(scope="module")
def people_run(tmp_path_factory):
    """Decode the real file, track it once; keep the detections so other tests can replay them."""
    path, truth, partial = write_people_video(tmp_path_factory.mktemp("people") / "people.mp4")
    video = decode_video(path)
    assert video.frames.shape == (len(truth), 360, 640, 3)
    det = make_detector(DEFAULT, people=True)
    assert det.name == DETECTOR
    detections = {}

    class Recording:  # the real detector, remembering what it found
        def detect(self, rgb):
            detections[len(detections) * DETECT_EVERY] = found = det.detect(rgb)
            return found

    tracker = PersonTracker(fps=FPS, detect_every=DETECT_EVERY)
    tracks = [t for _, _, t in track_video(video.frames, Recording(), DETECT_EVERY, tracker=tracker)]
    assert len(tracks) == len(truth)
    return dict(truth=truth, partial=partial, detections=detections, tracks=tracks, spans=tracker.person_spans())


def _identity(truth, tracks, min_iou=0.3):
    """Per true person: the tracked id matched on each frame they are visible (None: unmatched)."""
    seq = {}
    for f, people in enumerate(truth):
        for p, box in people.items():
            best = max(((iou(b, box), pid) for pid, b, _ in tracks[f]), default=(0, None))
            seq.setdefault(p, []).append((f, best[1] if best[0] >= min_iou else None))
    return seq


def test_detector_finds_every_face_in_the_video(people_run):
    found = total = false = 0
    for f, dets in people_run["detections"].items():
        truth = list(people_run["truth"][f].values())
        for box in truth:
            total += 1
            found += any(iou(d[:4], box) >= 0.5 for d in dets)
        others = truth + list(people_run["partial"][f].values())
        false += sum(1 for d in dets if max((iou(d[:4], b) for b in others), default=0) < 0.3)
    assert total >= 60
    assert found >= 0.95 * total, f"{DETECTOR} found {found} of {total} faces"
    assert false <= 0.05 * len(people_run["detections"]), f"{false} false positives"


def test_the_default_detector_is_mtcnn_for_everyone_and_haar_for_the_main_face():
    assert DEFAULT == "auto" and DETECTOR == "mtcnn"
    assert resolve_detector(DEFAULT, people=False) == "haar"  # --people main keeps the answers of 2408dd5
    assert make_detector("auto").name == "haar" and make_detector("haar", people=True).name == "haar"


def test_mtcnn_runs_one_thread_without_changing_the_others():
    """MTCNN's thread count is its calling thread's alone: the model's thread and threads started later keep
    torch's count (torch.set_num_threads would have changed the latter)."""
    import threading

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    det, seen = make_detector("mtcnn"), {}

    def worker():
        with thread_openmp_threads(1):
            seen["inside"] = torch.get_num_threads()
        det.detect(np.zeros((120, 160, 3), np.uint8))
        seen["after"] = torch.get_num_threads()

    try:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        later = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == {"inside": 1, "after": 2, "later": 2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_one_identity_per_person_through_the_crossing(people_run):
    seq = _identity(people_run["truth"], people_run["tracks"])
    assert sorted(seq) == [0, 1, 2]
    crossings = {0: 1, 1: 1, 2: 0}  # persons 0 and 1 pass each other once; person 2 crosses no one
    main_ids = {}
    for p, frames in seq.items():
        ids = [pid for _, pid in frames]
        main, n = Counter(i for i in ids if i is not None).most_common(1)[0]
        main_ids[p] = main
        assert n >= 0.9 * len(ids), f"person {p}: id {main} on {n} of {len(ids)} visible frames ({ids})"
        matched = [i for i in ids if i is not None]
        switches = sum(a != b for a, b in zip(matched, matched[1:]))
        assert switches <= crossings[p], f"person {p}: {switches} identity switches ({ids})"
    assert len(set(main_ids.values())) == 3, main_ids
    # ids are small integers in order of appearance: persons 0 and 1 are there from the start
    assert sorted(main_ids.values()) == [0, 1, 2] and main_ids[2] == 2


def test_person_spans_within_a_second_of_the_truth(people_run):
    seq = _identity(people_run["truth"], people_run["tracks"])
    spans = people_run["spans"]
    for p, frames in seq.items():
        main = Counter(i for _, i in frames if i is not None).most_common(1)[0][0]
        first, last = frames[0][0], frames[-1][0]
        got = spans[main]
        assert abs(got[0] - first) <= FPS and abs(got[1] - last) <= FPS, (p, got, (first, last))


def test_identities_hold_through_missed_detections(people_run):
    """Replay the real detections with person 0 missed on two detection frames in a row (0.8 s) just
    before the crossing, and with every face missed on one frame: the ids must not change."""
    truth, dets = people_run["truth"], people_run["detections"]
    frames = sorted(dets)
    drop_p0 = set(frames[16:18])  # sampled frames 64, 68: t = 6.4-6.8 s, before the crossing
    tracker = PersonTracker(fps=FPS, detect_every=DETECT_EVERY)
    tracks = []
    for f in frames:
        d = dets[f]
        if f in drop_p0:
            d = [x for x in d if iou(x[:4], truth[f][0]) < 0.3]
        if f == frames[20]:
            d = []
        out = tracker.update(f, d)
        tracks += [out] * DETECT_EVERY
    seq = _identity(truth, tracks[:len(truth)])
    ids = [{i for _, i in seq[p] if i is not None} for p in (0, 1, 2)]
    assert all(len(i) == 1 for i in ids) and len(set.union(*ids)) == 3, ids
    # the box of person 0 is held through the first missed update (hold_missed_s=0.5 s, one update)
    f0 = frames[16]
    assert any(iou(b, truth[f0][0]) >= 0.3 for _, b, _ in tracks[f0])


def test_max_people_keeps_the_largest(people_run):
    dets = people_run["detections"]
    full, two = PersonTracker(fps=FPS, detect_every=DETECT_EVERY), PersonTracker(max_people=2, fps=FPS,
                                                                                 detect_every=DETECT_EVERY)
    saw_three = False
    for f in sorted(dets):
        a, b = full.update(f, dets[f]), two.update(f, dets[f])
        saw_three |= len(a) == 3
        assert len(b) <= 2
        area = [(x[1][2] - x[1][0]) * (x[1][3] - x[1][1]) for x in a]
        assert sorted(((x[1][2] - x[1][0]) * (x[1][3] - x[1][1]) for x in b), reverse=True) == \
            sorted(area, reverse=True)[:2]
        assert area == sorted(area, reverse=True)  # largest first
    assert saw_three
    assert set(two.person_spans()) <= {0, 1, 2}


def test_faces_by_size_orders_floors_and_caps():
    rng = np.random.default_rng()
    dets = []
    for _ in range(7):
        x, y, s = rng.integers(0, 500), rng.integers(0, 300), int(rng.integers(20, 120))
        dets.append((int(x), int(y), int(x + s), int(y + s), float(rng.uniform(0.1, 1.0))))
    out = faces_by_size(dets, max_people=3, min_score=0.3)
    # largest first, equal sizes: higher score first
    want = sorted((d for d in dets if d[4] >= 0.3), key=lambda d: (-(d[2] - d[0]) * (d[3] - d[1]), -d[4]))[:3]
    assert out == want
    assert faces_by_size([]) == []
    with pytest.raises(ValueError, match="max_people"):
        faces_by_size(dets, max_people=0)
    with pytest.raises(ValueError, match="max_people"):
        PersonTracker(max_people=0)
    with pytest.raises(ValueError, match="unknown tracker"):
        PersonTracker(backend="sort")


# ---------------------------------------------------------------- per-person model inputs

def _two_people_chunk(n=4):
    from caer_fast.testing.people import render

    frames, truth, _ = render()
    idx = [i for i, t in enumerate(truth) if len(t) == 3][:n]
    chunk = torch.from_numpy(frames[idx])
    boxes = {p: torch.tensor([truth[i][p] for i in idx]) for p in (0, 1, 2)}
    return chunk, boxes


def test_person_inputs_mask_only_that_persons_face():
    from caer_fast.constants import IMAGENET_MEAN, IMAGENET_STD
    from caer_fast.data.tracking import person_inputs

    frames, boxes = _two_people_chunk(3)
    boxes[2][1] = 0  # person 2 absent on the middle frame: nothing masked for them there
    n, h, w, _ = frames.shape
    face, context, ids = person_inputs(frames, boxes, context_size=(h, w))  # same size: pixels comparable
    assert ids == [0, 1, 2] and context.shape == (3 * n, 3, h, w) and face.shape[0] == 3 * n
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    plain = (frames.permute(0, 3, 1, 2).float() / 255 - mean) / std
    masked = (0 - mean) / std
    ctx = context.view(3, n, 3, h, w)
    for k, a in enumerate(ids):
        for i in range(n):
            for b in ids:
                x1, y1, x2, y2 = boxes[b][i].tolist()
                if x2 <= x1:
                    continue
                region = ctx[k, i, :, y1 + 2:y2 - 2, x1 + 2:x2 - 2]  # inside, away from resampling edges
                if b == a:
                    assert torch.allclose(region, masked.expand_as(region), atol=1e-4), (a, i)
                else:  # another person's face: visible, the frame's own pixels
                    torch.testing.assert_close(region, plain[i, :, y1 + 2:y2 - 2, x1 + 2:x2 - 2], atol=2e-2, rtol=0)
    # the absent frame of person 2: context is the whole frame, face is zeros
    torch.testing.assert_close(ctx[2, 1], plain[1], atol=2e-2, rtol=0)
    assert face.view(3, n, *face.shape[1:])[2, 1].abs().max() == 0


def test_person_inputs_equal_separate_calls():
    from caer_fast.data.tracking import boxes_by_person, person_inputs
    from caer_fast.ops import face_context

    frames, boxes = _two_people_chunk(4)
    tracks = [[(p, tuple(boxes[p][i].tolist()), 1.0) for p in (2, 0, 1)] for i in range(frames.shape[0])]
    rebuilt = boxes_by_person(tracks)
    assert list(rebuilt) == [0, 1, 2] and all(torch.equal(rebuilt[p], boxes[p]) for p in rebuilt)
    face, context, ids = person_inputs(frames, rebuilt, crop=(8, 29, 112, 112))
    n = frames.shape[0]
    for k, p in enumerate(ids):
        f1, c1 = face_context(frames, boxes[p], crop=(8, 29, 112, 112))
        torch.testing.assert_close(face[k * n:(k + 1) * n], f1)
        torch.testing.assert_close(context[k * n:(k + 1) * n], c1)
    with pytest.raises(ValueError, match="person 1: 3 boxes for 4 frames"):
        person_inputs(frames, {0: boxes[0], 1: boxes[1][:3]})
    with pytest.raises(ValueError, match="uint8"):
        person_inputs(frames.float(), boxes)
