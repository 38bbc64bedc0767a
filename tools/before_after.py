"""Ops and models speed of two checkouts, measured in one run: the public ops and models of each,
timed in alternating subprocesses (A B A B …) so both see the same machine load.

    python tools/before_after.py --before ../old-checkout            # this checkout is "after"
    python tools/before_after.py --before OLD --after NEW --rounds 5 --json out.json

Each checkout needs its extension built (``pip install -e .`` or ``python setup.py build_ext --inplace``).
Only names both revisions share are timed: ``caer_fast.ops.attention_pool`` / ``adaptive_fusion`` (batch
32, and batch 1: the small eager calls) / ``face_context`` on their automatic backend (``cpp`` on CPU), the eager torch references, ``CAERSNet``
and ``CAERNet`` forward and train steps, and ``accelerate`` on the community model (caer_fast/testing/community_model.py).
Every case's output is checked against its reference before it is timed. The workers run with glibc's
malloc thresholds fixed (``--glibc-malloc-defaults`` to leave them moving). The table gives each case's
median per revision, after/before, and each op's speed-up over its reference in both revisions.
``--clock thread`` times with the worker's CPU thread time instead of the wall clock: on a shared machine
it leaves out the time other processes hold the core (not their effect on the caches).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


# ---- the worker: runs inside one checkout -------------------------------------------------------
_clock = time.perf_counter


def _median_time(fn, *args, repeat: int, number: int = 1) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeat):
        t = _clock()
        for _ in range(number):
            fn(*args)
        times.append((_clock() - t) / number)
    return statistics.median(times)


def worker(cases: list, repeat: int, clock: str = "wall") -> dict:
    global _clock
    _clock = time.thread_time if clock == "thread" else time.perf_counter
    import torch

    import caer_fast
    import caer_fast.ops as ops
    from caer_fast.models import CAERNet, CAERSNet
    from caer_fast.ops.adaptive_fusion import adaptive_fusion_reference
    from caer_fast.ops.attention_pool import attention_pool_reference
    from caer_fast.ops.face_context import face_context_reference

    # the reference model of THIS checkout, loaded by path: both revisions are timed against the same one
    community = runpy.run_path(str(HERE / "caer_fast" / "testing" / "community_model.py"))
    CommunityCAERSNet, randomize_bn_ = community["CommunityCAERSNet"], community["randomize_bn_"]

    g = torch.Generator().manual_seed(0)
    out = {}

    def close(a, b, what, atol=1e-4):
        a, b = (a if isinstance(a, (tuple, list)) else (a,)), (b if isinstance(b, (tuple, list)) else (b,))
        for x, y in zip(a, b):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-3, atol=atol, msg=lambda m: f"{what}: {m}")

    def pool_case(shape, backward):
        f = torch.randn(shape, generator=g)
        x = torch.randn(shape[0], 1, *shape[2:], generator=g) * 3
        gr = torch.randn(shape[:2], generator=g)
        if backward:
            f.requires_grad_(), x.requires_grad_()
            run = lambda fn: torch.autograd.grad(fn(f, x), (f, x), gr)  # noqa: E731
        else:
            def run(fn):
                with torch.no_grad():
                    return fn(f, x)
        return run

    def fusion_case(n, cf, cc, backward):
        t = [torch.randn(n, cf, generator=g), torch.randn(n, cc, generator=g), torch.randn(n, 1, generator=g),
             torch.randn(n, 1, generator=g)]
        gr = torch.randn(n, cf + cc, generator=g)
        if backward:
            for a in t:
                a.requires_grad_()
            run = lambda fn: torch.autograd.grad(fn(*t), t, gr)  # noqa: E731
        else:
            def run(fn):
                with torch.no_grad():
                    return fn(*t)
        return run

    def op_pair(name, run, fast, reference):
        close(run(fast), run(reference), name)
        out[name] = _median_time(run, fast, repeat=repeat, number=20)
        out[name + " [reference]"] = _median_time(run, reference, repeat=repeat, number=20)

    for case in cases:
        if case.startswith("attention_pool"):
            n = 1 if " b1 " in case else 32  # b1: one image's call, where the front door's overhead shows
            shape = (n, 256, 7, 7) if "7x7" in case and "2x7x7" not in case else (n, 256, 2, 7, 7)
            op_pair(case, pool_case(shape, "bwd" in case), ops.attention_pool, attention_pool_reference)
        elif case.startswith("adaptive_fusion"):
            n = 1 if " b1 " in case else 32
            op_pair(case, fusion_case(n, 256, 256, "bwd" in case), ops.adaptive_fusion, adaptive_fusion_reference)
        elif case == "face_context 32x400x712":
            frames = torch.randint(0, 256, (32, 400, 712, 3), dtype=torch.uint8, generator=g)
            boxes = torch.tensor([[200, 80, 330, 230]] * 32)
            crop = (8, 29, 112, 112)
            run = lambda fn: fn(frames, boxes, (96, 96), (128, 171), crop)  # noqa: E731
            close(run(ops.face_context), run(face_context_reference), case, atol=2e-2)
            out[case] = _median_time(run, ops.face_context, repeat=repeat, number=3)
            out[case + " [reference]"] = _median_time(run, face_context_reference, repeat=repeat, number=1)
        elif case.startswith("CAERSNet") or case.startswith("community"):
            torch.manual_seed(0)
            face, ctx = torch.randn(32, 3, 96, 96, generator=g), torch.randn(32, 3, 112, 112, generator=g)
            if case.startswith("community"):
                model = randomize_bn_(CommunityCAERSNet(), torch.Generator().manual_seed(1)).eval()
                with torch.inference_mode():
                    want = model(face, ctx)
                model = caer_fast.accelerate(model)
            else:
                model = CAERSNet().eval()
                want = None
            if "train" in case:
                model.train()
                labels = torch.randint(0, 7, (32,), generator=g)

                def run():
                    model.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(model(face, ctx), labels).backward()
            else:
                def run():
                    with torch.inference_mode():
                        return model(face, ctx)
                if want is not None:
                    close(run(), want, case, atol=1e-3)
            out[case] = _median_time(run, repeat=repeat)
        elif case.startswith("CAERNet"):
            torch.manual_seed(0)
            model = CAERNet().eval()
            face, ctx = torch.randn(2, 3, 16, 96, 96, generator=g), torch.randn(2, 3, 16, 112, 112, generator=g)

            def run():
                with torch.inference_mode():
                    return model(face, ctx)
            out[case] = _median_time(run, repeat=max(2, repeat // 2))
        else:
            raise ValueError(f"unknown case {case!r}")
    out["_backend"] = ops.backend("cpu") if hasattr(ops, "backend") else "?"
    out["_caer_fast"] = caer_fast.__file__
    return out


# the b1 rows are the small eager calls (one image): a few µs each, mostly the front door and the dispatcher
CASES = ["attention_pool 7x7 fwd", "attention_pool 7x7 fwd+bwd", "attention_pool 2x7x7 fwd",
         "attention_pool 2x7x7 fwd+bwd", "attention_pool b1 7x7 fwd", "attention_pool b1 7x7 fwd+bwd",
         "adaptive_fusion fwd", "adaptive_fusion fwd+bwd", "adaptive_fusion b1 fwd", "adaptive_fusion b1 fwd+bwd",
         "face_context 32x400x712", "CAERSNet b32 inference", "CAERSNet b32 train step",
         "community+accelerate b32 inference", "CAERNet video b2 inference"]


def _machine(threads: int) -> dict:
    """The CPU's name and vector flags, and its fp32 matmul rate at ``threads`` (bench/conftest.py prints it too)."""
    import torch

    from caer_fast.testing.timing import matmul_gflops

    torch.set_num_threads(threads)
    caps = torch.cpu.get_capabilities()
    return {"cpu": caps.get("cpu_name", "?"), "flags": sorted(k for k, v in caps.items() if v is True),
            "matmul_gflops": matmul_gflops()}


