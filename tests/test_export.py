"""ONNX export: onnxruntime runs the file and agrees with PyTorch within fp32 rounding."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from caer_fast import load_checkpoint  # noqa: E402
from caer_fast.serving.onnx import export_onnx  # noqa: E402
from caer_fast.testing.serving import make_checkpoint  # noqa: E402


def run_both(ckpt, onnx_path, face, context):
    model = load_checkpoint(ckpt).eval()
    with torch.no_grad():  # PyTorch on the default backend (the fused ops where built)
        logits, d = model(face, context, return_details=True)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["face", "context"]
    got = sess.run(None, {"face": face.numpy(), "context": context.numpy()})
    return (logits, d["attention"], d["fusion_weights"]), got


def assert_close(ref, got):
    for name, r, g in zip(("logits", "attention", "fusion_weights"), ref, got):
        assert g.shape == tuple(r.shape), name
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_caersnet_cli_export_matches_pytorch(tmp_path):
    ckpt = make_checkpoint(tmp_path / "caers.pth", "caers")
    out = tmp_path / "caers.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "caer_fast.export", "--checkpoint", str(ckpt), "--format", "onnx",
                           "--output", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and out.stat().st_size > 1_000_000
    torch.manual_seed(1)
    # a batch size other than the traced one (2): the batch axis is dynamic
    ref, got = run_both(ckpt, out, torch.randn(3, 3, 96, 96), torch.randn(3, 3, 112, 112))
    assert_close(ref, got)
    assert got[1].shape == (3, 1, 7, 7)


def test_small_caernet_export_matches_pytorch(tmp_path, monkeypatch):
    monkeypatch.delenv("CAER_FAST_BACKEND", raising=False)
    ckpt = make_checkpoint(tmp_path / "caer.pth", "caer")  # 8-frame clips, face 48, crop 56
    out = tmp_path / "caer.onnx"
    info = export_onnx(ckpt, out, opset=17)
    assert info["face"] == [3, 8, 48, 48] and info["context"] == [3, 8, 56, 56]
    assert "CAER_FAST_BACKEND" not in os.environ  # export restores the caller's backend choice
    import onnx

    assert onnx.load(str(out)).opset_import[0].version == 17
    torch.manual_seed(2)
    ref, got = run_both(ckpt, out, torch.randn(1, 3, 8, 48, 48), torch.randn(1, 3, 8, 56, 56))
    assert_close(ref, got)
    assert got[1].shape == (1, 1, 1, 3, 3)  # space-time attention map


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "caer_fast.export", "--checkpoint", str(bad)], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "bad.pth" in proc.stderr


def _export(*args):
    return subprocess.run([sys.executable, "-m", "caer_fast.export", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)


def test_bad_options_are_error_lines_not_tracebacks(tmp_path):
    ckpt = make_checkpoint(tmp_path / "caers.pth", "caers", steps=1)
    missing = _export("--checkpoint", tmp_path / "nope.pth")
    assert missing.returncode == 2 and "nope.pth: no such file" in missing.stderr, missing.stderr
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere: nothing to refuse then
            ro = _export("--checkpoint", ckpt, "--output", locked / "out.onnx")
            assert ro.returncode == 2 and "is not writable" in ro.stderr and str(locked) in ro.stderr, ro.stderr
    finally:
        locked.chmod(0o700)
    folder = _export("--checkpoint", ckpt, "--output", tmp_path)
    assert folder.returncode == 2 and "is a folder" in folder.stderr, folder.stderr
    under_file = _export("--checkpoint", ckpt, "--output", ckpt / "x.onnx")
    assert under_file.returncode == 2 and "is not a folder" in under_file.stderr, under_file.stderr
    fmt = _export("--checkpoint", ckpt, "--format", "tflite")
    assert fmt.returncode == 2 and "invalid choice: 'tflite'" in fmt.stderr
    opset = _export("--checkpoint", ckpt, "--opset", "3")
    assert opset.returncode == 2 and "--opset 3" in opset.stderr
    for proc in (missing, folder, under_file, fmt, opset):
        assert "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("*.onnx"))
