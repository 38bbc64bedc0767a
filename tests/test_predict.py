"""python -m caer_fast.predict and the Predictor behind it, on real files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from caer_fast.serving.inference import Predictor, clip_starts, sample_indices
from caer_fast.testing.serving import make_checkpoint, write_png, write_video


def run_predict(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "caer_fast.predict", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    caers = make_checkpoint(d / "caers.pth", "caers")
    ours = torch.load(caers, weights_only=True)
    community = d / "community.pth"  # the community layout: weights under state_dict, DataParallel prefixes
    torch.save({"arch": "CAERSNet", "epoch": 7, "state_dict": {f"module.{k}": v for k, v in ours["model"].items()}},
               community)
    return {"dir": d, "caers": caers, "caer": make_checkpoint(d / "caer.pth", "caer"), "community": community}


def test_sampling_follows_the_test_protocol():
    assert sample_indices(24, 20).tolist() == list(range(0, 24, 2))  # 20 fps → every 2nd frame
    assert sample_indices(10, 5).tolist() == list(range(10))  # slower than 10 fps: every frame
    assert clip_starts(40, 16) == [0, 8, 16, 24] and clip_starts(5, 16) == [0]


def test_video_with_the_video_model_json_and_picture(ckpts, demo_root):
    video = sorted((demo_root / "CAER" / "test" / "Happy").glob("*.avi"))[0]
    viz = ckpts["dir"] / "viz.png"
    proc = run_predict(video, "--checkpoint", ckpts["caer"], "--json", "--save-viz", viz)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["kind"] == "video" and out["model"] == "caer" and out["emotion"] in out["probabilities"]
    assert len(out["clips"]) >= 1 and abs(sum(out["probabilities"].values()) - 1) < 1e-4
    clip_mean = np.mean([list(c["probabilities"].values()) for c in out["clips"]], axis=0)
    np.testing.assert_allclose(list(out["probabilities"].values()), clip_mean, atol=1e-5)  # mean over clips
    assert out["face_found"] and out["face_boxes"]  # the demo faces are found by the Haar detector
    assert out["attention"]["shape"] == [3, 3]  # 56 crop → 3×3 map (mean over time)
    from PIL import Image

    with Image.open(viz) as im:
        assert im.size[0] > 800 and im.size[1] > 400


def test_community_checkpoint_on_an_image_summary(ckpts, demo_root):
    image = sorted((demo_root / "CAER-S" / "test" / "Sad").glob("*.png"))[0]
    proc = run_predict(image, "--checkpoint", ckpts["community"])
    assert proc.returncode == 0, proc.stderr
    assert "emotion:" in proc.stdout and "fusion weights: face" in proc.stdout


def test_no_face_is_context_only_not_a_crash(ckpts, tmp_path):
    p = Predictor(ckpts["caers"], device="cpu")
    r = p.predict_file(write_png(tmp_path / "noface.png"), with_arrays=True)
    assert r["face_found"] is False and r["face_boxes"] == [] and "context-only" in r["note"]
    # the same as asking with an empty box: zeros as the face input, nothing masked
    r2 = p.predict_frames(r["_visual"]["frame"], boxes=np.zeros((1, 4), np.int64))
    assert r2["probabilities"] == r["probabilities"]


def test_given_boxes_change_the_answer_and_are_reported(ckpts, tmp_path):
    p = Predictor(ckpts["caer"], device="cpu", detector=None)
    frames = np.random.default_rng(0).integers(0, 256, (20, 64, 80, 3), dtype=np.uint8)
    boxes = np.tile([10, 8, 40, 44], (20, 1))
    with_face = p.predict_frames(frames, boxes=boxes)
    without = p.predict_frames(frames)
    assert with_face["face_found"] and len(with_face["face_boxes"]) == 20
    assert with_face["face_boxes"][0][:5] == [0, 10, 8, 40, 44]
    assert not without["face_found"]
    assert with_face["probabilities"] != without["probabilities"]
    assert [c["first_frame"] for c in with_face["clips"]] == [0, 8]  # 20 frames at 10 fps, 8-frame clips


def test_image_model_on_a_video_averages_frames(ckpts, tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=40, fps=20)
    p = Predictor(ckpts["caers"], device="cpu", detector=None)
    r = p.predict_file(video)
    assert r["frames_used"] == 20 and [c["first_frame"] for c in r["clips"]] == [0]  # one 16-frame clip


def test_errors_are_messages_not_tracebacks(ckpts, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(3000))
    proc = run_predict(junk, "--checkpoint", ckpts["caers"])
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_predict(junk, "--checkpoint", tmp_path / "missing.pth")
    assert proc.returncode == 2 and "missing.pth" in proc.stderr


def test_boxes_from_a_box_file_replace_the_detector(ckpts, demo_root):
    from caer_fast.data.boxes import read_video_boxes
    from caer_fast.predict import boxes_for

    video = sorted((demo_root / "CAER" / "test").glob("*/*.avi"))[0]
    box_file = demo_root / "CAER" / "test.faces.csv"
    known = boxes_for(video, box_file)
    truth, _ = read_video_boxes(box_file)
    rel = video.relative_to(demo_root / "CAER").as_posix()
    assert known == {f: b for f, (b, _) in truth[rel].items()}
    result = Predictor(ckpts["caer"], device="cpu", detector=None).predict_file(video, known_boxes=known)
    assert result["face_found"]
    for frame, *box, _score in result["face_boxes"]:
        assert tuple(box) == known[frame]
    with pytest.raises(LookupError, match="no boxes"):
        boxes_for(demo_root / "elsewhere.avi", box_file)
