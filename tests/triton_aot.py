"""Every Triton kernel of caer_fast.kernels, compiled ahead of time to cubin for sm_80 and sm_90, no GPU.

Triton's own compiler does the work (``JITFunction.warmup``: the same specialisation and pipeline
as a launch, stopping before the launch) against a driver that only names the target; its bundled
``ptxas -v`` is then run on the PTX it produced, with the flags Triton uses, for registers, stack
and spills. Shared memory is what Triton asks for at launch (``metadata.shared``).

    python tests/triton_aot.py [--arch 80 90] [--json OUT] [--markdown]

Each kernel is compiled with every configuration its host code can launch it with (LAUNCHES:
pointer dtypes, constexpr switches, unit / non-unit strides, the face_context tap-window widths
up to 32 taps; --full: up to a 4K frame). Run in its own process (tests/test_triton_aot.py): the target-only driver must
not leak into a session, and TRITON_INTERPRET must be unset at triton's import.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

F32, F16, BF16, U8, I32 = torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int32
FLOATS = (F32, F16, BF16)
ARCHES = (80, 90)
# cudaDevAttrMaxSharedMemoryPerBlockOptin (what Triton checks at the first launch): A100 / H100-H200
SHARED_LIMIT = {80: 166912, 90: 232448}
REGS_PER_SM_BLOCK = 65536  # 64K 32-bit registers per block on sm_80 / sm_90
MAX_REGS_PER_THREAD = 255
# Default: every constexpr switch, layout and tap width, each with every dtype where the dtype changes
# the loads' width (pointer inputs) — not the full dtype × switch × width product; --full compiles that.
FULL = False


def _name(dtype):
    return str(dtype).replace("torch.", "")


# ---- what the host code launches --------------------------------------------------------------
def _attention_pool():
    from caer_fast.kernels import attention_pool as ap

    bc, bs = dict(BLOCK_C=ap.BLOCK_C), dict(BLOCK_S=ap.BLOCK_S)
    c, s = 256, 49
    layouts = {"contiguous": (c * s, s, 1), "channels_last": (c * s, 1, c)}  # features N×C×S strides
    for dt, (layout, fst) in itertools.product(FLOATS, layouts.items()):
        yield ap._fwd_kernel, f"{_name(dt)} {layout}", (dt, dt, dt, F32, c, s, 1.0 / s, *fst, s, 1), {**bc, **bs}
    for dt, out in itertools.product(FLOATS, ("same", F32)):  # attention map in features.dtype / float32
        out_dt = dt if out == "same" else out
        yield ap._attention_kernel, f"{_name(dt)} -> {_name(out_dt)}", (dt, F32, out_dt, s, s, 1), bs
    combos = itertools.product(FLOATS, ("same", F32), (True, False), layouts.items())
    if not FULL:  # every dtype × both switches, contiguous; float32 grads and channels_last with grad_attention
        combos = [c for c in combos if (c[1] == "same" and c[3][0] == "contiguous") or c[2]]
    for dt, g_dt, has_ga, (layout, fst) in combos:
        g_dt = dt if g_dt == "same" else g_dt  # eager: grad in features.dtype; compiled op: float32
        # grad_out, features, attention, grad_attention, dot, grad_features, grad_logits, C, S, 1/S, strides
        yield (ap._bwd_kernel, f"{_name(dt)} grad {_name(g_dt)} GA={has_ga:d} {layout}",
               (g_dt, dt, dt, dt, F32, dt, dt, c, s, 1.0 / s, *fst),
               dict(HAS_GA=has_ga, **bc, **bs))


def _adaptive_fusion():
    from caer_fast.kernels import adaptive_fusion as af

    cf = cc = 256
    # (features dtype, scores dtype): same dtypes, and fp32 scores beside half features (promoted output)
    combos = [(dt, dt) for dt in FLOATS] + [(F16, F32), (BF16, F32)]
    for dt, st in combos:
        out = torch.promote_types(dt, st)
        yield (af._fwd_kernel, f"{_name(dt)} scores {_name(st)}", (dt, dt, st, st, out, F32, cf, cc, cf, cc, 1, 1),
               dict(BLOCK=af.BLOCK))
        for has_gw in (False, True):
            yield (af._bwd_kernel, f"{_name(dt)} scores {_name(st)} HAS_GW={has_gw:d}",
                   (out, F32, dt, dt, F32, dt, dt, st, st, cf, cc, cf, cc), dict(HAS_GW=has_gw, BLOCK=af.BLOCK))


def _face_context():
    from caer_fast.kernels import face_context as fc

    # K taps per output pixel = 2·ceil(in/out) + 1 antialiased (2 without). The kernel loops over the x taps
    # in tiles of KXC = min(next power of two of K, MAX_TAP_CHUNK): these are every width any input launches.
    # K = 11 for CAER's 712×400 frames (KXC 8, two tiles); a 4K frame to a 96-wide face needs K ≈ 81 (11 tiles).
    chunks = [c for c in (2, 4, 8, 16, 32, 64) if c <= fc.MAX_TAP_CHUNK]
    modes = {"face": dict(MASK_BOX=False, ZERO_INVALID=True), "context": dict(MASK_BOX=True, ZERO_INVALID=False)}
    combos = itertools.product(FLOATS, modes.items(), chunks)
    if not FULL:  # every width in float32; half outputs at the narrowest and the widest tile
        combos = [c for c in combos if c[0] == F32 or c[2] in (chunks[0], chunks[-1])]
    for dt, (mode, flags), kxc in combos:
        k = 81 if kxc == chunks[-1] else max(kxc // 2 + 1, 2) if kxc > 2 else kxc  # widest: several tiles
        per_sample = 1 if mode == "face" else 0
        yield (fc._resize_kernel, f"{mode} {_name(dt)} KXC={kxc}",
               (U8, dt, I32, F32, I32, F32, I32, I32, 400, 712, 96, 96, k, k, per_sample,
                0.485, 0.456, 0.406, 0.229, 0.224, 0.225), dict(KXC=kxc, BLOCK=fc.BLOCK, **flags))


LAUNCHES = {"attention_pool": _attention_pool, "adaptive_fusion": _adaptive_fusion, "face_context": _face_context}


def launched_kernels():
    """{module: {kernel name}}: every @triton.jit function of caer_fast.kernels that another one does not call."""
    import importlib
    import pkgutil

    import triton

    import caer_fast.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"caer_fast.kernels.{info.name}")
        jits = {n: f for n, f in vars(mod).items() if isinstance(f, triton.runtime.jit.JITFunction)
                and f.fn.__module__ == mod.__name__}
        srcs = {n: inspect.getsource(f.fn) for n, f in jits.items()}
        helpers = {n for n in jits if any(re.search(rf"\b{n}\(", s) for m, s in srcs.items() if m != n)}
        found[info.name] = set(jits) - helpers
    return found


# ---- compiling --------------------------------------------------------------------------------
class TargetOnlyDriver:
    """Enough of a Triton driver to compile for ``arch``; anything that would touch a GPU raises."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_device(self):
        return self.arch  # the JIT caches per device: one cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def __getattr__(self, name):
        raise RuntimeError(f"no GPU here: triton driver.{name}")


