"""Choosing a backend: one op per name, the public switch, clear errors, Triton taking the CUDA key's
place and giving it back, whole models compiled through the ops."""
import importlib
import os

import pytest
import torch

import caer_fast.ops as ops
from caer_fast.ops import BackendUnavailableError, _dispatch
from caer_fast.ops.attention_pool import attention_pool_reference
from caer_fast.testing.op_checks import ops_called

needs_ext = pytest.mark.skipif(not _dispatch.HAS_OPS, reason="caer_fast._C not built (see test_extension_is_built)")


def test_extension_is_built():
    """The op tests skip their cpp cases without the extension; this one says so loudly unless opted out."""
    if os.environ.get("CAER_FAST_BUILD_EXT") == "0":
        pytest.skip("CAER_FAST_BUILD_EXT=0")
    assert _dispatch.HAS_OPS, _dispatch.why_unavailable("cpp", "cpu")
    assert "cpp" in ops.available_backends("cpu")


@needs_ext
def test_one_op_per_name():
    """Each op is one name in torch.ops.caer_fast, with the C++ CPU kernel under the CPU key."""
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("caer_fast::")}
    assert {n.removesuffix("_backward") for n in names} == set(_dispatch.OPS), names
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"caer_fast::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"caer_fast::{name}", "Meta"), name  # the fake


@needs_ext
def test_env_selects_backend(monkeypatch):
    f, x = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    monkeypatch.setenv("CAER_FAST_BACKEND", "cpp")
    assert ops.backend("cpu") == "cpp"
    torch.testing.assert_close(ops.attention_pool(f, x), attention_pool_reference(f, x))
    monkeypatch.delenv("CAER_FAST_BACKEND")
    assert ops.backend("cpu") == "cpp", "cpp is the default on CPU when built"
    monkeypatch.setenv("CAER_FAST_BACKEND", "torch")
    assert ops.backend("cpu") == "torch"


@needs_ext
def test_op_calls_follow_env_changes_at_run_time(monkeypatch):
    """The front doors remember their choice per value of the variable, not once per process."""
    f, x = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    monkeypatch.delenv("CAER_FAST_BACKEND", raising=False)
    assert "caer_fast.attention_pool.default" in ops_called(lambda: ops.attention_pool(f, x))
    monkeypatch.setenv("CAER_FAST_BACKEND", "torch")
    assert "caer_fast.attention_pool.default" not in ops_called(lambda: ops.attention_pool(f, x))
    monkeypatch.setenv("CAER_FAST_BACKEND", " CPP ")
    assert "caer_fast.attention_pool.default" in ops_called(lambda: ops.attention_pool(f, x))
    monkeypatch.setenv("CAER_FAST_BACKEND", "fast")
    with pytest.raises(BackendUnavailableError, match="'fast' is not one of"):
        ops.adaptive_fusion(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 1), torch.randn(2, 1))
    monkeypatch.delenv("CAER_FAST_BACKEND")
    assert "caer_fast.adaptive_fusion.default" in ops_called(
        lambda: ops.adaptive_fusion(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 1), torch.randn(2, 1)))


@needs_ext
def test_use_backend_wins_over_env_and_restores(monkeypatch):
    monkeypatch.setenv("CAER_FAST_BACKEND", "cpp")
    f, x = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    with ops.use_backend("torch"):
        assert ops.backend("cpu") == "torch"
        assert "caer_fast.attention_pool.default" not in ops_called(lambda: ops.attention_pool(f, x))
        with ops.use_backend("cpp"):
            assert "caer_fast.attention_pool.default" in ops_called(lambda: ops.attention_pool(f, x))
        assert ops.backend("cpu") == "torch"
    assert ops.backend("cpu") == "cpp"
    ops.set_backend("torch")
    try:
        assert ops.backend("cpu") == "torch"
    finally:
        ops.set_backend(None)
    assert ops.backend("cpu") == "cpp"
    with pytest.raises(ValueError, match="not one of"):
        ops.set_backend("fast")


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    f, x = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    monkeypatch.setenv("CAER_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="CAER_FAST_BACKEND=cuda is unavailable on cpu"):
        ops.attention_pool(f, x)
    with pytest.raises(BackendUnavailableError, match="CAER_FAST_BACKEND=cuda is unavailable"):
        ops.adaptive_fusion(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 1), torch.randn(2, 1))
    monkeypatch.delenv("CAER_FAST_BACKEND")
    with ops.use_backend("cuda"):
        with pytest.raises(BackendUnavailableError, match="set_backend=cuda is unavailable on cpu"):
            ops.attention_pool(f, x)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with ops.use_backend("triton"):
            with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
                ops.attention_pool(f, x)
    assert ops.preload("cpu") == "cpp" or not _dispatch.HAS_OPS


def test_env_bad_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CAER_FAST_BACKEND", "fast")
    with pytest.raises(BackendUnavailableError, match=r"'fast' is not one of torch, cpp, triton, cuda"):
        ops.attention_pool(torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4))


def test_cuda_backend_says_why_without_a_gpu():
    if torch.cuda.is_available() and _dispatch.HAS_CUDA_KERNELS:
        pytest.skip("the CUDA backend is available here")
    why = ops.why_unavailable("cuda", "cuda")
    assert why and ("_C" in why or "CUDA" in why), why
    assert "cuda" not in ops.available_backends("cpu")


