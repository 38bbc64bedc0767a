"""int8 video CAER-Net through OpenVINO + NNCF (caer_fast.models.openvino_int8), calibrated and checked on
real encoded clips of the demo tree; the calibration sample train saves (calibration.pt)."""
import pytest
import torch

from caer_fast.data import calibration as cal
from caer_fast.serving.onnx import export_model_onnx
from caer_fast.testing.serving import trained_model

pytest.importorskip("openvino")
pytest.importorskip("nncf", reason="nncf is not installed (pip install 'caer_fast[openvino-int8]')")
from caer_fast.models import openvino_int8 as q  # noqa: E402

SIZES = dict(clip_frames=8, face_size=(48, 48), context_size=(64, 86), crop=56)


@pytest.fixture(scope="module")
def built(demo_root, tmp_path_factory):
    model = trained_model("caer", steps=3)[0]
    calib = cal.video_calibration_batches(demo_root, 16, batch_size=4, **SIZES)
    held_out = cal.video_calibration_batches(demo_root, 14, split="test", batch_size=4, **SIZES)
    work = tmp_path_factory.mktemp("int8")
    onnx_path = export_model_onnx(model, tuple(calib[0][0].shape[1:]), tuple(calib[0][1].shape[1:]), work / "m.onnx")
    engine = q.build_int8_engine(model, onnx_path, calib, held_out, work, threads=1,
                                 min_agreement=0.0)  # the guard's threshold is tested on its own below
    return model, calib, held_out, engine


def test_int8_video_engine_is_quantized_and_close_to_fp32(built):
    model, calib, held_out, engine = built
    ops = {op.get_type_name() for op in engine.compiled.get_runtime_model().get_ops()}
    xml = open(engine.info["ir"]).read()
    assert xml.count('type="FakeQuantize"') >= 10, "NNCF inserted no quantizers: this would be fp32"
    assert ops, ops
    guard = engine.info["guard"]
    assert guard["n"] == sum(len(f) for f, _ in held_out) >= 7 and guard["agreement"] >= 0.99, guard
    face, context = held_out[0]
    with torch.inference_mode():
        want, details = model(face, context, return_details=True)
    got, got_details = engine(face, context, return_details=True)
    assert got.shape == want.shape and got.dtype == torch.float32
    spread = float(want.max() - want.min())
    assert float((got - want).abs().max()) < 0.1 * spread + 1e-3, (got, want)
    torch.testing.assert_close(got_details["fusion_weights"], details["fusion_weights"], atol=0.05, rtol=0)
    assert got_details["attention"].shape == details["attention"].shape
    # another batch size than calibration's, and an empty batch
    assert engine(face[:1], context[:1]).shape == (1, 7)
    assert engine(face[:0], context[:0]).shape == (0, 7)


def test_guard_counts_disagreement_and_refuses(built):
    model, calib, held_out, engine = built

    def flipped(face, context):  # a "quantized" model that swaps the top two classes
        logits = model(face, context)
        top2 = logits.topk(2, -1).indices
        out = logits.clone()
        out.scatter_(1, top2[:, :1], logits.gather(1, top2[:, 1:]))
        out.scatter_(1, top2[:, 1:], logits.gather(1, top2[:, :1]))
        return out

    bad = q.int8_guard(model, flipped, held_out)
    assert bad["agreement"] == 0.0 and not bad["ok"] and bad["max_abs"] > 0
    same = q.int8_guard(model, model, held_out)
    assert same == {"agreement": 1.0, "max_abs": 0.0, "n": same["n"], "ok": True}
    with pytest.raises(q.Int8AccuracyError, match="held-out"):
        work = engine.info["ir"].rsplit("/", 1)[0]
        q.build_int8_engine(model, work + "/m.onnx", calib[:1], held_out[:1], work + "/again",
                            min_agreement=1.01)


