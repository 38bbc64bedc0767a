"""Inference engines (caer_fast.serving.engines): every engine against the eager model, the measured
choice rejects a wrong engine, the on-disk cache makes a second start skip export and measurement, and
predict / serve state the engine they run. Timings are in bench/test_engines.py, not here."""
import copy
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from caer_fast import devices  # noqa: E402
from caer_fast.models import CAERNet, CAERSNet  # noqa: E402
from caer_fast.serving import engines  # noqa: E402
from caer_fast.serving.engines import auto, cache  # noqa: E402
from caer_fast.serving.engines import (EngineError, OnnxRuntimeEngine, build_engine, compare,  # noqa: E402
                                       engine_key)
from caer_fast.testing.serving import Server, make_checkpoint, write_png  # noqa: E402

SMALL_VIDEO = ((3, 8, 48, 48), (3, 8, 56, 56))
IMAGE = ((3, 96, 96), (3, 112, 112))


def _randomised(model):
    """Non-default BN statistics, so a wrong fold or a train-mode BN shows."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def caers():
    return _randomised(CAERSNet())


@pytest.fixture(scope="module")
def video():
    return _randomised(CAERNet(frames=8))


def _close(ref, got, atol=1e-4):
    (rl, rd), (gl, gd) = ref, got
    assert gl.shape == rl.shape
    torch.testing.assert_close(gl, rl, atol=atol, rtol=1e-4)
    for k in ("attention", "fusion_weights"):
        assert gd[k].shape == rd[k].shape, k
        torch.testing.assert_close(gd[k], rd[k], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("which", ["caers", "video"])
def test_onnx_engines_equal_eager_on_fresh_odd_batches(engine, which, caers, video, tmp_path):
    """Batch 1 and batches ≥ 2: OpenVINO 2026.4 was right at 1 and wrong at 2+ on an export that pooled
    through a Reshape (tools/openvino_repro.py)."""
    if engine == "openvino":
        pytest.importorskip("openvino")
    model, (fs, cs) = (caers, IMAGE) if which == "caers" else (video, SMALL_VIDEO)
    eng = build_engine(model, engine, face_shape=fs, context_shape=cs, batch_sizes=(1, 4), cache_dir=tmp_path)
    assert eng.name == engine and eng.info["check"]["ok"]
    assert not model.training  # exporting leaves the model in eval mode
    for b, seed in ((1, 11), (5, 12), (3, 13)):  # sizes never traced or measured: one graph for all
        g = torch.Generator().manual_seed(seed)
        face, context = torch.randn(b, *fs, generator=g) * 2, torch.randn(b, *cs, generator=g)
        with torch.inference_mode():
            _close(model(face, context, return_details=True), eng(face, context, return_details=True))
            torch.testing.assert_close(eng(face, context), model(face, context), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_onnx_engines_on_awkward_inputs(engine, caers, tmp_path):
    """An empty batch answers with empty outputs (as eager does), float64 and strided inputs are taken,
    and an input size the engine was not exported for is a ValueError naming the engine and both sizes."""
    if engine == "openvino":
        pytest.importorskip("openvino")
    fs, cs = IMAGE
    eng = build_engine(caers, engine, face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path)
    with torch.inference_mode():
        for face, context in ((torch.randn(0, *fs), torch.randn(0, *cs)),
                              (torch.randn(2, *fs, dtype=torch.float64), torch.randn(2, 3, 112, 112).transpose(2, 3))):
            got = eng(face, context, return_details=True)
            _close(caers(face.float(), context.float(), return_details=True), got)
        with pytest.raises(ValueError, match=rf"the {engine} engine was built for face N×3×96×96 .*\(2, 3, 64, 64\)"):
            eng(torch.randn(2, 3, 64, 64), torch.randn(2, *cs))
        with pytest.raises(ValueError, match="built for"):
            eng(torch.randn(2, *fs), torch.randn(3, *cs))


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime", "eager"])
def test_cpu_engines_run_big_batches_in_slices_with_the_same_answers(caers, tmp_path, monkeypatch, engine):
    """A batch over MAX_BATCH_INPUT_BYTES (the people steps: 3 people x 4 clips) runs as slices of at most that
    many bytes (a call's peak grows with its batch), and answers exactly as the model does for every sample."""
    if engine != "eager":
        pytest.importorskip(engine)
    from caer_fast.serving.engines import base

    fs, cs = IMAGE
    eng = build_engine(caers, engine, face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path)
    monkeypatch.setattr(base, "MAX_BATCH_INPUT_BYTES", 2 * base.sample_input_bytes(fs, cs))  # slices of 2
    calls = []
    run = eng.run
    monkeypatch.setattr(eng, "run", lambda face, context: calls.append(len(face)) or run(face, context))
    face, context = torch.randn(5, *fs), torch.randn(5, *cs)
    with torch.inference_mode():
        got = eng(face, context, return_details=True)
        _close(caers(face, context, return_details=True), got)
        assert calls == [2, 2, 1], calls
        calls.clear()
        monkeypatch.setattr(base, "MAX_BATCH_INPUT_BYTES", 5 * base.sample_input_bytes(fs, cs))
        torch.testing.assert_close(eng(face, context), caers(face, context), atol=1e-4, rtol=1e-4)
    assert calls == [5], calls


def test_a_predictor_without_an_engine_slices_like_eager(tmp_path, monkeypatch):
    """``Predictor(checkpoint)`` (no engine) runs the eager engine, not the bare model: a people step's batch
    runs in slices too, with the model's answers."""
    from caer_fast.serving.engines import base
    from caer_fast.serving.inference import Predictor

    p = Predictor(make_checkpoint(tmp_path / "ck.pth", "caers", steps=1), device="cpu", detector=None)
    assert p.engine_name == "eager" and p.engine.sliced
    fs, cs = p.input_shapes
    monkeypatch.setattr(base, "MAX_BATCH_INPUT_BYTES", 2 * base.sample_input_bytes(fs, cs))
    calls = []
    run = p.engine.run
    monkeypatch.setattr(p.engine, "run", lambda face, context: calls.append(len(face)) or run(face, context))
    face, context = torch.randn(5, *fs), torch.randn(5, *cs)
    probs, attention, weights = p.forward(face, context)
    assert calls == [2, 2, 1], calls
    with torch.inference_mode():
        logits, details = p.model(face, context, return_details=True)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=-1))
    torch.testing.assert_close(attention, details["attention"])
    torch.testing.assert_close(weights, details["fusion_weights"])