@needs_ext
def test_triton_registration_gives_the_cpu_key_back():
    """What a "triton" backend registers is undone when the backend changes: the C++ kernel runs again."""
    from caer_fast.ops._dispatch import _route

    f, x = torch.randn(2, 3, 5), torch.randn(2, 5)
    want = torch.ops.caer_fast.attention_pool.default(f, x)
    lib = torch.library.Library("caer_fast", "IMPL")
    lib.impl("attention_pool", lambda f, x: (f.sum(-1) * 0 + 7, x), "CPU")
    assert (torch.ops.caer_fast.attention_pool.default(f, x)[0] == 7).all()
    lib._destroy()
    torch.testing.assert_close(torch.ops.caer_fast.attention_pool.default(f, x), want, rtol=0, atol=0)
    _route("cpp", "cpu")  # a no-op while nothing is registered
    torch.testing.assert_close(torch.ops.caer_fast.attention_pool.default(f, x), want, rtol=0, atol=0)


# ---- torch.compile traces whole models through the ops --------------------------------------------
def _compile_and_compare(model, inputs, compiler):
    """fullgraph compile vs eager, forward (and backward when grad is on); the ops must be in the graph."""
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return compiler(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    want = model(*inputs)
    got = compiled(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert {"caer_fast.attention_pool.default", "caer_fast.adaptive_fusion.default"} <= seen, seen
    if torch.is_grad_enabled():
        g = torch.randn_like(want)
        params = [p for p in model.parameters()]
        for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@needs_ext
@pytest.mark.slow
def test_compile_caersnet_fullgraph():
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    from caer_fast.models import CAERSNet

    torch.manual_seed(0)
    with ops.use_backend("cpp"):
        model = CAERSNet().eval()
        inputs = (torch.randn(2, 3, 96, 96), torch.randn(2, 3, 112, 112))
        with torch.no_grad():
            _compile_and_compare(model, inputs, compile_fx)  # inductor
        # forward + backward through AOTAutograd (the backward ops get traced); inductor would add
        # minutes of codegen here for no extra coverage of our ops
        bw_ops = set()

        def record(gm, _):
            bw_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)

        _compile_and_compare(model, inputs, aot_autograd(fw_compiler=record, bw_compiler=record))
    assert {"caer_fast.attention_pool_backward.default", "caer_fast.adaptive_fusion_backward.default"} <= bw_ops


@needs_ext
@pytest.mark.slow
def test_compile_caernet_fullgraph():
    from torch._inductor.compile_fx import compile_fx

    from caer_fast.models import CAERNet

    torch.manual_seed(0)
    with ops.use_backend("cpp"):
        model = CAERNet(frames=8).eval()
        with torch.no_grad():
            _compile_and_compare(model, (torch.randn(2, 3, 8, 48, 48), torch.randn(2, 3, 8, 56, 56)), compile_fx)


# ---- the backend table: one choice per request, then a lookup ----------------------------------------
@needs_ext
def test_choice_is_made_once_per_request(monkeypatch):
    """The backend is resolved once per (request, op, device, dtype); later calls only look it up,
    and a new value of the variable is a new request."""
    calls = []
    real = _dispatch.backend
    monkeypatch.setattr(_dispatch, "backend", lambda device=None: calls.append(device) or real(device))
    monkeypatch.setenv("CAER_FAST_BACKEND", "cpp")  # a request no earlier test made
    f, x = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    for _ in range(5):
        ops.attention_pool(f, x)
    assert calls == ["cpu"], calls
    ops.attention_pool(f.double(), x.double())  # another dtype: one more choice
    assert len(calls) == 2, calls
    monkeypatch.setenv("CAER_FAST_BACKEND", "torch")
    for _ in range(3):
        assert "caer_fast.attention_pool.default" not in ops_called(lambda: ops.attention_pool(f, x))
    assert len(calls) == 3, calls
    monkeypatch.delenv("CAER_FAST_BACKEND")
    assert "caer_fast.attention_pool.default" in ops_called(lambda: ops.attention_pool(f, x))
    assert len(calls) == 4, calls


@needs_ext
def test_a_table_row_is_a_backend(monkeypatch):
    """A backend is its row: here the C++ CPU kernels declared for float32 only. float64 then runs the
    torch reference, float32 the op; the name is accepted everywhere a backend name is."""
    monkeypatch.setitem(_dispatch.TABLE, "cpp32", _dispatch.Backend(
        unavailable=_dispatch.TABLE["cpp"].unavailable, dtypes=(torch.float32,), ops=("attention_pool",)))
    f, x = torch.randn(2, 3, 5), torch.randn(2, 1, 5)
    fuse = (torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 1), torch.randn(2, 1))
    with ops.use_backend("cpp32"):
        assert ops.backend("cpu") == "cpp32"
        assert "caer_fast.attention_pool.default" in ops_called(lambda: ops.attention_pool(f, x))
        assert "caer_fast.attention_pool.default" not in ops_called(
            lambda: ops.attention_pool(f.double(), x.double()))
        assert "caer_fast.adaptive_fusion.default" not in ops_called(lambda: ops.adaptive_fusion(*fuse))
        torch.testing.assert_close(ops.attention_pool(f.double(), x.double()),
                                   attention_pool_reference(f.double(), x.double()))
    with ops.use_backend("cpp"):  # the real row: every op, float64 included
        assert "caer_fast.attention_pool.default" in ops_called(
            lambda: ops.attention_pool(f.double(), x.double()))
        assert "caer_fast.adaptive_fusion.default" in ops_called(lambda: ops.adaptive_fusion(*fuse))


def test_front_doors_name_no_backend():
    """The front doors ask the table (use_kernel); no backend name is written in them."""
    import inspect
    import re

    for op in _dispatch.OPS:
        source = inspect.getsource(importlib.import_module(f"caer_fast.ops.{op}"))
        for name in ops.BACKENDS:
            assert not re.search(rf"""["']{name}["']""", source), (op, name)
