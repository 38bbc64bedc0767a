"""The `cpp` backend of attention_pool and adaptive_fusion (caer_fast._C), against the float64 reference.

Every case runs the torch backend too, so a wrong reference shows up as well as a wrong kernel.
The raw kernels are also called with NaN-filled output buffers: an element the kernel forgets to
write stays NaN and fails the comparison.
"""
import os

import pytest
import torch

from caer_fast.ops import BackendUnavailableError, _dispatch, adaptive_fusion, attention_pool, backend
from caer_fast.ops.adaptive_fusion import adaptive_fusion_reference
from caer_fast.ops.attention_pool import attention_pool_reference
from op_checks import check_adaptive_fusion, check_attention_pool

try:
    from caer_fast import _C
    from caer_fast.ops import _cpp
except ImportError as exc:  # reported by test_extension_is_built
    _C = _cpp = None
    _WHY = str(exc)

needs_cpp = pytest.mark.skipif(_C is None, reason="caer_fast._C not built (see test_extension_is_built)")

# N=1, C=3, C not a multiple of 8, 1×1, 7×7, 2×7×7 space-time, 5×3 non-square, and S > 256 so the
# online softmax crosses tiles (600 positions: 3 tiles).
POOL_SHAPES = [(1, 3, 1, 1), (1, 5, 7, 7), (3, 3, 7, 7), (2, 13, 2, 7, 7), (2, 17, 5, 3), (2, 4, 20, 30),
               (2, 3, 600)]


def test_extension_is_built():
    """The cpp tests below skip without the extension; this one says so loudly unless it was opted out."""
    if os.environ.get("CAER_FAST_BUILD_EXT") == "0":
        pytest.skip("CAER_FAST_BUILD_EXT=0")
    assert _C is not None, f"caer_fast._C failed to import: {_WHY}"
    assert "cpp" in _dispatch.available_backends("cpu")


def _impls():
    impls = [pytest.param(attention_pool_reference, adaptive_fusion_reference, id="torch")]
    if _cpp is not None:
        impls.append(pytest.param(_cpp.attention_pool_cpp, _cpp.adaptive_fusion_cpp, id="cpp"))
    return impls


IMPLS = _impls()


@pytest.mark.parametrize("pool,_fusion", IMPLS)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_attention_pool_matches_float64(pool, _fusion, shape, dtype):
    check_attention_pool(pool, shape, dtype, "cpu", return_attention=True, seed=hash(shape) % 1000)
    check_attention_pool(pool, shape, dtype, "cpu", return_attention=False, seed=1)


