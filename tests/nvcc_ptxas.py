"""The CUDA kernel files (csrc/cuda, torch-free) through ``nvcc -Xptxas -v`` for sm_80 and sm_90.

    python tests/nvcc_ptxas.py [--markdown]

Per kernel (every template instantiation): registers, stack frame, spill stores / loads, static
shared memory, as ptxas reports them. tests/test_cuda_sources.py fails on any spill; the table goes
in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
ARCHES = (80, 90)
TORCH_INCLUDES = ("#include <torch", "#include <ATen", "#include <c10")
# the flags torch's CUDAExtension adds, so half/bf16 code compiles here as it will there
FLAGS = ["-O3", "--use_fast_math", "-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", f"-I{CUDA_DIR.parent}"]

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def kernel_files():
    """The .cu files that include no torch header (the kernels; the torch binding file is separate)."""
    return sorted(p.name for p in CUDA_DIR.glob("*.cu") if not any(t in p.read_text() for t in TORCH_INCLUDES))


def gencode(arch: int):
    return ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def short(demangled: str) -> str:
    """``void caer_fast::cuda::(anonymous namespace)::forward_kernel<float>(...)`` -> ``forward_kernel<float>``."""
    head = demangled.replace("(anonymous namespace)::", "")
    depth, end = 0, len(head)
    for i, ch in enumerate(head):  # cut at the parameter list (the first '(' outside template brackets)
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            end = i
            break
    return head[:end].replace("void ", "").replace("caer_fast::cuda::", "")


def parse(log: str):
    """[{kernel, arch, registers, stack, spill_stores, spill_loads, smem}] from a ``ptxas -v`` log."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = dict(mangled=m.group(1), arch=f"sm_{m.group(2)}")
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            cur.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        row["kernel"] = short(name)
    return rows


def compile_file(name: str, arch: int, workdir, timeout=300):
    """(returncode, log, rows) of ``nvcc -Xptxas -v -c`` on csrc/cuda/``name`` for sm_``arch``."""
    proc = subprocess.run([NVCC, *gencode(arch), *FLAGS, "-Xptxas", "-v", "-c", str(CUDA_DIR / name), "-o",
                           str(Path(workdir) / f"{name}.sm{arch}.o")], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    rows = parse(log)
    for r in rows:
        r["file"] = name
    return proc.returncode, log, rows


def markdown(rows) -> str:
    lines = [f"nvcc {nvcc_version()} `-Xptxas -v`, per kernel instantiation:", "",
             "| file | kernel | target | registers | smem (B) | stack (B) | spill stores / loads (B) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["file"], r["kernel"], r["arch"])):
        lines.append(f"| {r['file']} | `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['smem']} | {r['stack']} "
                     f"| {r['spill_stores']} / {r['spill_loads']} |")
    return "\n".join(lines)


def nvcc_version() -> str:
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


def main(argv=None):
    p = argparse.ArgumentParser(description="nvcc -Xptxas -v on the CUDA kernel files, sm_80 and sm_90")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if NVCC is None:
        print("error: nvcc is not on PATH", file=sys.stderr)
        return 2
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in kernel_files():
            for arch in ARCHES:
                rc, log, got = compile_file(name, arch, tmp)
                rows += got
                if rc != 0:
                    failed.append(f"{name} sm_{arch}:\n{log[-3000:]}")
    spills = [r for r in rows if r.get("spill_stores") or r.get("spill_loads")]
    if args.markdown:
        print(markdown(rows))
    for f in failed:
        print(f"FAIL compile {f}", file=sys.stderr)
    for r in spills:
        print(f"FAIL spill {r['file']} {r['kernel']} {r['arch']}", file=sys.stderr)
    return 1 if failed or spills else 0


if __name__ == "__main__":
    sys.exit(main())
