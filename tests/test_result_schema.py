"""One answer schema: an image and a video give the same keys, from ``predict --json`` (the real CLI in a
subprocess) and from ``POST /predict`` (the real server over HTTP) alike."""
import json
import os
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from caer_fast.serving.stream import RESULT_KEYS  # noqa: E402
from caer_fast.testing.serving import Server, make_checkpoint, write_png, write_video  # noqa: E402

CLIP_KEYS = {"clip", "first_frame", "last_frame", "start_s", "end_s", "emotion", "probabilities", "fusion_weights",
             "face_found"}


def predict_json(path, checkpoint) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "caer_fast.predict", str(path), "--checkpoint", str(checkpoint),
                           "--json", "--engine", "eager"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("schema")
    return {"dir": d, "caers": make_checkpoint(d / "caers.pth", "caers"), "caer": make_checkpoint(d / "caer.pth", "caer"),
            "png": write_png(d / "image.png", seed=3), "mp4": write_video(d / "clip.mp4", frames=30, fps=20)}


def test_image_and_video_answers_have_the_same_keys_on_the_cli_and_the_server(files):
    cli = {kind: predict_json(files[ext], files["caers"]) for kind, ext in (("image", "png"), ("video", "mp4"))}
    cli["image (video model)"] = predict_json(files["png"], files["caer"])
    srv = Server(files["caers"], "--engine", "eager")
    try:
        http = {}
        for kind, ext in (("image", "png"), ("video", "mp4")):
            r = httpx.post(srv.url + "/predict", files={"file": (f"x.{ext}", files[ext].read_bytes())}, timeout=120)
            assert r.status_code == 200, r.text
            http[kind] = r.json()
    finally:
        srv.close()
    assert cli["image"]["kind"] == http["image"]["kind"] == "image"
    assert cli["video"]["kind"] == http["video"]["kind"] == "video"
    # the CLI echoes its input as "path"; every other key is the one schema
    for name, answer in [*(("cli " + k, {k2: v for k2, v in a.items() if k2 != "path"}) for k, a in cli.items()),
                         *(("http " + k, a) for k, a in http.items())]:
        assert set(answer) == set(RESULT_KEYS), (name, set(answer) ^ set(RESULT_KEYS))
        assert answer["engine"] == "eager" and answer["truncated"] is False, name
        for clip in answer["clips"]:
            assert set(clip) == CLIP_KEYS, (name, set(clip) ^ CLIP_KEYS)
    assert all("path" in a for a in cli.values())
    assert cli["image"]["fps"] is None and cli["video"]["fps"] == pytest.approx(20)
    # the same input gives the same answer on both sides
    for kind in ("image", "video"):
        for c, p in cli[kind]["probabilities"].items():
            assert http[kind]["probabilities"][c] == pytest.approx(p, abs=1e-5), kind
