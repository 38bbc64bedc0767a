"""The GPU acceptance run, one command for a bare GPU machine:  python tools/gpu_check.py OUT_DIR

In order, each step under one time budget (default 470 s; what does not fit is reported skipped):

1. build  — ``pip install --no-build-isolation --no-deps -e .`` against the machine's own torch
   (CPU + CUDA extension, nvcc, the device's arch), then checks ``caer_fast._C`` has its CUDA code.
2. tests  — every ``gpu``-marked test (pytest -m gpu over the files that hold them), per-test outcome.
3. copy   — device-to-device copy bandwidth (bytes read + written), the ceiling for the ops.
4. ops    — each op × backend (torch, triton, cuda): checked against the torch reference, then timed;
   achieved bandwidth (bytes the op must move at least / time) against the copy rate.
5. models — CAER-S and CAER-Net, train step and inference: the community model (CAER-S) and ours
   eager fp32, against ``caer_fast.optimize`` (compile + bf16 autocast + CUDA graphs for inference).
6. e2e    — CAER-Net training from video files decoded on the host (OpenCV; PyAV if present; DALI if
   present) in DataLoader workers, frames/s against the decoder's own rate on the same files.

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md after every measurement, so a run cut short
still leaves its results. A missing piece (no GPU backend, no decoder, no DALI) is a ``skipped`` row
with the reason, never a crash; an exception in one step is an ``error`` row and the run goes on.

``--dry-run`` runs the same plumbing on the CPU in seconds (CI: tests/test_gpu_check.py): the build
step as ``pip wheel`` with ``CAER_FAST_BUILD_EXT=0`` (the installed package is left alone), the test
selection, tiny problem sizes, no compile, one timed round.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("build", "tests", "copy", "ops", "models", "e2e")


class Report:
    """Rows of results, written as JSON and a markdown table after each one (atomically)."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir, self.meta, self.rows = out_dir, meta, []
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, step, name, status="ok", value=None, unit="", ratio=None, ratio_of="", note="", **extra):
        row = dict(step=step, name=name, status=status, value=value, unit=unit, ratio=ratio, ratio_of=ratio_of,
                   note=note, **extra)
        self.rows.append(row)
        shown = f"{value:.4g} {unit}" if isinstance(value, (int, float)) else ""
        shown += f"  {ratio:.3g}x {ratio_of}" if isinstance(ratio, (int, float)) else ""
        print(f"[{step}] {status:7} {name}: {shown} {note}".rstrip(), flush=True)
        self.write()
        return row

    def write(self):
        data = dict(self.meta, rows=self.rows, finished=self.meta.get("finished", False))
        self._atomic(self.out_dir / "gpu_check.json", json.dumps(data, indent=1, default=str))
        self._atomic(self.out_dir / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# gpu_check {'(dry run, CPU) ' if m.get('dry_run') else ''}— {m.get('device', '?')}", "",
                 f"torch {m.get('torch')}, CUDA {m.get('torch_cuda')}, triton {m.get('triton')}, Python "
                 f"{m.get('python')}; started {m.get('started')}; "
                 f"{'finished' if m.get('finished') else 'NOT finished (partial)'} after {m.get('elapsed_s', '?')} s",
                 "", "| step | what | status | value | ratio | note |", "|---|---|---|---:|---:|---|"]
        for r in self.rows:
            value = f"{r['value']:.4g} {r['unit']}" if isinstance(r["value"], (int, float)) else ""
            ratio = f"{r['ratio']:.3g}x {r['ratio_of']}" if isinstance(r["ratio"], (int, float)) else ""
            note = str(r["note"]).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {r['step']} | {r['name']} | {r['status']} | {value} | {ratio} | {note} |")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _atomic(path: Path, text: str):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ---- timing -----------------------------------------------------------------------------------
