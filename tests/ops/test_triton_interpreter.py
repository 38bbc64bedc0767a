"""The triton cases of tests/ops under ``TRITON_INTERPRET=1``, on CPU tensors, in a subprocess:
the variable is read once, at triton's import, and must not leak into this session's other tests
(torch.compile of the other backends). Tiny shapes: the interpreter is 400-1000× slower than torch."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the triton cases run on it, in this session")
def test_triton_cases_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("CAER_FAST_BACKEND", None)
    files = [str(p.relative_to(ROOT)) for p in sorted(Path(__file__).parent.glob("test_*.py"))
             if p.name not in ("test_triton_interpreter.py", "test_backends.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "triton",
                           *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out[-8000:]}"
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= 40, out[-3000:]
