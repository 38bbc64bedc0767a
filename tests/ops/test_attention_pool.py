"""attention_pool on every backend present (tests/ops/conftest.py), against the float64 reference.

Every check also runs the torch reference in the test's precision, so a wrong reference shows up as
well as a wrong kernel; CPU kernels run with NaN-filled new memory (an unwritten element fails).
"""
import pytest
import torch

import caer_fast.ops as ops
from caer_fast.ops.attention_pool import attention_pool_reference
from caer_fast.testing.op_checks import aot_recorder, check_attention_pool, junk_filled_allocations

from .conftest import interpreted

# N=1, C=3, C not a multiple of 8, 1×1, 7×7, 2×7×7 space-time, 5×3 non-square, and S > 256 so the
# online softmax crosses tiles (600 positions: 3 tiles of the CPU kernel, 10 blocks of Triton's).
POOL_SHAPES = [(1, 3, 1, 1), (1, 5, 7, 7), (3, 3, 7, 7), (2, 13, 2, 7, 7), (2, 17, 5, 3), (2, 4, 20, 30),
               (2, 3, 600)]


def pool(f, x, return_attention=False):
    with junk_filled_allocations():
        return ops.attention_pool(f, x, return_attention=return_attention)


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_float64(backend, shape, dtype):
    name, device = backend
    if interpreted(name) and shape[1] * shape[-1] > 100:
        pytest.skip("interpreter: tiny shapes only")
    check_attention_pool(pool, shape, dtype, device, return_attention=True, seed=hash(shape) % 1000)
    check_attention_pool(pool, shape, dtype, device, return_attention=False, seed=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(backend, dtype):
    check_attention_pool(pool, (2, 19, 2, 3, 3), dtype, backend[1], return_attention=True)


def test_strided_features(backend):
    check_attention_pool(pool, (2, 24, 5, 3), torch.float32, backend[1], channels_last=True, return_attention=True)


@pytest.mark.parametrize("shape", [(2, 5, 7, 7), (2, 3, 600)], ids=["7x7", "600"])
def test_huge_logits(backend, shape):
    """±1e4 logits: one-hot-ish softmax, no inf/NaN; on 600 positions the max also grows across tiles."""
    device = backend[1]
    check_attention_pool(pool, shape, torch.float32, device, logit_scale=1e4, return_attention=True)
    n, c, *space = shape
    features = torch.randn(shape)
    ramp = torch.linspace(-1e4, 1e4, features[0, 0].numel()).view(1, 1, *space).repeat(n, 1, *[1] * len(space))
    out, att = pool(features.to(device), ramp.to(device), True)
    ref, ref_att = attention_pool_reference(features.double(), ramp.double(), True)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(att.double().cpu(), ref_att, rtol=1e-5, atol=1e-7)
    out, att = pool(features.to(device), torch.full_like(ramp, 1e4).to(device), True)  # all equal: uniform
    torch.testing.assert_close(att.cpu(), torch.full_like(att.cpu(), 1.0 / att[0].numel()))


def test_non_finite_logits_follow_softmax(backend):
    """Chosen for every backend (docs/ops.md): -inf weighs 0; +inf, NaN or all -inf make that sample's
    output and attention NaN, and leave the other samples alone."""
    device = backend[1]
    f = torch.randn(5, 4, 2, 3)
    x = torch.randn(5, 1, 2, 3)
    x[0, 0, 0, :2] = float("-inf")  # masked positions
    x[1, 0, 1, 1] = float("inf")
    x[2, 0, 0, 2] = float("nan")
    x[3] = float("-inf")
    out, att = pool(f.to(device), x.to(device), True)
    out, att = out.cpu(), att.cpu()
    ref, ref_att = attention_pool_reference(f.double(), x.double(), True)
    assert torch.isfinite(out[0]).all() and (att[0, 0, 0, :2] == 0).all()
    torch.testing.assert_close(out[[0, 4]].double(), ref[[0, 4]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(att[[0, 4]].double(), ref_att[[0, 4]], rtol=1e-5, atol=1e-7)
    for i in (1, 2, 3):
        assert out[i].isnan().all() and att[i].isnan().all(), i
        assert ref[i].isnan().all() and ref_att[i].isnan().all(), i  # what torch.softmax does


@pytest.mark.parametrize("features, logits, match", [
    ((2, 3), (2, 1), "N×C×"),
    ((2, 3, 4, 4), (2, 1, 4, 5), "logits must be"),
    ((2, 3, 4, 4), (2, 2, 4, 4), "logits must be"),
    ((2, 3, 0, 4), (2, 1, 0, 4), "at least one position"),
])
def test_errors(backend, features, logits, match):
    """Every backend rejects the same inputs, before any kernel runs, with the same message."""
    device = backend[1]
    with pytest.raises(ValueError, match=match):
        ops.attention_pool(torch.randn(features, device=device), torch.randn(logits, device=device))


def test_integer_inputs_are_an_error(backend):
    device = backend[1]
    with pytest.raises(ValueError, match="floating point"):
        ops.attention_pool(torch.ones(2, 3, 4, dtype=torch.int64, device=device), torch.randn(2, 1, 4, device=device))


def test_empty_batch(backend):
    """N = 0 is not an error: empty outputs (and gradients) of the right shapes, on every backend."""
    device = backend[1]
    f = torch.randn(0, 5, 3, 3, device=device, requires_grad=True)
    x = torch.randn(0, 1, 3, 3, device=device, requires_grad=True)
    out, att = ops.attention_pool(f, x, return_attention=True)
    assert out.shape == (0, 5) and att.shape == (0, 1, 3, 3)
    (out.sum() + att.sum()).backward()
    assert f.grad.shape == f.shape and x.grad.shape == x.shape


def test_partial_gradients(backend):
    device = backend[1]
    f = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    x = torch.randn(2, 1, 4, 4, device=device)
    ops.attention_pool(f, x).sum().backward()
    assert x.grad is None and f.grad is not None
    f2, x2 = torch.randn(2, 3, 4, 4, device=device), torch.randn(2, 1, 4, 4, device=device, requires_grad=True)
    ops.attention_pool(f2, x2).sum().backward()
    assert f2.grad is None and x2.grad is not None and x2.grad.shape == x2.shape


def test_gradcheck_float64(backend):
    name, device = backend
    if name != "cpp" and name != "torch":
        pytest.skip(f"{name} runs float64 on the torch reference")

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)

    for shape in [(2, 3, 5, 3), (1, 2, 2, 3, 3), (2, 2, 300)]:  # 2×2×300 crosses a CPU tile boundary
        n, c, *space = shape
        f, x = t(*shape), t(n, 1, *space)
        assert torch.autograd.gradcheck(lambda f, x: ops.attention_pool(f, x, True), (f, x))
        assert torch.autograd.gradcheck(lambda f, x: ops.attention_pool(f, x), (f, x))
        if name == "cpp":  # the op itself, through its registered autograd formula
            assert torch.autograd.gradcheck(torch.ops.caer_fast.attention_pool, (f.reshape(n, c, -1),
                                                                                x.reshape(n, -1)))


def test_opcheck(backend):
    """Schema, fake implementation, autograd registration and AOT dispatch of the op and its backward."""
    name, device = backend
    if name == "torch":
        pytest.skip("the torch backend does not call the op")
    gen = torch.Generator().manual_seed(2)
    # the kernels take N×C×(S…) with N×S or N×1×(S…) logits, strided or not, and answer in those shapes
    for f_shape, x_shape in (((2, 5, 9), (2, 9)), ((2, 5, 3, 3), (2, 1, 3, 3)), ((2, 5, 2, 3, 2), (2, 1, 2, 3, 2)),
                             ((2, 5, 3, 4), (2, 12))):
        f, x = torch.randn(f_shape, generator=gen).to(device), torch.randn(x_shape, generator=gen).to(device)
        if len(f_shape) == 4 and len(x_shape) == 2:
            f = f.transpose(2, 3).contiguous().transpose(2, 3)  # not contiguous
        torch.library.opcheck(torch.ops.caer_fast.attention_pool.default, (f.requires_grad_(), x.requires_grad_()))
        out, att = torch.ops.caer_fast.attention_pool.default(f.detach(), x.detach())
        assert att.shape == x.shape
        want_out, want_att = attention_pool_reference(f.detach().double(), x.detach().double().reshape(2, 1, -1),
                                                      return_attention=True)
        torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(att.double(), want_att.reshape(x.shape), rtol=1e-5, atol=1e-6)
        for ga in (None, torch.randn(x_shape, device=device)):
            torch.library.opcheck(torch.ops.caer_fast.attention_pool_backward.default,
                                  (torch.randn(2, 5, device=device), ga, f.detach(), att, out))
            grad_f, grad_x = torch.ops.caer_fast.attention_pool_backward.default(
                torch.randn(2, 5, device=device), ga, f.detach(), att, out)
            assert grad_f.shape == f.shape and grad_x.shape == x.shape


def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True), forward and backward, through the op (and its backward op)."""
    name, device = backend
    recorder, seen = aot_recorder()
    torch._dynamo.reset()
    compiled = torch.compile(lambda f, x, ra: ops.attention_pool(f, x, return_attention=ra), fullgraph=True,
                             backend=recorder)
    check_attention_pool(compiled, (2, 7, 3, 5), torch.float32, device, return_attention=True)
    check_attention_pool(compiled, (2, 6, 3, 5), torch.float16, device, channels_last=True)
    if name in ("cpp", "cuda") or interpreted(name):
        assert "caer_fast.attention_pool.default" in seen["fw"], seen
        assert "caer_fast.attention_pool_backward.default" in seen["bw"], seen
    elif name == "triton":  # on a GPU the kernels themselves are in the graphs
        assert any("triton_kernel_wrapper" in t for t in seen["fw"]) and not any("caer_fast." in t for t in seen["fw"])


def test_non_tensor_inputs_are_a_type_error(backend):
    """A list or NumPy array is a TypeError naming the op (as torch.softmax refuses one), not an AttributeError."""
    device = backend[1]
    f, x = torch.randn(2, 3, 4, device=device), torch.randn(2, 1, 4, device=device)
    for args in ((f.tolist(), x), (f, x.cpu().numpy()), (None, x)):
        with pytest.raises(TypeError, match="attention_pool: features and logits must be tensors"):
            ops.attention_pool(*args)


@pytest.mark.parametrize("used", ["out", "attention", "both"])
def test_gradient_through_one_output(backend, used):
    """The C++ formula (csrc/autograd.cpp) gets no gradient for an output that was not used: the pooled
    output alone, the attention map alone, or both, each against the float64 reference's gradients."""
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    f64, x64 = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64), torch.randn(2, 1, 3, 4, generator=gen,
                                                                                       dtype=torch.float64)
    g_out, g_att = torch.randn(2, 5, generator=gen, dtype=torch.float64), torch.randn(2, 1, 3, 4, generator=gen,
                                                                                     dtype=torch.float64)

    def loss(fn, f, x):
        out, att = fn(f, x, True)
        return {"out": (out * g_out.to(out)).sum(), "attention": (att * g_att.to(att)).sum(),
                "both": (out * g_out.to(out)).sum() + (att * g_att.to(att)).sum()}[used], out

    f, x = f64.float().to(device).requires_grad_(), x64.float().to(device).requires_grad_()
    got, out = loss(ops.attention_pool, f, x)
    if name != "torch":
        assert "AttentionPool" in out.grad_fn.name(), out.grad_fn.name()  # one C++ node, no Python frame
    got = torch.autograd.grad(got, (f, x), materialize_grads=True)
    fr, xr = f64.clone().requires_grad_(), x64.clone().requires_grad_()
    want = torch.autograd.grad(loss(attention_pool_reference, fr, xr)[0], (fr, xr), materialize_grads=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-6)
