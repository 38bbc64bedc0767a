"""adaptive_fusion on every backend present (tests/ops/conftest.py), against the float64 reference."""
import pytest
import torch

import caer_fast.ops as ops
from caer_fast.ops.adaptive_fusion import adaptive_fusion_reference
from caer_fast.testing.op_checks import aot_recorder, check_adaptive_fusion, junk_filled_allocations

from .conftest import interpreted


def fusion(*args):
    with junk_filled_allocations():
        return ops.adaptive_fusion(*args[:4], return_weights=args[4])


@pytest.mark.parametrize("n,cf,cc", [(1, 3, 5), (4, 256, 256), (3, 13, 7), (3, 200, 77)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_float64(backend, n, cf, cc, dtype):
    check_adaptive_fusion(fusion, n, cf, cc, dtype, backend[1], return_weights=True)
    check_adaptive_fusion(fusion, n, cf, cc, dtype, backend[1], return_weights=False, strided=True, seed=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(backend, dtype):
    check_adaptive_fusion(fusion, 5, 9, 11, dtype, backend[1], return_weights=True)


def test_huge_scores(backend):
    """±1e4 scores: saturated weights (0 / 1) stay finite."""
    check_adaptive_fusion(fusion, 5, 9, 11, torch.float32, backend[1], score_scale=1e4, return_weights=True)


def test_mixed_dtypes_promote(backend):
    """Inputs of several dtypes compute in the promoted one; gradients come back in each input's dtype."""
    device = backend[1]
    face = torch.randn(3, 4, device=device, dtype=torch.float16, requires_grad=True)
    context = torch.randn(3, 5, device=device, requires_grad=True)
    fs, cs = (torch.randn(3, 1, device=device, requires_grad=True) for _ in range(2))
    out, w = ops.adaptive_fusion(face, context, fs, cs, return_weights=True)
    with ops.use_backend("torch"):
        ref, ref_w = ops.adaptive_fusion(face, context, fs, cs, return_weights=True)
    assert out.dtype == ref.dtype == torch.float32 and w.dtype == ref_w.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert face.grad.dtype == torch.float16 and context.grad.dtype == torch.float32


@pytest.mark.parametrize("shapes, match", [
    (((2, 3, 1), (2, 3), (2, 1), (2, 1)), "N×C"),
    (((2, 3), (3, 3), (2, 1), (2, 1)), "N×C"),
    (((2, 3), (2, 3), (2, 2), (2, 1)), "face_score must be 2×1"),
    (((2, 3), (2, 3), (2, 1), (2,)), "context_score must be 2×1"),
])
def test_errors(backend, shapes, match):
    device = backend[1]
    with pytest.raises(ValueError, match=match):
        ops.adaptive_fusion(*(torch.randn(s, device=device) for s in shapes))


def test_empty_batch(backend):
    device = backend[1]
    inputs = [torch.randn(s, device=device, requires_grad=True) for s in [(0, 3), (0, 4), (0, 1), (0, 1)]]
    out, w = ops.adaptive_fusion(*inputs, return_weights=True)
    assert out.shape == (0, 7) and w.shape == (0, 2)
    (out.sum() + w.sum()).backward()
    assert all(t.grad.shape == t.shape for t in inputs)


def test_gradcheck_float64(backend):
    name, device = backend
    if name != "cpp" and name != "torch":
        pytest.skip(f"{name} runs float64 on the torch reference")
    inputs = tuple(torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True)
                   for s in [(3, 5), (3, 4), (3, 1), (3, 1)])
    assert torch.autograd.gradcheck(lambda *a: ops.adaptive_fusion(*a, return_weights=True), inputs)
    assert torch.autograd.gradcheck(lambda *a: ops.adaptive_fusion(*a), inputs)
    if name == "cpp":
        assert torch.autograd.gradcheck(torch.ops.caer_fast.adaptive_fusion, inputs)


def test_opcheck(backend):
    name, device = backend
    if name == "torch":
        pytest.skip("the torch backend does not call the op")
    gen = torch.Generator().manual_seed(2)
    args = tuple(torch.randn(*s, generator=gen).to(device).requires_grad_() for s in [(3, 6), (3, 4), (3, 1), (3, 1)])
    torch.library.opcheck(torch.ops.caer_fast.adaptive_fusion.default, args)
    _, w = torch.ops.caer_fast.adaptive_fusion.default(*(a.detach() for a in args))
    for gw in (None, torch.randn(3, 2, device=device)):
        torch.library.opcheck(torch.ops.caer_fast.adaptive_fusion_backward.default,
                              (torch.randn(3, 10, device=device), gw, args[0].detach(), args[1].detach(), w))


def test_compile_fullgraph(backend):
    name, device = backend
    recorder, seen = aot_recorder()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ops.adaptive_fusion(*a[:4], return_weights=a[4]), fullgraph=True,
                             backend=recorder)
    check_adaptive_fusion(compiled, 3, 200, 77, torch.float32, device, return_weights=True)
    check_adaptive_fusion(compiled, 1, 5, 13, torch.float16, device, strided=True)
    if name in ("cpp", "cuda") or interpreted(name):
        assert "caer_fast.adaptive_fusion.default" in seen["fw"], seen
        assert "caer_fast.adaptive_fusion_backward.default" in seen["bw"], seen
    elif name == "triton":
        assert any("triton_kernel_wrapper" in t for t in seen["fw"]) and not any("caer_fast." in t for t in seen["fw"])


def test_non_tensor_inputs_are_a_type_error(backend):
    device = backend[1]
    args = [torch.randn(2, 3, device=device), torch.randn(2, 3, device=device), torch.randn(2, 1, device=device),
            torch.randn(2, 1, device=device)]
    for i in range(4):
        bad = list(args)
        bad[i] = bad[i].tolist()
        with pytest.raises(TypeError, match="adaptive_fusion: .* must be tensors"):
            ops.adaptive_fusion(*bad)


def test_non_finite_scores_follow_softmax(backend):
    """As torch.softmax (docs/ops.md): a NaN or +inf score, or both -inf, make that row's weights and
    output NaN; a -inf score gives its stream weight 0; the other rows are unaffected."""
    device = backend[1]
    face, context = torch.randn(5, 3), torch.randn(5, 4)
    fs, cs = torch.randn(5, 1), torch.randn(5, 1)
    fs[0], fs[1], fs[2], cs[2], fs[3] = float("-inf"), float("nan"), float("-inf"), float("-inf"), float("inf")
    out, w = ops.adaptive_fusion(*(t.to(device) for t in (face, context, fs, cs)), return_weights=True)
    out, w = out.cpu(), w.cpu()
    ref, ref_w = ops.adaptive_fusion.__globals__["adaptive_fusion_reference"](face, context, fs, cs, True)
    assert w[0].tolist() == [0.0, 1.0] and torch.equal(out[0, :3], torch.zeros(3))
    torch.testing.assert_close(out[[0, 4]], ref[[0, 4]])
    for i in (1, 2, 3):
        assert w[i].isnan().all() and out[i].isnan().all(), i
        assert ref_w[i].isnan().all(), i


@pytest.mark.parametrize("used", ["out", "weights", "both"])
def test_gradient_through_one_output(backend, used):
    """The C++ formula (csrc/autograd.cpp) gets no gradient for an output that was not used: the fused
    vector alone, the weights alone, or both, each against the float64 reference's gradients."""
    name, device = backend
    gen = torch.Generator().manual_seed(4)
    inputs64 = [torch.randn(3, 6, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen,
                                                                                  dtype=torch.float64),
                torch.randn(3, 1, generator=gen, dtype=torch.float64), torch.randn(3, 1, generator=gen,
                                                                                  dtype=torch.float64)]
    g_out, g_w = torch.randn(3, 11, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen,
                                                                                    dtype=torch.float64)

    def loss(fn, inputs):
        out, w = fn(*inputs, return_weights=True)
        return {"out": (out * g_out.to(out)).sum(), "weights": (w * g_w.to(w)).sum(),
                "both": (out * g_out.to(out)).sum() + (w * g_w.to(w)).sum()}[used], out

    inputs = [t.float().to(device).requires_grad_() for t in inputs64]
    got, out = loss(ops.adaptive_fusion, inputs)
    if name != "torch":
        assert "AdaptiveFusion" in out.grad_fn.name(), out.grad_fn.name()  # one C++ node, no Python frame
    got = torch.autograd.grad(got, inputs, materialize_grads=True)
    ref_inputs = [t.clone().requires_grad_() for t in inputs64]
    want = torch.autograd.grad(loss(adaptive_fusion_reference, ref_inputs)[0], ref_inputs, materialize_grads=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-6)
