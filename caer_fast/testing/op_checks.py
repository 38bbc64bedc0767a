"""Checks of one fused-op implementation against the torch reference, shared by the Triton
interpreter cases (CPU) and the GPU tier. Not collected by pytest on its own (no test_ prefix).

The reference runs in float64 on the very same (rounded) inputs, so the difference measures the
kernel's arithmetic only. float32 must agree to ~1e-5; float16/bfloat16 may be at most twice as far
from it as plain PyTorch in that same precision (flash-attention's rule), plus one rounding step.
"""
import contextlib
import ctypes
import glob
import os

import torch

from caer_fast.ops.adaptive_fusion import adaptive_fusion_reference
from caer_fast.ops.attention_pool import attention_pool_reference
from caer_fast.ops.face_context import face_context_reference

@contextlib.contextmanager
def junk_filled_allocations():
    """New CPU tensors come back filled with NaN (c10 flag caffe2_cpu_allocator_do_junk_fill): an
    output element a kernel forgets to write stays NaN and fails the comparison."""
    lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.*"))[0])
    flag = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_cpu_allocator_do_junk_fill")
    old, flag.value = flag.value, True
    try:
        yield
    finally:
        flag.value = old


def ops_called(fn):
    """The names of the operators ``fn()`` dispatches below autograd (``caer_fast.<op>.default`` …)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def aot_recorder():
    """(a torch.compile backend, {"fw": [...], "bw": [...]}): AOTAutograd recording the call targets of
    the forward and backward graphs, then running them as they are."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    seen = {"fw": [], "bw": []}

    def record(stage):
        def compiler(gm, _):
            seen[stage] += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw")), seen


_ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def assert_close(got, ref64, lowp, dtype, what):
    got, ref64 = got.detach().double().cpu(), ref64.detach().double().cpu()
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err = (got - ref64).abs().max().item() if got.numel() else 0.0
    if dtype in _ULP:
        torch_err = (lowp.detach().double().cpu() - ref64).abs().max().item() if got.numel() else 0.0
        bound = 2 * torch_err + 2 * _ULP[dtype] * scale
    else:
        bound = 2e-5 * scale
    assert err <= bound, f"{what} ({dtype}): max error {err:.3g} > bound {bound:.3g}"


def _run(fn, inputs, grads):
    """Forward, then backward of Σ out·grad; returns (outputs, input grads)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g.to(o.device)).sum() for o, g in zip(outs, grads))
    loss.backward()
    return outs, [t.grad for t in inputs]


def check_attention_pool(impl, shape, dtype, device, logit_scale=3.0, channels_last=False, return_attention=False,
                         seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, *space = shape
    features = torch.randn(n, c, *space, generator=gen, dtype=torch.float64)
    logits = torch.randn(n, 1, *space, generator=gen, dtype=torch.float64) * logit_scale
    grads = [torch.randn(n, c, generator=gen, dtype=torch.float64),
             torch.randn(n, 1, *space, generator=gen, dtype=torch.float64)]
    grads = grads[:2 if return_attention else 1]

    def make(dt):
        f, l = (t.to(device=device, dtype=dtype).to(dt) for t in (features, logits))  # same rounded inputs
        if channels_last:  # the kernels read strided features (no copy)
            f = f.to(memory_format=torch.channels_last)
        return [f.requires_grad_(), l.requires_grad_()]

    got, got_g = _run(lambda f, l: impl(f, l, return_attention), make(dtype), grads)
    ref, ref_g = _run(lambda f, l: attention_pool_reference(f, l, return_attention), make(torch.float64), grads)
    low, low_g = _run(lambda f, l: attention_pool_reference(f, l, return_attention), make(dtype), grads)
    for name, a, b, lp in zip(("out", "attention"), got, ref, low):
        assert a.dtype == dtype, f"attention_pool {name}: dtype {a.dtype} != {dtype}"
        assert_close(a, b, lp, dtype, f"attention_pool {name} {shape}")
    for name, a, b, lp in zip(("grad features", "grad logits"), got_g, ref_g, low_g):
        assert_close(a, b, lp, dtype, f"attention_pool {name} {shape}")


def check_adaptive_fusion(impl, n, cf, cc, dtype, device, score_scale=2.0, return_weights=False, strided=False,
                          seed=0):
    gen = torch.Generator().manual_seed(seed)
    face = torch.randn(n, cf + (3 if strided else 0), generator=gen, dtype=torch.float64)
    tensors = [face, torch.randn(n, cc, generator=gen, dtype=torch.float64),
               torch.randn(n, 1, generator=gen, dtype=torch.float64) * score_scale,
               torch.randn(n, 1, generator=gen, dtype=torch.float64) * score_scale]
    grads = [torch.randn(n, cf + cc, generator=gen, dtype=torch.float64),
             torch.randn(n, 2, generator=gen, dtype=torch.float64)][:2 if return_weights else 1]

    def make(dt):
        return [t.to(device=device, dtype=dtype).to(dt).requires_grad_() for t in tensors]

    def call(fn):
        def f(face, context, fs, cs):
            if strided:  # a row-strided view: face[:, :cf] of a wider tensor
                face = face[:, :cf]
            return fn(face, context, fs, cs, return_weights)
        return f

    got, got_g = _run(call(impl), make(dtype), grads)
    ref, ref_g = _run(call(adaptive_fusion_reference), make(torch.float64), grads)
    low, low_g = _run(call(adaptive_fusion_reference), make(dtype), grads)
    for name, a, b, lp in zip(("out", "weights"), got, ref, low):
        assert_close(a, b, lp, dtype, f"adaptive_fusion {name}")
    for name, a, b, lp in zip(("grad face", "grad context", "grad face_score", "grad context_score"),
                              got_g, ref_g, low_g):
        assert_close(a, b, lp, dtype, f"adaptive_fusion {name}")


def check_face_context(impl, frames, boxes, face_size, context_size, crop, antialias, dtype, device):
    args = (face_size, context_size, crop, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), antialias)
    got = impl(frames.to(device), boxes.to(device), *args, dtype)
    ref = face_context_reference(frames, boxes, *args, torch.float32)
    for name, a, b in zip(("face", "context"), got, ref):
        assert a.dtype == dtype and a.device.type == torch.device(device).type, f"face_context {name}: {a.dtype}"
        assert a.shape == b.shape, f"face_context {name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = (a.float().cpu() - b).abs().max().item() if a.numel() else 0.0
        # float32: table / summation-order rounding only; lower precisions: one output rounding (|x| < 3)
        bound = 1e-4 if dtype == torch.float32 else 3 * _ULP[dtype] * 3
        assert err <= bound, f"face_context {name} (antialias={antialias}, crop={crop}, {dtype}): {err:.3g} > {bound}"
