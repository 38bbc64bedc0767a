"""Issue 4's acceptance: a CAER tree never seen before (MPEG-4 Part 2, MJPEG and H.264 .avi, odd frame
sizes, a clip shorter than 16 frames, a clip with no face) goes through `python -m caer_fast.faces`
and then `python -m caer_fast.train --model caer` with default settings (only --epochs 1 to be short).

The face is scikit-image's astronaut photograph (ships with the package, no download).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

skdata = pytest.importorskip("skimage.data")
av = pytest.importorskip("av")

from caer_fast.constants import CLASSES  # noqa: E402
from caer_fast.data.boxes import read_video_boxes  # noqa: E402
from caer_fast.testing.media import write_clip  # noqa: E402

PATCH = skdata.astronaut()[20:230, 140:310]  # the face with some context around it
CODECS = ("mpeg4", "mjpeg", "libx264")


def _clip(rng, h, w, n, face=True):
    base = rng.integers(40, 200, size=(h, w, 3), dtype=np.uint8)
    frames = []
    for t in range(n):
        img = base.copy()
        if face:
            x = min(w - PATCH.shape[1], 10 + 3 * t)
            y = min(h - PATCH.shape[0], 12)
            img[y:y + PATCH.shape[0], x:x + PATCH.shape[1]] = PATCH
        frames.append(img)
    return frames


def _run(*args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_unseen_tree_detects_faces_then_trains(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "CAER"
    # unusual sizes; 4:2:0 encoders need even ones, MJPEG takes odd ones
    sizes = {"mpeg4": (250, 302), "mjpeg": (241, 323), "libx264": (262, 354)}
    expected_faces = {}
    k = 0
    for split, per_class in (("train", 1), ("validation", 1), ("test", 1)):
        for label, name in enumerate(CLASSES[:3] if split != "train" else CLASSES):
            for _ in range(per_class):
                codec = CODECS[k % 3]
                h, w = sizes[codec]
                n = 12 if k == 2 else 44  # one clip shorter than 16 frames (even before 10 fps resampling)
                face = k != 4  # one clip without a face
                rel = f"{split}/{name}/{k:04d}.avi"
                # one x264 thread: its output then depends only on the input
                write_clip(root / rel, _clip(rng, h, w, n, face), codec,
                           options={"threads": "1"} if codec == "libx264" else None)
                expected_faces[rel] = face
                k += 1

    _run("caer_fast.faces", "--data", root, "--no-progress")
    for split in ("train", "validation", "test"):
        found, bad = read_video_boxes(root / f"{split}.faces.csv")
        assert not bad
        for rel, has_face in expected_faces.items():
            if rel.startswith(split + "/"):
                assert (rel in found) == has_face, rel

    out = tmp_path / "run"
    proc = _run("caer_fast.train", "--data", root, "--model", "caer", "--epochs", "1", "--output-dir", out,
                "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["video"]["count"] == 3
    assert "test: clip top-1" in proc.stdout
    assert (out / "checkpoint.pth").is_file()