def test_eager_on_a_gpu_takes_the_batch_as_it_comes(caers):
    """Off the CPU (a GPU; here the meta device stands in for the placement) eager does not slice: slices
    would leave a GPU idle."""
    fs, cs = IMAGE
    eng = build_engine(copy.deepcopy(caers), "eager", face_shape=fs, context_shape=cs, batch_sizes=(1, 2))
    assert eng.sliced
    eng.model.to("meta")
    assert not eng.sliced


def test_openvino_rebuilds_over_a_damaged_cache(caers, tmp_path):
    pytest.importorskip("openvino")
    fs, cs = IMAGE
    build_engine(caers, "openvino", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path)
    blobs = list(tmp_path.rglob("openvino/*.blob"))
    assert blobs, "OpenVINO wrote no compiled model into the engine cache"
    for b in blobs:
        b.write_bytes(b"not a compiled model" * 4)
    again = build_engine(caers, "openvino", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path)
    assert again.info["loaded_from_cache"] is False and again.info["check"]["ok"]
    third = build_engine(caers, "openvino", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path)
    assert third.info["loaded_from_cache"] is True, "the recompiled model should replace the damaged blob"


def test_warm_start_loads_the_cached_graph_and_decision(caers, tmp_path, monkeypatch):
    fs, cs = IMAGE
    first = build_engine(caers, "auto", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path)
    d = first.info["decision"]
    assert first.info["decision_cached"] is False and set(d["candidates"]) == set(engines.auto_candidates())
    assert {"onnxruntime", "eager"} <= set(d["candidates"])
    assert all(r["check"]["ok"] for r in d["candidates"].values())
    assert d["chosen"] == min(d["candidates"], key=lambda n: d["candidates"][n]["score"])
    assert d["cpu_flags"] == devices.cpu_flags()

    # the second start must neither export, nor optimise, nor measure
    def boom(*a, **k):
        raise AssertionError("a warm start must not do this")
    monkeypatch.setattr(auto, "time_engine", boom)
    monkeypatch.setattr("caer_fast.serving.onnx.export_model_onnx", boom)
    second = build_engine(caers, "auto", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path)
    assert second.name == first.name and second.info["decision_cached"] is True
    ort = build_engine(caers, "onnxruntime", face_shape=fs, context_shape=cs, batch_sizes=(1, 2),
                       cache_dir=tmp_path, check=False)
    assert ort.info["loaded_optimized"] is True and ort.info["exported"] is False
    face, context = torch.randn(3, *fs), torch.randn(3, *cs)
    with torch.inference_mode():  # the optimised graph read back from disk gives the model's numbers
        _close(caers(face, context, return_details=True), ort(face, context, return_details=True))
    if "openvino" in d["candidates"]:  # OpenVINO's compiled model comes from its own cache
        ov = build_engine(caers, "openvino", face_shape=fs, context_shape=cs, batch_sizes=(1, 2),
                          cache_dir=tmp_path, check=False)
        assert ov.info["loaded_from_cache"] is True and ov.info["exported"] is False
        with torch.inference_mode():
            _close(caers(face, context, return_details=True), ov(face, context, return_details=True))


