"""face_context on every backend present (tests/ops/conftest.py), against the per-frame torch reference.

Frames are uniform noise, so a window or weight off by one float ulp, a half-pixel shift or a
missed mask shows up far above the 1e-4 tolerance. CPU kernels run with torch's CPU allocator
junk-filling new memory (float NaN): an output element a kernel forgets to write stays NaN and fails.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import caer_fast.ops as ops
from caer_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from caer_fast.ops.face_context import clip_boxes, face_context_reference
from caer_fast.testing.op_checks import junk_filled_allocations

from .conftest import interpreted

ATOL = 1e-4  # normalised units (1 grey level is ~0.017)
CROP = (8, 29, 112, 112)


def run(device, frames, boxes, face_size=(96, 96), context_size=(128, 171), crop=None, antialias=True,
        dtype=torch.float32):
    with junk_filled_allocations():
        face, context = ops.face_context(frames.to(device), torch.as_tensor(boxes).to(device), face_size,
                                         context_size, crop, antialias=antialias, dtype=dtype)
    return face.cpu(), context.cpu()


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


def assert_matches(device, frames, boxes, face_size=(96, 96), context_size=(128, 171), crop=None, antialias=True):
    boxes = torch.as_tensor(boxes)
    want = face_context_reference(frames, boxes, face_size, context_size, crop, antialias=antialias)
    got = run(device, frames, boxes, face_size, context_size, crop, antialias)
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


@pytest.mark.parametrize("antialias", [True, False], ids=["aa", "bilinear"])
@pytest.mark.parametrize("crop", [None, CROP], ids=["full", "crop"])
@pytest.mark.parametrize("size,boxes", BOX_CASES, ids=lambda v: "x".join(map(str, v)) if len(v) == 2 else None)
def test_matches_reference(backend, size, boxes, crop, antialias):
    if interpreted(backend[0]):
        if size[0] > 40 or crop is not None:
            pytest.skip("interpreter: small frames and outputs only")
        assert_matches(backend[1], noise(len(boxes), *size, seed=size[0]), boxes, face_size=(9, 11),
                       context_size=(16, 21), antialias=antialias)
        return
    assert_matches(backend[1], noise(len(boxes), *size, seed=size[0]), boxes, crop=crop, antialias=antialias)


@pytest.mark.parametrize("antialias", [True, False], ids=["aa", "bilinear"])
def test_float32_error_is_reference_sized(backend, antialias):
    """Against float64, a kernel is at most about as wrong as the float32 reference itself."""
    if interpreted(backend[0]):
        frames, boxes, sizes = noise(3, 23, 31, seed=3), torch.tensor([[3, 2, 17, 21], [0, 0, 5, 4], [0, 0, 0, 0]]), \
            ((9, 11), (16, 21), (1, 2, 12, 15))
    else:
        frames, boxes, sizes = noise(3, 123, 201, seed=3), torch.tensor([[30, 20, 97, 111], [0, 0, 5, 4], [0, 0, 0, 0]]), \
            ((96, 96), (128, 171), (3, 7, 100, 90))
    got, want = assert_matches(backend[1], frames, boxes, *sizes, antialias=antialias)
    exact = reference64(frames, boxes, *sizes, antialias)
    for g, r, e in zip(got, want, exact):
        assert (g.double() - e).abs().max() <= 2 * (r.double() - e).abs().max() + 2e-6


def test_masks_only_the_box_and_empty_box_means_no_face(backend):
    frames, boxes = noise(2, 30, 40, seed=4), torch.tensor([[5, 5, 25, 20], [15, 15, 15, 20]])
    (face, context), _ = assert_matches(backend[1], frames, boxes, face_size=(10, 10), context_size=(30, 40),
                                        antialias=False)
    # same size, no antialias: the context is the frame itself, box black
    norm = lambda v: (v / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    masked = frames[0].permute(2, 0, 1).float().clone()
    masked[:, 5:20, 5:25] = 0
    torch.testing.assert_close(context[0], norm(masked), atol=1e-5, rtol=0)
    assert (face[1] == 0).all()
    torch.testing.assert_close(context[1], norm(frames[1].permute(2, 0, 1).float()), atol=1e-5, rtol=0)


def test_reference_resize_to_one_pixel_wide(backend):
    """torch 2.13's antialiased bilinear returns the first row for every row of an output 1 pixel wide and
    2+ high; the reference works around it (hypothesis found it: a 2×1 face box resized to 3×1)."""
    from caer_fast.ops.face_context import _resize

    img = torch.tensor([[172.0, 100.0], [211.0, 50.0]]).view(1, 1, 2, 2)
    # width 2 → 1 averages each row (136, 130.5); height 2 → 3 interpolates: 136, 133.25, 130.5
    torch.testing.assert_close(_resize(img, (3, 1), antialias=True).flatten(), torch.tensor([136.0, 133.25, 130.5]))
    frames = torch.tensor([[[[172, 47, 117]], [[211, 21, 242]]]], dtype=torch.uint8)
    face, _ = face_context_reference(frames, torch.tensor([[0, 0, 1, 2]]), (3, 1), (1, 1))
    assert face[0, :, 0, 0].ne(face[0, :, 2, 0]).all(), "the face's two rows came out as one"
    assert_matches(backend[1], frames, [[0, 0, 1, 2]], face_size=(3, 1), context_size=(1, 1))


def test_other_sizes_and_layouts(backend):
    small = interpreted(backend[0])
    frames = noise(2, 50, 64, seed=5)
    boxes = torch.tensor([[5, 6, 40, 45], [-1, 2, 63, 49]], dtype=torch.int32)
    assert_matches(backend[1], frames, boxes, face_size=(33, 17), context_size=(70, 29), crop=(1, 2, 69, 27))
    if not small:
        assert_matches(backend[1], frames, boxes, face_size=(128, 128), context_size=(200, 300))  # upscaling both
    assert_matches(backend[1], frames[:, ::2, 1::2], boxes, face_size=(9, 11), context_size=(13, 15))  # strided


def test_large_downscale_many_taps(backend):
    """Downscaling ~40× needs ~80 taps per output pixel: many of the Triton kernel's 8-wide tap tiles."""
    frames = noise(2, 90, 163, seed=6)
    boxes = torch.tensor([[3, 2, 160, 88], [40, 10, 80, 50]])
    for antialias in (True, False):
        assert_matches(backend[1], frames, boxes, face_size=(2, 4), context_size=(3, 4), antialias=antialias)


