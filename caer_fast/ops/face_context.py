"""`face_context`: face crop and face-masked context from uint8 frames, in one op.

The op ``caer_fast::face_context`` is defined in csrc/ops.cpp; this file checks the arguments (every
error of the op is raised here, before any backend runs), clips the boxes once (the kernels take them
clipped), registers the fake implementation and holds the per-frame torch reference the kernels are
tested against. Kernels compute in float32 and
round once to ``dtype`` (float16/bfloat16 kernels write it directly); other dtypes are cast after.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..constants import CONTEXT_SIZE, FACE_SIZE, IMAGENET_MEAN, IMAGENET_STD
from . import _dispatch


_BOX_DTYPES = (torch.int16, torch.int32, torch.int64)  # 8-bit ones would have wrapped coordinates past 127/255


def _as_boxes(boxes, frames: torch.Tensor) -> torch.Tensor:
    """``boxes`` as a tensor on the frames' device: a list, tuple or NumPy array is taken as torch.as_tensor
    takes it (like the ``size`` of F.interpolate, boxes are small coordinates, often a detector's list)."""
    if isinstance(boxes, torch.Tensor):
        return boxes
    try:
        return torch.as_tensor(boxes, device=frames.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"face_context: boxes must be a tensor, or a list/array of N [x1, y1, x2, y2] integers; "
                        f"got {type(boxes).__name__} ({exc})") from None


def _numbers(name: str, values, kind) -> tuple:
    """``values`` as a tuple of Python numbers: floats for ``kind`` float; integers are checked later."""
    try:
        out = tuple(v.item() if isinstance(v, torch.Tensor) else v + 0 for v in values)
        return tuple(float(v) for v in out) if kind is float else out
    except (TypeError, ValueError, RuntimeError):
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"face_context: {name} must be a sequence of {what}, got {values!r}") from None


