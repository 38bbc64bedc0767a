"""The triton backend: interpreter cases in a subprocess (CPU), compiled kernels on a GPU (gpu tier)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from op_checks import check_adaptive_fusion, check_attention_pool, check_face_context

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter_cases():
    """tests/triton_interp_cases.py under TRITON_INTERPRET=1, in its own process so the variable
    (read once, at triton's import) cannot leak into torch.compile tests of this session."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("CAER_FAST_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/triton_interp_cases.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out[-6000:]}"
    assert " passed" in out and "skipped" not in out.split("\n")[-2], out[-2000:]


def test_unavailable_without_gpu_or_interpreter(monkeypatch):
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("a GPU or the interpreter is present: the backend is available here")
    from caer_fast.ops import _triton

    ok, why = _triton.is_available()
    assert not ok and "TRITON_INTERPRET" in why


# ---- gpu tier: the compiled kernels on CUDA tensors ------------------------------------------
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape, kw", [((4, 256, 7, 7), {}), ((2, 256, 16, 7, 7), {"return_attention": True}),
                                       ((3, 64, 14, 14), {"channels_last": True}),
                                       ((2, 32, 9, 9), {"logit_scale": 1e4})])
def test_gpu_attention_pool(shape, kw, dtype):
    from caer_fast.kernels.attention_pool import attention_pool

    check_attention_pool(attention_pool, shape, dtype, "cuda", **kw)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_adaptive_fusion(dtype):
    from caer_fast.kernels.adaptive_fusion import adaptive_fusion

    check_adaptive_fusion(adaptive_fusion, 32, 256, 256, dtype, "cuda", return_weights=True)
    check_adaptive_fusion(adaptive_fusion, 5, 100, 300, dtype, "cuda", strided=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("antialias", [True, False])
def test_gpu_face_context(antialias, dtype):
    from caer_fast.kernels.face_context import face_context

    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 400, 712, 3), dtype=torch.uint8, generator=gen)
    boxes = torch.tensor([[300, 80, 420, 220], [0, 0, 0, 0], [690, 390, 800, 500]])
    check_face_context(face_context, frames, boxes, (96, 96), (128, 171), (8, 29, 112, 112), antialias, dtype,
                       "cuda")