def test_empty_batch(backend):
    face, context = run(backend[1], noise(0, 50, 64), torch.zeros(0, 4, dtype=torch.int64), crop=CROP)
    assert face.shape == (0, 3, 96, 96) and context.shape == (0, 3, 112, 112)


def test_junk_fill_is_active():
    """The NaN poisoning the tests rely on really works (else they could pass by luck)."""
    with junk_filled_allocations():
        assert torch.empty(1000).isnan().all()
        assert torch.empty(3, 96, 96).isnan().all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(frames=torch.zeros(1, 8, 8, 3)), "uint8"),
    (dict(frames=torch.zeros(1, 8, 8, 4, dtype=torch.uint8)), "uint8"),
    (dict(frames=torch.zeros(1, 0, 8, 3, dtype=torch.uint8)), "H, W > 0"),
    (dict(boxes=torch.zeros(2, 4, dtype=torch.int64)), "N×4"),
    (dict(boxes=torch.zeros(1, 4)), "integer"),
    (dict(crop=(0, 0, 129, 10)), "inside"),  # crop outside the context
    (dict(crop=(-1, 0, 10, 10)), "inside"),  # negative crop
    (dict(crop=(0, 0, 0, 10)), "inside"),
    (dict(crop=(0, 0, 10)), "inside"),
    (dict(face_size=(0, 96)), "positive"),  # face size 0
    (dict(context_size=(128, -1)), "positive"),
    (dict(mean=(0.5, 0.5)), "3 finite"),
    (dict(std=(0.2, 0.0, 0.2)), "nonzero"),  # std 0
    (dict(std=(0.2, float("nan"), 0.2)), "3 finite"),
])
def test_errors(backend, kwargs, match):
    """Every backend rejects the same arguments, before any kernel runs, with the same message."""
    args = dict(frames=torch.zeros(1, 8, 8, 3, dtype=torch.uint8), boxes=torch.zeros(1, 4, dtype=torch.int64))
    args.update(kwargs)
    args["frames"], args["boxes"] = args["frames"].to(backend[1]), args["boxes"].to(backend[1])
    with pytest.raises(ValueError, match=match):
        ops.face_context(**args)


