"""On a GPU, torch.compile traces the Triton attention_pool / adaptive_fusion kernels into its graphs
(docs/ops.md). Checked without a GPU by triton_capture_case.py, in a subprocess (it replaces triton's
driver)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_captured_for_gpu():
    env = dict(os.environ, CAER_FAST_TEST_TRITON_CAPTURE="1", OMP_NUM_THREADS="1")
    for var in ("TRITON_INTERPRET", "CAER_FAST_BACKEND"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/ops/triton_capture_case.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "1 passed" in out, out[-6000:]
