"""The CUDA build of caer_fast._C, verified without a GPU (tools/cuda_build_check.py): against a CUDA
build of torch in its own venv, ``pip install --no-build-isolation -e .`` compiles the CPU + CUDA
extension with nvcc, the .so loads, the dispatcher holds each op's CUDA kernel, and it carries sm_80 and
sm_90 code. Opt-in (several GB of torch, minutes of nvcc): CAER_FAST_TEST_CUDA_BUILD=1, with
CAER_FAST_CUDA_VENV (default .venv-cuda, made when missing) and CAER_FAST_CUDA_TORCH (default 2.13.0).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "cuda_build_check.py"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CAER_FAST_TEST_CUDA_BUILD") != "1",
                    reason="downloads a CUDA torch and runs nvcc for minutes: set CAER_FAST_TEST_CUDA_BUILD=1")
def test_cuda_build_against_cuda_torch(tmp_path):
    venv = Path(os.environ.get("CAER_FAST_CUDA_VENV", ROOT / ".venv-cuda"))
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--venv", str(venv), "--torch",
                           os.environ.get("CAER_FAST_CUDA_TORCH", "2.13.0"), "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=5400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["torch_cuda"] and len(result["steps"]) >= 5
    assert all(s["ok"] for s in result["steps"]), result["steps"]


def test_cuda_build_check_refuses_a_cpu_torch_and_a_missing_venv(tmp_path):
    """Bad input: one ``error:`` line naming the venv, exit status 2 (nothing is built)."""
    cpu_venv = Path(sys.executable).parent.parent  # this session's torch: the CPU build
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    for venv, words in ((cpu_venv, "CPU build"), (tmp_path / "nowhere", "no virtual environment")):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--venv", str(venv)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error:"), proc.stderr
        assert str(venv) in err[0] and words in err[0], err[0]
