"""The HTTP server, run as users run it: python -m caer_fast.serve on a loopback port, real HTTP (httpx)."""
import random
import threading

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from caer_fast.serving.inference import Predictor  # noqa: E402
from caer_fast.testing.serving import Server, make_checkpoint, write_png, write_video  # noqa: E402

UPLOAD_MB = 1  # small, so the oversized case is cheap
MAX_FRAMES = 120


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    return {"dir": d, "ckpt": make_checkpoint(d / "checkpoint.pth", "caers"),
            "png": write_png(d / "image.png", seed=1), "mp4": write_video(d / "clip.mp4", frames=24, fps=20)}


@pytest.fixture(scope="module")
def server(files):
    cwd = files["dir"] / "cwd"
    cwd.mkdir()
    # a long max wait so the batching assertion does not hang on scheduler luck
    srv = Server(files["ckpt"], "--max-batch", 8, "--max-wait-ms", 50, "--max-upload-mb", UPLOAD_MB,
                 "--max-frames", MAX_FRAMES, cwd=cwd)
    yield srv
    srv.close()


def post(server, data: bytes, name="upload.bin", field="file", timeout=60):
    return httpx.post(server.url + "/predict", files={field: (name, data, "application/octet-stream")},
                      timeout=timeout)


def assert_refused(resp, status, words=()):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    for w in words:
        assert w in (body["error"] + " " + body.get("detail", "")).lower(), body


def test_health(server):
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model"] == "caers" and len(h["classes"]) == 7 and h["precision"] == "fp32"
    assert h["limits"]["max_upload_bytes"] == UPLOAD_MB * 2**20 and h["limits"]["max_frames"] == MAX_FRAMES
    assert "max_requests_per_call" in h["batching"]


def test_predict_image_equals_in_process_predictor(server, files):
    r = post(server, files["png"].read_bytes(), "photo.png")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["kind"] == "image" and out["emotion"] in out["probabilities"]
    assert abs(sum(out["probabilities"].values()) - 1) < 1e-4
    assert abs(out["fusion_weights"]["face"] + out["fusion_weights"]["context"] - 1) < 1e-4
    # a gradient with noise has no face: context-only, flagged, not an error
    assert out["face_found"] is False and out["face_boxes"] == [] and "no face" in out["note"]
    assert len(out["attention"]["values"]) == 7  # 112 crop → 7×7 map
    local = Predictor(files["ckpt"], device="cpu").predict_file(files["png"])
    for c, p in local["probabilities"].items():
        assert out["probabilities"][c] == pytest.approx(p, abs=1e-5)


def test_predict_video(server, files):
    r = post(server, files["mp4"].read_bytes(), "clip.mp4")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["kind"] == "video" and out["fps"] == pytest.approx(20)
    assert out["frames_used"] == 12  # 24 frames at 20 fps → 12 at 10 fps
    assert len(out["clips"]) == 1 and out["clips"][0]["last_frame"] == 22
    assert abs(sum(out["probabilities"].values()) - 1) < 1e-4


def test_concurrent_requests_are_batched_and_not_mixed_up(server, files):
    d = files["dir"]
    images = [write_png(d / f"c{i}.png", seed=10 + i, size=(100 + 4 * i, 140)).read_bytes() for i in range(8)]
    alone = [post(server, b).json()["probabilities"] for b in images]  # one at a time: batches of one
    before = httpx.get(server.url + "/health").json()["batching"]
    results, errors = [None] * 8, []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait()
            results[i] = post(server, images[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(r is not None and r.status_code == 200 for r in results), [r and r.text for r in results]
    after = httpx.get(server.url + "/health").json()["batching"]
    assert after["requests"] - before["requests"] == 8
    assert after["model_calls"] - before["model_calls"] < 8, after  # some requests shared a model call
    assert after["max_requests_per_call"] >= 2, after
    # each answer belongs to its own upload (BN in eval mode: the batch does not change a sample's output)
    for r, ref in zip(results, alone):
        got = r.json()["probabilities"]
        assert all(got[c] == pytest.approx(p, abs=1e-4) for c, p in ref.items())


def test_junk_uploads_are_4xx_with_a_reason(server, files):
    rng = np.random.default_rng(0)
    assert_refused(post(server, rng.bytes(5000)), 415, ["not an image or a video"])
    mp4 = files["mp4"].read_bytes()
    r = post(server, mp4[: len(mp4) // 2], "cut.mp4")  # truncated: the index (moov) is lost
    assert r.status_code in (415, 422), r.text
    assert r.json()["error"]
    assert_refused(post(server, b""), 400, ["empty"])
    assert_refused(post(server, rng.bytes(UPLOAD_MB * 2**20 + 10)), 413, ["too large"])
    assert_refused(post(server, files["png"].read_bytes(), field="image"), 400, ["file"])
    assert_refused(httpx.post(server.url + "/predict", content=b"plain", timeout=30), 400)
    png = files["png"].read_bytes()
    assert_refused(post(server, png[:200]), 422, ["undecodable"])  # a PNG cut short: known format, broken


def test_too_long_video_is_refused(server, files):
    long = write_video(files["dir"] / "long.mp4", frames=MAX_FRAMES + 10, fps=30, size=(48, 64))
    assert_refused(post(server, long.read_bytes()), 413, ["too long"])


def test_client_file_name_is_never_a_path(server, files):
    cwd = files["dir"] / "cwd"
    for name in ("../escaped.png", "/tmp/../" + str(files["dir"] / "abs_escape.png"), "x/../../escaped2.png"):
        assert post(server, files["png"].read_bytes(), name).status_code == 200
    assert not (files["dir"] / "escaped.png").exists() and not (files["dir"] / "abs_escape.png").exists()
    assert not (files["dir"] / "escaped2.png").exists()
    assert [p.name for p in cwd.iterdir() if not p.name.startswith("serve-")] == []


def test_fuzz_random_bytes_never_5xx(server, files):
    rnd = random.Random(1234)
    heads = [b"", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x10\x00\x00AVI LIST", b"\x00\x00\x00\x18ftypmp42",
             files["png"].read_bytes()[:64], files["mp4"].read_bytes()[:512]]
    statuses = []
    for _ in range(30):  # bounded
        body = rnd.choice(heads) + rnd.randbytes(rnd.randint(0, 20000))
        r = post(server, body)
        statuses.append(r.status_code)
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert r.json()["error"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert any(s >= 400 for s in statuses)


def test_binds_loopback_by_default():
    from caer_fast.serve import get_args_parser

    assert get_args_parser().parse_args(["--checkpoint", "x"]).host == "127.0.0.1"
