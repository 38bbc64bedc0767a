"""Bad input and faults in training: skipped and named, --strict refuses, SIGKILL resumes exactly."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import SMALL, run_train


def _salted_caer(demo_root, tmp_path):
    """A copy of the demo CAER tree with corrupt files and a broken box line added."""
    root = tmp_path / "CAER"
    shutil.copytree(Path(demo_root) / "CAER", root)
    train = root / "train"
    good = sorted(train.glob("*/*.avi"))
    (train / "Happy" / "zero.avi").write_bytes(b"")
    (train / "Sad" / "not_a_video.avi").write_text("this is not a video\n" * 100)
    truncated = train / "Anger" / "truncated.avi"
    data = good[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with open(root / "train.faces.csv", "a") as f:
        f.write("train/Anger/0000.avi,not-a-frame,1,2,3\n")
    return root


@pytest.mark.slow
def test_salted_tree_trains_to_the_end_and_names_what_it_skipped(demo_root, tmp_path):
    root = _salted_caer(demo_root, tmp_path)
    out = tmp_path / "run"
    proc = run_train("--data", root, "--model", "caer", "-b", "4", "--epochs", "1", "--output-dir", out, *SMALL)
    text = proc.stdout + proc.stderr
    assert "zero.avi" in text and "not_a_video.avi" in text
    assert "train.faces.csv" in text  # the broken box line is reported with its file
    assert (out / "checkpoint.pth").is_file() and (out / "metrics.json").is_file()

    strict = run_train("--data", root, "--model", "caer", "-b", "4", "--epochs", "1", "--output-dir",
                       tmp_path / "strict", "--strict", *SMALL, check=False)
    assert strict.returncode == 2, strict.stderr[-2000:]
    assert "Traceback" not in strict.stderr
    assert any(name in strict.stderr for name in ("zero.avi", "not_a_video.avi", "truncated.avi", "train.faces.csv"))


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_weights(demo_root, tmp_path):
    data = Path(demo_root) / "CAER-S"
    common = ["--data", data, "--model", "caers", "-b", "4", "--epochs", "3", *SMALL]
    run_train(*common, "--output-dir", tmp_path / "straight")

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "caer_fast.train", *map(str, common), "--output-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = killed / "checkpoint.pth"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # now inside epoch 1 (or saving it)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    first = torch.load(ckpt, weights_only=True)  # the surviving checkpoint is whole
    assert first["epoch"] in (0, 1, 2)
    run_train(*common, "--output-dir", killed, "--resume", ckpt)
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(ckpt, weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_diverging_loss_stops_with_a_clear_message(demo_root, tmp_path):
    out = tmp_path / "nan"
    proc = run_train("--data", Path(demo_root) / "CAER-S", "--model", "caers", "-b", "4", "--epochs", "2",
                     "--lr", "1e12", "--output-dir", out, *SMALL, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "loss is" in proc.stderr and "Traceback" not in proc.stderr
    # whatever checkpoint exists is a complete, loadable one
    if (out / "checkpoint.pth").exists():
        torch.load(out / "checkpoint.pth", weights_only=True)