def test_auto_rejects_an_engine_whose_outputs_differ(caers, tmp_path, monkeypatch):
    fs, cs = IMAGE
    real_run = OnnxRuntimeEngine.run

    def wrong_at_batch_2_and_up(self, face, context):  # like OpenVINO 2026.4's fusion weights
        logits, att, w = real_run(self, face, context)
        if face.shape[0] >= 2:
            w = w.flip(-1).contiguous()
        return logits, att, w
    monkeypatch.setattr(OnnxRuntimeEngine, "run", wrong_at_batch_2_and_up)
    eng = build_engine(caers, "auto", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path,
                       candidates=("onnxruntime", "eager"))
    d = eng.info["decision"]
    assert eng.name == "eager" and d["chosen"] == "eager"
    assert d["candidates"]["onnxruntime"]["check"]["ok"] is False and "seconds" not in d["candidates"]["onnxruntime"]
    with pytest.raises(EngineError, match="differ"):
        build_engine(caers, "onnxruntime", face_shape=fs, context_shape=cs, cache_dir=tmp_path)


def test_compare_sees_a_poisoned_output(caers):
    fs, cs = IMAGE

    def poisoned(face, context, return_details=False):
        logits, d = caers(face, context, return_details=True)
        logits = logits.clone()
        logits[-1, 0] = float("nan")
        return logits, d
    r = compare(caers, poisoned, fs, cs, batch_sizes=(2,))
    assert r["ok"] is False and r["max_abs"] == float("inf")
    assert compare(caers, caers, fs, cs, batch_sizes=(1, 2))["ok"] is True


