"""Issue 25 (reliability, round 3): a finished run survives ``--overwrite`` until the new run has a checkpoint,
one training per output folder, box files with non-finite numbers, media FFmpeg opens but cannot decode, output
names checked before the work, CLI limits, crafted checkpoint sizes. Real subprocesses of the commands."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import SMALL, run_train

REPO = Path(__file__).resolve().parents[1]


def _caers(root):
    return ["--data", Path(root), "--model", "caers", "-b", "4", *SMALL]


def _one_error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def _train_popen(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "caer_fast.train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_line(proc, prefix: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
        assert time.monotonic() < deadline, f"no {prefix!r} line in {timeout}s"
    raise AssertionError(f"train ended ({proc.wait()}) before a {prefix!r} line: {proc.stderr.read()[-3000:]}")


@pytest.fixture(scope="module")
def finished_run(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    run_train(*_caers(Path(demo_root) / "CAER-S"), "--epochs", "1", "--output-dir", out)
    (out / "skipped.json").write_text("{}")  # a file of the old run a new one might not rewrite
    return out


# ---------------------------------------------------------------- item 4: --overwrite keeps the run until replaced

def test_overwrite_killed_before_its_first_checkpoint_leaves_the_old_run_whole(demo_root, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    proc = _train_popen(*_caers(Path(demo_root) / "CAER-S"), "--epochs", "3", "--output-dir", run, "--overwrite")
    try:
        _wait_for_line(proc, "data:")  # indexing done, epoch 0 starting: SIGKILL now
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert _snapshot(run) == before  # not a byte of the finished run changed
    # the next --overwrite run replaces it once it has a checkpoint, and says what it removed
    out = run_train(*_caers(Path(demo_root) / "CAER-S"), "--epochs", "1", "--output-dir", run, "--overwrite").stdout
    assert "--overwrite: removed the earlier run's" in out and "skipped.json" in out, out
    assert not (run / "skipped.json").exists()
    assert _snapshot(run)["checkpoint.pth"] != before["checkpoint.pth"]


def test_overwrite_with_a_strict_data_error_leaves_the_old_run_whole(demo_root, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    data = tmp_path / "CAER-S"
    shutil.copytree(Path(demo_root) / "CAER-S", data)
    shutil.copytree(data / "train" / "Happy", data / "train" / "Contempt")  # --strict refuses it at the data scan
    proc = run_train(*_caers(data), "--epochs", "1", "--output-dir", run, "--overwrite", "--strict", check=False)
    assert "Contempt" in _one_error_line(proc)
    assert _snapshot(run) == before
    # a new folder created for a run that fails at the data scan is not left behind (empty)
    fresh = tmp_path / "fresh"
    proc = run_train(*_caers(data), "--epochs", "1", "--output-dir", fresh, "--strict", check=False)
    assert "Contempt" in _one_error_line(proc)
    assert not fresh.exists()


def test_two_trainings_into_one_folder_the_second_is_refused_and_a_killed_lock_does_not_block(demo_root, tmp_path):
    out = tmp_path / "new"
    first = _train_popen(*_caers(Path(demo_root) / "CAER-S"), "--epochs", "50", "--output-dir", out)
    try:
        _wait_for_line(first, "data:")
        # --overwrite: refused for the lock whether or not the first has saved its first checkpoint yet
        second = run_train(*_caers(Path(demo_root) / "CAER-S"), "--epochs", "1", "--output-dir", out, "--overwrite",
                           check=False)
        line = _one_error_line(second)
        assert "in use by another training" in line and str(first.pid) in line, line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    # the killed run's lock is gone with it: a new run goes ahead (with --overwrite if it had saved a checkpoint)
    proc = run_train(*_caers(Path(demo_root) / "CAER-S"), "--epochs", "0", "--output-dir", out, "--overwrite")
    assert json.loads((out / "metrics.json").read_text())["history"] == []


# ---------------------------------------------------------------- box files with non-finite or huge numbers

HOSTILE_NUMBERS = ["inf", "-inf", "nan", "1e30", "-1e30", "1e308"]


def _poison_image_boxes(root: Path) -> None:
    """Each test image's box line gets a hostile number in a different place (x1, y1, x2, y2 in turn)."""
    lines = (root / "test.txt").read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        f = line.split(",")
        f[2 + i % 4] = HOSTILE_NUMBERS[i % len(HOSTILE_NUMBERS)]
        out.append(",".join(f))
    (root / "test.txt").write_text("\n".join(out) + "\n")


