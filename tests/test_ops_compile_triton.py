"""torch.compile(fullgraph=True) through the triton and cuda backends' ``torch.library`` ops, without a GPU.

* triton: tests/triton_compile_cases.py in subprocesses — under ``TRITON_INTERPRET=1`` (compiled public
  ops on CPU tensors, forward + backward vs float64, opcheck, a tiny CAERSNet), and without the
  interpreter against an sm_90 target-only driver (the kernels are captured into the AOT graphs as
  they are on a GPU). Subprocesses: TRITON_INTERPRET is read once, at triton's import, and the fake
  driver must not leak into this session.
* cuda: the backend cannot run here, but its module imports, its ops register, ``_dispatch`` says
  why it is unavailable, and on meta tensors the fake implementations and autograd formulas carry a
  fullgraph compile (forward and backward graphs) — shape and dtype propagation, not numbers.
* gpu tier: inductor on CUDA tensors, both backends, against the reference.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from op_checks import check_adaptive_fusion, check_attention_pool

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _run_cases(env_extra, select):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    for var in ("TRITON_INTERPRET", "CAER_FAST_BACKEND", "CAER_FAST_TEST_TRITON_CAPTURE"):
        if var not in env_extra:
            env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", select,
         "tests/triton_compile_cases.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"cases failed (rc={proc.returncode}):\n{out[-8000:]}"
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "deselected" in summary, out[-3000:]
    return summary


@needs_triton
def test_triton_compile_interpreted():
    summary = _run_cases({"TRITON_INTERPRET": "1", "CAER_FAST_BACKEND": "triton"}, "not captured")
    assert int(re.search(r"(\d+) passed", summary).group(1)) >= 18, summary


@needs_triton
def test_triton_kernels_captured_for_gpu():
    summary = _run_cases({"CAER_FAST_TEST_TRITON_CAPTURE": "1"}, "captured")
    assert "1 passed" in summary, summary


# ---- cuda backend without CUDA --------------------------------------------------------------------
def test_cuda_module_imports_and_registers_ops():
    from caer_fast.ops import _cuda, _dispatch

    for name in ("attention_pool_cuda", "attention_pool_cuda_backward", "adaptive_fusion_cuda",
                 "adaptive_fusion_cuda_backward", "face_context_cuda"):
        assert hasattr(torch.ops.caer_fast, name), name
    if torch.cuda.is_available() and _cuda.is_available()[0]:
        pytest.skip("the CUDA backend is available here")
    why = _dispatch.why_unavailable("cuda")
    assert why and ("_C" in why or "cuda" in why.lower()), why
    assert "cuda" not in _dispatch.available_backends("cpu")


def test_cuda_ops_trace_on_meta_tensors():
    """fullgraph compile of the cuda backend's functions on meta tensors: the custom ops (forward and
    backward) are in the graphs and the fake impls give every output and gradient its shape and dtype."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from caer_fast.ops import _cuda

    seen = {"fw": [], "bw": []}

    def record(stage):
        def compiler(gm, _):
            seen[stage] += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    def fn(f, x, face, ctx, fs, cs):
        out, att = _cuda.attention_pool(f, x, True)
        fused, w = _cuda.adaptive_fusion(face, ctx, fs, cs, return_weights=True)
        return out, att, fused, w

    specs = [((2, 5, 3, 3), torch.float16), ((2, 1, 3, 3), torch.float32), ((3, 4), torch.float16),
             ((3, 5), torch.float32), ((3, 1), torch.float32), ((3, 1), torch.bfloat16)]
    inputs = [torch.empty(s, dtype=d, device="meta", requires_grad=True) for s, d in specs]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record("fw"),
                                                                       bw_compiler=record("bw")))
    out, att, fused, w = compiled(*inputs)
    assert (out.shape, out.dtype) == ((2, 5), torch.float16)
    assert (att.shape, att.dtype) == ((2, 1, 3, 3), torch.float16)
    assert (fused.shape, fused.dtype) == ((3, 9), torch.float32)
    assert (w.shape, w.dtype) == ((3, 2), torch.float32)
    (out.sum() + att.sum() + fused.sum() + w.sum()).backward()
    for t in inputs:
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype
    assert {"caer_fast.attention_pool_cuda.default", "caer_fast.adaptive_fusion_cuda.default"} <= set(seen["fw"])
    assert {"caer_fast.attention_pool_cuda_backward.default",
            "caer_fast.adaptive_fusion_cuda_backward.default"} <= set(seen["bw"]), seen["bw"]

    frames = torch.empty(2, 20, 30, 3, dtype=torch.uint8, device="meta")
    boxes = torch.empty(2, 4, dtype=torch.int64, device="meta")
    torch._dynamo.reset()
    face, context = torch.compile(_cuda.face_context, fullgraph=True, backend="eager")(
        frames, boxes, (5, 6), (7, 9), (1, 2, 4, 5), (0.5,) * 3, (0.25,) * 3, True, torch.float64)
    assert (face.shape, face.dtype) == ((2, 3, 5, 6), torch.float64)
    assert (context.shape, context.dtype) == ((2, 3, 4, 5), torch.float64)


# ---- gpu tier --------------------------------------------------------------------------------------
def _gpu_backend(name):
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False")
    from caer_fast.ops import _dispatch

    why = _dispatch.why_unavailable(name)
    if why:
        pytest.skip(f"{name} backend unavailable: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_inductor_fullgraph(name, dtype, monkeypatch):
    _gpu_backend(name)
    import caer_fast.ops as ops

    monkeypatch.setenv("CAER_FAST_BACKEND", name)
    torch._dynamo.reset()
    pool = torch.compile(lambda f, x, ra: ops.attention_pool(f, x, return_attention=ra), fullgraph=True)
    check_attention_pool(pool, (4, 256, 7, 7), dtype, "cuda", return_attention=True)
    fusion = torch.compile(lambda *a: ops.adaptive_fusion(*a[:4], return_weights=a[4]), fullgraph=True)
    check_adaptive_fusion(fusion, 32, 256, 256, dtype, "cuda", return_weights=True)
