"""Build caer_fast._C with its CUDA kernels against a CUDA build of torch, without a GPU, and check it.

    python tools/cuda_build_check.py --venv DIR [--torch 2.13.0] [--json OUT.json]

DIR is a virtual environment holding a CUDA build of torch (made there when missing: ``--torch``
from PyPI, bypassing any local CPU wheel; several GB). The working tree (tracked and untracked,
not ignored files) is copied to DIR/caer_fast-src and installed there with
``pip install --no-build-isolation --no-deps -e .`` — nvcc compiles the CUDA sources for sm_80 and
sm_90 — so the repository's own CPU build in .venv is left alone. Then, in that venv:

* the extension loads (``torch`` first, then the .so by path: no other dependency is needed);
* every operator it registers in torch's dispatcher (``caer_fast::*`` from C++) that has a CPU
  kernel also has a CUDA kernel, and the CUDA entry points are there;
* the .so carries sm_80 and sm_90 machine code (cuobjdump --list-elf).

Prints one line per step and a JSON summary (also written to ``--json``); exit status 0 when all
passed, 1 when a check failed, 2 on bad input (``error:`` line).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHES = ("80", "90")

# Runs inside the CUDA venv: load the .so by path and report what the dispatcher holds.
PROBE = r"""
import glob, importlib.util, json, sys
import torch
so = sys.argv[1]
spec = importlib.util.spec_from_file_location("caer_fast._C", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
ops = {}
for name in sorted(torch._C._dispatch_get_all_op_names()):
    if name.startswith("caer_fast::"):
        ops[name] = {k: torch._C._dispatch_has_kernel_for_dispatch_key(name, k) for k in ("CPU", "CUDA")}
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "ops": ops,
                  "functions": sorted(n for n in dir(mod) if not n.startswith("__"))}))
"""


def _error(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _step(summary: dict, name: str, ok: bool, detail: str = "", **extra):
    summary["steps"].append({"step": name, "ok": ok, "detail": detail, **extra})
    print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def _clean_pip_env():
    """pip that asks PyPI only: no local find-links (they hold a CPU torch), no torch cap."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    if os.environ.get("PIP_CERT"):
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    return env


def make_venv(venv: Path, torch_version: str):
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # a current pip: older ones run setup.py develop, which re-enters pip with build isolation (no torch there)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--index-url", "https://pypi.org/simple",
                    "--upgrade", "pip"], check=True, env=_clean_pip_env())
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--index-url", "https://pypi.org/simple",
                    f"torch=={torch_version}", "setuptools", "wheel", "ninja"], check=True, env=_clean_pip_env())


