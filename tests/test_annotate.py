"""python -m caer_fast.annotate on a real corpus: embedded, resumed after a killed job, and on a local Ray head
with one of its workers killed mid-run.

The corpus: 40 demo videos (real .avi files, three codecs) in nested folders plus two bad files (garbage bytes
named .avi, an empty .mp4); a tiny CAER-Net checkpoint; the demo data's face boxes (``--boxes``).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caer_fast.annotation import AnnotateError, find_inputs
from caer_fast.predict import boxes_for
from caer_fast.serving.inference import Predictor
from caer_fast.testing.ray_head import RAY_ENV, ray_head as start_ray_head
from caer_fast.testing.serving import make_checkpoint, write_png

pq = pytest.importorskip("pyarrow.parquet")

GOOD, BAD = 40, ("odd/deeper/garbage.avi", "empty.mp4")


def run_annotate(*args, timeout=300, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "caer_fast.annotate", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=timeout, **kw)


def popen_annotate(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", **RAY_ENV)
    return subprocess.Popen([sys.executable, "-m", "caer_fast.annotate", *map(str, args), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from caer_fast.data.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("annotate")
    make_demo_dataset(root / "demo", seed=3, videos_per_class={"train": 6, "validation": 0, "test": 0},
                      images_per_class={"train": 0, "test": 0}, size=(64, 86), frames=(36, 44))
    videos = root / "demo" / "CAER" / "train"
    for extra in ("Anger/0005.avi", "Sad/0005.avi"):  # 42 written, 40 kept
        (videos / extra).unlink()
    (videos / BAD[0]).parent.mkdir(parents=True)
    (videos / BAD[0]).write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (videos / BAD[1]).write_bytes(b"")
    ck = make_checkpoint(root / "caer.pth", "caer")
    return {"root": root, "videos": videos, "boxes": root / "demo" / "CAER" / "train.faces.csv", "ckpt": ck}


def read(out):
    v = pq.read_table(out / "videos.parquet").to_pylist()
    c = pq.read_table(out / "clips.parquet").to_pylist()
    return {r["path"]: r for r in v}, c


@pytest.fixture(scope="module")
def embedded(corpus):
    out = corpus["root"] / "embedded"
    t0 = time.perf_counter()
    proc = run_annotate(corpus["videos"], "--checkpoint", corpus["ckpt"], "--out", out, "--boxes", corpus["boxes"])
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "wall": wall, "stdout": proc.stdout}


def assert_same_answers(a, b):
    assert sorted(a) == sorted(b)
    for path, ra in a.items():
        rb = b[path]
        assert (ra["status"], ra["emotion"], ra["clips"], ra["error"]) == (rb["status"], rb["emotion"], rb["clips"],
                                                                          rb["error"]), path
        if ra["status"] == "ok":
            np.testing.assert_allclose([ra[k] for k in ra if k.startswith("p_")],
                                       [rb[k] for k in rb if k.startswith("p_")], atol=1e-5, err_msg=path)


def test_embedded_rows_match_predict_and_bad_files_are_rows(corpus, embedded, request):
    videos, clips = read(embedded["out"])
    assert len(videos) == GOOD + len(BAD)
    assert sum(r["status"] == "ok" for r in videos.values()) == GOOD
    bad = {Path(p).name: r for p, r in videos.items() if r["status"] == "error"}
    assert sorted(bad) == ["empty.mp4", "garbage.avi"]
    assert "empty file (0 bytes)" in bad["empty.mp4"]["error"]
    assert "not a readable video container" in bad["garbage.avi"]["error"]
    assert all(r["emotion"] is None and r["clips"] == 0 for r in bad.values())
    # every ok row is what the Predictor says about that file alone (same boxes)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references take 4x longer with two threads on two loaded cores
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    p = Predictor(corpus["ckpt"], device="cpu", detector=None)
    by_path = {}
    for c in clips:
        by_path.setdefault(c["path"], []).append(c)
    for path, row in videos.items():
        if row["status"] != "ok":
            assert path not in by_path
            continue
        ref = p.predict_file(path, known_boxes=boxes_for(Path(path), corpus["boxes"]))
        assert row["emotion"] == ref.emotion and row["clips"] == len(ref.clips) and row["engine"] == "eager"
        np.testing.assert_allclose([row[f"p_{k}"] for k in ref.probabilities], list(ref.probabilities.values()),
                                   atol=1e-5)
        assert row["seconds"] == pytest.approx(ref.frames_used / 10) and row["face_found"]
        mine = sorted(by_path[path], key=lambda c: c["clip"])
        assert [c["clip"] for c in mine] == list(range(len(ref.clips))) and {c["person"] for c in mine} == {0}
        for c, rc in zip(mine, ref.clips):
            assert (c["start"], c["end"], c["emotion"]) == (pytest.approx(rc.start_s), pytest.approx(rc.end_s),
                                                            rc.emotion)
            np.testing.assert_allclose([c[f"p_{k}"] for k in rc.probabilities], list(rc.probabilities.values()),
                                       atol=1e-5)
    # the CSV beside it holds the same rows
    import csv

    with open(embedded["out"] / "videos.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(videos)
    assert "42 inputs: 40 annotated, 2 errors, 0 already done" in embedded["stdout"]


def test_rerun_over_a_finished_out_is_quick_and_changes_nothing(corpus, embedded):
    out = embedded["out"]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    t0 = time.perf_counter()
    proc = run_annotate(corpus["videos"], "--checkpoint", corpus["ckpt"], "--out", out, "--boxes", corpus["boxes"])
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - t0 <= 15
    assert "0 annotated, 0 errors, 42 already done" in proc.stdout
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before


def test_a_killed_job_resumes_and_ends_with_every_video_once(corpus, embedded, tmp_path):
    out = tmp_path / "out"
    args = (corpus["videos"], "--checkpoint", corpus["ckpt"], "--out", out, "--boxes", corpus["boxes"],
            "--part-videos", "3")
    proc = popen_annotate(*args)
    deadline = time.monotonic() + 120
    while len(list((out / "parts").glob("*.videos.parquet"))) < 2:  # some blocks committed, most not
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: the CLI and its decode workers
    proc.wait()
    done_before = sum(pq.read_table(f).num_rows for f in (out / "parts").glob("*.videos.parquet"))
    assert 0 < done_before < GOOD + len(BAD) and not (out / "videos.parquet").exists()
    proc = run_annotate(*args)
    assert proc.returncode == 0, proc.stderr
    assert f"{done_before} already done" in proc.stdout
    videos, clips = read(out)
    assert len(pq.read_table(out / "videos.parquet")) == GOOD + len(BAD)  # exactly once
    assert_same_answers(videos, read(embedded["out"])[0])
    keys = [(c["path"], c["clip"]) for c in clips]
    assert len(keys) == len(set(keys)) == sum(r["clips"] for r in videos.values())


def test_inputs_from_folders_files_and_manifests(corpus, tmp_path):
    v = corpus["videos"]
    files = find_inputs([v])
    assert len(files) == GOOD + len(BAD) and files == sorted(files) and all(os.path.isabs(f) for f in files)
    txt = tmp_path / "list.txt"
    rel = os.path.relpath(v / "Happy" / "0001.avi", tmp_path)
    txt.write_text(f"# two videos\n{rel}\n\n{v / 'Sad' / '0002.avi'}\n")
    man = tmp_path / "m.csv"
    man.write_text(f"label,path\nx,{v / 'Fear' / '0000.avi'}\n")
    got = find_inputs([txt, man, v / "Happy" / "0001.avi"])  # the same file twice counts once
    assert got == sorted(str((v / n).resolve()) for n in ("Happy/0001.avi", "Sad/0002.avi", "Fear/0000.avi"))
    with pytest.raises(AnnotateError, match="nowhere: no such file or folder"):
        find_inputs([tmp_path / "nowhere"])
    proc = run_annotate(tmp_path / "empty-dir-none", "--checkpoint", corpus["ckpt"], "--out", tmp_path / "o")
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_an_image_and_a_missing_file_from_a_manifest(corpus, tmp_path):
    image = write_png(tmp_path / "still.png", seed=4)
    video = corpus["videos"] / "Surprise" / "0003.avi"
    man = tmp_path / "m.txt"
    man.write_text(f"{image}\n{video}\ngone.avi\n")
    proc = run_annotate(man, "--checkpoint", corpus["ckpt"], "--out", tmp_path / "o", "--detector", "none")
    assert proc.returncode == 0, proc.stderr
    videos, clips = read(tmp_path / "o")
    assert videos[str(tmp_path / "gone.avi")]["error"].endswith("gone.avi: no such file")
    p = Predictor(corpus["ckpt"], device="cpu", detector=None)
    for path in (image, video):
        row, ref = videos[str(path)], p.predict_file(path)
        assert (row["status"], row["kind"], row["emotion"]) == ("ok", ref.kind, ref.emotion)
        assert row["clips"] == len(ref.clips)
        np.testing.assert_allclose([row[f"p_{k}"] for k in ref.probabilities], list(ref.probabilities.values()),
                                   atol=1e-5)
    assert videos[str(image)]["seconds"] == 0 and not videos[str(image)]["face_found"]


# -- Ray ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_head():
    pytest.importorskip("ray")
    with start_ray_head() as head:  # stops this head alone (`ray stop` would stop every Ray here)
        yield head.address


def _ray_workers(name: str) -> set:
    """pids of Ray worker processes whose title holds ``name`` (Ray names them ray::<actor class>...)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::") and name in cmd:
                pids.add(int(d.name))
    return pids


