"""Issue 11 (round 2) for training and checkpoints: no run is overwritten, every command error is one
``error:`` line with exit status 2, class folders and truncated videos are reported, the demo runs under
torchrun. Real subprocesses of ``python -m caer_fast.train`` on the demo data."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import caer_fast
from caer_fast.constants import CLASSES
from caer_fast.models import CAERNet, CAERSNet
from caer_fast.models.checkpoint import CheckpointError, CheckpointMetadataError
from test_train import SMALL, run_train

REPO = Path(__file__).resolve().parents[1]


def _caers(demo_root):
    return ["--data", Path(demo_root) / "CAER-S", "--model", "caers", "-b", "4", *SMALL]


def _in_process(capsys, main, *args):
    """A command line run in this process (no second torch import: keeps the suite fast)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, cap.out, cap.err)


def _one_error_line(proc):
    """The whole of stderr is one line starting with ``error:``; exit status 2."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(demo_root, tmp_path_factory):
    """One finished 1-epoch CAER-S run, copied per test (tests damage it)."""
    out = tmp_path_factory.mktemp("runs") / "done"
    run_train(*_caers(demo_root), "--epochs", "1", "--output-dir", out)
    return out


def _copy_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


# ---------------------------------------------------------------- item 1: no run is overwritten

def test_folder_holding_a_run_is_refused_and_left_as_it_was(demo_root, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for extra in (["--epochs", "0"], ["--epochs", "1"]):
        proc = run_train(*_caers(demo_root), *extra, "--output-dir", run, check=False)
        line = _one_error_line(proc)
        assert "already holds a run" in line and "--resume" in line and "--overwrite" in line, line
    # --resume of a run from elsewhere does not license writing over this one either
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    proc = run_train(*_caers(demo_root), "--epochs", "2", "--output-dir", run, "--resume", other / "checkpoint.pth",
                     check=False)
    assert "holds another run" in _one_error_line(proc)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # not a byte changed


def test_overwrite_replaces_the_run_and_says_so(demo_root, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    (run / "skipped.json").write_text("{}")  # a file of the old run the new one would not rewrite
    proc = run_train(*_caers(demo_root), "--epochs", "1", "--output-dir", run, "--overwrite")
    assert "--overwrite: removed the earlier run's" in proc.stdout and "skipped.json" in proc.stdout
    assert not (run / "skipped.json").exists()
    assert json.loads((run / "metrics.json").read_text())["history"][0]["epoch"] == 0


def test_resume_keeps_the_best_score_and_the_log_names_only_what_was_written(demo_root, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    ck = torch.load(run / "checkpoint.pth", weights_only=True)
    # An older checkpoint without a best score: the folder's model_best.pth still holds one, above any
    # reachable accuracy, so no resumed epoch may replace model_best.pth.
    best = torch.load(run / "model_best.pth", weights_only=True)
    best["best_acc"] = 101.0
    torch.save(best, run / "model_best.pth")
    ck.pop("best_acc")
    torch.save(ck, run / "checkpoint.pth")
    best_bytes = (run / "model_best.pth").read_bytes()
    out = run_train(*_caers(demo_root), "--epochs", "2", "--output-dir", run, "--resume", run / "checkpoint.pth").stdout
    assert "best validation video top-1 so far 101.0%" in out, out
    assert (run / "model_best.pth").read_bytes() == best_bytes
    assert "new best" not in out
    assert torch.load(run / "checkpoint.pth", weights_only=True)["best_acc"] == 101.0  # stored for the next resume

    # Nothing left to train: no checkpoint is written, and the log does not claim one.
    ck_bytes = (run / "checkpoint.pth").read_bytes()
    out = run_train(*_caers(demo_root), "--epochs", "2", "--output-dir", run, "--resume", run / "checkpoint.pth").stdout
    assert "nothing to train" in out
    wrote = [ln for ln in out.splitlines() if ln.startswith("wrote ")]
    assert len(wrote) == 1 and "checkpoint.pth" not in wrote[0] and "metrics.json" in wrote[0], out
    assert (run / "checkpoint.pth").read_bytes() == ck_bytes


# ---------------------------------------------------------------- items 3 and 7: errors at start, one line

def _unwritable_dir(tmp_path):
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    try:  # root ignores permissions; sysfs refuses new files even to root
        fd = os.open("/sys/.caer_fast_probe", os.O_CREAT | os.O_WRONLY)
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink("/sys/.caer_fast_probe")
    pytest.skip("no folder here refuses writes to root")


def test_output_dir_is_checked_before_the_first_step(demo_root, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {a_file: "is a file", a_file / "sub": "cannot create", _unwritable_dir(tmp_path): "cannot write"}
    for out, words in cases.items():
        t0 = time.perf_counter()
        proc = run_train(*_caers(demo_root), "--epochs", "1", "--output-dir", out, check=False)
        line = _one_error_line(proc)
        assert words in line and str(out) in line, line
        assert "data:" not in proc.stdout  # refused before indexing or training
        assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("flags,words", [
    (["-b", "0"], "--batch-size must be at least 1"),
    (["--lr", "-0.1"], "--lr must be"),
    (["--lr", "nan"], "--lr must be"),
    (["--epochs", "-1"], "--epochs"),
    (["-j", "-2"], "--workers"),
    (["--face-size", "0"], "sizes must be positive"),
    (["--crop", "999"], "--crop 999"),
    (["-b", "many"], "invalid int value"),
    (["--device", "bogus"], "not a device name"),
    (["--device", "cuda"], "use --device cpu"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--seed", "-1"], "--seed"),
    (["--clip-frames", "100000"], "more than 512"),
    (["--context-size", "100000"], "over 2048"),
    (["--val-fraction", "1"], "--val-fraction"),
])
def test_bad_options_are_one_error_line(demo_root, tmp_path, capsys, flags, words):
    from caer_fast.train import cli

    if "cuda" in " ".join(flags) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = [*_caers(demo_root), "--epochs", "1", "--output-dir", tmp_path / "out", *flags]
    # the real process for two of them (exit status and stderr as a shell sees them), the rest in-process
    real = flags in (["-b", "0"], ["--device", "bogus"])
    proc = run_train(*args, check=False) if real else _in_process(capsys, cli, *args)
    assert words in _one_error_line(proc)
    assert not (tmp_path / "out").exists()  # nothing created for a refused command


def test_device_parser_shared_by_the_commands():
    from caer_fast.devices import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("bogus", "cuda:-1", "meta", "CPU"):
        with pytest.raises(DeviceError, match="--device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="use --device cpu"):
            resolve_device("cuda")


# ---------------------------------------------------------------- item 7: checkpoints

def _meta_cases():
    sd2, sd3 = CAERSNet().state_dict(), CAERNet(frames=8).state_dict()
    return {
        "kind vs weights": ({"model": sd2, "model_type": "caer"}, "model_type says 'caer'"),
        "unknown kind": ({"model": sd2, "model_type": "resnet"}, "model_type 'resnet'"),
        "args not a dict": ({"model": sd2, "args": ["--lr", "0.1"]}, "args is a list"),
        "model_args not a dict": ({"model": sd2, "model_args": "use_face"}, "model_args is a str"),
        "unknown model arg": ({"model": sd2, "model_args": {"use_face": True, "depth": 50}}, "depth"),
        "frames arg on the image model": ({"model": sd2, "model_args": {"frames": 8}}, "frames"),
        "model arg of the wrong type": ({"model": sd3, "model_args": {"frames": "8"}}, "frames='8'"),
        "too few frames": ({"model": sd3, "model_args": {"frames": 2}}, "at least 8 frames"),
        "classes too short": ({"model": sd2, "classes": list(CLASSES[:5])}, "5 names but the classifier has 7"),
        "classes not names": ({"model": sd2, "classes": [1, 2, 3, 4, 5, 6, 7]}, "classes"),
        "bad face_size": ({"model": sd2, "args": {"face_size": [0, 96]}}, "face_size"),
        "num_classes vs classifier": ({"model": sd2, "model_args": {"num_classes": 3}}, "num_classes=3"),
    }


@pytest.mark.parametrize("case", list(_meta_cases()))
def test_malformed_checkpoint_metadata_is_a_clear_error(tmp_path, case):
    ckpt, words = _meta_cases()[case]
    path = tmp_path / "meta.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointMetadataError) as err:
        caer_fast.load_checkpoint(path)
    assert words in str(err.value) and str(path) in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    sd = CAERSNet().state_dict()
    sd["fusion_net.fc1.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf.*fusion_net.fc1.weight"):
        caer_fast.load_checkpoint({"model": sd})


def test_model_of_the_other_kind_is_one_line(tmp_path):
    with pytest.raises(CheckpointError) as err:
        caer_fast.load_checkpoint({"model": CAERNet(frames=8).state_dict()}, CAERSNet())
    assert "CAERNet (video" in str(err.value) and "\n" not in str(err.value)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    rng = torch.Generator().manual_seed(0)
    for i, n in enumerate((1, 7, 4096, 100_000)):
        path = tmp_path / f"random{i}.pth"
        path.write_bytes(bytes(torch.randint(0, 256, (n,), generator=rng, dtype=torch.uint8).tolist()))
        with pytest.raises(CheckpointError) as err:
            caer_fast.load_checkpoint(path)
        msg = str(err.value)
        assert "not a PyTorch checkpoint" in msg and str(path) in msg, msg
        assert "code" not in msg and "weights_only" not in msg, msg
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        caer_fast.load_checkpoint(empty)


def test_code_carrying_checkpoint_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "evil.pth"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model": CAERSNet().state_dict(), "x": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        caer_fast.load_checkpoint(path)
    msg = str(err.value)
    assert "refused" in msg and "weights_only" not in msg and "False" not in msg, msg
    assert not (tmp_path / "pwned").exists()


def test_predictor_errors_name_the_file(tmp_path):
    from caer_fast.serving.inference import Predictor

    path = tmp_path / "short_classes.pth"
    torch.save({"model": CAERSNet().state_dict(), "classes": ["a", "b"]}, path)
    with pytest.raises(CheckpointError, match="short_classes.pth"):
        Predictor(path, detector=None)


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("badck")
    (d / "random.pth").write_bytes(os.urandom(5000))
    torch.save({"model": CAERSNet().state_dict(), "classes": ["a", "b"]}, d / "classes.pth")
    torch.save({"model": CAERSNet().state_dict(), "model_type": "caer"}, d / "kind.pth")
    torch.save({"model": CAERSNet().state_dict(), "args": 3}, d / "args.pth")
    torch.save({"model": CAERSNet().state_dict(), "model_type": "caers", "epoch": 0,
                "args": {"streams": "both"}}, d / "weights_only.pth")  # no optimizer: not resumable
    return d


@pytest.mark.parametrize("name,words", [("random.pth", "not a PyTorch checkpoint"), ("classes.pth", "classes"),
                                        ("kind.pth", "model_type"), ("args.pth", "args is an int"),
                                        ("weights_only.pth", "no optimizer state")])
def test_train_resume_from_a_bad_checkpoint_is_one_error_line(demo_root, tmp_path, capsys, bad_checkpoints, name,
                                                              words):
    from caer_fast.train import cli

    args = [*_caers(demo_root), "--epochs", "1", "--output-dir", tmp_path / "o", "--resume", bad_checkpoints / name]
    proc = run_train(*args, check=False) if name == "random.pth" else _in_process(capsys, cli, *args)
    line = _one_error_line(proc)
    assert words in line and name in line, line


def _run_predict(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "caer_fast.predict", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("name,flags,words", [
    ("random.pth", [], "not a PyTorch checkpoint"), ("classes.pth", [], "2 names"), ("kind.pth", [], "model_type"),
    ("args.pth", [], "args is an int"), ("weights_only.pth", ["--device", "bogus"], "not a device name"),
    ("weights_only.pth", ["--device", "cuda"], "--device cuda"),
])
def test_predict_checkpoint_and_device_errors_are_one_line(demo_root, capsys, bad_checkpoints, name, flags, words):
    from caer_fast.predict import main

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    image = sorted((Path(demo_root) / "CAER-S" / "test").glob("*/*.png"))[0]
    args = [image, "--checkpoint", bad_checkpoints / name, "--detector", "none", *flags]
    proc = _run_predict(*args) if name == "random.pth" or "bogus" in flags else _in_process(capsys, main, *args)
    assert words in _one_error_line(proc)


# ---------------------------------------------------------------- item 5: class folders, resumed streams

def test_class_folders_missing_misnamed_extra_warn_and_strict_refuses(demo_root, tmp_path):
    root = tmp_path / "CAER-S"
    shutil.copytree(Path(demo_root) / "CAER-S", root)
    (root / "train" / "Sad").rename(root / "train" / "sad")
    shutil.copytree(root / "train" / "Happy", root / "train" / "Contempt")
    shutil.rmtree(root / "test" / "Surprise")
    common = ["--data", root, "--model", "caers", "-b", "4", *SMALL, "--epochs", "0"]
    proc = run_train(*common, "--output-dir", tmp_path / "warn")
    warns = [ln for ln in proc.stdout.splitlines() if ln.startswith("warning:")]
    train_w = [w for w in warns if "/train:" in w and "sad" in w]
    assert len(train_w) == 1 and "the class is Sad" in train_w[0] and "Contempt" in train_w[0], warns
    assert any("missing class folder Surprise" in w and "/test:" in w for w in warns), warns
    strict = run_train(*common, "--output-dir", tmp_path / "strict", "--strict", check=False)
    line = _one_error_line(strict)
    assert "sad" in line and "Contempt" in line and "--strict" in line, line


def test_resuming_with_other_streams_warns(demo_root, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    out = run_train(*_caers(demo_root), "--epochs", "1", "--streams", "face", "--output-dir", run, "--resume",
                    run / "checkpoint.pth").stdout
    assert "warning: resuming" in out and "--streams face" in out and "--streams both" in out, out


# ---------------------------------------------------------------- item 6: truncated videos in training

def test_truncated_videos_are_named_as_truncated_not_unreadable(demo_root, tmp_path):
    from caer_fast.data.datasets import TRUNCATED, CAERVideoDataset, DatasetError
    from caer_fast.data.video import MediaDecodeError, probe_video

    root = tmp_path / "CAER"
    shutil.copytree(Path(demo_root) / "CAER", root)
    vids = sorted((root / "train").glob("*/*.avi"))
    by_codec = {}
    for v in vids:
        by_codec.setdefault(probe_video(v).codec, v)
    cut = by_codec["mjpeg"]  # MJPEG cut to a third: FFmpeg decodes the first third without an error
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    (root / "train" / "Fear" / "junk.avi").write_bytes(b"not a video at all" * 50)
    ds = CAERVideoDataset(root, "train", train=True, clip_frames=8, face_size=(48, 48), context_size=(64, 86),
                          crop=56, index_cache=False)
    truncated = {Path(p).name: r for p, r in ds.truncated}
    assert set(truncated) == {cut.name} and truncated[cut.name].startswith(TRUNCATED), ds.truncated
    assert [Path(p).name for p, _ in ds.bad_files] == ["junk.avi"]
    v = [i for i, (rel, _) in enumerate(ds.videos) if rel.endswith(cut.relative_to(root).as_posix())][0]
    assert 0 < ds.num_frames[v] < 40  # the frames that decode, and they do
    for i, (vi, _) in enumerate(ds.clips):
        if vi == v:
            assert torch.isfinite(ds[i]["face"]).all()
    with pytest.raises(DatasetError, match="truncated"):
        CAERVideoDataset(root, "train", train=True, clip_frames=8, strict=True, index_cache=False)
    # Every codec, cut to a third: quietly shorter (header check) or breaking off with an error (H.264
    # here, for some files): both are "truncated", with the frames that decode.
    from caer_fast.data.datasets import _probe

    kinds = set()
    for i, v in enumerate(sorted((Path(demo_root) / "CAER" / "train").glob("*/*.avi"))):
        short = tmp_path / f"cut{i}.avi"
        data = v.read_bytes()
        short.write_bytes(data[: len(data) // 3])
        try:
            info, note = _probe(short, True)
        except MediaDecodeError:
            continue  # nothing decodes: unreadable, and said so
        assert note.startswith(TRUNCATED) and 0 < info.num_frames, (v, note)
        kinds.add("breaks off" if "breaks off" in note else "header")
    assert "header" in kinds, kinds
    out = run_train("--data", root, "--model", "caer", "-b", "4", *SMALL, "--epochs", "0",
                    "--output-dir", tmp_path / "o").stdout
    assert "1 truncated / partly decodable" in out and "1 unreadable" in out, out
    assert any(ln.startswith("warning: truncated / partly decodable:") and cut.name in ln for ln in out.splitlines())


def test_skip_log_counts_by_kind():
    from caer_fast.training.engine import SkipLog, skip_kind

    log = SkipLog()
    log.add({"skipped": 3, "skipped_items": ["a.avi: decoding failed after 12 frames (InvalidDataError: x)",
                                             "b.avi: empty file (0 bytes)", "c.avi: decoding failed after 0 frames"]})
    assert log.counts() == {"truncated / partly decodable": 1, "unreadable": 2}
    assert "1 truncated / partly decodable" in log.summary() and "2 unreadable" in log.summary()
    assert skip_kind("CAER/train.faces.csv:3: not-a-frame") == "bad box line"
    assert skip_kind("/tmp/truncated_test/a.avi: empty file (0 bytes)") == "unreadable"  # the path does not count


# ---------------------------------------------------------------- item 2: the demo under torchrun

@pytest.mark.slow
def test_demo_under_torchrun_writes_the_data_once_and_finishes(tmp_path):
    from test_distributed import TORCHRUN, torchrun

    if TORCHRUN is None:
        pytest.skip("no torchrun")
    out = tmp_path / "demo"
    # 2 videos per class, 1 epoch, batch 2 per process: the whole demo path (data, two trainings) in ~1 minute
    proc = torchrun(["-m", "caer_fast.train", "--demo", "--demo-per-class", "2", "--epochs", "1", "-b", "2", "-j", "0",
                     "--no-progress", "--output-dir", out], cwd=tmp_path, timeout=400)
    log = proc.stdout
    assert log.count("writing the demo dataset") == 1 and log.count("=== demo result") == 1, log
    assert log.count("=== training with face only") == 1 and log.count("=== training with face + context") == 1
    assert "× 2 processes" in log and "trained on no samples" not in log, log
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary) == {"face_only", "face_context", "gain"}
    for streams in ("face", "both"):
        ck = torch.load(out / streams / "checkpoint.pth", weights_only=True)
        assert ck["epoch"] == 0 and ck["args"]["streams"] == streams
    # Run again: the earlier demo run is refused at once, then replaced with --overwrite.
    again = subprocess.run([sys.executable, "-m", "caer_fast.train", "--demo", "--output-dir", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert "--overwrite" in _one_error_line(again)


@pytest.mark.parametrize("device,words", [("bogus", "not a device name"), ("cuda", "--device cuda")])
def test_serve_device_errors_are_one_line(bad_checkpoints, capsys, device, words):
    pytest.importorskip("uvicorn")
    from caer_fast.serve import main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _in_process(capsys, main, "--checkpoint", bad_checkpoints / "weights_only.pth", "--detector", "none",
                       "--device", device, "--port", "1")
    assert words in _one_error_line(proc)