def copy_tree(dst: Path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    if dst.exists():  # a fresh copy: a stale source (a file since removed) would be compiled in, a stale .so pass
        shutil.rmtree(dst)
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--venv", type=Path, required=True, help="virtual environment with a CUDA build of torch")
    p.add_argument("--torch", default=None, help="make the venv with this torch from PyPI when it is missing")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    p.add_argument("--jobs", default=os.environ.get("MAX_JOBS", "2"), help="parallel compile jobs (MAX_JOBS)")
    args = p.parse_args(argv)
    args.venv = args.venv.absolute()  # the build runs in a copy of the tree: a relative path would miss

    py = args.venv / "bin" / "python"
    nvcc = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))
    if nvcc is None:
        _error("nvcc is not on PATH (nor in /usr/local/cuda/bin): the CUDA sources cannot be compiled")
    if not py.exists():
        if not args.torch:
            _error(f"{args.venv}: no virtual environment there (pass --torch VERSION to make one)")
        make_venv(args.venv, args.torch)
    info = subprocess.run([str(py), "-c", "import torch, json; print(json.dumps([torch.__version__, "
                           "torch.version.cuda]))"], capture_output=True, text=True)
    if info.returncode != 0:
        _error(f"{py}: cannot import torch: {info.stderr.strip().splitlines()[-1:]}")
    torch_version, torch_cuda = json.loads(info.stdout)
    if torch_cuda is None:
        _error(f"{args.venv}: torch {torch_version} is a CPU build; a CUDA build is needed")

    summary = {"torch": torch_version, "torch_cuda": torch_cuda, "nvcc": nvcc, "steps": []}
    src = args.venv / "caer_fast-src"
    copy_tree(src)
    env = _clean_pip_env()
    # the toolkit root that holds lib64/libcudart.so (here /usr/local/cuda: nvcc's resolved path,
    # /usr/local/cuda-13.0, lacks it and the link failed with "cannot find -lcudart")
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", str(Path(nvcc).resolve().parent.parent)]
    cuda_home = next((h for h in homes if h and (Path(h) / "lib64" / "libcudart.so").exists()), homes[-1])
    env.update(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST="8.0;9.0",
               MAX_JOBS=str(args.jobs), CAER_FAST_BUILD_CUDA="1")
    t0 = time.time()
    build = subprocess.run([str(py), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                           cwd=src, env=env, capture_output=True, text=True)
    summary["build_s"] = round(time.time() - t0, 1)
    (args.venv / "caer_fast-build.log").write_text(build.stdout + build.stderr)
    ok = _step(summary, "pip install --no-build-isolation -e . (CPU + CUDA, nvcc)", build.returncode == 0,
               f"{summary['build_s']} s" + ("" if build.returncode == 0 else
                                            f"; log {args.venv / 'caer_fast-build.log'}:\n"
                                            + (build.stdout + build.stderr)[-3000:]))
    sos = sorted(src.glob("caer_fast/_C*.so"))
    if ok:
        ok = _step(summary, "extension file", len(sos) == 1, str(sos[0]) if sos else "no caer_fast/_C*.so")
    if ok:
        probe = subprocess.run([str(py), "-c", PROBE, str(sos[0])], capture_output=True, text=True,
                               cwd=args.venv, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        ok = _step(summary, "import", probe.returncode == 0, probe.stderr.strip()[-2000:])
    if ok:
        got = json.loads(probe.stdout.strip().splitlines()[-1])
        summary["ops"], summary["functions"] = got["ops"], got["functions"]
        cpp_ops = {name: keys for name, keys in got["ops"].items() if keys["CPU"]}
        if cpp_ops:  # ops defined with TORCH_LIBRARY: each CPU kernel has its CUDA twin
            missing = [name for name, keys in cpp_ops.items() if not keys["CUDA"]]
            _step(summary, "dispatcher: CUDA kernel of every op with a CPU kernel", not missing,
                  f"{len(cpp_ops) - len(missing)}/{len(cpp_ops)} ops" + (f"; missing {missing}" if missing else ""))
        else:  # pybind entry points only
            cuda_fns = [f for f in got["functions"] if f.endswith("_cuda")]
            _step(summary, "CUDA entry points in _C (no dispatcher ops registered from C++)", bool(cuda_fns),
                  ", ".join(cuda_fns))
        # the toolkit here ships none: Triton's wheel bundles one (triton/backends/nvidia/bin)
        tools = [shutil.which("cuobjdump"), str(Path(cuda_home) / "bin" / "cuobjdump"),
                 str(Path(nvcc).resolve().parent / "cuobjdump")]
        try:
            import triton
            tools.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
        except ImportError:
            pass
        cuobjdump = next((t for t in tools if t and Path(t).is_file()), None)
        elfs = "" if cuobjdump is None else subprocess.run([cuobjdump, "--list-elf", str(sos[0])],
                                                           capture_output=True, text=True).stdout
        have = {a for a in ARCHES if f"sm_{a}" in elfs}
        _step(summary, "machine code for sm_80 and sm_90", have == set(ARCHES),
              f"{elfs.count('.cubin')} cubins: " + ", ".join(f"sm_{a}" for a in sorted(have)))
    summary["ok"] = all(s["ok"] for s in summary["steps"]) and len(summary["steps"]) >= 5
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