@pytest.mark.slow
def test_ray_run_with_a_worker_killed_gives_the_embedded_answers(corpus, embedded, ray_head, tmp_path):
    out = tmp_path / "ray"
    t0 = time.perf_counter()
    proc = popen_annotate(corpus["videos"], "--checkpoint", corpus["ckpt"], "--out", out, "--boxes", corpus["boxes"],
                          "--ray", ray_head, "--part-videos", "3")
    deadline = time.monotonic() + 240
    while not list((out / "parts").glob("*.videos.parquet")):  # some videos through: the run is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    # the model actor: the stage still busy (decoding runs ahead); Ray restarts it and reruns its batch
    victims = _ray_workers("MapBatches(_Model)")
    assert len(victims) == 1, victims
    os.kill(next(iter(victims)), signal.SIGKILL)
    done_at_kill = sum(pq.read_table(f).num_rows for f in (out / "parts").glob("*.videos.parquet"))
    restarted = set()
    while proc.poll() is None and time.monotonic() < deadline + 120:
        restarted |= _ray_workers("MapBatches(_Model)") - victims
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=60)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, stderr
    assert done_at_kill < GOOD + len(BAD) and restarted  # killed mid-run, and Ray started another model actor
    videos, clips = read(out)
    assert len(pq.read_table(out / "videos.parquet")) == GOOD + len(BAD)  # exactly once
    assert_same_answers(videos, read(embedded["out"])[0])
    keys = [(c["path"], c["clip"]) for c in clips]
    assert len(keys) == len(set(keys)) == sum(r["clips"] for r in videos.values())
    print(f"embedded {embedded['wall']:.1f} s, ray (one worker killed) {wall:.1f} s")


def test_help_speaks_of_annotate_options_only():
    """annotate shares predict's --detector, but not predict's text about --people (annotate has no such flag);
    predict's own help keeps it."""
    from caer_fast.annotate import get_args_parser as annotate_parser
    from caer_fast.predict import get_args_parser as predict_parser

    annotate_help, predict_help = annotate_parser().format_help(), predict_parser().format_help()
    assert "--people" not in annotate_help and "--people" in predict_help
    assert "--detector" in annotate_help and "auto: haar" in " ".join(annotate_help.split())