def test_boxes_as_list_tuple_or_numpy(backend):
    """Boxes that are not a tensor are taken as torch.as_tensor takes them, onto the frames' device."""
    device = backend[1]
    frames = noise(2, 20, 27, seed=3).to(device)
    boxes = [[3, 2, 15, 17], [0, 0, 0, 0]]
    want = ops.face_context(frames, torch.tensor(boxes, device=device), (5, 7), (8, 9))
    for given in (boxes, tuple(map(tuple, boxes)), torch.tensor(boxes).numpy().astype("int32")):
        got = ops.face_context(frames, given, (5, 7), (8, 9))
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    with pytest.raises(TypeError, match="face_context: boxes must be a tensor, or a list"):
        ops.face_context(frames, [[3, 2, 15], [0, 0, 0, 0]], (5, 7), (8, 9))  # ragged
    with pytest.raises(TypeError, match="face_context: frames must be a uint8 N×H×W×3 tensor"):
        ops.face_context(frames.cpu().numpy(), boxes, (5, 7), (8, 9))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.bool, torch.float32], ids=str)
def test_narrow_or_float_boxes_are_an_error(backend, dtype):
    """uint8 boxes cannot hold x = 300: they would have wrapped silently, so they are refused."""
    device = backend[1]
    frames = noise(1, 20, 27).to(device)
    with pytest.raises(ValueError, match="boxes must be integer pixels .* int16, int32 or int64"):
        ops.face_context(frames, torch.tensor([[1, 2, 5, 6]]).to(dtype).to(device), (5, 7), (8, 9))
    for ok in (torch.int16, torch.int32):
        got = ops.face_context(frames, torch.tensor([[1, 2, 5, 6]], dtype=ok, device=device), (5, 7), (8, 9))
        want = ops.face_context(frames, torch.tensor([[1, 2, 5, 6]], device=device), (5, 7), (8, 9))
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mean=0.5), "mean must be a sequence of numbers"),
    (dict(std=("a", 1, 1)), "std must be a sequence of numbers"),
    (dict(face_size=96), "face_size must be a sequence of integers"),
    (dict(mean=(0.5, float("inf"), 0.5)), "3 finite numbers"),
    (dict(std=torch.tensor([0.2, float("nan"), 0.2])), "3 finite numbers"),
])
def test_bad_numbers_are_value_errors(backend, kwargs, match):
    """mean/std/sizes: a ValueError naming the op and the argument, NaN and inf included (the frames are
    uint8, so with finite mean/std every output is finite)."""
    device = backend[1]
    args = dict(frames=torch.zeros(1, 8, 8, 3, dtype=torch.uint8, device=device), boxes=[[1, 1, 4, 4]])
    with pytest.raises(ValueError, match=match):
        ops.face_context(**args, **kwargs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 40), w=st.integers(1, 40), fh=st.integers(1, 24), fw=st.integers(1, 24),
       ch=st.integers(1, 48), cw=st.integers(1, 48), antialias=st.booleans(), use_crop=st.booleans(),
       coords=st.lists(st.integers(-10, 50), min_size=8, max_size=8), seed=st.integers(0, 1000))