@pytest.mark.parametrize("pool,_fusion", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_pool_low_precision(pool, _fusion, dtype):
    check_attention_pool(pool, (2, 19, 2, 7, 7), dtype, "cpu", return_attention=True)


@pytest.mark.parametrize("pool,_fusion", IMPLS)
def test_attention_pool_strided_features(pool, _fusion):
    check_attention_pool(pool, (2, 24, 5, 3), torch.float32, "cpu", channels_last=True, return_attention=True)


@pytest.mark.parametrize("pool,_fusion", IMPLS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 7), (2, 3, 600)], ids=["7x7", "600"])
def test_attention_pool_huge_logits(pool, _fusion, shape):
    """±1e4 logits: one-hot-ish softmax, no inf/NaN; on 600 positions the max also grows across tiles."""
    check_attention_pool(pool, shape, torch.float32, "cpu", logit_scale=1e4, return_attention=True)
    n, c, *space = shape
    features = torch.randn(shape)
    ramp = torch.linspace(-1e4, 1e4, features[0, 0].numel()).view(1, 1, *space).repeat(n, 1, *[1] * len(space))
    out, att = pool(features, ramp, True)
    ref, ref_att = attention_pool_reference(features.double(), ramp.double(), True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(att.double(), ref_att, rtol=1e-5, atol=1e-7)
    out, att = pool(features, torch.full_like(ramp, 1e4), True)  # all equal: uniform attention
    torch.testing.assert_close(att, torch.full_like(att, 1.0 / att[0].numel()))


@pytest.mark.parametrize("_pool,fusion", IMPLS)
@pytest.mark.parametrize("n,cf,cc", [(1, 3, 5), (4, 256, 256), (3, 13, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adaptive_fusion_matches_float64(_pool, fusion, n, cf, cc, dtype):
    check_adaptive_fusion(fusion, n, cf, cc, dtype, "cpu", return_weights=True)
    check_adaptive_fusion(fusion, n, cf, cc, dtype, "cpu", return_weights=False, strided=True, seed=1)


@pytest.mark.parametrize("_pool,fusion", IMPLS)
def test_adaptive_fusion_huge_scores_and_low_precision(_pool, fusion):
    check_adaptive_fusion(fusion, 5, 9, 11, torch.float32, "cpu", score_scale=1e4, return_weights=True)
    check_adaptive_fusion(fusion, 5, 9, 11, torch.bfloat16, "cpu", return_weights=True)


# ---- raw kernels: NaN-poisoned outputs, float64 gradcheck ----------------------------------------
@needs_cpp
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_pool_kernel_writes_every_element(shape):
    n, c, *space = shape
    f, x = torch.randn(shape), torch.randn(n, 1, *space) * 3
    g, ga = torch.randn(n, c), torch.randn(n, 1, *space)
    out, att = torch.full((n, c), float("nan")), torch.full_like(x, float("nan"))
    _C.attention_pool_forward_out(f, x, out, att)
    ref, ref_att = attention_pool_reference(f.double(), x.double(), True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(att.double(), ref_att, rtol=1e-5, atol=1e-7)
    for grad_att in (ga, None):
        gf, gx = torch.full_like(f, float("nan")), torch.full_like(x, float("nan"))
        _C.attention_pool_backward_out(g, grad_att, f, att, out, gf, gx)
        fd, xd = f.double().requires_grad_(), x.double().requires_grad_()
        o, a = attention_pool_reference(fd, xd, True)
        loss = (o * g.double()).sum() + ((a * ga.double()).sum() if grad_att is not None else 0)
        rgf, rgx = torch.autograd.grad(loss, (fd, xd))
        torch.testing.assert_close(gf.double(), rgf, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gx.double(), rgx, rtol=1e-4, atol=1e-6)


@needs_cpp
def test_adaptive_fusion_kernel_writes_every_element():
    n, cf, cc = 3, 13, 7
    face, ctx, fs, cs = torch.randn(n, cf), torch.randn(n, cc), torch.randn(n, 1), torch.randn(n, 1)
    out, w = torch.full((n, cf + cc), float("nan")), torch.full((n, 2), float("nan"))
    _C.adaptive_fusion_forward_out(face, ctx, fs, cs, out, w)
    ref, ref_w = adaptive_fusion_reference(face, ctx, fs, cs, True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)
    g, gw = torch.randn(n, cf + cc), torch.randn(n, 2)
    for grad_w in (gw, None):
        bufs = [torch.full_like(t, float("nan")) for t in (face, ctx, fs, cs)]
        _C.adaptive_fusion_backward_out(g, grad_w, face, ctx, w, *bufs)
        inputs = [t.clone().requires_grad_() for t in (face, ctx, fs, cs)]
        o, ww = adaptive_fusion_reference(*inputs, True)
        loss = (o * g).sum() + ((ww * gw).sum() if grad_w is not None else 0)
        for got, want in zip(bufs, torch.autograd.grad(loss, inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_kernels_reject_bad_arguments():
    f, x = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="logits must be"):
        _C.attention_pool_forward(f, torch.randn(2, 1, 4, 5))
    with pytest.raises(RuntimeError, match="share a dtype"):
        _C.attention_pool_forward(f, x.double())
    with pytest.raises(RuntimeError, match="out must have shape"):
        _C.attention_pool_forward_out(f, x, torch.empty(2, 4), torch.empty_like(x))
    with pytest.raises(RuntimeError, match="scores must be"):
        _C.adaptive_fusion_forward(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 2), torch.randn(2, 1))


@needs_cpp
def test_gradcheck_float64():
    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    # 2×2×300 crosses an online-softmax tile boundary
    for shape in [(2, 3, 5, 3), (1, 2, 2, 3, 3), (2, 2, 300)]:
        n, c, *space = shape
        f, x = t(*shape), t(n, 1, *space)
        assert torch.autograd.gradcheck(lambda f, x: _cpp.attention_pool_cpp(f, x, True), (f, x))
        assert torch.autograd.gradcheck(lambda f, x: _cpp.attention_pool_cpp(f, x), (f, x))
        # the torch.library op itself (what torch.compile records), not only the eager twin
        assert torch.autograd.gradcheck(torch.ops.caer_fast.attention_pool_cpp, (f, x))
    inputs = (t(3, 5), t(3, 4), t(3, 1), t(3, 1))
    assert torch.autograd.gradcheck(lambda *a: _cpp.adaptive_fusion_cpp(*a, return_weights=True), inputs)
    assert torch.autograd.gradcheck(lambda *a: _cpp.adaptive_fusion_cpp(*a), inputs)
    assert torch.autograd.gradcheck(torch.ops.caer_fast.adaptive_fusion_cpp, inputs)


@needs_cpp
@pytest.mark.parametrize("shape", [(2, 13, 2, 7, 7), (2, 3, 600)], ids=["2x7x7", "600"])
def test_custom_op_matches_eager_path(shape):
    """torch.compile runs the torch.library op, eager runs _AttentionPoolFunction: same numbers, grads too."""
    n, c, *space = shape
    f, x, g, ga = torch.randn(shape), torch.randn(n, 1, *space), torch.randn(n, c), torch.randn(n, 1, *space)
    results = []
    for fn in (torch.ops.caer_fast.attention_pool_cpp, _cpp._AttentionPoolFunction.apply):
        fr, xr = f.clone().requires_grad_(), x.clone().requires_grad_()
        out, att = fn(fr, xr)
        results.append((out, att, *torch.autograd.grad((out * g).sum() + (att * ga).sum(), (fr, xr))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    face, ctx, fs, cs = (torch.randn(3, 7), torch.randn(3, 5), torch.randn(3, 1), torch.randn(3, 1))
    results = []
    for fn in (torch.ops.caer_fast.adaptive_fusion_cpp, _cpp._AdaptiveFusionFunction.apply):
        inputs = [t.clone().requires_grad_() for t in (face, ctx, fs, cs)]
        out, w = fn(*inputs)
        results.append((out, w, *torch.autograd.grad(out.sum() + w[:, :1].sum(), inputs)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpp
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels and autograd registration as torch.compile sees them."""
    f, x = torch.randn(2, 5, 3, 3, requires_grad=True), torch.randn(2, 1, 3, 3, requires_grad=True)
    torch.library.opcheck(_cpp.attention_pool_op, (f, x))
    args = (torch.randn(2, 5), torch.randn(2, 3), torch.randn(2, 1), torch.randn(2, 1))
    torch.library.opcheck(_cpp.adaptive_fusion_op, tuple(a.requires_grad_() for a in args))


# ---- backend choice ----------------------------------------------------------------------------
@needs_cpp
def test_env_selects_cpp(monkeypatch):
    monkeypatch.setenv("CAER_FAST_BACKEND", "cpp")
    f, x = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    assert backend("cpu") == "cpp"
    assert _dispatch.implementation("attention_pool", f) is _cpp.attention_pool_cpp
    assert _dispatch.implementation("adaptive_fusion", f) is _cpp.adaptive_fusion_cpp
    torch.testing.assert_close(attention_pool(f, x), attention_pool_reference(f, x))
    monkeypatch.delenv("CAER_FAST_BACKEND")
    assert backend("cpu") == "cpp", "cpp is the default on CPU when built"
    monkeypatch.setenv("CAER_FAST_BACKEND", "torch")
    assert _dispatch.implementation("attention_pool", f) is attention_pool_reference


def test_env_cuda_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CAER_FAST_BACKEND", "cuda")
    f, x = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    with pytest.raises(BackendUnavailableError, match="CAER_FAST_BACKEND=cuda is unavailable"):
        attention_pool(f, x)
    with pytest.raises(BackendUnavailableError, match="CAER_FAST_BACKEND=cuda is unavailable"):
        adaptive_fusion(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 1), torch.randn(2, 1))


def test_env_bad_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CAER_FAST_BACKEND", "fast")
    with pytest.raises(BackendUnavailableError, match=r"'fast' is not one of torch, cpp, triton, cuda"):
        attention_pool(torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4))


# ---- torch.compile traces whole models through the custom ops ------------------------------------
def _compile_and_compare(model, inputs, compiler):
    """fullgraph compile vs eager, forward (and backward when grad is on); the cpp ops must be in the graph."""
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return compiler(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    want = model(*inputs)
    got = compiled(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert {"caer_fast.attention_pool_cpp.default", "caer_fast.adaptive_fusion_cpp.default"} <= seen, seen
    if torch.is_grad_enabled():
        g = torch.randn_like(want)
        params = [p for p in model.parameters()]
        for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@needs_cpp
@pytest.mark.slow
def test_compile_caersnet_fullgraph(monkeypatch):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    from caer_fast.models import CAERSNet

    monkeypatch.setenv("CAER_FAST_BACKEND", "cpp")
    torch.manual_seed(0)
    model = CAERSNet().eval()
    inputs = (torch.randn(2, 3, 96, 96), torch.randn(2, 3, 112, 112))
    with torch.no_grad():
        _compile_and_compare(model, inputs, compile_fx)  # inductor
    # forward + backward through AOTAutograd (the backward custom ops get traced); inductor would
    # add minutes of codegen here for no extra coverage of our ops
    bw_ops = set()

    def record(gm, _):
        bw_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    _compile_and_compare(model, inputs, aot_autograd(fw_compiler=record, bw_compiler=record))
    assert {"caer_fast.attention_pool_cpp_backward.default", "caer_fast.adaptive_fusion_cpp_backward.default"} <= bw_ops


@needs_cpp
@pytest.mark.slow
def test_compile_caernet_fullgraph(monkeypatch):
    from torch._inductor.compile_fx import compile_fx

    from caer_fast.models import CAERNet

    monkeypatch.setenv("CAER_FAST_BACKEND", "cpp")
    torch.manual_seed(0)
    model = CAERNet(frames=8).eval()
    with torch.no_grad():
        _compile_and_compare(model, (torch.randn(2, 3, 8, 48, 48), torch.randn(2, 3, 8, 56, 56)), compile_fx)
