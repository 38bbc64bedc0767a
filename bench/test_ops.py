"""attention_pool / adaptive_fusion speed: reference eager, reference under torch.compile, and the public
ops on the cpp, triton and cuda backends.

Run: ``OMP_NUM_THREADS=1 pytest bench/test_ops.py --benchmark-only --benchmark-group-by=group``
(the ratio table at the end comes from bench/conftest.py). Every benchmark first checks its result
against the float64 reference, so a fast-but-wrong implementation cannot win.
"""
import pytest
import torch

import caer_fast.ops as ops
from caer_fast.ops.adaptive_fusion import adaptive_fusion_reference
from caer_fast.ops.attention_pool import attention_pool_reference

IMPLEMENTATIONS = ["reference", "reference-compiled", "cpp", "triton", "cuda"]
POOL_CASES = {"32x256x7x7": (32, 256, 7, 7), "32x256x2x7x7": (32, 256, 2, 7, 7)}
FUSION_CASES = {"32x(256+256)": (32, 256, 256)}
_compiled = {}


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _impl(op, name, reference):
    """The implementation under test and the device its inputs live on."""
    if name == "reference":
        return reference, "cpu"
    if name == "reference-compiled":
        if op not in _compiled:
            _compiled[op] = torch.compile(reference, dynamic=False)
        return _compiled[op], "cpu"
    device = "cpu" if name == "cpp" else "cuda"
    if name != "cpp" and not torch.cuda.is_available():
        pytest.skip(f"{name}: needs a CUDA GPU" + (" (the interpreter on CPU is 400-1000x slower, not a benchmark)"
                                                  if name == "triton" else ""))
    why = ops.why_unavailable(name, device)
    if why:
        pytest.skip(f"{name} backend unavailable: {why}")
    ops.set_backend(name)  # the public op on that backend; the module's fixture resets the choice
    return getattr(ops, op), device


@pytest.fixture(autouse=True)
def _automatic_backend():
    yield
    ops.set_backend(None)


def _timed(fn, device):
    if device != "cuda":
        return fn

    def synced(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out
    return synced


def _label(benchmark, op, case, mode, impl):
    benchmark.group = f"{op} {case} {mode}"
    benchmark.extra_info.update(op=op, case=case, mode=mode, implementation=impl)


def _check(got, want, what):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("case", list(POOL_CASES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_attention_pool(benchmark, impl, case, mode):
    fn, device = _impl("attention_pool", impl, attention_pool_reference)
    shape = POOL_CASES[case]
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(shape, generator=gen)
    logits = torch.randn(shape[0], 1, *shape[2:], generator=gen) * 3
    grad = torch.randn(shape[:2], generator=gen)
    f, x, g = (t.to(device) for t in (features, logits, grad))
    if mode == "forward":
        def run(f, x):
            with torch.no_grad():
                return (fn(f, x),)
        fd, xd = features.double(), logits.double()
        want = (attention_pool_reference(fd, xd),)
    else:
        f.requires_grad_(), x.requires_grad_()

        def run(f, x):
            return torch.autograd.grad(fn(f, x), (f, x), g)
        fd, xd = features.double().requires_grad_(), logits.double().requires_grad_()
        want = torch.autograd.grad(attention_pool_reference(fd, xd), (fd, xd), grad.double())
    run = _timed(run, device)
    _check(run(f, x), want, f"attention_pool {impl} {case} {mode}")  # also compiles / warms up
    _label(benchmark, "attention_pool", case, mode, impl)
    got = benchmark(run, f, x)
    _check(got, want, f"attention_pool {impl} {case} {mode}")


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("case", list(FUSION_CASES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_adaptive_fusion(benchmark, impl, case, mode):
    fn, device = _impl("adaptive_fusion", impl, adaptive_fusion_reference)
    n, cf, cc = FUSION_CASES[case]
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(n, cf, generator=gen), torch.randn(n, cc, generator=gen),
              torch.randn(n, 1, generator=gen), torch.randn(n, 1, generator=gen)]
    grad = torch.randn(n, cf + cc, generator=gen)
    dev_inputs, g = [t.to(device) for t in inputs], grad.to(device)
    if mode == "forward":
        def run(*a):
            with torch.no_grad():
                return (fn(*a),)
        want = (adaptive_fusion_reference(*[t.double() for t in inputs]),)
    else:
        for t in dev_inputs:
            t.requires_grad_()

        def run(*a):
            return torch.autograd.grad(fn(*a), a, g)
        ref_inputs = [t.double().requires_grad_() for t in inputs]
        want = torch.autograd.grad(adaptive_fusion_reference(*ref_inputs), ref_inputs, grad.double())
    run = _timed(run, device)
    _check(run(*dev_inputs), want, f"adaptive_fusion {impl} {case} {mode}")
    _label(benchmark, "adaptive_fusion", case, mode, impl)
    got = benchmark(run, *dev_inputs)
    _check(got, want, f"adaptive_fusion {impl} {case} {mode}")