def test_random_boxes(backend, h, w, fh, fw, ch, cw, antialias, use_crop, coords, seed):
    if interpreted(backend[0]) and h * w + fh * fw + ch * cw > 1500:
        return  # interpreter: the smaller examples only
    frames = noise(2, h, w, seed=seed)
    boxes = torch.tensor(coords).view(2, 4)
    crop = (ch // 4, cw // 3, ch - ch // 4, cw - cw // 3) if use_crop else None
    assert_matches(backend[1], frames, boxes, face_size=(fh, fw), context_size=(ch, cw), crop=crop,
                   antialias=antialias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_output_dtypes(backend, dtype):
    frames, boxes = noise(3, 30, 50, seed=6), torch.tensor([[20, 5, 33, 22], [0, 0, 0, 0], [-5, 15, 10, 31]])
    face, context = run(backend[1], frames, boxes, (12, 12), (20, 28), (2, 3, 14, 14), dtype=dtype)
    want = face_context_reference(frames, boxes, (12, 12), (20, 28), (2, 3, 14, 14), dtype=torch.float32)
    eps = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0  # one rounding to dtype
    for g, r in zip((face, context), want):
        assert g.dtype == dtype and g.shape == r.shape
        torch.testing.assert_close(g.float(), r, atol=ATOL, rtol=eps)


def test_opcheck(backend):
    name, device = backend
    if name == "torch":
        pytest.skip("the torch backend does not call the op")
    frames = noise(3, 20, 27).to(device)
    boxes = torch.tensor([[3, 2, 15, 17], [0, 0, 0, 0], [0, 10, 27, 12]]).to(device)  # clipped: the op's contract
    for dtype in (torch.float32, torch.float16):
        torch.library.opcheck(torch.ops.caer_fast.face_context.default,
                              (frames, boxes, [5, 7], [8, 9], [1, 2, 5, 6], [0.5] * 3, [0.25] * 3, True, dtype))


def test_kernels_take_clipped_boxes(backend):
    """The front door clips once; the op itself refuses boxes that are not clipped (never reads past the
    frame), and the front door's clipping makes any box fine."""
    name, device = backend
    frames = noise(2, 20, 27).to(device)
    args = ([5, 7], [8, 9], [1, 2, 5, 6], [0.5] * 3, [0.25] * 3, True, torch.float32)
    if name != "torch":
        for bad in ([[-3, 10, 20, 12], [0, 0, 0, 0]], [[3, 2, 28, 17], [0, 0, 0, 0]], [[3, 2, 15, 21], [1, 1, 1, 1]],
                    [[3, 2, 15, 17], [5, 5, 2, 9]]):
            with pytest.raises((RuntimeError, ValueError), match="boxes must be clipped"):
                torch.ops.caer_fast.face_context.default(frames, torch.tensor(bad).to(device), *args)
    boxes = torch.tensor([[-3, 10, 40, 12], [5, 5, 2, 9]])
    got = ops.face_context(frames, boxes.to(device), (5, 7), (8, 9), (1, 2, 5, 6), [0.5] * 3, [0.25] * 3)
    want = face_context_reference(frames.cpu(), torch.tensor([[0, 10, 27, 12], [0, 0, 0, 0]]), (5, 7), (8, 9),
                                  (1, 2, 5, 6), [0.5] * 3, [0.25] * 3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, atol=ATOL, rtol=0)


def test_clip_boxes():
    b = clip_boxes(torch.tensor([[-3, 10, 40, 12], [5, 5, 2, 9], [1, 2, 3, 4], [4, 30, 9, 40]], dtype=torch.int16),
                   20, 27)
    assert b.dtype == torch.int64
    assert b.tolist() == [[0, 10, 27, 12], [0, 0, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0]]


def test_compile_fullgraph(backend):
    name, device = backend
    if name == "torch":
        pytest.skip("the reference loops over the frames and branches on the box values: not one graph")
    seen = []

    def record(gm, _):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(ops.face_context, fullgraph=True, backend=record)
    frames, boxes = noise(3, 20, 27), torch.tensor([[3, 2, 15, 17], [0, 0, 0, 0], [-3, 10, 40, 12]])
    got = compiled(frames.to(device), boxes.to(device), (5, 7), (8, 9), (1, 2, 5, 6))
    want = face_context_reference(frames, boxes, (5, 7), (8, 9), (1, 2, 5, 6))
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu(), r, atol=ATOL, rtol=0)
    assert "caer_fast.face_context.default" in seen, seen
