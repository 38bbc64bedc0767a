"""The streaming pipeline (caer_fast.serving.stream) against the whole-input path, and predict's streaming
input forms: a file, a pipe on stdin, a file still being written; VFR, size changes, truncation; timelines."""
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from caer_fast.data.video import decode_video
from caer_fast.serving.inference import Predictor
from caer_fast.serving.stream import Prediction
from caer_fast.testing.serving import make_checkpoint, write_video

ROOT = Path(__file__).resolve().parents[1]


def run_predict(*args, stdin=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "caer_fast.predict", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=stdin)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    return {"dir": d, "caer": make_checkpoint(d / "caer.pth", "caer"), "caers": make_checkpoint(d / "caers.pth", "caers")}


def whole_input(p: Predictor, path, known_boxes=None) -> dict:
    """The input all at once: decode everything in memory (decode_video, not the streaming decoder),
    resample, preprocess every frame and run every clip in one chunk, one model call."""
    from caer_fast.serving.clips import sample_indices
    from caer_fast.serving.inference import MediaSource

    video = decode_video(path)
    sel = sample_indices(len(video.frames), video.fps)
    h, w = video.frames.shape[1:3]
    source = MediaSource("video", [(k, int(video.indices[i]), video.frames[i]) for k, i in enumerate(sel)],
                         float(video.fps), w, h)
    chunks = list(p.preprocessor(chunk_inputs=10**9).chunks(source.frames, known_boxes=known_boxes))
    assert len(chunks) == 1 and chunks[0].last
    acc = p.accumulator(source)
    acc.add(chunks[0], *p.forward(chunks[0].face, chunks[0].context))
    return acc.result().to_dict()


def assert_same(stream: dict, whole: dict, atol=1e-5):
    for c, v in whole["probabilities"].items():
        assert stream["probabilities"][c] == pytest.approx(v, abs=atol), (c, stream["probabilities"], whole["probabilities"])
    assert [(c["first_frame"], c["last_frame"], c["start_s"], c["end_s"], c["face_found"]) for c in stream["clips"]] == \
        [(c["first_frame"], c["last_frame"], c["start_s"], c["end_s"], c["face_found"]) for c in whole["clips"]]
    for a, b in zip(stream["clips"], whole["clips"]):
        for c, v in b["probabilities"].items():
            assert a["probabilities"][c] == pytest.approx(v, abs=atol)
    assert stream["face_boxes"] == whole["face_boxes"]
    assert stream["frames_used"] == whole["frames_used"] and stream["emotion"] == whole["emotion"]
    assert stream["attention"]["clip"] == whole["attention"]["clip"]
    np.testing.assert_allclose(stream["attention"]["values"], whole["attention"]["values"], atol=1e-5)


@pytest.mark.parametrize("model", ["caer", "caers"])
def test_stream_equals_whole_input_on_the_demo_test_clips(ckpts, demo_root, model):
    from caer_fast.predict import boxes_for

    videos = sorted((demo_root / "CAER" / "test").glob("*/*.avi"))
    assert len(videos) >= 7
    box_file = demo_root / "CAER" / "test.faces.csv"
    for i, video in enumerate(videos):
        # a small chunk, so the clips of one video are spread over several chunks and model calls
        p = Predictor(ckpts[model], device="cpu", detector="haar", stream_chunk=1 + i % 3)
        if i % 2:
            known = boxes_for(video, box_file)
            assert_same(p.predict_file(video, known_boxes=known).to_dict(), whole_input(p, video, known))
        else:
            assert_same(p.predict_file(video).to_dict(), whole_input(p, video))