def timed(fn, device, rounds: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(rounds):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


class _Backend:
    """CAER_FAST_BACKEND=name for the ops called inside (the documented switch)."""

    def __init__(self, name):
        self.name, self.old = name, None

    def __enter__(self):
        self.old = os.environ.get("CAER_FAST_BACKEND")
        os.environ["CAER_FAST_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("CAER_FAST_BACKEND", None)
        else:
            os.environ["CAER_FAST_BACKEND"] = self.old


# ---- 1. build -----------------------------------------------------------------------------------
def step_build(rep: Report, args, budget: Budget):
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
    if args.dry_run:  # the same setup.py path, without compiling and without touching the install
        env["CAER_FAST_BUILD_EXT"] = "0"
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
               str(Path(tempfile.mkdtemp(prefix="gpu_check_wheel_"))), "."]
    else:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(30, budget.left()))
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, log = "timeout", str(exc)
    (rep.out_dir / "build.log").write_text(log)
    secs = round(time.time() - t0, 1)
    if rc != 0:
        rep.add("build", " ".join(cmd[2:5]), "error", secs, "s", note=f"exit {rc}; see build.log: {log[-400:]}")
        return
    rep.add("build", " ".join(cmd[2:5]) + (" (CAER_FAST_BUILD_EXT=0)" if args.dry_run else ""), "ok", secs, "s")
    if args.dry_run:
        return
    probe = ("import json, torch, caer_fast._C as C, caer_fast.ops as ops\n"
             "names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith('caer_fast::'))\n"
             "cuda = [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, 'CUDA')]\n"
             "try:\n    be = ops.backend(torch.device('cuda'))\nexcept Exception as e:\n    be = repr(e)\n"
             "print(json.dumps([names, cuda, [f for f in dir(C) if f.endswith('_cuda')], be]))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if proc.returncode != 0:
        rep.add("build", "import caer_fast._C", "error", note=proc.stderr[-500:])
        return
    ops, cuda_ops, cuda_fns, avail = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = bool(cuda_ops or cuda_fns)
    rep.add("build", "CUDA kernels in caer_fast._C", "ok" if ok else "error", len(cuda_ops) or len(cuda_fns), "ops",
            note=f"dispatcher CUDA kernels: {cuda_ops}; CUDA functions: {cuda_fns}; backend on cuda: {avail}")


# ---- 2. tests -----------------------------------------------------------------------------------
def gpu_test_files():
    """Test files holding ``gpu``-marked tests (only those are collected: the others may import
    packages this machine lacks)."""
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if re.search(r"mark\.gpu\b", path.read_text(errors="replace")):
            files.append(str(path.relative_to(ROOT)))
    return files


def step_tests(rep: Report, args, budget: Budget):
    files = gpu_test_files()
    if not files:
        rep.add("tests", "gpu-marked tests", "error", note="no test file holds a gpu-marked test")
        return
    xml = rep.out_dir / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
           "--continue-on-collection-errors", f"--junitxml={xml}", *files]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, budget.left() - 240),
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = f"timed out: {exc}"
    (rep.out_dir / "gpu_tests.log").write_text(out)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    skips = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
            status = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(kinds[0] if kinds else "",
                                                                                     "passed")
            counts[status] += 1
            msg = "" if not kinds else (case.find(kinds[0]).get("message") or "")[:300]
            if status == "skipped" and not args.verbose_tests:  # one row per reason
                skips.setdefault(msg, []).append(case.get("name"))
                continue
            if status != "passed" or args.verbose_tests:
                rep.add("tests", f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}", status,
                        note=msg)
    for msg, names in skips.items():
        rep.add("tests", f"{len(names)} tests skipped", "skipped", note=f"{msg} (e.g. {names[0]})")
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    bad = counts["failed"] + counts["error"]
    rep.add("tests", f"pytest -m gpu ({len(files)} files)", "ok" if bad == 0 and xml.exists() else "failed",
            round(time.time() - t0, 1), "s", note=f"{counts}; {summary}")


