"""int8 inference (caer_fast.quantize_int8, predict/serve --int8) against the fp32 model it came from.

One CAER-Net-S is trained for 5 epochs on demo CAER-S data (demo input sizes, about 20 s), then quantised
once (calibration on 64 train images, then a compile per batch-size range: about 10 s each) and shared by
the tests here. Tolerances, measured on the build machine (AVX2, no VNNI, so 7-bit activations): mean
|Δlogit| 0.0075, max 0.14 on logits up to 5.4; argmax agreement 100 %; accuracy equal. The asserts
allow mean 0.05, max 0.5, agreement >= 97 %, accuracy within 1 point.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import caer_fast
from caer_fast.models import CAERNet, CAERSNet

pytest.importorskip("torchao", reason="int8 needs torchao (requirements.txt)")

from caer_fast.data.calibration import calibration_batches  # noqa: E402
from caer_fast.devices import has_vnni  # noqa: E402
from caer_fast.models.checkpoint import input_sizes, read_checkpoint  # noqa: E402
from caer_fast.models.quantize import Int8Model, quantize_int8  # noqa: E402
from caer_fast.serving.engines import EngineError, Int8Engine, build_engine  # noqa: E402
from caer_fast.testing.serving import Server, make_checkpoint  # noqa: E402

SMALL = ["--clip-frames", "8", "--face-size", "48", "--context-size", "64x86", "--crop", "56", "-j", "0",
         "--no-progress", "--seed", "3"]
MEAN_LOGIT_TOL, MAX_LOGIT_TOL, AGREEMENT_MIN, ACCURACY_POINTS = 0.05, 0.5, 0.97, 1.0


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{"data": demo root, "ckpt": trained CAER-S checkpoint} (210 test images: 1 point = 2.1 images)."""
    from caer_fast.data.synthetic import make_demo_dataset

    d = tmp_path_factory.mktemp("int8")
    make_demo_dataset(d / "data", seed=1, videos_per_class=1, images_per_class={"train": 24, "test": 30})
    out = d / "run"
    proc = subprocess.run([sys.executable, "-m", "caer_fast.train", "--data", str(d / "data" / "CAER-S"), "--model",
                           "caers", "-b", "16", "--lr", "0.01", "--epochs", "5", "--output-dir", str(out), *SMALL],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": d, "data": d / "data", "ckpt": out / "checkpoint.pth"}


@pytest.fixture(scope="module")
def int8(trained):
    """(fp32 Predictor model, int8 model, test faces, contexts, labels)."""
    from caer_fast.data.datasets import CAERSImageDataset
    from caer_fast.serving.inference import Predictor

    p = Predictor(trained["ckpt"], device="cpu", detector=None)
    fp32 = p.model
    snapshot = {k: v.clone() for k, v in fp32.state_dict().items()}
    sizes = input_sizes(read_checkpoint(trained["ckpt"]), fp32)
    eng = build_engine(fp32, "int8", face_shape=sizes["face_shape"], context_shape=sizes["context_shape"],
                       calibration=trained["data"], calibration_samples=64, calibration_sizes=sizes, cache_dir=None)
    q = eng.model
    assert isinstance(eng, Int8Engine) and eng.name == "int8" and isinstance(q, Int8Model)
    assert p.model is fp32  # the predictor's own model is not swapped
    for k, v in fp32.state_dict().items():  # the user's weights are untouched
        assert torch.equal(v, snapshot[k]), k
    assert not fp32.training
    ds = CAERSImageDataset(trained["data"] / "CAER-S", "test", train=False, face_size=p.face_size,
                           context_size=p.context_size, crop=p.crop[2])
    items = [ds[i] for i in range(len(ds))]
    face = torch.stack([s["face"] for s in items])
    context = torch.stack([s["context"] for s in items])
    labels = torch.tensor([s["label"] for s in items])
    return fp32, q, face, context, labels


def test_int8_matches_fp32_on_the_demo_test_set(int8):
    fp32, q, face, context, labels = int8
    with torch.no_grad():
        want = torch.cat([fp32(face[i:i + 32], context[i:i + 32]) for i in range(0, len(face), 32)])
    got = torch.cat([q(face[i:i + 32], context[i:i + 32]) for i in range(0, len(face), 32)])
    err = (got - want).abs()
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    acc32 = 100 * (want.argmax(1) == labels).float().mean().item()
    acc8 = 100 * (got.argmax(1) == labels).float().mean().item()
    summary = (f"mean |Δlogit| {err.mean():.4f}, max {err.max():.3f} (logits up to {want.abs().max():.2f}); "
               f"argmax agreement {agree:.1%}; accuracy fp32 {acc32:.2f} % int8 {acc8:.2f} % "
               f"({len(labels)} images, reduce_range={q.info['reduce_range']})")
    print(summary)
    assert acc32 > 100 / 7 + 15, summary  # the training worked, so the comparison means something
    assert err.mean() < MEAN_LOGIT_TOL and err.max() < MAX_LOGIT_TOL, summary
    assert agree >= AGREEMENT_MIN, summary
    assert abs(acc8 - acc32) <= ACCURACY_POINTS, summary


def test_int8_graph_convs_and_linears_int8_fused_ops_fp32(int8):
    _, q, *_ = int8
    info = q.info
    assert info["int8_convs"] == 12 and info["int8_linears"] == 6, info
    assert info["relus_fused"] == 12 and info["calibration_samples"] == 64
    assert info["reduce_range"] == (not has_vnni())
    custom = [n for n in q.quantized_graph.graph.nodes
              if n.op == "call_function" and str(n.target).startswith("caer_fast.")]
    if caer_fast.ops.backend("cpu") != "torch":  # the torch backend traces the ops into aten ops
        assert {str(n.target).split(".")[1] for n in custom} == {"attention_pool", "adaptive_fusion"}
    for n in custom:  # fp32 inputs: none comes straight from a dequantize
        for a in n.args:
            assert not (isinstance(a, torch.fx.Node) and "quantize" in str(a.target)), (n, a)


def test_details_and_any_batch_size(int8):
    fp32, q, face, context, _ = int8
    with torch.no_grad():
        want, want_d = fp32(face[:5], context[:5], return_details=True)
    got, d = q(face[:5], context[:5], return_details=True)
    assert d.keys() == {"attention", "fusion_weights"}
    assert d["attention"].shape == want_d["attention"].shape
    torch.testing.assert_close(d["attention"].flatten(1).sum(1), torch.ones(5), rtol=0, atol=1e-4)
    torch.testing.assert_close(d["attention"], want_d["attention"], rtol=0, atol=0.02)
    torch.testing.assert_close(d["fusion_weights"], want_d["fusion_weights"], rtol=0, atol=0.02)
    torch.testing.assert_close(got, want, rtol=0, atol=MAX_LOGIT_TOL)
    one = q(face[2:3], context[2:3])  # batch 1: its own compiled graph, same answer as inside a batch
    torch.testing.assert_close(one, got[2:3], rtol=0, atol=0.05)
    with torch.inference_mode():  # what Predictor.forward uses
        torch.testing.assert_close(q(face[:5], context[:5]), got, rtol=0, atol=1e-5)
    assert set(q.info["batch_sizes_seen"]) >= {1, 5}
    with pytest.raises(ValueError, match="expects face"):
        q(torch.zeros(2, 3, 96, 96), torch.zeros(2, 3, 112, 112))


def test_unsupported_models_and_bad_calibration_are_clear_errors():
    calib = [(torch.randn(2, 3, 8, 48, 48), torch.randn(2, 3, 8, 56, 56))]
    with pytest.raises(NotImplementedError, match="Conv3d"):
        quantize_int8(CAERNet(frames=8), calib)
    with pytest.raises(TypeError, match="CAERSNet"):
        quantize_int8(torch.nn.Linear(2, 2), calib)
    with pytest.raises(ValueError, match="no calibration batches"):
        quantize_int8(CAERSNet(), [])
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(CAERSNet(), [torch.zeros(3)])
    with pytest.raises(ValueError, match="different input sizes"):
        quantize_int8(CAERSNet(), [(torch.zeros(2, 3, 96, 96), torch.zeros(2, 3, 112, 112)),
                                   (torch.zeros(2, 3, 48, 48), torch.zeros(2, 3, 56, 56))])


def test_calibration_batches_read_a_caers_tree(trained, tmp_path):
    batches = calibration_batches(trained["data"], 20, face_size=(48, 48), context_size=(64, 86), crop=56,
                                  batch_size=8)
    assert [tuple(f.shape) for f, _ in batches] == [(8, 3, 48, 48), (8, 3, 48, 48), (4, 3, 48, 48)]
    assert tuple(batches[0][1].shape[1:]) == (3, 56, 56)
    # ROOT may be the CAER-S folder itself or the demo root holding it; anything else is a clear error
    assert len(calibration_batches(trained["data"] / "CAER-S", 3)) == 1
    with pytest.raises(FileNotFoundError, match="not a CAER-S tree"):
        calibration_batches(tmp_path, 4)


def _run(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", f"caer_fast.{module}", *map(str, args)], capture_output=True,
                          text=True, env=_env(), timeout=timeout)


@pytest.mark.parametrize("module", ["predict", "serve"])
def test_cli_int8_needs_calibration_data(module, tmp_path):
    ck = make_checkpoint(tmp_path / "caers.pth", "caers", steps=1)  # no calibration.pt beside it
    extra = ["x.png"] if module == "predict" else []
    proc = _run(module, *extra, "--checkpoint", ck, "--int8", "--detector", "none")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: --engine int8: the int8 engine needs calibration data" in proc.stderr, proc.stderr
    proc = _run(module, *extra, "--checkpoint", tmp_path / "none.pth", "--engine", "onnxruntime", "--calibrate", tmp_path)
    assert proc.returncode == 2 and "--calibrate is only used with --engine int8 or auto" in proc.stderr, proc.stderr
    helptext = _run(module, "--help").stdout
    assert "--int8" in helptext and "--calibrate-samples" in helptext and "X86InductorQuantizer" in helptext


def test_predict_int8_agrees_with_fp32(trained):
    image = sorted((trained["data"] / "CAER-S" / "test" / "Happy").glob("*.png"))[0]
    common = [image, "--checkpoint", trained["ckpt"], "--json", "--detector", "none",
              "--boxes", trained["data"] / "CAER-S" / "test.txt"]
    fp32 = _run("predict", *common)
    int8 = _run("predict", *common, "--int8", "--calibrate", trained["data"], "--calibrate-samples", 32)
    assert fp32.returncode == 0, fp32.stderr[-2000:]
    assert int8.returncode == 0, int8.stderr[-2000:]
    a, b = json.loads(fp32.stdout), json.loads(int8.stdout)
    assert b["emotion"] == a["emotion"]
    for k, v in a["probabilities"].items():
        assert b["probabilities"][k] == pytest.approx(v, abs=0.05), (k, a["probabilities"], b["probabilities"])
    assert "calibrated on 32 samples" in int8.stderr and "compiled in" in int8.stderr, int8.stderr


def test_int8_engine_errors_before_reading_calibration(tmp_path):
    """A missing calibration tree is named, for either model."""
    pytest.importorskip("openvino")
    with pytest.raises(EngineError, match="missing: no such directory"):
        build_engine(CAERNet(frames=8).eval(), "int8", calibration=tmp_path / "missing", cache_dir=None)
    with pytest.raises(EngineError, match="missing: no such directory"):
        build_engine(CAERSNet().eval(), "int8", calibration=tmp_path / "missing", cache_dir=None)
    proc = _run("predict", "x.png", "--checkpoint", tmp_path / "none.pth", "--int8", "--engine", "onnxruntime",
                "--calibrate", tmp_path)
    assert proc.returncode == 2 and "--int8 is --engine int8" in proc.stderr, proc.stderr


def test_serve_int8_over_http(trained, tmp_path):
    import httpx

    image = sorted((trained["data"] / "CAER-S" / "test" / "Anger").glob("*.png"))[0]
    srv = Server(trained["ckpt"], "--int8", "--calibrate", trained["data"] / "CAER-S", "--calibrate-samples", 24,
                 "--max-batch", 2, "--detector", "none", cwd=tmp_path, startup_timeout=300)
    try:
        with open(image, "rb") as fh:
            r = httpx.post(srv.url + "/predict", files={"file": (image.name, fh, "image/png")}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "caers" and abs(sum(body["probabilities"].values()) - 1) < 1e-3
        assert httpx.get(srv.url + "/health", timeout=10).json()["precision"] == "int8"
        log = srv.output()
        assert "calibrated on 24 samples" in log and "compiled in" in log and "caers int8" in log, log
    finally:
        srv.close()