@pytest.mark.parametrize("frames,fps,chunk", [(5, 8, 1), (23, 20, 2), (61, 25, 3), (200, 30, 4), (37, 24, 16)])
def test_stream_equals_whole_input_on_odd_lengths_and_rates(ckpts, tmp_path, frames, fps, chunk):
    video = write_video(tmp_path / f"v{frames}_{fps}.mp4", frames=frames, fps=fps, size=(72, 104), seed=frames)
    for model in ("caer", "caers"):
        p = Predictor(ckpts[model], device="cpu", detector=None, stream_chunk=chunk)
        rng = np.random.default_rng(frames)
        known = {i: tuple(int(v) for v in (rng.integers(0, 30), rng.integers(0, 20), rng.integers(40, 100), rng.integers(30, 70)))
                 for i in range(frames) if rng.random() < 0.6}
        assert_same(p.predict_file(video, known_boxes=known).to_dict(), whole_input(p, video, known))


def test_typed_result_keeps_the_dict_json(ckpts, tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=40, fps=20)
    r = Predictor(ckpts["caer"], device="cpu", detector=None).predict_file(video)
    assert isinstance(r, Prediction)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready
    assert r["emotion"] == d["emotion"] == r.emotion and r["clips"] == d["clips"] and "probabilities" in r
    assert set(d) >= {"kind", "model", "checkpoint_kind", "emotion", "confidence", "probabilities", "fusion_weights",
                      "face_found", "frames_with_face", "frames_used", "note", "fps", "detector", "face_boxes",
                      "attention", "clips", "truncated"}


def test_engine_seam_is_used(ckpts, tmp_path):
    """An engine (exported / compiled model) replaces the model in Predictor.forward, the single model call."""
    calls = []
    p = Predictor(ckpts["caer"], device="cpu", detector=None)
    model = p.model

    def engine(face, context, return_details=True):
        calls.append(face.shape[0])
        logits, d = model(face, context, return_details=True)
        return logits * 0 + torch.arange(7.0), d  # poisoned: the answer must come from here

    q = Predictor(ckpts["caer"], device="cpu", detector=None, engine=engine)
    r = q.predict_file(write_video(tmp_path / "v.mp4", frames=60, fps=20))
    assert calls and r.emotion == "Surprise"


def test_vfr_input_is_sampled_by_timestamp(ckpts, tmp_path):
    """Frames with irregular timestamps: the sampled frames are those at or before each 0.1 s tick."""
    import av

    path = tmp_path / "vfr.mkv"
    times = [0.0, 0.02, 0.05, 0.31, 0.33, 0.6, 0.61, 0.62, 0.63, 1.2, 1.25, 1.5]  # seconds
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=50)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.time_base = __import__("fractions").Fraction(1, 1000)
        s.codec_context.time_base = s.time_base
        for i, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = int(round(t * 1000)), s.time_base
            c.mux(s.encode(f))
        c.mux(s.encode())
    from caer_fast.data.video import VideoStream, open_source, sample_positions

    v = VideoStream(open_source(path), path)
    got = [(k, i) for k, i, _ in sample_positions(v, v.fps, 10.0)]
    v.close()
    by_k = dict(got)
    # tick k·0.1 s → the last frame shown at that time (not the k-th frame: the timestamps are irregular)
    for k, j in {0: 0, 1: 2, 2: 2, 3: 2, 4: 4, 5: 4, 6: 5, 7: 8, 11: 8, 12: 9, 13: 10, 15: 11}.items():
        assert by_k[k] == j, (k, by_k)
    assert [k for k, _ in got] == list(range(len(got))) and 15 <= len(got) <= 16
    want = got
    r = Predictor(ckpts["caer"], device="cpu", detector=None).predict_file(path)
    assert r.frames_used == len(want)


