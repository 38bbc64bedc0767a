"""Face detection CLI (`python -m caer_fast.faces`) on a real photograph composited into real files.

The face is the astronaut portrait that ships with scikit-image (``skimage.data.astronaut()``, no
download), pasted onto scikit-image's brick texture, written as an MPEG-4 .avi (PyAV) and as PNGs.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

skdata = pytest.importorskip("skimage.data")
av = pytest.importorskip("av")

from caer_fast.constants import CLASSES  # noqa: E402
from caer_fast.data.boxes import read_image_boxes, read_video_boxes  # noqa: E402
from caer_fast.data.detectors import HaarDetector, best_face  # noqa: E402
from caer_fast.faces import FacesError, fill_track, run  # noqa: E402
from caer_fast.faces.__main__ import main  # noqa: E402
from caer_fast.testing.media import write_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
H, W = 288, 512
PATCH = skdata.astronaut()[20:230, 140:310]  # 210×170 around the face
FACE_IN_PATCH = (37, 46, 132, 141)  # where OpenCV's cascade puts the face on the full photo, minus (140, 20)
N_FRAMES, FACE_FRAMES, EVERY = 25, 13, 5  # the face leaves after frame 12, between samples 10 and 15


def _background():
    import cv2

    return cv2.resize(skdata.brick(), (W, H), interpolation=cv2.INTER_AREA)[..., None].repeat(3, 2)


def _composite(x, y):
    img = _background()
    img[y:y + PATCH.shape[0], x:x + PATCH.shape[1]] = PATCH
    fx1, fy1, fx2, fy2 = FACE_IN_PATCH
    return img, (x + fx1, y + fy1, x + fx2, y + fy2)


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _moving_face_clip(path):
    """Face moves right 12 px per frame for FACE_FRAMES frames, then only the background: truth per frame."""
    frames, truth = [], {}
    for t in range(N_FRAMES):
        if t < FACE_FRAMES:
            img, box = _composite(40 + 12 * t, 30 + (t % 3) * 4)
            truth[t] = box
        else:
            img = _background()
        frames.append(img)
    write_clip(path, frames, "mpeg4", fps=10, bit_rate=3_000_000)
    return truth


def _main(capsys, root, *args):
    """The same command line in-process (no second torch import: keeps the suite fast)."""
    t0 = time.perf_counter()
    rc = main(["--data", str(root), "--no-progress", *args])
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, cap.out, cap.err), time.perf_counter() - t0


def _cli(root, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "caer_fast.faces", "--data", str(root), "--no-progress", *args],
                       capture_output=True, text=True, env=env, timeout=timeout)
    return p, time.perf_counter() - t0


@pytest.fixture(scope="module")
def video_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("caer")
    truth = _moving_face_clip(root / "train" / "Happy" / "clip.avi")
    (root / "train" / "Sad").mkdir(parents=True)
    (root / "train" / "Sad" / "empty.avi").write_bytes(b"")
    (root / "train" / "Anger").mkdir(parents=True)
    (root / "train" / "Anger" / "garbage.avi").write_bytes(np.random.default_rng(0).bytes(4096))
    for c in CLASSES:  # every emotion folder present (empty ones too): --strict refuses a tree missing some
        (root / "train" / c).mkdir(exist_ok=True)
    return root, truth


# ---------------------------------------------------------------- in-process: the rules

def test_haar_finds_the_astronaut_and_not_the_bricks():
    img, box = _composite(200, 40)
    d = best_face(HaarDetector().detect(img))
    assert d is not None and _iou(d[:4], box) >= 0.5, (d, box)
    assert HaarDetector().detect(_background()) == []


def test_mtcnn_finds_every_face_and_not_the_bricks():
    """Two real faces in one frame (the astronaut twice, one half size: 48 px, where the one-face path
    would keep only the larger): MTCNN returns both, faces_by_size orders them, the bricks give none."""
    import cv2

    from caer_fast.data.detectors import faces_by_size, make_detector

    img, box = _composite(20, 40)
    small = cv2.resize(PATCH, (PATCH.shape[1] // 2, PATCH.shape[0] // 2), interpolation=cv2.INTER_AREA)
    img[150:150 + small.shape[0], 380:380 + small.shape[1]] = small
    fx1, fy1, fx2, fy2 = FACE_IN_PATCH
    box2 = (380 + fx1 // 2, 150 + fy1 // 2, 380 + fx2 // 2, 150 + fy2 // 2)
    det = make_detector("mtcnn", min_size=24)
    found = faces_by_size(det.detect(img))
    assert len(found) == 2, found
    assert _iou(found[0][:4], box) >= 0.5 and _iou(found[1][:4], box2) >= 0.5, (found, box, box2)
    assert all(0.7 <= d[4] <= 1.0 for d in found)  # O-net probabilities above its threshold
    assert det.detect(_background()) == []


def test_mtcnn_is_a_cli_detector(tmp_path, capsys):
    from PIL import Image

    for c in CLASSES:
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "test" / c).mkdir(parents=True)
    img, box = _composite(60, 20)
    Image.fromarray(img).save(tmp_path / "train" / "Happy" / "0001.png")
    Image.fromarray(img).save(tmp_path / "test" / "Happy" / "0001.png")
    p, _ = _main(capsys, tmp_path, "--detector", "mtcnn", "--workers", "1")
    assert p.returncode == 0, p.stderr
    boxes, _ = read_image_boxes(tmp_path / "train.txt")
    assert _iou(boxes["Happy/0001.png"][1], box) >= 0.5


def test_fill_track_interpolates_and_never_invents():
    a, b = (10, 10, 60, 60, 2.0), (20, 10, 70, 60, 4.0)
    out = fill_track({0: a, 5: b, 10: None, 15: None}, num_frames=18, max_gap=5)
    assert out[0][0] == a[:4] and out[5][0] == b[:4]
    assert out[2] == ((14, 10, 64, 60), pytest.approx(2.8))  # linear between 0 and 5
    assert out[7][0] == b[:4]  # nearer to 5 (a face) than to 10 (none): carried
    assert 8 not in out and 10 not in out and 17 not in out  # nearer to a face-less sample
    # Far-apart boxes (a cut / another person) are not blended: each side carries its own.
    far = fill_track({0: a, 5: (300, 10, 350, 60, 1.0)}, num_frames=6, max_gap=5)
    assert far[1][0] == a[:4] and far[4][0] == (300, 10, 350, 60)
    # Tail after the last sample: carried at most max_gap frames.
    assert sorted(fill_track({0: a}, num_frames=20, max_gap=5)) == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------- the CLI on a video tree

def test_video_tree_boxes_resume_and_bad_files(video_tree, capsys):
    root, truth = video_tree
    p, first = _cli(root, "--workers", "2", "--every", str(EVERY))
    assert p.returncode == 0, p.stderr
    out = root / "train.faces.csv"
    boxes, bad = read_video_boxes(out)
    assert not bad and list(boxes) == ["train/Happy/clip.avi"]
    got = {f: b for f, (b, _) in boxes["train/Happy/clip.avi"].items()}
    # Every box sits on the face, and the face is found on most of the frames that show it.
    for f, b in got.items():
        assert f in truth, f"frame {f} has a box but no face"
        assert _iou(b, truth[f]) >= 0.5, (f, b, truth[f])
    assert len(got) >= 0.8 * FACE_FRAMES, sorted(got)
    assert all(f < FACE_FRAMES for f in got)  # frames after the face left get no box
    # Bad files: skipped, counted, named.
    assert "3 files: 3 processed now, 0 already done" in p.stdout and "2 skipped as bad" in p.stdout
    assert "train/Sad/empty.avi: empty file (0 bytes)" in p.stdout
    assert "train/Anger/garbage.avi" in p.stdout
    assert "frames with a face: %d of %d" % (len(got), N_FRAMES) in p.stdout

    # Resume: a killed run loses the clip's log line (and leaves a torn one); a new file appears.
    log = root / ".faces-train.log.jsonl"
    lines = log.read_text().splitlines()
    kept = [ln for ln in lines if "clip.avi" not in ln]
    assert len(kept) == len(lines) - 1
    log.write_text("\n".join(kept) + "\n" + lines[-1][:20])  # torn last line, no newline
    out.unlink()
    _moving_face_clip(root / "train" / "Happy" / "clip2.avi")
    p, second = _main(capsys, root, "--workers", "1", "--every", str(EVERY))
    assert p.returncode == 0, p.stderr
    assert "4 files: 2 processed now, 2 already done" in p.stdout, p.stdout
    boxes2, _ = read_video_boxes(out)
    assert boxes2["train/Happy/clip.avi"] == boxes["train/Happy/clip.avi"]
    assert boxes2["train/Happy/clip2.avi"] == boxes["train/Happy/clip.avi"]  # same clip, same boxes

    # A third run has nothing left to do.
    p, third = _main(capsys, root, "--every", str(EVERY))
    assert "4 files: 0 processed now, 4 already done" in p.stdout, p.stdout
    assert read_video_boxes(out)[0] == boxes2
    # Other settings must not silently mix with the logged ones.
    assert third < 0.5 * first, (first, third)  # nothing decoded again (first includes process start)
    p, _ = _main(capsys, root, "--every", "3")
    assert p.returncode != 0 and "--overwrite" in p.stderr


def test_video_strict_names_the_bad_file(video_tree, capsys):
    root, _ = video_tree
    p, _ = _main(capsys, root, "--strict", "--overwrite", "--workers", "1")
    assert p.returncode != 0
    assert "garbage.avi" in p.stderr and "Traceback" not in p.stderr, p.stderr


# ---------------------------------------------------------------- the CLI on a CAER-S image tree

def test_image_tree_community_csv(tmp_path, capsys):
    from PIL import Image

    truth = {}
    for split, emo, name, pos in [("train", "Happy", "0001.png", (60, 20)), ("train", "Sad", "0002.png", None),
                                  ("test", "Surprise", "0003.png", (300, 60))]:
        d = tmp_path / split / emo
        d.mkdir(parents=True, exist_ok=True)
        img, box = _composite(*pos) if pos else (_background(), None)
        Image.fromarray(img).save(d / name)
        truth[(split, f"{emo}/{name}")] = box
    (tmp_path / "train" / "Fear").mkdir()
    (tmp_path / "train" / "Fear" / "0004.png").write_bytes(b"")
    (tmp_path / "train" / "Fear" / "0005.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    for split in ("train", "test"):
        for c in CLASSES:
            (tmp_path / split / c).mkdir(exist_ok=True)

    p, _ = _cli(tmp_path, "--workers", "1")
    assert p.returncode == 0, p.stderr
    assert "[train] 4 files: 4 processed now" in p.stdout and "2 skipped as bad" in p.stdout
    assert "Fear/0004.png" in p.stdout and "Fear/0005.png" in p.stdout
    assert "images with a face: 1 of 2" in p.stdout
    for split in ("train", "test"):
        boxes, bad = read_image_boxes(tmp_path / f"{split}.txt")
        assert not bad
        want = {rel: b for (s, rel), b in truth.items() if s == split and b is not None}
        assert set(boxes) == set(want), boxes
        for rel, (label, box) in boxes.items():
            assert label == ["Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"].index(rel.split("/")[0])
            assert _iou(box, want[rel]) >= 0.5, (rel, box, want[rel])
    # Community format: plain CSV rows, no header.
    assert next(csv.reader(open(tmp_path / "train.txt")))[:2] == ["Happy/0001.png", "3"]

    # one worker: with several, whichever bad file a worker meets first is the one named
    p, _ = _main(capsys, tmp_path, "--strict", "--overwrite", "--splits", "train", "--workers", "1")
    assert p.returncode != 0 and "0004.png" in p.stderr and "Traceback" not in p.stderr


def test_tree_without_media_is_a_clear_error(tmp_path):
    with pytest.raises(FacesError, match="no CAER videos"):
        run(tmp_path)


# ---------------------------------------------------------------- issue 11: truncated files, class folders, errors

def test_truncated_video_and_image_are_counted_and_named(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "caer"
    for c in CLASSES:
        (root / "train" / c).mkdir(parents=True)
    full = root / "train" / "Happy" / "full.avi"
    truth = _moving_face_clip(full)
    cut = root / "train" / "Happy" / "cut.avi"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # FFmpeg decodes the first half quietly, no error
    p, _ = _main(capsys, root, "--workers", "1", "--every", str(EVERY))
    assert p.returncode == 0, p.stderr
    assert "0 skipped as bad (unreadable), 1 truncated / partly decodable" in p.stdout, p.stdout
    line = [ln for ln in p.stdout.splitlines() if "cut.avi" in ln]
    assert len(line) == 1 and line[0].startswith("[train] truncated / partly decodable: train/Happy/cut.avi: ")
    assert f"of the {N_FRAMES} frames its header lists decode" in line[0], line[0]
    boxes, _ = read_video_boxes(root / "train.faces.csv")
    kept = boxes["train/Happy/cut.avi"]
    assert kept and max(kept) < N_FRAMES // 2 + 2  # boxes only for frames that decoded
    assert all(f in truth and _iou(kept[f][0], truth[f]) >= 0.5 for f in kept), kept  # on the face
    p, _ = _main(capsys, root, "--workers", "1", "--every", str(EVERY), "--strict", "--overwrite")
    assert p.returncode == 2 and "cut.avi" in p.stderr and "truncated" in p.stderr, p.stderr

    # An image cut off mid-file: the top part decodes, the face in it is found, the file is named.
    img_root = tmp_path / "caers"
    for c in CLASSES:
        (img_root / "train" / c).mkdir(parents=True)
    img, box = _composite(60, 10)
    whole = img_root / "train" / "Happy" / "whole.png"
    Image.fromarray(img).save(whole)
    cut_png = img_root / "train" / "Happy" / "cut.png"
    cut_png.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.8)])
    p, _ = _main(capsys, img_root, "--workers", "1")
    assert p.returncode == 0, p.stderr
    assert "0 skipped as bad (unreadable), 1 truncated / partly decodable" in p.stdout, p.stdout
    assert "[train] truncated / partly decodable: Happy/cut.png" in p.stdout
    got, _ = read_image_boxes(img_root / "train.txt")
    assert _iou(got["Happy/cut.png"][1], box) >= 0.5, got


def test_class_folders_are_checked_and_strict_refuses(tmp_path, capsys):
    from PIL import Image

    for c in CLASSES:
        if c != "Sad":
            (tmp_path / "train" / c).mkdir(parents=True)
    (tmp_path / "train" / "sad").mkdir()
    (tmp_path / "train" / "Contempt").mkdir()
    Image.fromarray(_background()).save(tmp_path / "train" / "Happy" / "a.png")
    Image.fromarray(_background()).save(tmp_path / "train" / "sad" / "b.png")
    p, _ = _main(capsys, tmp_path, "--workers", "1")
    assert p.returncode == 0, p.stderr
    warn = [ln for ln in p.stdout.splitlines() if ln.startswith("[train] warning:")]
    assert len(warn) == 1 and "misnamed sad (the class is Sad)" in warn[0] and "extra folder Contempt" in warn[0]
    p, _ = _main(capsys, tmp_path, "--workers", "1", "--strict", "--overwrite")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "sad" in p.stderr and "Contempt" in p.stderr


def test_command_errors_are_one_line(tmp_path, capsys):
    from caer_fast.faces import FacesError, check_writable

    (tmp_path / "train" / "Happy").mkdir(parents=True)
    for args in (["--every", "x"], ["--detector", "yolo"], ["--every", "0"], ["--min-size", "0"],
                 ["--detect-height", "-5"], ["--splits", "nope"]):
        try:
            p, _ = _main(capsys, tmp_path, *args)
            rc, err = p.returncode, p.stderr
        except SystemExit as exc:  # argparse errors exit from inside main()
            rc, err = exc.code, capsys.readouterr().err
        assert rc == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    if os.geteuid() == 0:  # root writes anywhere but sysfs
        with pytest.raises(FacesError, match="cannot write the box files"):
            check_writable(Path("/sys"))
    else:
        (tmp_path / "train").chmod(0o555)
        tmp_path.chmod(0o555)
        try:
            p, _ = _main(capsys, tmp_path)
            assert p.returncode == 2 and "cannot write the box files" in p.stderr
        finally:
            tmp_path.chmod(0o755)


def test_damaged_resume_log_and_a_folder_in_the_way(tmp_path, capsys):
    from PIL import Image

    for c in CLASSES:
        (tmp_path / "train" / c).mkdir(parents=True)
    Image.fromarray(_composite(60, 10)[0]).save(tmp_path / "train" / "Happy" / "a.png")
    p, _ = _main(capsys, tmp_path, "--workers", "1")
    assert p.returncode == 0, p.stderr
    log = tmp_path / ".faces-train.log.jsonl"
    # lines a crash, a disk error or a hand edit could leave: none may crash the next run
    with open(log, "ab") as f:
        f.write(b'3\n["x"]\n{"path": "Happy/z.png", "bogus": 1}\n{"path": 7}\n\xff\xfe\x00junk\n')
    (tmp_path / "train.txt").unlink()
    p, _ = _main(capsys, tmp_path, "--workers", "1")
    assert p.returncode == 0 and "1 files: 0 processed now, 1 already done" in p.stdout, p.stdout + p.stderr
    (tmp_path / "train.txt").unlink()
    (tmp_path / "train.txt").mkdir()
    p, _ = _main(capsys, tmp_path, "--workers", "1")
    assert p.returncode == 2 and "train.txt is a folder" in p.stderr, p.stderr


def test_old_names_still_import_from_the_package():
    import caer_fast.faces as faces
    from caer_fast.faces import (DEFAULT_EVERY, FileResult, SplitSummary, _files, _init_worker,  # noqa: F401
                                 _label_of, _near, _open_log, detect_layout, detect_video, process_file, read_log,
                                 run_split)
    from caer_fast.faces import detect

    assert faces.fill_track is detect.fill_track and faces._near is detect.same_face
    assert faces._DETECTOR is detect._DETECTOR  # live module state, not a copy
    p = subprocess.run([sys.executable, "-m", "caer_fast.faces", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--strict" in p.stdout