def _check_inputs(frames: torch.Tensor, boxes: torch.Tensor, face_size, context_size, crop, mean, std):
    """Every error of the op, raised before any backend runs (so all backends agree on them)."""
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"face_context: frames must be a uint8 N×H×W×3 tensor, got {type(frames).__name__} "
                        "(torch.from_numpy takes a NumPy array without a copy)")
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"face_context: frames must be uint8 N×H×W×3 (RGB), got {tuple(frames.shape)} {frames.dtype}")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"face_context: frames must have H, W > 0, got {tuple(frames.shape)}")
    if boxes.dim() != 2 or boxes.shape != (frames.shape[0], 4):
        raise ValueError(f"face_context: boxes must be N×4 xyxy with N={frames.shape[0]}, got {tuple(boxes.shape)}")
    if boxes.dtype not in _BOX_DTYPES:
        why = " (8 bits wrap coordinates past 127 or 255)" if boxes.dtype in (torch.uint8, torch.int8) else ""
        raise ValueError(f"face_context: boxes must be integer pixels (xyxy) as int16, int32 or int64, "
                         f"got {boxes.dtype}{why}")
    if boxes.device != frames.device:
        raise ValueError(f"face_context: frames on {frames.device}, boxes on {boxes.device}")
    for name, size in (("face_size", face_size), ("context_size", context_size)):
        if len(size) != 2 or any(int(v) != v or v <= 0 for v in size):
            raise ValueError(f"face_context: {name} must be two positive integers (h, w), got {tuple(size)}")
    if crop is not None:
        top, left, h, w = crop if len(crop) == 4 else (None,) * 4
        if top is None or any(int(v) != v for v in crop) or top < 0 or left < 0 or h <= 0 or w <= 0 \
                or top + h > context_size[0] or left + w > context_size[1]:
            raise ValueError(f"face_context: crop (top, left, height, width) = {tuple(crop)} must lie inside the "
                             f"{context_size[0]}×{context_size[1]} context")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"face_context: {name} must be 3 finite numbers, got {tuple(values)}")
    if any(v == 0 for v in std):
        raise ValueError(f"face_context: std must be nonzero, got {tuple(std)}")


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip xyxy boxes to the frame (int64); boxes with no area become (0, 0, 0, 0)."""
    b = boxes.to(torch.int64)
    b = b.clamp(min=0).minimum(b.new_tensor([width, height, width, height]))  # 4 small ops: it runs per call
    return b.masked_fill((b[:, 2:] <= b[:, :2]).any(1, keepdim=True), 0)


def _resize(img: torch.Tensor, size, antialias: bool) -> torch.Tensor:
    """Bilinear resize of 1×3×h×w (align_corners=False). torch 2.13's antialiased CPU kernel gets an output
    1 pixel wide and 2+ high wrong (every row comes out as the first: a 2×2 → 3×1 gives 136, 136, 136
    instead of 136, 133.25, 130.5); the output 1 pixel high is right, and bilinear resizing treats both
    axes alike, so such a resize runs on the transposed image."""
    if antialias and size[1] == 1 and size[0] > 1:
        return F.interpolate(img.transpose(-1, -2), size=(size[1], size[0]), mode="bilinear",
                             align_corners=False, antialias=True).transpose(-1, -2)
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def face_context_reference(frames, boxes, face_size=FACE_SIZE, context_size=CONTEXT_SIZE,
                           crop: Optional[Tuple[int, int, int, int]] = None,
                           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                           antialias: bool = True, dtype: torch.dtype = torch.float32):
    """Per-frame PyTorch reference of :func:`face_context` (float32 math, then cast)."""
    return _face_context_torch(frames, clip_boxes(boxes, frames.shape[1], frames.shape[2]), face_size, context_size,
                               crop, mean, std, antialias, dtype)


def _face_context_torch(frames, boxes, face_size, context_size, crop, mean, std, antialias, dtype):
    """The reference on boxes already clipped (the op's contract, csrc/ops.cpp)."""
    n = frames.shape[0]
    boxes = boxes.tolist()
    mean_t = torch.tensor(mean, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    faces = torch.zeros(n, 3, *face_size, dtype=torch.float32, device=frames.device)
    contexts = []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        img = frames[i].permute(2, 0, 1).float()  # 3×H×W in [0, 255]
        if x2 > x1 and y2 > y1:
            face = _resize(img[None, :, y1:y2, x1:x2], face_size, antialias)[0]
            faces[i] = (face / 255.0 - mean_t) / std_t
            img = img.clone()
            img[:, y1:y2, x1:x2] = 0
        ctx = _resize(img[None], context_size, antialias)[0]
        contexts.append((ctx / 255.0 - mean_t) / std_t)
    context = torch.stack(contexts) if contexts else torch.zeros(0, 3, *context_size, device=frames.device)
    if crop is not None:
        top, left, ch, cw = crop
        context = context[:, :, top:top + ch, left:left + cw]
    return faces.to(dtype), context.contiguous().to(dtype)


def face_context(frames: torch.Tensor, boxes: torch.Tensor, face_size=FACE_SIZE, context_size=CONTEXT_SIZE,
                 crop: Optional[Tuple[int, int, int, int]] = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, antialias: bool = True,
                 dtype: torch.dtype = torch.float32):
    """Face crop and face-masked context, normalised, from uint8 RGB frames.

    Args:
        frames: uint8 N×H×W×3 (clips: N·T×H×W×3).
        boxes: N×4 xyxy pixel boxes, int16/int32/int64 (a list, tuple or NumPy array is taken as
            ``torch.as_tensor`` takes it), clipped to the frame here; an empty box means "no face"
            (the face output is zeros and nothing is masked). 8-bit and bool boxes are an error.
        face_size: (h, w) of the face output.
        context_size: (h, w) the masked frame is resized to.
        crop: optional (top, left, height, width) crop of the resized context.

    Returns:
        (face N×3×fh×fw, context N×3×h×w), normalised with ``mean``/``std``.

    Example:
        >>> frames = torch.randint(0, 256, (2, 400, 712, 3), dtype=torch.uint8)
        >>> boxes = torch.tensor([[300, 80, 420, 220], [0, 0, 0, 0]])
        >>> face, context = face_context(frames, boxes, crop=(8, 29, 112, 112))
        >>> face.shape, context.shape
        (torch.Size([2, 3, 96, 96]), torch.Size([2, 3, 112, 112]))
    """
    face_size, context_size = _numbers("face_size", face_size, int), _numbers("context_size", context_size, int)
    crop = None if crop is None else _numbers("crop", crop, int)
    mean, std = _numbers("mean", mean, float), _numbers("std", std, float)
    if isinstance(frames, torch.Tensor):
        boxes = _as_boxes(boxes, frames)
    _check_inputs(frames, boxes, face_size, context_size, crop, mean, std)
    boxes = clip_boxes(boxes, frames.shape[1], frames.shape[2])  # once, here: every backend takes them clipped
    kernel_dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    if not _dispatch.use_kernel("face_context", _dispatch.device_type(frames.device), kernel_dtype):
        return _face_context_torch(frames, boxes, face_size, context_size, crop, mean, std, antialias, dtype)
    crop = (0, 0, *context_size) if crop is None else crop
    face, context = _dispatch.call(_OP, frames, boxes,
                                   [int(v) for v in face_size], [int(v) for v in context_size],
                                   [int(v) for v in crop], list(mean), list(std), bool(antialias), kernel_dtype)
    return (face, context) if kernel_dtype == dtype else (face.to(dtype), context.to(dtype))


_OP = torch.ops.caer_fast.face_context.default if _dispatch.HAS_OPS else None  # bound once, not per call

if _dispatch.HAS_OPS:
    @torch.library.register_fake("caer_fast::face_context")
    def _(frames, boxes, face_size, context_size, crop, mean, std, antialias, dtype):
        n = frames.shape[0]
        return (frames.new_empty((n, 3, *face_size), dtype=dtype),
                frames.new_empty((n, 3, crop[2], crop[3]), dtype=dtype))