# ---- 3. copy ------------------------------------------------------------------------------------
def step_copy(rep: Report, args, device, rounds):
    import torch

    n = (1 << 30) if device.type == "cuda" else (16 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, rounds)
    assert torch.equal(x[:4096], y[:4096])
    bw = 2 * n / t / 1e9
    rep.add("copy", f"device copy {n >> 20} MiB", "ok", bw, "GB/s", note="bytes read + written")
    return bw


# ---- 4. ops -------------------------------------------------------------------------------------
def _op_cases(device, dry):
    """(op, dtype, make inputs, run(inputs), bytes moved at least)."""
    import torch

    import caer_fast.ops as ops

    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = []
    # face_context: uint8 CAER-S-sized frames -> face 96×96 + context 112×112 crop, float32
    n, h, w = (2, 100, 180) if dry else (256, 400, 712)
    frames = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    x1 = torch.randint(0, w - 40, (n,), generator=gen)
    y1 = torch.randint(0, h - 40, (n,), generator=gen)
    boxes = torch.stack([x1, y1, x1 + w // 5, y1 + h // 3], 1)

    def fc_inputs(dtype):
        return frames.to(device), boxes.to(device)

    def fc_run(inp):
        return ops.face_context(*inp, crop=(8, 29, 112, 112))

    fc_bytes = frames.numel() + n * 3 * (96 * 96 + 112 * 112) * 4
    cases.append(("face_context", torch.float32, fc_inputs, fc_run, fc_bytes, False))
    # attention_pool forward + backward: CAER-Net-sized maps (256 channels, 4×7×7 positions)
    n, c, s = (4, 32, 4 * 3) if dry else (1024, 256, 4 * 49)
    for dtype in (torch.float32, torch.bfloat16):
        def ap_inputs(dtype, n=n, c=c, s=s):
            f = torch.randn(n, c, 4, s // 4, generator=gen).to(device, dtype).requires_grad_()
            l = torch.randn(n, 1, *f.shape[2:], generator=gen).to(device, dtype).requires_grad_()
            g = torch.randn(n, c, generator=gen).to(device, dtype)
            return f, l, g

        def ap_run(inp):
            f, l, g = inp
            out = ops.attention_pool(f, l)
            out.backward(g)
            return out

        size = torch.empty(0, dtype=dtype).element_size()
        cases.append(("attention_pool fwd+bwd", dtype, ap_inputs, ap_run, 3 * n * c * s * size + 3 * n * s * size,
                      True))
    # adaptive_fusion forward + backward
    n, cf = (8, 64) if dry else (65536, 256)
    for dtype in (torch.float32, torch.bfloat16):
        def af_inputs(dtype, n=n, cf=cf):
            t = [torch.randn(n, k, generator=gen).to(device, dtype).requires_grad_() for k in (cf, cf, 1, 1)]
            return (*t, torch.randn(n, 2 * cf, generator=gen).to(device, dtype))

        def af_run(inp):
            *t, g = inp
            out = ops.adaptive_fusion(*t)
            out.backward(g)
            return out

        size = torch.empty(0, dtype=dtype).element_size()
        cases.append(("adaptive_fusion fwd+bwd", dtype, af_inputs, af_run, 5 * 2 * n * cf * size, True))
    return cases


def step_ops(rep: Report, args, device, rounds, copy_bw, budget):
    import torch

    backends = ["torch", "triton", "cuda"] if device.type == "cuda" else ["torch", "cpp"]
    for op, dtype, make, run, nbytes, has_grad in _op_cases(device, args.dry_run):
        if budget.left() < 60:
            rep.add("ops", op, "skipped", note="time budget")
            continue
        dname = str(dtype).replace("torch.", "")
        with _Backend("torch"):
            ref_in = make(dtype)
            ref = run(ref_in)
        for be in backends:
            name = f"{op} {dname} [{be}]"
            try:
                with _Backend(be):
                    inp = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in ref_in)
                    got = run(inp)
                    got_t = got if isinstance(got, tuple) else (got,)
                    ref_t = ref if isinstance(ref, tuple) else (ref,)
                    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                    for a, b in zip(got_t, ref_t):
                        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
                    if has_grad:
                        for a, b in zip(inp, ref_in):
                            if a.grad is not None:
                                torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=tol)

                    def once():
                        for t in inp:
                            t.grad = None
                        run(inp)
                    t = timed(once, device, rounds)
                bw = nbytes / t / 1e9
                rep.add("ops", name, "ok", bw, "GB/s", ratio=bw / copy_bw if copy_bw else None,
                        ratio_of="of copy", note=f"{t * 1e6:.1f} us, {nbytes / 1e6:.1f} MB moved at least")
            except Exception as exc:
                unavailable = type(exc).__name__ == "BackendUnavailableError" or "unavailable" in str(exc).lower()
                rep.add("ops", name, "skipped" if unavailable else "error", note=f"{type(exc).__name__}: {exc}"[:400])


# ---- 5. models ----------------------------------------------------------------------------------
def _train_step(model, opt, face, ctx, y):
    import torch.nn.functional as F

    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(face, ctx), y)
    loss.backward()
    opt.step()
    return loss