def test_cache_key_follows_weights_shapes_batch_range_threads_and_versions(caers, monkeypatch):
    fs, cs = IMAGE
    k = engine_key(caers, fs, cs, (1, 16), threads=2)
    installed = cache.library_versions()
    assert installed["onnxruntime"] == __import__("onnxruntime").__version__
    for package in ("onnxruntime", "openvino", "torch"):  # a new engine version measures and checks again
        monkeypatch.setattr(cache, "library_versions", lambda: {**installed, package: "0.0.1"})
        assert engine_key(caers, fs, cs, (1, 16), threads=2) != k, package
    monkeypatch.setattr(cache, "library_versions", lambda: installed)
    assert engine_key(caers, fs, cs, (1, 16), threads=2) == k
    assert k == engine_key(caers, fs, cs, (16, 1), threads=2)
    assert k != engine_key(caers, fs, cs, (1, 32), threads=2)
    assert k != engine_key(caers, fs, cs, (1, 16), threads=1)
    assert k != engine_key(caers, (3, 64, 64), cs, (1, 16), threads=2)
    other = _randomised(CAERSNet())
    with torch.no_grad():
        other.load_state_dict(caers.state_dict())
        assert engine_key(other, fs, cs, (1, 16), threads=2) == k
        other.fusion_net.fc2.bias[0] += 1e-6
    assert engine_key(other, fs, cs, (1, 16), threads=2) != k


def test_bad_engine_arguments_are_clear_errors(caers, tmp_path):
    with pytest.raises(EngineError, match="unknown engine 'tensorrt'"):
        build_engine(caers, "tensorrt")
    with pytest.raises(EngineError, match="not an fp32 engine"):
        build_engine(caers, "auto", candidates=("int8",), cache_dir=tmp_path)
    with pytest.raises(EngineError, match="calibration"):
        build_engine(caers, "int8")


def test_registry_one_module_one_register_call(caers, tmp_path):
    """An engine is a builder registered under a name: build_engine finds it, checks an fp32 one against
    eager, `auto` measures it when asked (and rejects it when its outputs differ)."""
    from caer_fast.serving.engines import base

    assert engines.ENGINES == engines.engine_names()
    assert set(engines.ENGINES) == {"auto", "eager", "compiled", "onnxruntime", "openvino", "int8"}
    assert set(engines.FP32_ENGINES) == {"eager", "compiled", "onnxruntime", "openvino"}

    class Doubled(engines.Engine):
        def __init__(self, model):
            super().__init__("test-doubled")
            self.model = model

        def run(self, face, context):
            logits, d = self.model(face, context, return_details=True)
            return logits * 2, d["attention"], d["fusion_weights"]

    @engines.register_engine("test-doubled")
    def build(ctx):
        assert ctx.options["flavour"] == "x" and ctx.face_shape == IMAGE[0]
        return Doubled(ctx.model)

    try:
        assert "test-doubled" in engines.engine_names() and engines.lookup_engine("test-doubled").build is build
        with pytest.raises(EngineError, match="test-doubled engine's outputs differ"):
            build_engine(caers, "test-doubled", cache_dir=None, flavour="x")
        eng = build_engine(caers, "test-doubled", cache_dir=None, check=False, flavour="x")
        face, context = torch.randn(2, *IMAGE[0]), torch.randn(2, *IMAGE[1])
        with torch.inference_mode():
            torch.testing.assert_close(eng(face, context), 2 * caers(face, context))
        chosen = build_engine(caers, "auto", candidates=("test-doubled", "eager"), cache_dir=tmp_path,
                              batch_sizes=(1, 2), flavour="x")
        assert chosen.name == "eager"
        assert chosen.info["decision"]["candidates"]["test-doubled"]["check"]["ok"] is False
        with pytest.raises(ValueError, match="already registered"):
            engines.register_engine("eager", build)
    finally:
        base._REGISTRY.pop("test-doubled", None)
    with pytest.raises(EngineError, match="unknown engine 'test-doubled'"):
        engines.lookup_engine("test-doubled")