def test_non_finite_and_huge_box_numbers_are_bad_lines_in_train(demo_root, tmp_path):
    data = tmp_path / "CAER-S"
    shutil.copytree(Path(demo_root) / "CAER-S", data)
    _poison_image_boxes(data)
    proc = run_train(*_caers(data), "--epochs", "0", "--output-dir", tmp_path / "out", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "test.txt" in proc.stdout and "not a finite number" in proc.stdout and "out of range" in proc.stdout, \
        proc.stdout
    strict = run_train(*_caers(data), "--epochs", "0", "--output-dir", tmp_path / "strict", "--strict", check=False)
    line = _one_error_line(strict)
    assert "test.txt:1" in line and "inf" in line, line


def test_non_finite_and_huge_video_box_numbers_are_bad_lines(demo_root, tmp_path):
    from caer_fast.data.boxes import parse_video_boxes

    text = (Path(demo_root) / "CAER" / "test.faces.csv").read_text().splitlines()
    path = text[1].split(",")[0]
    hostile = [f"{path},0,{v},19,142,73,1.0" for v in HOSTILE_NUMBERS] + [
        f"{path},1,96,19,142,73,{v}" for v in ("inf", "nan")] + [f"{path},99999999999999999999,96,19,142,73,1.0"]
    boxes, bad = parse_video_boxes("\n".join([text[0], *hostile, text[1]]), "f.csv")
    assert [b.line for b in bad] == list(range(2, 2 + len(hostile)))
    assert boxes == {path: {0: ((96, 19, 142, 73), 1.0)}}  # only the good last line


def test_predict_boxes_with_non_finite_numbers_is_one_error_line(demo_root, tmp_path):
    from caer_fast.testing.serving import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "caers.pth", "caers")
    image = Path(demo_root) / "CAER-S" / "test" / "Anger" / "0000.png"
    for v in ("inf", "1e30", "nan"):
        boxes = tmp_path / "boxes.txt"
        boxes.write_text(f"Anger/0000.png,0,{v},33,88,78\n")
        proc = subprocess.run([sys.executable, "-m", "caer_fast.predict", str(image), "--checkpoint", str(ckpt),
                               "--boxes", str(boxes), "--engine", "eager", "--no-progress"], capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        line = _one_error_line(proc)
        assert "boxes.txt:1" in line and v in line, line


# ---------------------------------------------------------------- media FFmpeg opens but cannot decode

def _predict(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "caer_fast.predict", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def caers_ckpt(tmp_path_factory):
    from caer_fast.testing.serving import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ck") / "caers.pth", "caers")


def test_predict_of_an_svg_is_one_error_line(caers_ckpt, tmp_path):
    svg = tmp_path / "drawing.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="9" height="9"/></svg>')
    proc = _predict(svg, "--checkpoint", caers_ckpt, "--engine", "eager", "--no-progress")
    line = _one_error_line(proc)
    assert "drawing.svg" in line and "no decoder" in line, line


# ---------------------------------------------------------------- crafted checkpoint sizes

@pytest.mark.parametrize("field,value,words", [
    ("model_args", {"use_face": True, "use_context": True, "frames": 10**9}, "frames=1000000000"),
    ("args", {"face_size": [10**6, 10**6]}, "face_size"),
    ("args", {"context_size": 10**6}, "context_size"),
    ("args", {"clip_frames": 10**7}, "clip_frames"),
    ("args", {"crop": 10**6}, "crop"),
])
def test_checkpoint_asking_for_huge_allocations_is_one_error_line(tmp_path, field, value, words):
    import torch
    from caer_fast.testing.serving import make_checkpoint, write_png

    ckpt_path = make_checkpoint(tmp_path / "caer.pth", "caer")
    ck = torch.load(ckpt_path, weights_only=True)
    ck[field] = {**ck[field], **value}
    torch.save(ck, ckpt_path)
    image = write_png(tmp_path / "x.png")
    t0 = time.monotonic()
    proc = _predict(image, "--checkpoint", ckpt_path, "--engine", "eager", "--no-progress", "--detector", "none",
                    timeout=240)
    line = _one_error_line(proc)
    assert words in line and "caer.pth" in line and any(w in line for w in ("at most", "up to", "more than")), line
    assert time.monotonic() - t0 < 200


# ---------------------------------------------------------------- output names checked before the work; CLI minors

@pytest.fixture(scope="module")
def video_job(tmp_path_factory):
    from caer_fast.testing.serving import make_checkpoint, write_video

    d = tmp_path_factory.mktemp("vid")
    return make_checkpoint(d / "caer.pth", "caer"), write_video(d / "clip.mp4", frames=40, fps=20, size=(64, 96))


@pytest.mark.parametrize("flag,name,words", [
    ("--timeline-plot", "x.xyz", "must end in"),
    ("--save-viz", "x.xyz", "must end in"),
    ("--save-viz", "viz", "must end in"),  # wrote viz.png and printed "viz"
    ("--save-viz", "a_folder", "is a folder"),
    ("--timeline", "t.txt", "must end in .csv or .json"),
    ("--timeline-plot", "missing/t.png", "does not exist"),
])
def test_bad_output_names_are_refused_before_the_prediction(video_job, tmp_path, flag, name, words):
    ckpt, video = video_job
    (tmp_path / "a_folder").mkdir()
    out = tmp_path / name
    proc = _predict(video, "--checkpoint", ckpt, "--engine", "eager", "--detector", "none", "--no-progress",
                    flag, out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert flag in line and words in line, line
    assert proc.stdout == ""  # refused before the prediction ran
    assert not Path(str(out) + ".png").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"]


def test_timeline_writes_through_a_symlink_with_normal_permissions(video_job, tmp_path):
    ckpt, video = video_job
    target = tmp_path / "real" / "t.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o644)
    link = tmp_path / "t.csv"
    link.symlink_to(target)
    fresh = tmp_path / "new.json"
    for out in (link, fresh):
        proc = _predict(video, "--checkpoint", ckpt, "--engine", "eager", "--detector", "none", "--no-progress",
                        "--timeline", out)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text().startswith("person,clip,start_s,end_s") and (target.stat().st_mode & 0o777) == 0o644
    umask = os.umask(0)
    os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~umask and json.loads(fresh.read_text())["clips"]


@pytest.mark.parametrize("flags,option", [
    (["--port", "99999"], "--port"), (["--port", "-1"], "--port"), (["--max-connections", "0"], "--max-connections"),
    (["--max-batch", "0"], "--max-batch"), (["--max-upload-mb", "-5"], "--max-upload-mb"),
    (["--memory-budget-mb", "nan"], "--memory-budget-mb"), (["--max-frames", "0"], "--max-frames"),
    (["--max-frame-pixels", "-1"], "--max-frame-pixels"), (["--header-timeout", "0"], "--header-timeout"),
    (["--body-timeout", "inf"], "--body-timeout"), (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--threads", "0"], "--threads"),
])
def test_serve_refuses_nonsense_limits(caers_ckpt, flags, option):
    try:
        proc = subprocess.run([sys.executable, "-m", "caer_fast.serve", "--checkpoint", str(caers_ckpt), *flags],
                              capture_output=True, text=True, timeout=90, env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve {' '.join(flags)} started serving instead of refusing the option")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and option in errors[0], proc.stderr


@pytest.mark.parametrize("flags,words", [
    (["--opset", "99"], "--opset 99"), (["--opset", "3"], "--opset 3"), (["--opset", "x"], "--opset"),
    (["--output", "{tmp}"], "is a folder"), (["--output", "/proc/nope/x.onnx"], "cannot write"),
])
def test_export_bad_options_are_one_error_line(caers_ckpt, tmp_path, flags, words):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    proc = subprocess.run([sys.executable, "-m", "caer_fast.export", "--checkpoint", str(caers_ckpt), *flags],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) <= 8  # the usage and one line, no graph dump


def test_training_tree_with_an_svg_named_avi_skips_and_names_it(demo_root, tmp_path):
    data = tmp_path / "CAER"
    shutil.copytree(Path(demo_root) / "CAER", data)
    (data / "test" / "Anger" / "zz_drawing.avi").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="9" height="9"/></svg>')
    common = ["--data", data, "--model", "caer", "-b", "2", *SMALL, "--epochs", "0"]
    proc = run_train(*common, "--output-dir", tmp_path / "out", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "zz_drawing.avi" in proc.stdout and "no decoder" in proc.stdout, proc.stdout
    strict = run_train(*common, "--output-dir", tmp_path / "strict", "--strict", check=False)
    assert "zz_drawing.avi" in _one_error_line(strict)
