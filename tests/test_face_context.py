"""face_context: the cpp kernel (and the dispatched op) against the per-frame torch reference.

Frames are uniform noise, so a window or weight off by one float ulp, a half-pixel shift or a
missed mask shows up far above the 1e-4 tolerance. The raw kernel runs with torch's CPU allocator
junk-filling new memory (float NaN): an output element it forgets to write stays NaN and fails.
"""
import contextlib
import ctypes
import glob
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from caer_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from caer_fast.ops import face_context
from caer_fast.ops.face_context import clip_boxes, face_context_reference

try:
    from caer_fast import _C
except ImportError:  # test_ops_cpu.test_extension_is_built reports it
    _C = None

needs_cpp = pytest.mark.skipif(_C is None, reason="caer_fast._C not built")
ATOL = 1e-4  # normalised units (1 grey level is ~0.017)
CROP = (8, 29, 112, 112)


@contextlib.contextmanager
def junk_filled_allocations():
    """New CPU tensors come back filled with NaN (c10 flag caffe2_cpu_allocator_do_junk_fill)."""
    lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.*"))[0])
    flag = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_cpu_allocator_do_junk_fill")
    old, flag.value = flag.value, True
    try:
        yield
    finally:
        flag.value = old


def cpp(frames, boxes, face_size=(96, 96), context_size=(128, 171), crop=None, antialias=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD):
    top, left, ch, cw = (-1, -1, -1, -1) if crop is None else crop
    with junk_filled_allocations():
        return _C.face_context_forward(frames, boxes, *face_size, *context_size, top, left, ch, cw, list(mean),
                                       list(std), antialias)


def reference64(frames, boxes, face_size, context_size, crop, antialias):
    """The reference recomputed in float64: how far from exact the float32 results are."""
    n, h, w, _ = frames.shape
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    faces, contexts = torch.zeros(n, 3, *face_size, dtype=torch.float64), []
    for i, (x1, y1, x2, y2) in enumerate(clip_boxes(boxes, h, w).tolist()):
        img = frames[i].permute(2, 0, 1).double()
        if x2 > x1:
            faces[i] = (F.interpolate(img[None, :, y1:y2, x1:x2], size=face_size, mode="bilinear",
                                      antialias=antialias)[0] / 255 - mean) / std
            img = img.clone()
            img[:, y1:y2, x1:x2] = 0
        contexts.append((F.interpolate(img[None], size=context_size, mode="bilinear", antialias=antialias)[0]
                         / 255 - mean) / std)
    context = torch.stack(contexts)
    if crop is not None:
        context = context[:, :, crop[0]:crop[0] + crop[2], crop[1]:crop[1] + crop[3]]
    return faces, context


