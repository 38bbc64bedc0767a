"""Everyone in the scene, end to end (issue 26 items 3-4): the real-face 3-person video (caer_fast/testing/people.py:
three real faces moving, one entering and leaving, two passing closely) through the real CLI
(``python -m caer_fast.predict --people all``) and the real server over HTTP (``POST /predict?people=all``),
scored against the video's ground truth; ``--people main`` keeps the one-face answer."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("skimage.data")
pytest.importorskip("av")
pytest.importorskip("supervision")

from caer_fast.data.detectors import make_detector  # noqa: E402
from caer_fast.serving.app import request_memory_estimate  # noqa: E402
from caer_fast.predict import format_summary  # noqa: E402
from caer_fast.serving.inference import Predictor  # noqa: E402
from caer_fast.serving.stream import PERSON_KEYS, RESULT_KEYS, concat_chunks  # noqa: E402
from caer_fast.testing.people import FPS, iou, write_people_video  # noqa: E402
from caer_fast.testing.serving import Server, make_checkpoint, write_video  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the model on one thread: the cores are shared


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("people_cli")
    path, truth, partial = write_people_video(d / "people.mp4")
    return dict(dir=d, video=path, truth=truth, ck=make_checkpoint(d / "caer.pth", "caer"))


def cli(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "caer_fast.predict", *map(str, args), "--engine", "eager",
                           "--no-progress"], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def check_people(answer: dict, truth) -> None:
    """One identity per true person over >= 90 % of the frames they are visible, at most one switch at the
    crossing, start and end within 1 s of the truth, nobody else."""
    assert set(answer) - {"path"} == set(RESULT_KEYS)
    people = answer["people"]
    assert len(people) == 3, [(p["id"], p["start"], p["end"]) for p in people]
    for p in people:
        assert set(p) == set(PERSON_KEYS)
    boxes = {}  # frame → [(id, box)]
    for p in people:
        for f, x1, y1, x2, y2, _ in p["face_boxes"]:
            boxes.setdefault(f, []).append((p["id"], (x1, y1, x2, y2)))
    by_id = {p["id"]: p for p in people}
    found = set()
    for person in range(3):
        frames = [f for f, t in enumerate(truth) if person in t]
        seq = []
        for f in frames:
            best = max(((iou(b, truth[f][person]), pid) for pid, b in boxes.get(f, [])), default=(0, None))
            seq.append(best[1] if best[0] >= 0.3 else None)
        pid, n = Counter(seq).most_common(1)[0]
        assert pid is not None and n >= 0.9 * len(frames), (person, Counter(seq))
        ids = [s for s in seq if s is not None]
        switches = sum(a != b for a, b in zip(ids, ids[1:]))
        assert switches <= 1, (person, ids)
        start, end = frames[0] / FPS, (frames[-1] + 1) / FPS
        assert abs(by_id[pid]["start"] - start) <= 1.0 and abs(by_id[pid]["end"] - end) <= 1.0, \
            (person, by_id[pid]["start"], by_id[pid]["end"], start, end)
        found.add(pid)
    assert found == set(by_id)
    for p in people:  # each person's answer is the mean of their own clips
        probs = np.array([[c["probabilities"][k] for k in p["probabilities"]] for c in p["clips"]])
        np.testing.assert_allclose(probs.mean(0), list(p["probabilities"].values()), atol=2e-6)
        assert p["emotion"] == max(p["probabilities"], key=p["probabilities"].get)
        assert all(p["start"] - 0.8 <= c["start_s"] and c["end_s"] <= p["end"] + 3.0 for c in p["clips"])
    # the top-level answer is the person seen longest
    main = max(people, key=lambda p: (len(p["face_boxes"]), -p["id"]))
    assert answer["probabilities"] == main["probabilities"] and answer["clips"] == main["clips"]


def test_cli_people_all_follows_every_person(media):
    d = media["dir"]
    out = cli(media["video"], "--checkpoint", media["ck"], "--people", "all", "--json",  # the default detector
              "--timeline", d / "t.csv", "--timeline-plot", d / "t.png", "--save-viz", d / "v.png")
    answer = json.loads(out)
    assert answer["detector"] == "mtcnn"  # auto: MTCNN when everyone counts
    check_people(answer, media["truth"])
    with open(d / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:2] == ["person", "clip"]
    assert Counter(int(r["person"]) for r in rows) == {p["id"]: len(p["clips"]) for p in answer["people"]}
    first = {p["id"]: p["clips"][0] for p in answer["people"]}
    for r in rows:
        if r["clip"] == "0":
            assert float(r["start_s"]) == first[int(r["person"])]["start_s"]
    assert (d / "t.png").stat().st_size > 10_000 and (d / "v.png").stat().st_size > 10_000
    summary = format_summary(answer, "people.mp4")  # what the CLI prints without --json
    for p in answer["people"]:
        assert f"person {p['id']:>2} {p['start']:6.1f}-{p['end']:<6.1f}s  {p['emotion']}" in summary


def test_cli_follow_lines_carry_the_person_and_max_people_caps(media):
    d = media["dir"]
    mkv, _, _ = write_people_video(d / "people.mkv")  # --follow reads a growing file: not MP4 (its index is last)
    lines = [json.loads(x) for x in cli(mkv, "--checkpoint", media["ck"], "--max-people", "2", "--follow-idle", "0.5",
                                        "--detector", "mtcnn", "--follow", "--timeline", d / "t2.json").splitlines()]
    clips, final = lines[:-1], lines[-1]
    assert final["type"] == "result" and all(c["type"] == "clip" for c in clips)
    people = final["people"]
    assert len(people) >= 2 and all("clips" not in p for p in people)
    timeline = json.loads((d / "t2.json").read_text())
    assert Counter(c["person"] for c in clips) == Counter(c["person"] for c in timeline["clips"])
    assert {p["id"] for p in people} == {c["person"] for c in clips} == {p["id"] for p in timeline["people"]}
    # at most two people on any frame (three faces are visible from 4.6 s to 13.6 s)
    per_frame = Counter(f for p in people for f, *_ in p["face_boxes"])
    assert max(per_frame.values()) == 2


def test_http_people_all_gives_the_same_json(media):
    import httpx

    srv = Server(media["ck"], "--engine", "eager", "--max-people", "4", cwd=media["dir"])  # the default detector
    try:
        data = media["video"].read_bytes()
        r = httpx.post(srv.url + "/predict?people=all", files={"file": ("p.mp4", data)}, timeout=300)
        assert r.status_code == 200, r.text
        bad = httpx.post(srv.url + "/predict?people=some", files={"file": ("p.mp4", data)}, timeout=60)
        assert bad.status_code == 400 and "people" in bad.json()["detail"]
        health = httpx.get(srv.url + "/health").json()
    finally:
        srv.close()
    answer = r.json()
    assert answer["detector"] == "mtcnn" and health["detector"] == "auto"
    check_people(answer, media["truth"])
    # every person's inputs of a step in one job: far fewer jobs than the people's clips
    clips = sum(len(p["clips"]) for p in answer["people"])
    assert health["batching"]["model_calls"] <= health["batching"]["requests"] < clips / 2
    # the reservation counted the people allowed (4), not one face
    assert health["limits"]["max_people"] == 4
    frame_pixels = health["limits"]["max_frame_pixels"]
    assert health["memory"]["peak_reserved_bytes"] == \
        request_memory_estimate(640, 360, max_frame_pixels=frame_pixels, people=4) > \
        request_memory_estimate(640, 360, max_frame_pixels=frame_pixels)


def test_people_main_is_the_one_face_answer(tmp_path):
    """--people main (the default) is today's path: the same answer with and without the flag, and the
    people list is that one person."""
    ck = make_checkpoint(tmp_path / "caer.pth", "caer")
    video = write_video(tmp_path / "v.mp4", frames=60, fps=20)
    a = json.loads(cli(video, "--checkpoint", ck, "--json"))
    b = json.loads(cli(video, "--checkpoint", ck, "--json", "--people", "main"))
    c = Predictor(ck, device="cpu").predict_file(video).to_dict()
    for x in (b, c):
        for k in ("probabilities", "fusion_weights"):
            np.testing.assert_allclose(list(a[k].values()), list(x[k].values()), atol=1e-5)
        assert a["clips"] == x["clips"] and a["face_boxes"] == x["face_boxes"]
    assert len(a["people"]) == 1 and a["people"][0]["probabilities"] == a["probabilities"]
    assert a["detector"] == b["detector"] == c["detector"] == "haar"  # auto: Haar for the one face, as before
    assert a["people"][0]["clips"] == a["clips"]


def test_one_model_call_per_step_with_every_persons_inputs(media):
    """All people of a step go through the model in one call, and batching them changes no answer:
    each person's clips equal that person's inputs run alone."""
    from caer_fast.data.video import decode_video

    torch.set_num_threads(1)
    frames = decode_video(media["video"]).frames[:60]  # 6 s: persons 0 and 1, person 2 enters at 4.6 s
    det = make_detector("mtcnn")
    found = []

    class Replay:  # the real detector once, then its answers again
        def __init__(self):
            self.i = 0

        def detect(self, rgb):
            if self.i == len(found):
                found.append(det.detect(rgb))
            self.i += 1
            return found[self.i - 1]

    p = Predictor(media["ck"], device="cpu", detector=Replay())
    steps = list(p.preprocessor().people_chunks(((k, k, f) for k, f in enumerate(frames))))
    p = Predictor(media["ck"], device="cpu", detector=Replay())
    calls = []

    class Counting:
        name = "counting"

        def __call__(self, face, context, return_details=True):
            calls.append(face.shape[0])
            return p.model(face, context, return_details=True)

    r = p.with_engine(Counting()).predict_frames(frames, people="all")
    sizes = [sum(c.n for c in s) for s in steps if any(c.n for c in s)]
    assert calls == sizes and any(len({c.person for c in s if c.n}) >= 2 for s in steps)
    for person in r.people:
        alone = [c for s in steps for c in s if c.person == person.id and c.n]
        face, context = concat_chunks(alone)
        probs = p.forward(face, context)[0]
        got = torch.tensor([[c.probabilities[k] for k in p.classes] for c in person.clips])
        torch.testing.assert_close(got, probs.float(), atol=1e-5, rtol=0)


def test_people_who_leave_end_there(media):
    """Everybody leaves at 4 s of an 8 s input: each person's clips end with them (the frames after they
    are gone are not theirs), their span ends within 0.5 s of 4 s, and the input's frames are all counted."""
    from caer_fast.data.video import decode_video
    from caer_fast.testing.people import _background

    torch.set_num_threads(1)
    frames = decode_video(media["video"]).frames[60:100]  # 3 people
    empty = np.repeat(_background()[None], 40, 0)
    r = Predictor(media["ck"], device="cpu", detector="mtcnn").predict_frames(np.concatenate([frames, empty]),
                                                                              people="all")
    assert len(r.people) == 3 and r.frames_used == 80
    for p in r.people:
        assert p.start <= 0.5 and abs(p.end - 4.0) <= 0.5, (p.id, p.start, p.end)
        assert p.clips and p.clips[-1].end_s <= p.end + 1e-6 and all(c.face_found for c in p.clips)


@pytest.mark.parametrize("args, message", [(("--people", "0"), "--people"), (("--people", "most"), "--people"),
                                           (("--people", "2", "--max-people", "3"), "not both"),
                                           (("--people", "all", "--boxes", "b.csv"), "--people main only")])
def test_bad_people_arguments_are_refused_clearly(media, args, message):
    proc = subprocess.run([sys.executable, "-m", "caer_fast.predict", str(media["video"]), "--checkpoint",
                           str(media["ck"]), *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