PTXAS_INFO = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, arch: int, extra=()):
    """Triton's bundled ptxas -v on ``ptx`` with the flags Triton compiles with: registers, stack, spills."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", *extra,
                               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    regs, spill = PTXAS_INFO.search(log), PTXAS_SPILL.search(log)
    return dict(registers=int(regs.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)))


def problems(row, arch):
    """Why a compiled kernel would fail or crawl on sm_``arch``: spills, shared memory, registers."""
    out = []
    threads = 32 * row["num_warps"]
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["shared"] > SHARED_LIMIT[arch]:
        out.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[arch]} B")
    if row["registers"] > MAX_REGS_PER_THREAD or row["registers"] * threads > REGS_PER_SM_BLOCK:
        out.append(f"{row['registers']} registers × {threads} threads")
    return out


def compile_all(arches=ARCHES):
    import triton

    rows = []
    covered = {}
    for op, gen in LAUNCHES.items():
        for arch in arches:
            triton.runtime.driver.set_active(TargetOnlyDriver(arch))  # this process only: never reset
            for kernel, config, args, constexprs in gen():
                covered.setdefault(op, set()).add(kernel.fn.__name__)
                row = dict(op=op, kernel=kernel.fn.__name__, config=config, arch=f"sm_{arch}")
                t0 = time.time()
                try:
                    compiled = kernel.warmup(*args, grid=(1,), **constexprs)
                    row.update(shared=int(compiled.metadata.shared), num_warps=compiled.metadata.num_warps,
                               cubin_bytes=len(compiled.asm["cubin"]), **ptxas_report(compiled.asm["ptx"], arch))
                    row["error"] = "; ".join(problems(row, arch))
                    if not any("_ptx" in r for r in rows):
                        row["_ptx"] = compiled.asm["ptx"]
                except Exception as exc:  # a compile error is a result, reported per config
                    row["error"] = f"compile error: {type(exc).__name__}: {str(exc)[:2000]}"
                row["seconds"] = round(time.time() - t0, 2)
                rows.append(row)
                print(f"{op}.{row['kernel']} [{config}] {row['arch']}: {row.get('registers', '?')} regs, "
                      f"{row['seconds']} s {row['error']}", file=sys.stderr, flush=True)
    # the spill check can fail: the first kernel's PTX capped at 24 registers (.maxnreg: Triton's .reqntid
    # made ptxas ignore --maxrregcount here) must report spills
    first = next((r for r in rows if "_ptx" in r), None)
    squeezed = None
    if first is not None:
        ptx = re.sub(r"\.reqntid \d+", ".maxnreg 24", first.pop("_ptx"))
        squeezed = dict(kernel=first["kernel"], config=first["config"], arch=first["arch"],
                        **ptxas_report(ptx, int(first["arch"][3:])))
    for r in rows:
        r.pop("_ptx", None)
    found = launched_kernels()
    uncovered = sorted(f"{op}.{k}" for op, ks in found.items() for k in ks - covered.get(op, set()))
    return dict(triton=triton.__version__, torch=torch.__version__, arches=[f"sm_{a}" for a in arches], full=FULL,
                squeezed=squeezed,
                rows=rows, uncovered=uncovered)


def markdown(result) -> str:
    """Per kernel and arch: configs compiled, the register / shared-memory range over them, spills."""
    groups = {}
    for r in result["rows"]:
        groups.setdefault((r["op"], r["kernel"], r["arch"]), []).append(r)
    lines = [f"Triton {result['triton']}, cubin via Triton's bundled ptxas; per kernel, over every launch config:",
             "", "| op | kernel | target | configs | registers | shared memory (B) | stack (B) | spills | errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (op, kernel, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if "registers" in r]

        def span(key):
            vals = [r[key] for r in ok]
            return "-" if not vals else (f"{min(vals)}" if min(vals) == max(vals) else f"{min(vals)}–{max(vals)}")
        spills = sum(r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in ok)
        lines.append(f"| {op} | {kernel} | {arch} | {len(rs)} | {span('registers')} | {span('shared')} | "
                     f"{span('stack')} | {spills} | {sum(bool(r['error']) for r in rs)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="AOT-compile every Triton kernel for sm_80 / sm_90 (no GPU)")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHES))
    p.add_argument("--json", default=None, help="write the per-config results here")
    p.add_argument("--markdown", action="store_true", help="print the per-kernel table")
    p.add_argument("--full", action="store_true", help="the full dtype × switch × width product")
    args = p.parse_args(argv)
    global FULL
    FULL = args.full
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set: kernels would be interpreted, not compiled", file=sys.stderr)
        return 2
    from caer_fast.ops._dispatch import _kernels

    _kernels("attention_pool")  # makes caer_fast.kernels importable in a `setup.py develop` install too
    result = compile_all(tuple(args.arch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        print(markdown(result))
    bad = [r for r in result["rows"] if r["error"]]
    for r in bad:
        print(f"FAIL {r['op']}.{r['kernel']} [{r['config']}] {r['arch']}: {r['error']}", file=sys.stderr)
    if result["uncovered"]:
        print(f"FAIL kernels with no launch configs in tests/triton_aot.py: {result['uncovered']}", file=sys.stderr)
    print(f"{len(result['rows'])} compiles, {len(bad)} failed, {len(result['uncovered'])} kernels uncovered")
    return 1 if bad or result["uncovered"] else 0


if __name__ == "__main__":
    sys.exit(main())