def noise(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


def assert_matches(frames, boxes, face_size=(96, 96), context_size=(128, 171), crop=None, antialias=True):
    boxes = torch.as_tensor(boxes)
    want = face_context_reference(frames, boxes, face_size, context_size, crop, antialias=antialias)
    got = cpp(frames, boxes, face_size, context_size, crop, antialias)
    for name, g, r in zip(("face", "context"), got, want):
        assert g.dtype == torch.float32 and g.shape == r.shape, (name, g.shape, r.shape)
        assert not g.isnan().any(), f"{name}: unwritten (NaN) elements"
        err = (g - r).abs().max().item() if g.numel() else 0.0
        assert err <= ATOL, f"{name}: max abs error {err:.2e} vs the float32 reference"
    return got, want


# (H, W), boxes: inside, off the frame, empty, one pixel, whole frame, negative, past the edges,
# tiny (upscaled to 96), larger than the frame.
BOX_CASES = [
    ((400, 712), [[300, 80, 420, 220], [800, 500, 900, 600], [10, 10, 10, 50], [5, 7, 6, 8]]),
    ((400, 712), [[0, 0, 712, 400], [-30, -20, 40, 33], [650, 350, 900, 800], [100, 100, 103, 104]]),
    ((37, 53), [[3, 4, 30, 33], [-5, -5, 100, 100], [52, 36, 53, 37], [20, 0, 10, 30]]),
    ((1, 1), [[0, 0, 1, 1], [0, 0, 0, 0], [-3, -3, 5, 5], [1, 1, 2, 2]]),
    ((2, 3), [[0, 0, 3, 2], [1, 0, 2, 1], [0, 0, 0, 0], [2, 1, 3, 2]]),
]


@needs_cpp
@pytest.mark.parametrize("antialias", [True, False], ids=["aa", "bilinear"])
@pytest.mark.parametrize("crop", [None, CROP], ids=["full", "crop"])
@pytest.mark.parametrize("size,boxes", BOX_CASES, ids=lambda v: "x".join(map(str, v)) if len(v) == 2 else None)
def test_cpp_matches_reference(size, boxes, crop, antialias):
    frames = noise(len(boxes), *size, seed=size[0])
    assert_matches(frames, boxes, crop=crop, antialias=antialias)


@needs_cpp
@pytest.mark.parametrize("antialias", [True, False], ids=["aa", "bilinear"])
def test_cpp_float32_error_is_reference_sized(antialias):
    """Against float64, the kernel is at most about as wrong as the float32 reference itself."""
    frames, boxes = noise(3, 123, 201, seed=3), torch.tensor([[30, 20, 97, 111], [0, 0, 5, 4], [0, 0, 0, 0]])
    got, want = assert_matches(frames, boxes, crop=(3, 7, 100, 90), antialias=antialias)
    exact = reference64(frames, boxes, (96, 96), (128, 171), (3, 7, 100, 90), antialias)
    for g, r, e in zip(got, want, exact):
        assert (g.double() - e).abs().max() <= 2 * (r.double() - e).abs().max() + 2e-6


@needs_cpp
def test_cpp_masks_only_the_box_and_empty_box_means_no_face():
    frames, boxes = noise(2, 60, 80, seed=4), torch.tensor([[10, 10, 50, 40], [30, 30, 30, 40]])
    (face, context), _ = assert_matches(frames, boxes, face_size=(20, 20), context_size=(60, 80), antialias=False)
    # same size, no antialias: the context is the frame itself, box black
    norm = lambda v: (v / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    masked = frames[0].permute(2, 0, 1).float().clone()
    masked[:, 10:40, 10:50] = 0
    torch.testing.assert_close(context[0], norm(masked), atol=1e-5, rtol=0)
    assert (face[1] == 0).all()
    torch.testing.assert_close(context[1], norm(frames[1].permute(2, 0, 1).float()), atol=1e-5, rtol=0)


def test_reference_resize_to_one_pixel_wide():
    """torch 2.13's antialiased bilinear returns the first row for every row of an output 1 pixel wide and
    2+ high; the reference works around it (hypothesis found it: a 2×1 face box resized to 3×1)."""
    from caer_fast.ops.face_context import _resize

    img = torch.tensor([[172.0, 100.0], [211.0, 50.0]]).view(1, 1, 2, 2)
    # width 2 → 1 averages each row (136, 130.5); height 2 → 3 interpolates: 136, 133.25, 130.5
    torch.testing.assert_close(_resize(img, (3, 1), antialias=True).flatten(), torch.tensor([136.0, 133.25, 130.5]))
    frames = torch.tensor([[[[172, 47, 117]], [[211, 21, 242]]]], dtype=torch.uint8)
    face, _ = face_context_reference(frames, torch.tensor([[0, 0, 1, 2]]), (3, 1), (1, 1))
    assert face[0, :, 0, 0].ne(face[0, :, 2, 0]).all(), "the face's two rows came out as one"
    if _C is not None:
        assert_matches(frames, [[0, 0, 1, 2]], face_size=(3, 1), context_size=(1, 1))


@needs_cpp
def test_cpp_other_sizes_and_layouts():
    frames = noise(2, 50, 64, seed=5)
    boxes = torch.tensor([[5, 6, 40, 45], [-1, 2, 63, 49]], dtype=torch.int32)
    assert_matches(frames, boxes, face_size=(33, 17), context_size=(70, 29), crop=(1, 2, 69, 27))
    assert_matches(frames, boxes, face_size=(128, 128), context_size=(200, 300))  # upscaling both
    assert_matches(frames[:, ::2, 1::2], boxes, face_size=(9, 11), context_size=(13, 15))  # non-contiguous
    # N = 0
    face, context = cpp(frames[:0], boxes[:0], crop=CROP)
    assert face.shape == (0, 3, 96, 96) and context.shape == (0, 3, 112, 112)


def test_junk_fill_is_active():
    """The NaN poisoning the cpp tests rely on really works (else they could pass by luck)."""
    with junk_filled_allocations():
        assert torch.empty(1000).isnan().all()
        assert torch.empty(3, 96, 96).isnan().all()


@needs_cpp
@pytest.mark.parametrize("kwargs,match", [
    (dict(frames=torch.zeros(1, 8, 8, 3)), "uint8"),
    (dict(frames=torch.zeros(1, 8, 8, 4, dtype=torch.uint8)), "uint8"),
    (dict(boxes=torch.zeros(2, 4, dtype=torch.int64)), "N×4"),
    (dict(boxes=torch.zeros(1, 4)), "integer"),
    (dict(crop=(0, 0, 129, 10)), "inside"),
    (dict(crop=(-1, 0, 10, 10)), "inside"),
    (dict(face_size=(0, 96)), "positive"),
    (dict(mean=(0.5, 0.5)), "3 values"),
    (dict(frames=torch.zeros(1, 0, 8, 3, dtype=torch.uint8)), "H, W > 0"),
])
def test_cpp_errors(kwargs, match):
    args = dict(frames=torch.zeros(1, 8, 8, 3, dtype=torch.uint8), boxes=torch.zeros(1, 4, dtype=torch.int64))
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match):
        cpp(**args)


@needs_cpp
@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), fh=st.integers(1, 24), fw=st.integers(1, 24),
       ch=st.integers(1, 48), cw=st.integers(1, 48), antialias=st.booleans(), use_crop=st.booleans(),
       coords=st.lists(st.integers(-10, 50), min_size=8, max_size=8), seed=st.integers(0, 1000))