def step_models(rep: Report, args, device, rounds, budget):
    import torch

    from caer_fast import optimize
    from caer_fast.models import CAERNet, CAERSNet

    from caer_fast.testing.community_model import CommunityCAERSNet

    dry = args.dry_run
    f, c, t = (32, 32, 8) if dry else (96, 112, 16)  # dry: small maps, 8 frames (three temporal pools)
    cases = [  # (case, builder, face shape, context shape, batch train, batch inference)
        ("CAER-S", CAERSNet, (3, f, f), (3, c, c), 2 if dry else 256, 2 if dry else 256),
        ("CAER-Net", CAERNet, (3, t, f, f), (3, t, c, c), 2 if dry else 32, 2 if dry else 64),
    ]
    for case, build, fshape, cshape, bt, bi in cases:
        for mode, batch in (("train", bt), ("inference", bi)):
            contenders = [("ours eager fp32", build, False)]
            if case == "CAER-S":
                contenders.insert(0, ("community eager fp32", CommunityCAERSNet, False))
            contenders.append(("ours optimize", build, True))
            base = None
            for label, cls, opt_on in contenders:
                name = f"{case} {mode} b{batch} {label}"
                if budget.left() < (90 if opt_on else 30):
                    rep.add("models", name, "skipped", note="time budget")
                    continue
                try:
                    torch.manual_seed(0)
                    model = cls().to(device)
                    face = torch.randn(batch, *fshape, device=device)
                    ctx = torch.randn(batch, *cshape, device=device)
                    y = torch.randint(0, 7, (batch,), device=device)
                    t0 = time.time()
                    if mode == "train":
                        model.train()
                        fwd = optimize(model, "train", compile=not dry) if opt_on else model
                        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                        fn = lambda: _train_step(fwd, opt, face, ctx, y)  # noqa: E731
                    else:
                        model.eval()
                        fwd = optimize(model, "inference", compile=not dry) if opt_on else model

                        def fn():
                            with torch.inference_mode():
                                return fwd(face, ctx)
                    out = fn()  # first call: compile
                    first = time.time() - t0
                    assert torch.isfinite(out.float()).all(), "non-finite output"
                    t = timed(fn, device, rounds, warmup=1 if dry else 3)
                    rate = batch / t
                    base = rate if base is None else base
                    unit = "clips/s" if case == "CAER-Net" else "img/s"
                    rep.add("models", name, "ok", rate, unit, ratio=rate / base, ratio_of=f"vs {contenders[0][0]}",
                            note=f"{t * 1e3:.2f} ms/step; first call {first:.1f} s")
                except Exception as exc:
                    rep.add("models", name, "error", note=f"{type(exc).__name__}: {exc}"[:400])
                finally:
                    model = fwd = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


