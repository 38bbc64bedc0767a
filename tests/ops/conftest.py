"""The ``backend`` fixture: every test of tests/ops runs once per backend present.

torch and cpp run here, on CPU tensors; cuda runs on a GPU (marked ``gpu``). triton runs on a GPU,
or on CPU tensors under ``TRITON_INTERPRET=1`` — which must be set before triton is imported and must
not leak into the other tests, so test_triton_interpreter.py runs the triton cases of this folder
in a subprocess that sets it (and there only the triton cases run).
"""
import os

import pytest
import torch

import caer_fast.ops as ops

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _device(name: str) -> str:
    """The backend's first device type (its table row) that it can run on here, else its usual one."""
    devices = ops._dispatch.TABLE[name].devices
    if name == "triton":  # CPU tensors in the interpreter session, CUDA ones elsewhere
        devices = ("cpu",) if INTERPRETED else ("cuda",)
    return next((d for d in devices if ops.why_unavailable(name, d) is None), devices[0])


@pytest.fixture(params=[pytest.param(name, id=name, marks=[pytest.mark.gpu] if name == "cuda" else [])
                        for name in ops.BACKENDS])
def backend(request):
    """(name, device): inside the test the ops run on backend ``name``, on ``device`` tensors."""
    name = request.param
    if INTERPRETED and name != "triton":
        pytest.skip("the interpreter session runs the triton cases only")
    if name == "triton" and not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("triton on CPU runs under the interpreter (tests/ops/test_triton_interpreter.py)")
    device = _device(name)
    why = ops.why_unavailable(name, device)
    if why is not None:
        pytest.skip(f"{name} backend unavailable: {why}")
    with ops.use_backend(name):
        yield name, device


def interpreted(name: str) -> bool:
    return name == "triton" and INTERPRETED