def test_resolution_change_mid_stream_is_rescaled_and_noted(ckpts, tmp_path):
    import av

    path = tmp_path / "sizes.ts"
    with av.open(str(path), "w", format="mpegts") as c:
        s = c.add_stream("mpeg2video", rate=25)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for i in range(30):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((64, 96, 3), 5 * i, np.uint8), format="rgb24")))
        c.mux(s.encode())
    with av.open(str(path), "a" if False else "r") as c:  # sanity: it decodes
        assert sum(1 for _ in c.decode(video=0)) == 30
    # a second part at another size, concatenated byte-wise (a broadcast stream that changes resolution)
    part2 = tmp_path / "part2.ts"
    with av.open(str(part2), "w", format="mpegts") as c:
        s = c.add_stream("mpeg2video", rate=25)
        s.width, s.height, s.pix_fmt = 160, 120, "yuv420p"
        for i in range(30):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((120, 160, 3), 200 - 5 * i, np.uint8), format="rgb24")))
        c.mux(s.encode())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(path.read_bytes() + part2.read_bytes())
    r = Predictor(ckpts["caer"], device="cpu", detector=None).predict_file(joined).to_dict()
    assert r["note"] and "frame size changed" in r["note"] and "rescaled" in r["note"]
    assert r["frames_used"] >= 20 and len(r["clips"]) >= 2


def test_truncated_file_gives_results_up_to_the_last_good_frame_with_a_note(ckpts, tmp_path):
    video = write_video(tmp_path / "full.avi", frames=120, fps=20, codec="mpeg4", size=(64, 96))
    data = video.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    p = Predictor(ckpts["caer"], device="cpu", detector=None)
    full = p.predict_file(video).to_dict()
    r = p.predict_file(cut).to_dict()
    assert r["truncated"] is True and "truncated" in r["note"]
    assert 0 < r["frames_used"] < full["frames_used"]
    assert not full["truncated"] and full["note"] is None or "truncated" not in (full["note"] or "")
    proc = run_predict(cut, "--checkpoint", ckpts["caer"], "--detector", "none")
    assert proc.returncode == 0, proc.stderr
    assert "note:" in proc.stdout and "truncated" in proc.stdout