# glibc moves its mmap threshold with the history of frees, so whether a 1.6 MB gradient buffer is
# fresh (page-faulting) memory differs from process to process, and one backward call's time with it
# (bench/RESULTS.md, "op layer"). Fixed thresholds give both checkouts the same allocator.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _run_worker(checkout: Path, cases, repeat, threads, steady_malloc: bool = True, clock: str = "wall") -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(threads))
    if steady_malloc:
        env.update(STEADY_MALLOC)
    env.pop("CAER_FAST_BACKEND", None)
    code = (f"import json, runpy, sys; m = runpy.run_path({str(Path(__file__).resolve())!r}); "
            f"print('@@' + json.dumps(m['worker']({cases!r}, {repeat}, {clock!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker in {checkout} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next(ln[2:] for ln in proc.stdout.splitlines() if ln.startswith("@@")))
    if not Path(result["_caer_fast"]).resolve().is_relative_to(checkout.resolve()):
        sys.exit(f"worker in {checkout} imported caer_fast from {result['_caer_fast']}; is another copy installed?")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="checkout of the earlier revision (extension built)")
    p.add_argument("--after", type=Path, default=HERE, help="checkout of the later revision (default: this one)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per revision (default 3)")
    p.add_argument("--repeat", type=int, default=7, help="timed repeats per case in each round (default 7)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the workers (default 1)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--json", type=Path, help="also write every round's raw numbers here")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall clock (default) or the worker's CPU thread time (a shared, loaded machine)")
    p.add_argument("--glibc-malloc-defaults", action="store_true",
                   help="leave glibc's moving mmap/trim thresholds in the workers (default: fixed at 1 GiB)")
    a = p.parse_args(argv)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    machine = _machine(a.threads)
    print(f"CPU {machine['cpu']}: {' '.join(machine['flags'])}; fp32 matmul {machine['matmul_gflops']:.0f} GFLOP/s "
          f"at {a.threads} thread(s), measured now", file=sys.stderr, flush=True)
    runs = {"before": [], "after": []}
    for r in range(a.rounds):
        for label, checkout in (("before", a.before), ("after", a.after)) if r % 2 == 0 else \
                (("after", a.after), ("before", a.before)):
            runs[label].append(_run_worker(checkout, cases, a.repeat, a.threads, not a.glibc_malloc_defaults,
                                           a.clock))
            print(f"round {r + 1}/{a.rounds} {label} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    med = {k: {c: statistics.median(run[c] for run in runs[k]) for c in runs[k][0] if not c.startswith("_")}
           for k in runs}
    print(f"\nbefore: {a.before} (backend {runs['before'][0]['_backend']}); after: {a.after} "
          f"(backend {runs['after'][0]['_backend']}); {a.threads} thread(s), {a.rounds} rounds, {a.clock} clock, "
          f"load "
          f"{os.getloadavg()[0]:.1f}; malloc thresholds "
          f"{'glibc defaults' if a.glibc_malloc_defaults else 'fixed'}; CPU {machine['cpu']} ({' '.join(machine['flags'])}), fp32 matmul "
          f"{machine['matmul_gflops']:.0f} GFLOP/s at the start\n")
    print("| case | before ms | after ms | after speed vs before | vs reference, before → after |")
    print("|---|---|---|---|---|")
    for c in cases:
        b, f = med["before"][c], med["after"][c]
        ref = ""
        if c + " [reference]" in med["before"]:
            rb, rf = med["before"][c + " [reference]"], med["after"][c + " [reference]"]
            ref = f"{rb / b:.2f}× → {rf / f:.2f}×"
        print(f"| {c} | {b * 1e3:.3f} | {f * 1e3:.3f} | {b / f:.2f}× | {ref} |")
    if a.json:
        a.json.write_text(json.dumps({"runs": runs, "medians": med, "threads": a.threads, "machine": machine},
                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
