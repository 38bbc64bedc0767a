"""face_context speed: 32 frames 400×712 uint8 -> face 96×96 + context 128×171 cropped to 112×112.

Run: ``OMP_NUM_THREADS=1 pytest bench/test_face_context.py --benchmark-only --benchmark-group-by=group``.
Implementations: the per-frame eager reference, a batched torch version (one interpolate over the
float batch), and the cpp kernel (through the public op, backend cpp). Each first checks its result against the reference. GB/s counts
the uint8 frames read plus the float32 outputs written (extra_info["GB/s"]).
"""
import pytest
import torch
import torch.nn.functional as F

import caer_fast.ops as ops
from caer_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from caer_fast.ops.face_context import clip_boxes, face_context_reference

N, H, W = 32, 400, 712
FACE, CONTEXT, CROP = (96, 96), (128, 171), (8, 29, 112, 112)
IMPLEMENTATIONS = ["reference", "torch-batched", "cpp"]


def face_context_batched(frames, boxes, face_size, context_size, crop, mean, std, antialias, dtype):
    """Plain torch, batched where shapes allow: one context interpolate over all frames."""
    n, h, w, _ = frames.shape
    b = clip_boxes(boxes, h, w)
    img = frames.permute(0, 3, 1, 2).float()
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = ((ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None]) & (xs >= b[:, 0, None, None])
              & (xs < b[:, 2, None, None]))
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    faces = torch.zeros(n, 3, *face_size)
    for i, (x1, y1, x2, y2) in enumerate(b.tolist()):  # boxes differ in size: one interpolate each
        if x2 > x1 and y2 > y1:
            face = F.interpolate(img[i:i + 1, :, y1:y2, x1:x2], size=face_size, mode="bilinear",
                                 antialias=antialias)
            faces[i] = ((face / 255 - mean_t) / std_t)[0]  # no face stays 0, not -mean/std
    context = F.interpolate(img.masked_fill_(inside[:, None], 0), size=context_size, mode="bilinear",
                            antialias=antialias)
    top, left, ch, cw = crop
    context = context[:, :, top:top + ch, left:left + cw]
    context = (context / 255 - mean_t) / std_t
    return faces.to(dtype), context.contiguous().to(dtype)


def _impl(name):
    if name == "reference":
        return face_context_reference
    if name == "torch-batched":
        return face_context_batched
    why = ops.why_unavailable("cpp", "cpu")
    if why:
        pytest.skip(f"cpp backend unavailable: {why}")

    def cpp(*args):
        with ops.use_backend("cpp"):
            return ops.face_context(*args)
    return cpp


@pytest.mark.parametrize("antialias", [True, False], ids=["aa", "bilinear"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_face_context_speed(benchmark, implementation, antialias):
    fn = _impl(implementation)
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (N, H, W, 3), dtype=torch.uint8, generator=g)
    x1 = torch.randint(0, W - 160, (N,), generator=g)
    y1 = torch.randint(0, H - 200, (N,), generator=g)
    boxes = torch.stack([x1, y1, x1 + 60 + x1 % 100, y1 + 80 + y1 % 120], 1)
    boxes[::8] = 0  # every 8th frame has no face
    args = (frames, boxes, FACE, CONTEXT, CROP, IMAGENET_MEAN, IMAGENET_STD, antialias, torch.float32)

    want = face_context_reference(*args)
    for got, ref in zip(fn(*args), want):
        assert (got - ref).abs().max() <= 1e-4

    benchmark.group = f"face_context 32x400x712 {'aa' if antialias else 'bilinear'}"
    benchmark.extra_info.update(op="face_context", implementation=implementation)
    benchmark.pedantic(fn, args=args, rounds=5 if implementation == "reference" else 20, iterations=1,
                       warmup_rounds=1)
    nbytes = frames.numel() + sum(t.numel() * 4 for t in want)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 3)
