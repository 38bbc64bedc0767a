"""The training CLI, run as users run it: python -m caer_fast.train in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SMALL = ["--clip-frames", "8", "--face-size", "48", "--context-size", "64x86", "--crop", "56", "-j", "0",
         "--no-progress", "--seed", "3"]


def run_train(*args, timeout=600, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "caer_fast.train", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def test_help_explains_the_flags():
    out = run_train("--help").stdout
    for flag in ("--demo", "--data", "--model", "--streams", "--resume", "--test-only", "--strict", "--loader"):
        assert flag in out


def test_missing_data_is_a_clear_error(tmp_path):
    proc = run_train("--data", tmp_path / "nope", check=False)
    assert proc.returncode != 0 and "nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_video_training_resumes_exactly(demo_root, tmp_path):
    data = Path(demo_root) / "CAER"
    common = ["--data", data, "--model", "caer", "-b", "4", "--lr", "0.01", *SMALL]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(*common, "--epochs", "2", "--output-dir", straight)
    run_train(*common, "--epochs", "1", "--output-dir", split)
    out = run_train(*common, "--epochs", "2", "--output-dir", split, "--resume", split / "checkpoint.pth").stdout
    assert "resumed from" in out
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    metrics = json.loads((straight / "metrics.json").read_text())
    assert {"clip", "video"} <= set(metrics["test"]) and len(metrics["history"]) == 2
    assert (straight / "confusion_test.png").stat().st_size > 1000
    assert set(a) >= {"model", "optimizer", "lr_scheduler", "epoch", "args"}


@pytest.mark.slow
def test_image_training_loss_falls_and_beats_chance(tmp_path):
    from caer_fast.data.synthetic import make_demo_dataset

    root = tmp_path / "data"
    make_demo_dataset(root, seed=1, videos_per_class=1, images_per_class=24)
    out_dir = tmp_path / "run"
    run_train("--data", root / "CAER-S", "--model", "caers", "-b", "16", "--lr", "0.01", "--epochs", "5",
              "--output-dir", out_dir, *SMALL)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    losses = [h["train"]["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0] * 0.8, losses
    assert metrics["test"]["video"]["top1"] > 100 / 7 + 15, metrics["test"]["video"]["top1"]
    # --test-only on the saved checkpoint reproduces the test accuracy
    again = tmp_path / "again"
    run_train("--data", root / "CAER-S", "--model", "caers", "--test-only", "--resume", out_dir / "checkpoint.pth",
              "--output-dir", again, *SMALL)
    m2 = json.loads((again / "metrics.json").read_text())
    assert m2["test"]["video"]["top1"] == pytest.approx(metrics["test"]["video"]["top1"])
