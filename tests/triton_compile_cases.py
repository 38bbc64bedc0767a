"""torch.compile through the triton backend's ``torch.library`` ops, without a GPU. Run by
test_ops_compile_triton.py in subprocesses, in one of two modes (tiny shapes: the interpreter is slow):

* ``TRITON_INTERPRET=1`` (+ ``CAER_FAST_BACKEND=triton``): the public ops on CPU tensors compiled
  with ``fullgraph=True`` (backends "eager", "aot_eager", "inductor"), forward and backward checked
  against the float64 reference; ``opcheck`` of the ops; the op path vs the eager twin; a tiny CAERSNet.
  Here the ops are opaque graph nodes (interpreted kernels cannot be captured).
* ``CAER_FAST_TEST_TRITON_CAPTURE=1`` (no interpreter, no GPU): triton's driver is replaced by one that
  only names an sm_90 target, so AOTAutograd captures the kernels into the graphs as on a GPU
  (``triton_kernel_wrapper_functional`` nodes, forward and backward); the graphs are not run.

By hand: ``TRITON_INTERPRET=1 CAER_FAST_BACKEND=triton pytest tests/triton_compile_cases.py``.
"""
import logging
import os

import pytest

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CAPTURE = os.environ.get("CAER_FAST_TEST_TRITON_CAPTURE") == "1" and not INTERPRET
if not (INTERPRET or CAPTURE):  # collected by a plain run: it would compile for a GPU
    pytest.skip("run by test_ops_compile_triton.py (TRITON_INTERPRET=1, or CAER_FAST_TEST_TRITON_CAPTURE=1)",
                allow_module_level=True)

import torch  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402

interp = pytest.mark.skipif(not INTERPRET, reason="interpreter mode only")
capture = pytest.mark.skipif(not CAPTURE, reason="capture mode only")

if CAPTURE:
    import triton
    from triton.backends.compiler import GPUTarget

    class _TargetOnlyDriver:
        """Enough of a driver for torch's kernel analysis (TTIR for sm_90); launching is an error."""

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def __getattr__(self, name):
            raise RuntimeError(f"no GPU here: triton driver.{name}")

    triton.runtime.driver.set_active(_TargetOnlyDriver())

import caer_fast.ops as ops  # noqa: E402
from caer_fast.kernels import adaptive_fusion as af  # noqa: E402
from caer_fast.kernels import attention_pool as ap  # noqa: E402
from caer_fast.kernels import face_context as fc  # noqa: E402
from op_checks import check_adaptive_fusion, check_attention_pool, check_face_context  # noqa: E402

OPS = {"caer_fast.attention_pool_triton.default", "caer_fast.adaptive_fusion_triton.default"}
BW_OPS = {"caer_fast.attention_pool_triton_backward.default", "caer_fast.adaptive_fusion_triton_backward.default"}


def _targets(gm):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            fn = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn
            out.append(f"triton:{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}")
        else:
            out.append(str(node.target))
    return out


def _compiled(fn, backend):
    """torch.compile(fn, fullgraph=True) with ``backend``; returns (compiled, {stage: [targets]})."""
    seen = {"dynamo": [], "fw": [], "bw": []}

    def record(stage):
        def compiler(gm, _):
            seen[stage] += _targets(gm)
            return make_boxed_func(gm.forward)
        return compiler

    def dynamo_backend(gm, example_inputs):
        seen["dynamo"] += _targets(gm)
        if backend == "aot_eager":  # aot_eager, recording the forward and backward graphs
            return aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))(gm, example_inputs)
        if backend == "inductor":
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=dynamo_backend), seen


# ---- interpreter: compiled public ops, forward + backward vs float64 --------------------------
@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("CAER_FAST_BACKEND", "triton")
    assert ops.backend("cpu") == "triton"


@interp
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("shape, dtype, kw", [
    ((2, 37, 5, 7), torch.float32, {"return_attention": True}),  # C not a multiple of BLOCK_C, odd S
    ((1, 3, 3, 5, 5), torch.float32, {}),  # space-time map
    ((2, 6, 3, 5), torch.float16, {"channels_last": True, "return_attention": True}),
])
def test_compiled_attention_pool(triton_backend, backend, shape, dtype, kw):
    compiled, seen = _compiled(lambda f, x, ra: ops.attention_pool(f, x, return_attention=ra), backend)
    check_attention_pool(compiled, shape, dtype, "cpu", **kw)
    assert "caer_fast.attention_pool_triton.default" in seen["dynamo"], seen
    if backend == "aot_eager":
        assert "caer_fast.attention_pool_triton_backward.default" in seen["bw"], seen