def test_calibration_sample_round_trip_and_clear_errors(built, tmp_path):
    _, calib, _, _ = built
    path = cal.save_calibration_sample(tmp_path / "calibration.pt", calib)
    back = cal.load_calibration_sample(path, batch_size=5)
    assert torch.equal(torch.cat([f for f, _ in back]), torch.cat([f for f, _ in calib]))
    assert torch.equal(torch.cat([c for _, c in back]), torch.cat([c for _, c in calib]))
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pt: not a calibration sample"):
        cal.load_calibration_sample(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        cal.load_calibration_sample(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="not a CAER tree"):
        cal.video_calibration_batches(tmp_path)


def _predict(*args, env):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "caer_fast.predict", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_predict_engine_int8_video_end_to_end(demo_root, tmp_path):
    """`predict --engine int8` on a video checkpoint needs nothing but the calibration.pt beside it; the
    quantized model is cached (the second start loads it); without calibration data: one error line."""
    import json
    import os

    from caer_fast.testing.serving import TINY_VIDEO_ARGS, make_checkpoint

    ck = make_checkpoint(tmp_path / "ck" / "caer.pth" if (tmp_path / "ck").mkdir() is None else None, "caer", steps=3)
    env = dict(os.environ, CAER_FAST_CACHE_DIR=str(tmp_path / "cache"))
    clip = sorted((demo_root / "CAER" / "test" / "Happy").glob("*.avi"))[0]
    common = [clip, "--checkpoint", ck, "--detector", "none", "--json"]
    missing = _predict(*common, "--engine", "int8", env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert "error: --engine int8: the int8 engine needs calibration data" in missing.stderr, missing.stderr

    a = TINY_VIDEO_ARGS
    cal.save_calibration_sample(ck.parent / cal.CALIBRATION_FILE, cal.video_calibration_batches(
        demo_root, 32, clip_frames=a["clip_frames"], face_size=tuple(a["face_size"]),
        context_size=tuple(a["context_size"]), crop=a["crop"]))
    fp32 = _predict(*common, "--engine", "eager", env=env)
    first = _predict(*common, "--engine", "int8", env=env)
    second = _predict(*common, "--engine", "int8", env=env)
    for p in (fp32, first, second):
        assert p.returncode == 0, p.stderr[-2000:]
    ref, got, again = (json.loads(p.stdout) for p in (fp32, first, second))
    assert got["engine"] == "int8" and got["emotion"] == ref["emotion"]
    for k, v in ref["probabilities"].items():
        assert got["probabilities"][k] == pytest.approx(v, abs=0.03), (k, ref, got)
        assert again["probabilities"][k] == pytest.approx(got["probabilities"][k], abs=1e-5)
    assert "quantizing the video model" in first.stderr and "agreement with fp32 100.0%" in first.stderr, first.stderr
    assert "loaded from the cache" in second.stderr and "quantizing" not in second.stderr, second.stderr


def test_quantizing_in_the_background_leaves_the_answer_on_stdout(capfd):
    """NNCF's progress goes to stderr, but only the quantizing thread's (and threads it starts): the answer the
    main thread prints meanwhile (a cold `predict --json` while `auto` measures int8 in the background) stays
    on stdout. contextlib.redirect_stdout, process-wide, sent it to stderr."""
    import threading
    import time

    from caer_fast.serving.engines.int8 import _stdout_of_this_thread_to_stderr

    started, printed = threading.Event(), threading.Event()

    def quantize():
        with _stdout_of_this_thread_to_stderr():
            started.set()
            print("progress bar")
            child = threading.Thread(target=lambda: print("progress refresh"))
            child.start()
            child.join()
            printed.wait(5)

    t = threading.Thread(target=quantize)
    t.start()
    started.wait(5)
    print('{"emotion": "Happy"}')
    printed.set()
    t.join()
    time.sleep(0.01)
    out, err = capfd.readouterr()
    assert out == '{"emotion": "Happy"}\n' and "progress bar" in err and "progress refresh" in err


def _write_calibration_pt(demo_root, path, offset=0):
    """calibration.pt of 16 demo clips at the test checkpoints' sizes (``offset``: other clips)."""
    from caer_fast.testing.serving import TINY_VIDEO_ARGS

    a = TINY_VIDEO_ARGS
    sizes = dict(clip_frames=a["clip_frames"], face_size=tuple(a["face_size"]), context_size=tuple(a["context_size"]),
                 crop=a["crop"])
    return cal.save_calibration_sample(path, cal.video_calibration_batches(demo_root, 16, offset=offset, **sizes))


def _build_int8_from(model, path, cache_dir, out=None):
    """The int8 engine (guard off) the way `predict --engine int8` builds it from calibration.pt."""
    from caer_fast.serving.engines import build_engine

    return build_engine(model, "int8", face_shape=(3, 8, 48, 48), context_shape=(3, 8, 56, 56), batch_sizes=(1,),
                        calibration=path, cache_dir=cache_dir, min_agreement=0.0, out=out)


def test_warm_start_finds_the_int8_entry_without_reading_calibration_pt(demo_root, tmp_path, monkeypatch):
    """The cache remembers calibration.pt's digest by the file's size, mtime and inode: a second build loads the
    int8 model without reading the clips (~130 MiB for the full-size model); a touched file is read and digested
    again (same clips: still the cached model); other clips quantize again."""
    import os

    from caer_fast.serving.engines import int8 as int8_engine

    model = trained_model("caer", steps=3)[0]
    path = _write_calibration_pt(demo_root, tmp_path / cal.CALIBRATION_FILE)
    reads = []
    load = int8_engine.load_calibration_sample
    monkeypatch.setattr(int8_engine, "load_calibration_sample", lambda *args, **kw: reads.append(1) or load(*args, **kw))

    def build():
        reads.clear()
        return _build_int8_from(model, path, tmp_path / "cache")

    first = build()
    assert first.info["loaded_from_cache"] is False and reads == [1]
    second = build()
    assert second.info["loaded_from_cache"] is True and reads == [], "the warm start read calibration.pt"
    assert second.info["calibration_digest"] == first.info["calibration_digest"]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: read and digested again
    third = build()
    assert third.info["loaded_from_cache"] is True and reads == [1]
    assert third.info["calibration_digest"] == first.info["calibration_digest"]
    _write_calibration_pt(demo_root, path, offset=1)  # other clips
    fourth = build()
    assert fourth.info["loaded_from_cache"] is False and reads == [1]
    assert fourth.info["calibration_digest"] != first.info["calibration_digest"]
    assert fourth.info["guard"]["n"] > 0 and first.info["guard"]["n"] > 0  # each build guarded its own clips


def test_a_damaged_int8_blob_is_compiled_again_and_recorded(demo_root, tmp_path):
    """A warm start that finds OpenVINO's compiled int8 blob damaged removes it and compiles the cached IR again;
    the new blob is recorded, so the next start trusts it instead of warning and compiling once more."""
    import io

    model = trained_model("caer", steps=3)[0]
    path = _write_calibration_pt(demo_root, tmp_path / cal.CALIBRATION_FILE)

    def build():
        out = io.StringIO()
        return _build_int8_from(model, path, tmp_path / "cache", out=out), out.getvalue()

    first, _ = build()
    blobs = [f for f in (tmp_path / "cache").rglob("openvino-int8/*") if f.is_file()]
    assert first.info["loaded_from_cache"] is False and blobs, "OpenVINO wrote no compiled int8 model into the cache"
    for b in blobs:
        b.write_bytes(b"not a compiled model" * 4)
    second, said = build()
    assert second.info["loaded_from_cache"] is True and "rebuilding it" in said, said
    assert [f for f in (tmp_path / "cache").rglob("openvino-int8/*") if f.is_file()], "no blob compiled again"
    third, said = build()
    assert third.info["loaded_from_cache"] is True and "warning" not in said, said
