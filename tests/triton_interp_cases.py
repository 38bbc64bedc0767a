"""Triton kernels under the interpreter, on CPU tensors. Run by test_ops_triton.py in a subprocess
(TRITON_INTERPRET must be set before triton is imported and must not leak into other tests);
by hand: ``TRITON_INTERPRET=1 pytest tests/triton_interp_cases.py``. Tiny shapes: the interpreter
is ~1000× slower than torch.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # collected by a plain run: it would compile for a GPU
    pytest.skip("run with TRITON_INTERPRET=1 (test_ops_triton.py does)", allow_module_level=True)

import torch  # noqa: E402

from caer_fast.kernels import adaptive_fusion as af  # noqa: E402
from caer_fast.kernels import attention_pool as ap  # noqa: E402
from caer_fast.kernels import face_context as fc  # noqa: E402
from op_checks import check_adaptive_fusion, check_attention_pool, check_face_context  # noqa: E402

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kw", [
    ((2, 37, 5, 7), {}),  # C not a multiple of BLOCK_C, S < BLOCK_S
    ((2, 5, 130), {}),  # three position blocks: the running max rescales
    ((1, 3, 3, 5, 5), {"return_attention": True}),  # space-time map, gradient through the attention too
    ((2, 6, 4, 4), {"channels_last": True}),  # strided features, read in place
    ((2, 4, 9, 9), {"logit_scale": 1e4}),  # ±1e4 logits: online softmax stays finite
])
def test_attention_pool(shape, kw, dtype):
    check_attention_pool(ap.attention_pool, shape, dtype, "cpu", **kw)


def test_attention_pool_partial_grads():
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    l = torch.randn(2, 1, 4, 4)  # noqa: E741
    ap.attention_pool(f, l).sum().backward()
    assert l.grad is None and f.grad is not None
    f2, l2 = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4, requires_grad=True)
    ap.attention_pool(f2, l2).sum().backward()
    assert f2.grad is None and l2.grad is not None and l2.grad.shape == l2.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, cf, cc, kw", [
    (3, 200, 77, {"return_weights": True}),  # several column blocks, gradient through the weights
    (1, 5, 300, {"strided": True}),  # face a row-strided view
    (2, 16, 16, {"score_scale": 1e4}),  # saturated weights (0 / 1) stay finite
])
def test_adaptive_fusion(n, cf, cc, kw, dtype):
    check_adaptive_fusion(af.adaptive_fusion, n, cf, cc, dtype, "cpu", **kw)


FRAMES = torch.randint(0, 256, (4, 40, 57, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
BOXES = torch.tensor([[5, 4, 30, 33],  # downscaled face (support > 1 px)
                      [0, 0, 0, 0],  # no face: zeros, nothing masked
                      [-3, 10, 80, 12],  # clipped to the frame, 2 rows tall: upscaled
                      [20, 20, 24, 23]])  # tiny face: upscaled in both directions


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("context_size, crop", [((16, 21), None), ((16, 21), (2, 3, 10, 11)), ((50, 60), (1, 2, 40, 40))])
def test_face_context(antialias, context_size, crop):
    check_face_context(fc.face_context, FRAMES, BOXES, (9, 11), context_size, crop, antialias, torch.float32, "cpu")


def test_face_context_fp16():
    check_face_context(fc.face_context, FRAMES, BOXES, (9, 11), (16, 21), (2, 3, 10, 11), True, torch.float16, "cpu")


def test_dispatch_picks_triton(monkeypatch):
    """CAER_FAST_BACKEND=triton routes the public ops to these kernels on CPU tensors."""
    import caer_fast.ops as ops

    monkeypatch.setenv("CAER_FAST_BACKEND", "triton")
    assert ops.backend("cpu") == "triton"
    f, l = torch.randn(2, 8, 3, 3), torch.randn(2, 1, 3, 3)  # noqa: E741
    torch.testing.assert_close(ops.attention_pool(f, l), ap.attention_pool(f, l))
    face, ctx = ops.face_context(FRAMES[:2], BOXES[:2], face_size=(5, 6), context_size=(7, 9))
    ref = fc.face_context(FRAMES[:2], BOXES[:2], (5, 6), (7, 9))
    torch.testing.assert_close(face, ref[0])
    torch.testing.assert_close(ctx, ref[1])