@interp
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("n, cf, cc, dtype, kw", [
    (3, 200, 77, torch.float32, {"return_weights": True}),  # several column blocks, grad through the weights
    (1, 5, 13, torch.float16, {"strided": True}),  # face a row-strided view
])
def test_compiled_adaptive_fusion(triton_backend, backend, n, cf, cc, dtype, kw):
    compiled, seen = _compiled(lambda *a: ops.adaptive_fusion(*a[:4], return_weights=a[4]), backend)
    check_adaptive_fusion(compiled, n, cf, cc, dtype, "cpu", **kw)
    assert "caer_fast.adaptive_fusion_triton.default" in seen["dynamo"], seen
    if backend == "aot_eager":
        assert "caer_fast.adaptive_fusion_triton_backward.default" in seen["bw"], seen


FRAMES = torch.randint(0, 256, (3, 20, 27, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
BOXES = torch.tensor([[3, 2, 15, 17], [0, 0, 0, 0], [-3, 10, 40, 12]])


@interp
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("crop", [None, (1, 2, 5, 6)])
def test_compiled_face_context(triton_backend, backend, crop):
    compiled, seen = _compiled(ops.face_context, backend)
    check_face_context(compiled, FRAMES, BOXES, (5, 7), (8, 9), crop, True, torch.float32, "cpu")
    assert "caer_fast.face_context_triton.default" in seen["dynamo"], seen


@interp
def test_compiled_inductor(triton_backend):
    """Inductor on CPU tensors: the interpreted ops are opaque fallback kernels, the rest is C++ codegen."""
    def fn(f, x, face, ctx, fs, cs):
        out, att = ops.attention_pool(f, x, return_attention=True)
        fused = ops.adaptive_fusion(face, ctx, fs, cs)
        return out.sin().sum() + (att * att).sum() + fused.cos().sum()

    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in
              [(2, 7, 3, 5), (2, 1, 3, 5), (3, 6), (3, 5), (3, 1), (3, 1)]]
    compiled, seen = _compiled(fn, "inductor")
    got_in = [t.float().requires_grad_() for t in inputs]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    got = compiled(*got_in)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAER_FAST_BACKEND", "torch")
        ref = fn(*ref_in)
    assert OPS <= set(seen["dynamo"]), seen
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, got_in), torch.autograd.grad(ref, ref_in)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@interp
def test_opcheck():
    """Schema, fake implementation, autograd registration and AOT dispatch of every new op."""
    gen = torch.Generator().manual_seed(2)
    f, x = torch.randn(2, 5, 3, 3, generator=gen), torch.randn(2, 1, 3, 3, generator=gen)
    for ra in (True, False):
        torch.library.opcheck(ap.attention_pool_op, (f.clone().requires_grad_(), x.clone().requires_grad_(), ra))
    out32, lse, _ = ap.attention_pool_op(f, x, False)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(ap.attention_pool_backward_op, (torch.randn(2, 5), torch.randn(2, 1, 3, 3), f, x, out32,
                                                              lse, *need))
    args = tuple(torch.randn(*s, generator=gen).requires_grad_() for s in [(3, 6), (3, 4), (3, 1), (3, 1)])
    torch.library.opcheck(af.adaptive_fusion_op, args)
    _, w32 = af.adaptive_fusion_op(*args)
    plain = tuple(a.detach() for a in args[:2])
    for gw in (None, torch.randn(3, 2)):
        torch.library.opcheck(af.adaptive_fusion_backward_op, (torch.randn(3, 10), gw, *plain, w32.detach(),
                                                               torch.float32))
    torch.library.opcheck(fc.face_context_op, (FRAMES, BOXES, 5, 7, 8, 9, 1, 2, 5, 6, [0.5] * 3, [0.25] * 3, True,
                                               torch.float16))


