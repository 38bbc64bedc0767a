"""python -m caer_fast.annotate on one machine: the embedded run against the Ray Data run, same corpus.

    pytest bench/test_annotate.py --benchmark-only -s
    CAER_BENCH_ANNOTATE_VIDEOS=20 pytest bench/test_annotate.py --benchmark-only -s   # videos per class

The corpus is the demo data (real .avi files, MJPEG / MPEG-4 / H.264, 64×86, 36–44 frames), 6 videos per class
by default (42), with the demo's face boxes (``--boxes``); the checkpoint is a tiny CAER-Net (8-frame clips,
48² faces, 56² context crops) from random init. Contenders, alternated so the machine's load hits them alike:

- ``embedded``: the default run (2 decode processes feeding the model process);
- ``ray-head``: ``--ray ADDRESS`` against a head started beforehand (``ray start --head --num-cpus=2`` on
  127.0.0.1, as a cluster would be); its start is not timed, its actors' start is;
- ``ray-local``: ``--ray`` alone: Ray started and stopped for the job (timed);
- ``ray-floor``: not ours: the same Ray Data pipeline against the same head (the corpus's paths in blocks of 4,
  a decode actor pool of 1–2 → one model actor, ``num_cpus=1`` each) with actors that do nothing and a driver
  that never imports torch: what Ray costs before any of our work;
- ``ray-floor-torch``: the same with each actor importing torch in its constructor, as ours must.

Each run is a subprocess with ``OMP_NUM_THREADS=1``; wall time from its start to its exit; peak memory is the
largest sum of RSS over the CLI, its children and the job's Ray actor processes (sampled every 0.1 s; Ray's
own daemons are not counted). Every run's ``videos.parquet`` must give the embedded run's emotions.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from caer_fast.testing.ray_head import RAY_ENV, ray_head

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
psutil = pytest.importorskip("psutil")

PER_CLASS = int(os.environ.get("CAER_BENCH_ANNOTATE_VIDEOS", "6"))
ROUNDS = int(os.environ.get("CAER_BENCH_ANNOTATE_ROUNDS", "2"))
RESULTS = {}


# the floor contenders' driver: Ray Data with our stages' shape and no work (argv[1]: head, [2]: n, [3]: 1 = torch)
FLOOR = """
import sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
HEAVY = sys.argv[3] == "1"
class Decode:
    def __init__(self):
        if HEAVY:
            import torch  # noqa: F401
    def __call__(self, row):
        return [{"path": row["path"], "seq": 0}]
class Model(Decode):
    def __call__(self, batch):
        return batch
ray.data.DataContext.get_current().enable_progress_bars = False
n = int(sys.argv[2])
ds = ray.data.from_items([{"path": str(i)} for i in range(n)], override_num_blocks=-(-n // 4))
ds = ds.flat_map(Decode, num_cpus=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
ds = ds.map_batches(Model, batch_size=4, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1))
assert sum(1 for _ in ds.iter_rows()) == n
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from caer_fast.constants import CLASSES
    from caer_fast.data.synthetic import make_demo_dataset
    from caer_fast.models.caer_net import CAERNet

    d = tmp_path_factory.mktemp("annotate_bench")
    make_demo_dataset(d / "demo", seed=3, videos_per_class={"train": PER_CLASS, "validation": 0, "test": 0},
                      images_per_class={"train": 0, "test": 0}, size=(64, 86), frames=(36, 44))
    torch.manual_seed(0)
    ck = d / "caer.pth"
    torch.save({"model": CAERNet(frames=8).state_dict(), "model_type": "caer", "classes": list(CLASSES),
                "model_args": {"use_face": True, "use_context": True, "frames": 8},
                "args": {"face_size": [48, 48], "context_size": [64, 86], "crop": 56, "clip_frames": 8}}, ck)
    return {"dir": d, "videos": d / "demo" / "CAER" / "train", "boxes": d / "demo" / "CAER" / "train.faces.csv",
            "ckpt": ck, "n": 7 * PER_CLASS}


@pytest.fixture(scope="module")
def head():
    with ray_head() as h:  # stops this head alone (`ray stop` would stop every Ray here)
        yield h.address


def _job_rss(proc: psutil.Process) -> int:
    """RSS of the CLI, its descendants and the Ray actor processes (ray::MapWorker…) now alive."""
    total, seen = 0, set()
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if cmd and cmd[0].startswith("ray::MapWorker"):
            procs.append(p)
    for p in procs:
        if p.pid in seen:
            continue
        seen.add(p.pid)
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_once(corpus, out: Path, extra, floor=None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", CAER_FAST_ENGINE="eager", **RAY_ENV)
    cmd = [sys.executable, "-m", "caer_fast.annotate", str(corpus["videos"]), "--checkpoint", str(corpus["ckpt"]),
           "--out", str(out), "--boxes", str(corpus["boxes"]), "--no-progress", *extra]
    if floor is not None:
        cmd = [sys.executable, "-c", FLOOR, *floor]
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the loopback address, as run_ray does
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        peak = max(peak, _job_rss(ps))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    stdout, stderr = p.communicate()
    assert p.returncode == 0, stderr
    if floor is not None:
        return {"wall": wall, "peak_mb": peak / 2 ** 20, "emotions": None}
    rows = pq.read_table(out / "videos.parquet").to_pylist()
    assert len(rows) == corpus["n"] and all(r["status"] == "ok" for r in rows)
    return {"wall": wall, "peak_mb": peak / 2 ** 20, "emotions": {r["path"]: r["emotion"] for r in rows}}


@pytest.mark.parametrize("implementation", ["embedded", "ray-head", "ray-floor", "ray-floor-torch", "ray-local"])
def test_annotate_corpus(benchmark, corpus, head, implementation):
    """All contenders run here, alternated, once the first parameter is reached; the other parameters
    report their share (one pytest-benchmark row per contender)."""
    if not RESULTS:
        order = ["embedded", "ray-head", "ray-floor", "ray-floor-torch"] * ROUNDS + ["ray-local"]
        for i, name in enumerate(order):
            extra = {"embedded": [], "ray-head": ["--ray", head], "ray-local": ["--ray"]}.get(name, [])
            floor = {"ray-floor": [head, str(corpus["n"]), "0"], "ray-floor-torch": [head, str(corpus["n"]), "1"]}
            r = run_once(corpus, corpus["dir"] / f"out-{name}", extra, floor.get(name))
            RESULTS.setdefault(name, []).append(r)
        ref = RESULTS["embedded"][0]["emotions"]
        for name, runs in RESULTS.items():
            for r in runs:
                assert r["emotions"] in (ref, None), name  # the same answers whichever way it ran (floors: none)
    runs = RESULTS[implementation]
    best = min(r["wall"] for r in runs)
    benchmark.extra_info.update({"videos": corpus["n"], "walls_s": [round(r["wall"], 2) for r in runs],
                                 "videos_per_s": round(corpus["n"] / best, 2),
                                 "peak_mb": round(max(r["peak_mb"] for r in runs)),
                                 "vs_embedded": round(best / min(r["wall"] for r in RESULTS["embedded"]), 2),
                                 "load": os.getloadavg()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timed work ran above, alternated
    print(f"\n{implementation}: walls {benchmark.extra_info['walls_s']} s, {benchmark.extra_info['videos_per_s']} "
          f"videos/s, peak {benchmark.extra_info['peak_mb']} MB, {benchmark.extra_info['vs_embedded']}x embedded, "
          f"load {os.getloadavg()[0]:.1f}")