def test_timeline_csv_json_and_plot(ckpts, tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=160, fps=20, size=(64, 96))
    csv_path, json_path, png = tmp_path / "t.csv", tmp_path / "t.json", tmp_path / "t.png"
    proc = run_predict(video, "--checkpoint", ckpts["caer"], "--detector", "none", "--timeline", csv_path,
                       "--timeline-plot", png, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(out["clips"]) == 10  # 80 frames at 10 fps, 8-frame clips every 8 frames
    for row, clip in zip(rows, out["clips"]):
        assert float(row["start_s"]) == clip["start_s"] and row["emotion"] == clip["emotion"]
        assert float(row["p_Happy"]) == clip["probabilities"]["Happy"]
        assert float(row["lambda_face"]) + float(row["lambda_context"]) == pytest.approx(1, abs=1e-5)
        assert row["face_found"] == "0"
    proc = run_predict(video, "--checkpoint", ckpts["caer"], "--detector", "none", "--timeline", json_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(json_path.read_text())
    assert [c["start_s"] for c in doc["clips"]] == [c["start_s"] for c in out["clips"]]
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 1000 and im.size[1] > 500
    bad = run_predict(video, "--checkpoint", ckpts["caer"], "--timeline", tmp_path / "t.txt")
    assert bad.returncode == 2 and "csv or .json" in bad.stderr


def _mpegts_bytes(frames=60, fps=25, size=(48, 64)):
    import io

    import av

    buf = io.BytesIO()
    h, w = size
    with av.open(buf, "w", format="mpegts") as c:
        s = c.add_stream("mpeg2video", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (4 * i) % 256
            img[10:30, (i % (w - 20)):(i % (w - 20)) + 20] = 230
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def test_pipe_on_stdin_equals_the_same_stream_as_a_file(ckpts, tmp_path):
    data = _mpegts_bytes(frames=90)
    f = tmp_path / "s.ts"
    f.write_bytes(data)
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.buffer.write(open(sys.argv[1],'rb').read())",
                               str(f)], stdout=subprocess.PIPE)  # a real pipe, not a file on stdin
    piped = run_predict("-", "--checkpoint", ckpts["caer"], "--detector", "none", "--json", stdin=writer.stdout)
    writer.wait()
    assert piped.returncode == 0, piped.stderr
    from_file = run_predict(f, "--checkpoint", ckpts["caer"], "--detector", "none", "--json")
    a, b = json.loads(piped.stdout), json.loads(from_file.stdout)
    assert a["probabilities"] == b["probabilities"] and len(a["clips"]) == len(b["clips"]) == 4
    bad = run_predict("-", "--checkpoint", ckpts["caer"], stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "error:" in bad.stderr and "<stdin>" in bad.stderr and "Traceback" not in bad.stderr


def test_follow_a_file_still_being_written(ckpts, tmp_path):
    """A writer appends MPEG-TS packets while predict --follow reads: clip lines arrive before the writer ends."""
    import av

    path = tmp_path / "growing.ts"
    path.write_bytes(b"")
    done = threading.Event()
    first_line = threading.Event()
    written = []

    def writer():
        with open(path, "ab", buffering=0) as raw:
            with av.open(raw, "w", format="mpegts") as c:
                s = c.add_stream("mpeg2video", rate=25)
                s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
                for i in range(250):
                    img = np.full((48, 64, 3), (3 * i) % 256, np.uint8)
                    for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                        c.mux(pkt)
                    if i % 25 == 24:
                        written.append(time.monotonic())
                        time.sleep(0.5)
                    if i == 99:  # 4 s written: go on only once predict has answered for what it has
                        first_line.wait(300)
                for pkt in s.encode():
                    c.mux(pkt)
        done.set()

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "caer_fast.predict", str(path), "--checkpoint", str(ckpts["caer"]),
                             "--detector", "none", "--follow", "--follow-idle", "20"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    t = threading.Thread(target=writer)
    t.start()
    lines, first_at = [], None
    for line in proc.stdout:
        if first_at is None:
            first_at = time.monotonic()
            first_before_writer_done = not done.is_set()
            first_line.set()
        lines.append(json.loads(line))
    proc.wait(timeout=120)
    first_line.set()
    t.join()
    assert proc.returncode == 0, proc.stderr.read()
    clips = [x for x in lines if x["type"] == "clip"]
    assert lines[-1]["type"] == "result" and "clips" not in lines[-1]
    assert len(clips) == 12  # 250 frames at 25 fps → 100 at 10 fps → 8-frame clips at 0, 8, …, 88
    assert first_before_writer_done  # results came out while the file was still growing
    assert [c["clip"] for c in clips] == list(range(12))


def test_memory_stays_flat_with_length(ckpts, tmp_path):
    """The producer/consumer queue holds at most a few chunks: a 4× longer input does not hold 4× the
    preprocessed frames (counted through the chunks alive at once, not RSS: that is bench/test_streaming)."""
    import gc
    import weakref

    from caer_fast.serving import stream as stream_mod

    alive, peak = set(), [0]
    orig_init = stream_mod.Chunk.__init__

    def init(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        alive.add(id(self))
        weakref.finalize(self, alive.discard, id(self))
        peak[0] = max(peak[0], len(alive))

    stream_mod.Chunk.__init__ = init
    try:
        p = Predictor(ckpts["caer"], device="cpu", detector=None, stream_chunk=1)
        peaks = []
        for frames in (80, 480):
            peak[0] = 0
            gc.collect()
            r = p.predict_file(write_video(tmp_path / f"{frames}.mp4", frames=frames, fps=20, size=(48, 64)))
            assert len(r.clips) == frames // 2 // 8  # 10 fps, 8-frame clips every 8 frames
            peaks.append(peak[0])
        # 5 clips vs 30 clips, one clip per chunk: the chunks alive at once do not grow with the length
        assert 2 <= peaks[0] and peaks[1] <= 5, peaks
    finally:
        stream_mod.Chunk.__init__ = orig_init


def test_a_url_is_read_like_a_file(ckpts, tmp_path):
    """http:// through FFmpeg's own protocol: a local HTTP server in a thread serves the file."""
    import functools
    import http.server

    video = write_video(tmp_path / "web.mp4", frames=60, fps=20, size=(48, 64))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/web.mp4"
        p = Predictor(ckpts["caer"], device="cpu", detector=None)
        assert p.predict_file(url).probabilities == p.predict_file(video).probabilities
        proc = run_predict(url.replace("web.mp4", "missing.mp4"), "--checkpoint", ckpts["caer"])
        assert proc.returncode == 2 and "error:" in proc.stderr and "missing.mp4" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("video_model", [True, False])
def test_clip_sampler_follows_the_test_protocol_whatever_the_chunking(video_model):
    """ClipSampler against the protocol written out directly: clips at clip_starts (the datasets' rule),
    frames at min(a + j, s - 1) (a short input padded with its last frame), for random lengths, random
    batches of added frames and random chunk sizes."""
    from caer_fast.serving.clips import ClipPooler, ClipSampler, clip_starts

    rng = np.random.default_rng()
    for _ in range(20):
        s, t = int(rng.integers(1, 60)), int(rng.choice([4, 8, 16]))
        frames = torch.randn(s, 3, 2, 2)
        sampler = ClipSampler(t, video_model)
        chunks, i = [], 0
        while i < s:
            k = int(rng.integers(1, 9))
            sampler.add(frames[i:i + k], -frames[i:i + k], [(q, q, 0, 0, 0, 0, float("nan")) for q in range(i, min(i + k, s))])
            i += k
            while sampler.pending and rng.random() < 0.5:
                chunks.append(sampler.take(int(rng.integers(1, 5))))
        sampler.close()
        while not chunks or not chunks[-1].last:  # the chunk that empties a closed sampler is the last
            chunks.append(sampler.take(int(rng.integers(1, 5))))
        assert chunks[-1].last and not any(c.last for c in chunks[:-1])
        starts = clip_starts(s, t)
        want = [(a, min(a + t, s) - 1) for a in starts]
        assert [c for ch in chunks for c in ch.clips] == want
        assert [m[0] for ch in chunks for m in ch.frames] == list(range(s))
        face = torch.cat([ch.face for ch in chunks if ch.n])
        if video_model:  # one 3×T×h×w input per clip
            ref = torch.stack([frames[[min(a + j, s - 1) for j in range(t)]].permute(1, 0, 2, 3) for a in starts])
        else:  # one input per sampled frame
            ref = frames
        torch.testing.assert_close(face, ref, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([ch.context for ch in chunks if ch.n]), -ref, rtol=0, atol=0)
        # the output side: per-frame outputs averaged per clip (image model), clip outputs as they are (video)
        pooler, got = ClipPooler(video_model), []
        out = torch.rand(len(ref), 7)
        first = 0
        for ch in chunks:
            got += pooler.add(ch, out[first:first + ch.n], out[first:first + ch.n, :1], out[first:first + ch.n, :2])
            first += ch.n
        assert [(a, b) for a, b, *_ in got] == want
        for k, (a, b, p, _w, _att) in enumerate(got):
            torch.testing.assert_close(p, out[k] if video_model else out[a:b + 1].mean(0))


def test_preprocessing_can_run_apart_from_the_model(ckpts, tmp_path):
    """The preprocessor and its chunks survive pickling (another process can make them); the answer from
    unpickled chunks is predict_file's."""
    import pickle

    video = write_video(tmp_path / "v.mp4", frames=50, fps=25, seed=5)
    p = Predictor(ckpts["caers"], device="cpu", detector="haar", stream_chunk=3)
    pre = pickle.loads(pickle.dumps(p.preprocessor()))
    with p.open(video) as source:
        blobs = [pickle.dumps(c) for c in pre.chunks(source.frames)]
        acc = p.accumulator(source)
    for blob in blobs:
        ch = pickle.loads(blob)
        acc.add(ch, *(p.forward(ch.face, ch.context) if ch.n else (torch.empty(0),) * 3))
    assert_same(acc.result().to_dict(), p.predict_file(video).to_dict(), atol=0)