def _run(*args, cache):
    env = dict(os.environ, OMP_NUM_THREADS="1", CAER_FAST_CACHE_DIR=str(cache))
    env.pop("CAER_FAST_ENGINE", None)
    return subprocess.run([sys.executable, "-m", "caer_fast.predict", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_predict_cold_then_warm_start_and_engine_in_output(tmp_path):
    """A cold cache: predict answers with eager at once (nothing exported or measured before the answer,
    its result says so), then measures and caches the choice; the next start reads it."""
    import time

    ck = make_checkpoint(tmp_path / "ck.pth", "caers", steps=1)
    img = write_png(tmp_path / "a.png", seed=3)
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", CAER_FAST_CACHE_DIR=str(cache))
    env.pop("CAER_FAST_ENGINE", None)
    t = time.perf_counter()
    with open(tmp_path / "stderr.txt", "w") as errfile:
        proc = subprocess.Popen([sys.executable, "-m", "caer_fast.predict", str(img), "--checkpoint", str(ck),
                                 "--json", "--detector", "none"], stdout=subprocess.PIPE, stderr=errfile, text=True,
                                env=env)
        first_line = proc.stdout.readline()
        answered_s = time.perf_counter() - t
        rest = proc.stdout.read()
        proc.wait(600)
    err = (tmp_path / "stderr.txt").read_text()
    print(f"cold predict: first answer after {answered_s:.1f}s, process done after {time.perf_counter() - t:.1f}s")
    assert proc.returncode == 0, err[-3000:]
    a = json.loads(first_line + rest)
    assert a["engine"] == auto.BackgroundAuto.MEASURING  # the answer came before any export or measurement
    assert "answering with eager now" in err
    measuring = "engine: measuring " + ", ".join(engines.auto_candidates())
    assert measuring in err and "exporting the model to ONNX" in err and "switched to" in err, err
    assert answered_s < 60, answered_s  # generous: the point is the line above (2 shared cores)
    warm = _run(img, "--checkpoint", ck, "--json", "--detector", "none", cache=cache)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "measuring" not in warm.stderr and "exporting" not in warm.stderr, warm.stderr
    b = json.loads(warm.stdout)
    assert b["engine"] in engines.auto_candidates()
    eager = _run(img, "--checkpoint", ck, "--json", "--detector", "none", "--engine", "eager", cache=cache)
    assert eager.returncode == 0, eager.stderr[-3000:]
    c = json.loads(eager.stdout)
    assert c["engine"] == "eager"
    for k, v in c["probabilities"].items():
        assert a["probabilities"][k] == v
        assert b["probabilities"][k] == pytest.approx(v, abs=1e-4)
    bad = _run(img, "--checkpoint", ck, "--engine", "tensorrt", cache=cache)
    assert bad.returncode == 2 and "invalid choice: 'tensorrt'" in bad.stderr


def test_background_auto_swaps_after_measuring(caers, tmp_path):
    """In process: eager answers until the measurement ends, then the chosen engine; answers agree within
    the fp32 tolerance; a build with the decision cached is no BackgroundAuto."""
    fs, cs = engines.default_shapes(caers)
    bg = build_engine(caers, "auto", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path,
                      background=True)
    assert isinstance(bg, engines.BackgroundAuto) and bg.name == bg.MEASURING
    face, context = torch.randn(3, *fs), torch.randn(3, *cs)
    with torch.inference_mode():
        ref = caers(face, context)
        torch.testing.assert_close(bg(face, context), ref)  # eager; starts the measurement
        chosen = bg.wait(600)
        assert bg.name == chosen.name in engines.auto_candidates() and bg.info["background"]["state"] == "done"
        torch.testing.assert_close(bg(face, context), ref, atol=1e-3, rtol=1e-3)
    again = build_engine(caers, "auto", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path,
                         background=True)
    assert not isinstance(again, engines.BackgroundAuto) and again.name == chosen.name
    assert again.info["decision_cached"] is True


def test_background_auto_takes_turns_with_eager(caers, tmp_path, monkeypatch):
    """While measuring, eager's answers and the measured candidates take turns: no eager forward runs during
    a candidate's timing (their memory peaks would add up: issue 24's cold streamed run); eager runs a big
    batch in slices of the largest measured batch, with the same answers."""
    caers = copy.deepcopy(caers)  # hooks below: not on the shared fixture
    fs, cs = engines.default_shapes(caers)
    timed, answered, starts = [], [], {}
    real_time = auto.time_engine

    def timing(*a, **kw):
        t = time.perf_counter()
        out = real_time(*a, **kw)
        timed.append((t, time.perf_counter()))
        return out
    monkeypatch.setattr(auto, "time_engine", timing)
    main = threading.get_ident()
    # hooks see the forwards of this thread only (the measurement runs a deep copy, hooks included)
    caers.register_forward_pre_hook(lambda m, i: starts.update({threading.get_ident(): time.perf_counter()}))
    caers.register_forward_hook(lambda m, i, o: answered.append((starts[main], time.perf_counter()))
                                if threading.get_ident() == main else None)
    bg = build_engine(caers, "auto", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path,
                      background=True)
    face, context = torch.randn(3, *fs), torch.randn(3, *cs)
    with torch.inference_mode():
        ref_logits, ref_details = caers(face, context, return_details=True)
        n0 = len(answered)
        bg(face, context)  # starts the measurement
        n_first = len(answered)
        while bg.state["state"] != "done":
            logits, details = bg(face, context, return_details=True)  # in slices of 2 (the measured batch)
            time.sleep(0.01)
        assert bg.wait(600) is not None
    assert n_first - n0 == 2  # 3 inputs: slices of 2 and 1
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(details["attention"], ref_details["attention"])
    during = [a for a in answered[n_first:] if a[0] < timed[-1][1]]
    assert timed and during, (timed, answered)
    overlaps = [(a, t) for a in answered for t in timed if a[0] < t[1] and t[0] < a[1]]
    assert not overlaps, overlaps


def test_predict_measures_the_batches_it_streams(tmp_path):
    """predict on a video model measures `auto` at batch 1 and its stream chunk (the largest batch it runs),
    not at the server's batch size: measuring a batch it never runs cost time and, at full size, ~1 GB."""
    from caer_fast.testing.serving import write_video

    ck = make_checkpoint(tmp_path / "ck.pth", "caer", steps=1)
    clip = write_video(tmp_path / "v.avi", frames=40)
    r = _run(clip, "--checkpoint", ck, "--json", "--detector", "none", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    measuring = "engine: measuring " + ", ".join(engines.auto_candidates())
    assert measuring + " at batch 1 and 4 " in r.stderr, r.stderr[-3000:]
    assert json.loads(r.stdout)["engine"] in (*engines.auto_candidates(), auto.BackgroundAuto.MEASURING)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_serve_states_its_engine(engine, tmp_path):
    import httpx

    if engine == "openvino":
        pytest.importorskip("openvino")
    ck = make_checkpoint(tmp_path / "video.pth", "caer", steps=1)
    img = write_png(tmp_path / "b.png", seed=4)
    srv = Server(ck, "--engine", engine, "--max-batch", 2, "--detector", "none", cwd=tmp_path,
                 startup_timeout=300)
    try:
        health = httpx.get(srv.url + "/health", timeout=10).json()
        assert health["engine"] == engine and health["model"] == "caer"
        with open(img, "rb") as fh:
            r = httpx.post(srv.url + "/predict", files={"file": (img.name, fh, "image/png")}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["engine"] == engine and abs(sum(body["probabilities"].values()) - 1) < 1e-3
        assert f"with engine {engine}" in srv.output()
    finally:
        srv.close()


def test_cache_checks_its_files_and_locks_its_entries(tmp_path):
    """Through the real CLI: two cold starts at once build the entry once (the second waits on the
    entry's lock and reads the first one's files); another checkpoint's export copied over model.onnx
    and the optimised graph is found by its digest, rebuilt and named in a warning, and the answer is
    the model's; an engine cache that is a file is a warning, not a traceback."""
    ck = make_checkpoint(tmp_path / "ck.pth", "caers", steps=1)
    other = make_checkpoint(tmp_path / "other.pth", "caers", steps=1, seed=7)
    img = write_png(tmp_path / "a.png", seed=3)
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", CAER_FAST_CACHE_DIR=str(cache))
    env.pop("CAER_FAST_ENGINE", None)
    cmd = [sys.executable, "-m", "caer_fast.predict", str(img), "--checkpoint", str(ck), "--json", "--detector", "none"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert sum("exporting the model to ONNX" in e for _, e in outs) == 1, [e for _, e in outs]
    assert sum("engine: measuring" in e for _, e in outs) == 1, [e for _, e in outs]
    first, second = (json.loads(o) for o, _ in outs)
    assert first["probabilities"] == second["probabilities"]

    (entry,) = [d for d in (cache / "engines").iterdir() if d.is_dir()]
    poison = tmp_path / "other.onnx"
    assert subprocess.run([sys.executable, "-m", "caer_fast.export", "--checkpoint", str(other), "--output",
                           str(poison)], env=env, capture_output=True, timeout=300).returncode == 0
    for name in ("model.onnx", "model.ort-optimized.onnx"):
        (entry / name).write_bytes(poison.read_bytes())
    warm = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert f"warning: engine cache: {entry / 'model.onnx'} does not match what was built for this model" \
        in warm.stderr, warm.stderr
    assert "measuring" not in warm.stderr  # the decision itself was intact
    fixed = json.loads(warm.stdout)
    assert fixed["engine"] in engines.auto_candidates()
    for k, v in first["probabilities"].items():
        assert fixed["probabilities"][k] == pytest.approx(v, abs=1e-4), (k, fixed["probabilities"])

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    bad = subprocess.run(cmd + ["--engine", "eager"], capture_output=True, text=True, timeout=600,
                         env=dict(env, CAER_FAST_CACHE_DIR=str(not_a_dir)))
    assert bad.returncode == 0 and "is unusable" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_named_engine_says_the_cache_was_the_cause(caers, tmp_path):
    """Files whose digests were recorded and still answer wrongly (the record itself rewritten): the
    named engine's check fails, the entry is rebuilt with a warning saying the cache was the cause."""
    fs, cs = IMAGE
    build_engine(caers, "onnxruntime", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path)
    (entry,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    other = _randomised(CAERSNet())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    from caer_fast.serving.onnx import export_model_onnx

    export_model_onnx(other, fs, cs, entry / "model.onnx")
    (entry / "model.ort-optimized.onnx").unlink()
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"] = {"model.onnx": cache.file_digest(entry / "model.onnx")}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    import io

    out = io.StringIO()
    eng = build_engine(caers, "onnxruntime", face_shape=fs, context_shape=cs, batch_sizes=(1, 2), cache_dir=tmp_path,
                       out=out)
    assert "the cache was the cause" in out.getvalue() and eng.info["check"]["ok"], out.getvalue()
    assert eng.info["exported"] is True


def test_auto_pick_rule():
    ok = lambda score: {"check": {"ok": True}, "score": score}  # noqa: E731
    assert auto.pick({"eager": ok(1.0), "onnxruntime": ok(0.5), "int8": ok(0.1)}) == "int8"
    assert auto.pick({"eager": ok(1.0), "onnxruntime": ok(0.5), "int8": ok(0.6)}) == "onnxruntime"  # an AVX2 CPU
    failed_guard = {"check": {"ok": False, "agreement": 0.9}}  # not timed: never chosen
    assert auto.pick({"eager": ok(1.0), "onnxruntime": ok(0.5), "int8": failed_guard}) == "onnxruntime"
    assert auto.pick({"eager": ok(1.0), "int8": {"error": "EngineError: …"}}) == "eager"
    assert auto.pick({"onnxruntime": {"check": {"ok": False}}}) == "eager"


def test_auto_keeps_int8_only_where_faster(demo_root, tmp_path, monkeypatch):
    """The real ``auto`` build with int8 (video model, calibrated on demo clips); the timings are injected so
    the test says which rule picks, not how fast this machine is."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from caer_fast.data import calibration as cal
    from caer_fast.testing.serving import trained_model

    model = trained_model("caer", steps=3)[0]  # logits not tied: a random model's top two are within int8 rounding
    calib = cal.video_calibration_batches(demo_root, 32, clip_frames=8, face_size=(48, 48), context_size=(64, 86),
                                          crop=56)
    shapes = dict(face_shape=(3, 8, 48, 48), context_shape=(3, 8, 56, 56), batch_sizes=(1, 4), threads=1)
    per_sample = {}
    monkeypatch.setattr(auto, "time_engine", lambda eng, f, c, b, **kw: per_sample[eng.name] * b)
    monkeypatch.setenv("CAER_FAST_CACHE_DIR", str(tmp_path))
    for int8_s, want in ((0.01, "int8"), (0.5, "eager")):
        per_sample.update(eager=0.1, int8=int8_s)
        for f in tmp_path.rglob("decision-*.json"):
            f.unlink()
        eng = build_engine(model, "auto", candidates=("eager",), calibration=calib, cache_dir=tmp_path, **shapes)
        d = eng.info["decision"]
        assert eng.name == want and d["chosen"] == want and set(d["candidates"]) == {"eager", "int8"}, d["candidates"]
        assert d["candidates"]["int8"]["check"]["ok"] and d["candidates"]["int8"]["check"]["agreement"] >= 0.99
        again = build_engine(model, "auto", candidates=("eager",), calibration=calib, cache_dir=tmp_path, **shapes)
        assert again.name == want and again.info["decision_cached"]
    # without calibration data int8 is not a candidate
    eng = build_engine(model, "auto", candidates=("eager",), cache_dir=tmp_path, **shapes)
    assert set(eng.info["decision"]["candidates"]) == {"eager"}


@pytest.mark.parametrize("digest", ["../../elsewhere", "", 42, None])
def test_a_source_record_names_files_of_the_entry_only(tmp_path, digest):
    """An edited manifest's calibration record that is not a hex digest is ignored (it names the entry's files)."""
    src = tmp_path / "calibration.pt"
    src.write_bytes(b"clips")
    man = cache.Manifest(tmp_path / "entry", "model", warn=lambda msg: None)
    man.remember_source(src, "0123abcd0123abcd")
    assert man.source_digest(src) == "0123abcd0123abcd"
    man.doc["sources"][str(src.resolve())]["digest"] = digest
    assert man.source_digest(src) is None


_MEASURE_PEAK = """
import sys, tempfile, gc, torch
from caer_fast.models import CAERSNet
from caer_fast.serving.engines import auto, build_engine
from caer_fast.testing.serving import proc_status_bytes
torch.manual_seed(0)
bs, fs, cs = (1, int(sys.argv[1])), (3, 96, 96), (3, 112, 112)
model = CAERSNet().eval()
with torch.inference_mode():  # eager has answered a full batch: the server at rest
    model(torch.randn(bs[-1], *fs), torch.randn(bs[-1], *cs))
gc.collect()
rest = proc_status_bytes("VmRSS")
with tempfile.TemporaryDirectory() as d:
    build_engine(model, "auto", face_shape=fs, context_shape=cs, batch_sizes=bs, cache_dir=d, out=sys.stderr)
print(proc_status_bytes("VmHWM") - rest, auto.measure_memory_estimate(fs, cs, bs))
"""


@pytest.mark.parametrize("batch", [4, 8])
def test_the_measurement_memory_estimate_covers_the_image_model(batch):
    """The bytes a server reserves for auto's measurement (``measure_memory_estimate``) cover what measuring
    ONNX Runtime and OpenVINO really adds to a fresh process (its VmHWM over its rest), for CAER-Net-S at the
    server's small batches (the full-size video model's figure is in bench/RESULTS.md)."""
    pytest.importorskip("openvino")
    proc = subprocess.run([sys.executable, "-c", _MEASURE_PEAK, str(batch)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak, estimate = map(int, proc.stdout.split())
    assert 0 < peak <= estimate, f"measuring added {peak / 2**20:.0f} MiB, the estimate is {estimate / 2**20:.0f} MiB"