def test_cpp_random_boxes(h, w, fh, fw, ch, cw, antialias, use_crop, coords, seed):
    frames = noise(2, h, w, seed=seed)
    boxes = torch.tensor(coords).view(2, 4)
    crop = (ch // 4, cw // 3, ch - ch // 4, cw - cw // 3) if use_crop else None
    assert_matches(frames, boxes, face_size=(fh, fw), context_size=(ch, cw), crop=crop, antialias=antialias)


# ---- through caer_fast.ops.face_context (dispatch, dtype casts) ----
BACKENDS = ["torch"] + (["cpp"] if _C is not None else [])


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dispatched_op(monkeypatch, backend_name, dtype):
    monkeypatch.setenv("CAER_FAST_BACKEND", backend_name)
    from caer_fast.ops import backend

    assert backend("cpu") == backend_name
    frames, boxes = noise(3, 90, 160, seed=6), torch.tensor([[60, 20, 100, 70], [0, 0, 0, 0], [-5, 50, 30, 95]])
    face, context = face_context(frames, boxes, crop=CROP, dtype=dtype)
    want = face_context_reference(frames, boxes, crop=CROP, dtype=torch.float32)
    # one rounding to dtype on top of the float32 error
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    for g, r in zip((face, context), want):
        assert g.dtype == dtype and g.shape == r.shape
        torch.testing.assert_close(g.float(), r, atol=ATOL, rtol=eps)