@interp
def test_op_path_matches_eager_twin():
    """torch.compile runs the ops, eager runs the autograd.Function twins: the same numbers, grads too."""
    gen = torch.Generator().manual_seed(3)
    f, x = torch.randn(2, 9, 4, 5, generator=gen), torch.randn(2, 1, 4, 5, generator=gen)
    g, ga = torch.randn(2, 9, generator=gen), torch.randn(2, 1, 4, 5, generator=gen)

    def via_op(f, x):
        out32, _, att = ap.attention_pool_op(f, x, True)
        return out32, att

    results = []
    for fn in (via_op, lambda f, x: ap.AttentionPoolFunction.apply(f, x, True)):
        fr, xr = f.clone().requires_grad_(), x.clone().requires_grad_()
        out, att = fn(fr, xr)
        results.append((out, att, *torch.autograd.grad((out * g).sum() + (att * ga).sum(), (fr, xr))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    inputs = [torch.randn(*s, generator=gen) for s in [(3, 7), (3, 5), (3, 1), (3, 1)]]
    results = []
    for fn in (af.adaptive_fusion_op, lambda *a: af.AdaptiveFusionFunction.apply(*a, True)):
        ins = [t.clone().requires_grad_() for t in inputs]
        out, w = fn(*ins)
        results.append((out, w, *torch.autograd.grad(out.sum() + w[:, :1].sum(), ins)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@interp
def test_compiled_caersnet(triton_backend):
    """A CAERSNet (small inputs: 2×2 face and context maps) compiled whole: forward and parameter grads."""
    from caer_fast.models import CAERSNet

    torch.manual_seed(0)
    model = CAERSNet()
    model.eval()  # dropout off; the fused ops are the same in train mode
    inputs = (torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    compiled, seen = _compiled(model, "aot_eager")
    got = compiled(*inputs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAER_FAST_BACKEND", "torch")
        want = model(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert OPS <= set(seen["dynamo"]) and OPS <= set(seen["fw"]), seen
    grad = torch.randn_like(want)
    params = list(model.parameters())
    got_g = torch.autograd.grad(got, params, grad)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAER_FAST_BACKEND", "torch")
        want_g = torch.autograd.grad(model(*inputs), params, grad)
    assert BW_OPS <= set(seen["bw"]), seen
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ---- capture: on a GPU the kernels themselves land in the graphs --------------------------------
@capture
def test_kernels_are_captured_into_the_graph():
    from torch._library.triton import get_triton_kernels_for_op

    warnings = []  # torch's mutation analysis (TTIR for sm_90) must succeed, not fall back to "all mutated"

    class _Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    wrap_log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    wrap_log.addHandler(_Collect(logging.WARNING))
    wrap_log.propagate = False

    for op, n in [("attention_pool_triton", 2), ("attention_pool_triton_backward", 2), ("adaptive_fusion_triton", 1),
                  ("adaptive_fusion_triton_backward", 1)]:
        assert len(get_triton_kernels_for_op(f"caer_fast::{op}")) == n, op  # what AOTAutograd's cache hashes

    seen = {"fw": [], "bw": []}

    def record(stage):
        def compiler(gm, _):
            seen[stage] += _targets(gm)
            outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            vals = [o.meta["val"] if isinstance(o, torch.fx.Node) else o for o in outs]

            def stub(args):  # the graph cannot run without a GPU: outputs of the right shapes
                return [torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v for v in vals]
            stub._boxed_call = True
            return stub
        return compiler

    def fn(f, x, face, ctx, fs, cs):
        out, att = ap.attention_pool(f, x, True)
        fused, w = af.adaptive_fusion(face, ctx, fs, cs, return_weights=True)
        return out.sum() + att.sum() + fused.sum() + w.sum()

    inputs = [torch.randn(*s, requires_grad=True) for s in [(2, 5, 3, 3), (2, 1, 3, 3), (3, 4), (3, 5), (3, 1),
                                                            (3, 1)]]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record("fw"),
                                                                       bw_compiler=record("bw")))
    compiled(*inputs).backward()
    kernels = [t for t in seen["fw"] if t.startswith("triton:")]
    assert sorted(kernels) == ["triton:adaptive_fusion._fwd_kernel", "triton:attention_pool._attention_kernel",
                               "triton:attention_pool._fwd_kernel"], seen["fw"]
    kernels = [t for t in seen["bw"] if t.startswith("triton:")]
    assert sorted(kernels) == ["triton:adaptive_fusion._bwd_kernel", "triton:attention_pool._attention_kernel",
                               "triton:attention_pool._bwd_kernel"], seen["bw"]
    assert not any("caer_fast." in t for t in seen["fw"] + seen["bw"]), "the ops were decomposed into their kernels"
    assert not warnings, warnings