# ---- 6. end to end --------------------------------------------------------------------------------
def _write_videos(folder: Path, count: int, frames: int, size=(360, 640)):
    """MJPEG .avi files written by OpenCV (no PyAV needed); a moving square so frames differ."""
    import cv2
    import numpy as np

    cv2.setNumThreads(0)  # no OpenCV thread pool in this process: DataLoader workers fork from it
    paths = []
    h, w = size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for i in range(count):
        path = folder / f"clip{i:03d}.avi"
        vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
        if not vw.isOpened():
            raise RuntimeError("cv2.VideoWriter cannot write MJPG .avi here")
        for t in range(frames):
            img = base.copy()
            x = (t * 7 + i * 13) % (w - 80)
            img[100:180, x:x + 80] = (30 * t) % 255
            vw.write(img)
        vw.release()
        paths.append(path)
    return paths


class _CV2Clips:
    """torch Dataset: each video's first ``frames`` frames as uint8 T×H×W×3 RGB (OpenCV), plus a box."""

    def __init__(self, paths, frames):
        self.paths, self.frames = paths, frames

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import cv2
        import numpy as np
        import torch

        cap = cv2.VideoCapture(str(self.paths[i]))
        out = []
        while len(out) < self.frames:
            ok, img = cap.read()
            if not ok:
                break
            out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        cap.release()
        if len(out) < self.frames:
            raise RuntimeError(f"{self.paths[i]}: {len(out)} frames decoded, {self.frames} wanted")
        x = torch.from_numpy(np.stack(out))
        h, w = out[0].shape[:2]
        box = torch.tensor([w // 3, h // 6, w // 3 + w // 5, h // 6 + h // 3]).expand(self.frames, 4)
        return x, box, i % 7


def step_e2e(rep: Report, args, device, budget):
    import torch

    try:
        import cv2  # noqa: F401
    except ImportError as exc:
        rep.add("e2e", "OpenCV decode + train", "skipped", note=f"no OpenCV: {exc}")
        cv2 = None
    for mod, why in (("av", "PyAV"), ("nvidia.dali", "DALI NVDEC")):
        try:
            __import__(mod)
            present = True
        except ImportError:
            present = False
        if not present:
            rep.add("e2e", f"{why} decode + train", "skipped", note=f"{mod} is not installed here")
        elif mod == "nvidia.dali":
            rep.add("e2e", f"{why} decode + train", "skipped", note="present, but not wired into gpu_check yet")
        elif cv2 is not None:
            rep.add("e2e", f"{why} decode + train", "skipped", note="PyAV present: OpenCV is measured instead")
    if cv2 is None:
        return
    import caer_fast.ops as ops
    from caer_fast import optimize
    from caer_fast.models import CAERNet

    dry = args.dry_run
    T, batch = (8, 2) if dry else (16, 16)
    count = 4 if dry else 128
    workers = 0 if dry else min(12, max(1, (os.cpu_count() or 2) - 2))
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_videos_"))
    try:
        paths = _write_videos(folder, count, T, size=(90, 160) if dry else (360, 640))
        ds = _CV2Clips(paths, T)
        make = lambda: torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,  # noqa: E731
                                                   pin_memory=device.type == "cuda", persistent_workers=False)
        t0 = time.time()
        n = sum(x.shape[0] * x.shape[1] for x, _, _ in make())
        dec = n / (time.time() - t0)
        rep.add("e2e", f"OpenCV decode only ({workers} workers, {'160×90' if dry else '640×360'} MJPEG)", "ok", dec,
                "frames/s")
        if budget.left() < 90:
            rep.add("e2e", "OpenCV decode + CAER-Net train", "skipped", note="time budget")
            return
        torch.manual_seed(0)
        model = CAERNet().to(device).train()
        fwd = optimize(model, "train", compile=not dry)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        fs, cs, crop = (32, (40, 50), (4, 9, 32, 32)) if dry else (96, (128, 171), (8, 29, 112, 112))

        def epoch():
            frames_seen = 0
            for x, box, y in make():
                nb = x.shape[0]
                x = x.to(device, non_blocking=True).flatten(0, 1)
                box = box.to(device, non_blocking=True).flatten(0, 1)
                face, ctx = ops.face_context(x, box, face_size=(fs, fs), context_size=cs, crop=crop)
                face = face.view(nb, T, *face.shape[1:]).transpose(1, 2)
                ctx = ctx.view(nb, T, *ctx.shape[1:]).transpose(1, 2)
                _train_step(fwd, opt, face, ctx, torch.as_tensor(y, device=device))
                frames_seen += nb * T
            if device.type == "cuda":
                torch.cuda.synchronize()
            return frames_seen

        epoch()  # compile + warm workers
        t0 = time.time()
        n = epoch()
        rate = n / (time.time() - t0)
        rep.add("e2e", "OpenCV decode + face_context + CAER-Net train (optimize)", "ok", rate, "frames/s",
                ratio=rate / dec, ratio_of="of decode-only", note=f"batch {batch} clips × {T} frames")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="GPU acceptance run: build, gpu tests, benchmarks -> JSON + markdown")
    p.add_argument("out_dir", type=Path, help="folder for gpu_check.json, gpu_check.md and logs")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no compile: the plumbing only")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run (default 470)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of steps (default all: {','.join(STEPS)})")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 20; dry: 1)")
    p.add_argument("--verbose-tests", action="store_true", help="a row for every test, passed ones too")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"error: --steps: unknown step(s) {unknown}; choose from {list(STEPS)}", file=sys.stderr)
        return 2
    if args.out_dir.exists() and not args.out_dir.is_dir():
        print(f"error: {args.out_dir}: exists and is not a folder", file=sys.stderr)
        return 2
    budget = Budget(args.budget)
    t_start = time.time()
    meta = dict(dry_run=args.dry_run, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                python=platform.python_version(), host=platform.node(), steps=steps, budget_s=args.budget)
    rep = Report(args.out_dir, meta)
    import torch

    meta.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if args.dry_run:
        device = torch.device("cpu")
        meta["device"] = f"CPU ({os.cpu_count()} cores), dry run"
    elif not torch.cuda.is_available():
        rep.add("env", "CUDA device", "error", note="torch.cuda.is_available() is False (use --dry-run on a CPU)")
        meta.update(finished=True, elapsed_s=round(time.time() - t_start, 1))
        rep.write()
        return 1
    else:
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(0)
        meta["device"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the eager baselines
        torch.backends.cudnn.allow_tf32 = False
    rounds = args.rounds or (1 if args.dry_run else 20)
    rep.write()
    copy_bw = None
    for step in steps:
        if budget.left() < 20:
            rep.add(step, step, "skipped", note="time budget spent")
            continue
        try:
            if step == "build":
                step_build(rep, args, budget)
            elif step == "tests":
                step_tests(rep, args, budget)
            elif step == "copy":
                copy_bw = step_copy(rep, args, device, rounds)
            elif step == "ops":
                if copy_bw is None:
                    copy_bw = step_copy(rep, args, device, rounds)
                step_ops(rep, args, device, rounds, copy_bw, budget)
            elif step == "models":
                step_models(rep, args, device, rounds, budget)
            elif step == "e2e":
                step_e2e(rep, args, device, budget)
        except Exception as exc:  # one broken step must not cost the others
            rep.add(step, step, "error", note=f"{type(exc).__name__}: {exc} | {traceback.format_exc()[-600:]}")
        meta["elapsed_s"] = round(time.time() - t_start, 1)
    meta.update(finished=True, elapsed_s=round(time.time() - t_start, 1))
    rep.write()
    bad = [r for r in rep.rows if r["status"] in ("error", "failed")]
    print(f"wrote {args.out_dir / 'gpu_check.json'} and {args.out_dir / 'gpu_check.md'}: {len(rep.rows)} rows, "
          f"{len(bad)} errors/failures, {meta['elapsed_s']} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
