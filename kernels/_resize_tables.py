"""1-D resampling tables for the Triton ``face_context`` kernel (a launch helper).

A bilinear resize, antialiased or not, is separable: each output row (column) is a weighted sum
of a window of input rows (columns). We build, per sample and output index, the window start and
its K normalised weights exactly as ``F.interpolate(mode="bilinear", align_corners=False,
antialias=...)`` does on CPU (aten ``_compute_index_ranges_weights`` / ``upsample_bilinear2d``),
so a kernel only gathers ``K_y × K_x`` pixels per output pixel.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch



def _tables(in_sizes: torch.Tensor, out_size: int, antialias: bool, keep: Optional[Tuple[int, int]] = None):
    """Window starts (int32, M×out) and weights (float32, M×out×K) for M input lengths ``in_sizes``.

    ``keep=(start, length)`` returns only those output indices (the crop). Input positions are
    relative to the start of the resized region; weights past its end are 0.
    """
    # float32 arithmetic in aten's order, so window edges and weights round the same way
    f32, f64 = torch.float32, torch.float64
    in_i = in_sizes.to(torch.int64).clamp(min=1)[:, None]  # M×1 (an empty face gets a dummy 1)
    scale = (in_i.to(f64) / out_size).to(f32)
    i = torch.arange(out_size, dtype=torch.int64)[None, :]
    if keep is not None:
        i = i[:, keep[0]:keep[0] + keep[1]]
    if antialias:
        one = torch.ones_like(scale)
        support = torch.where(scale >= 1.0, scale, one)  # bilinear: interp_size / 2 = 1
        invscale = torch.where(scale >= 1.0, 1.0 / scale, one)
        center = (scale.to(f64) * (i.to(f64) + 0.5)).to(f32)
        start = torch.clamp(torch.trunc(center.to(f64) - support.to(f64) + 0.5), min=0).to(torch.int64)
        stop = torch.minimum(torch.trunc(center.to(f64) + support.to(f64) + 0.5).to(torch.int64), in_i)
        k = int(math.ceil(float(support.max()))) * 2 + 1
        j = start[..., None] + torch.arange(k)
        x = (((j.to(f32) - center[..., None]).to(f64) + 0.5) * invscale[..., None].to(f64)).to(f32)
        w = torch.clamp(1.0 - x.abs(), min=0)
        w = torch.where(j < stop[..., None], w, torch.zeros_like(w))
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), w)
    else:
        src = torch.clamp(scale * (i.to(f32) + 0.5) - 0.5, min=0)
        start = torch.minimum(torch.floor(src).to(torch.int64), in_i - 1)
        lam = torch.clamp(src - start.to(f32), 0, 1)
        has_next = (start < in_i - 1).to(f32)  # at the last row aten reads it twice
        w = torch.stack([1.0 - lam * has_next, lam * has_next], dim=-1)
    return start.to(torch.int32).contiguous(), w.to(torch.float32).contiguous()


def build(frames: torch.Tensor, boxes: torch.Tensor, face_size, context_size, crop, antialias: bool):
    """All tables both kernels need, on ``frames.device``.

    ``boxes`` come clipped to the frame (empty ones as zeros), as the op's contract says.
    Returns a dict: ``boxes`` (int32 N×4 xyxy), ``valid`` (int32 N),
    face tables ``fy0, fyw, fx0, fxw`` (per sample, starts already offset by the box corner) and
    context tables ``cy0, cyw, cx0, cxw`` (shared by all samples, 1×…), plus the output sizes.
    """
    n, h, w, _ = frames.shape
    b = boxes.to("cpu", torch.int64)
    valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    # the op's contract (csrc/ops.cpp): boxes come clipped, an empty one as zeros; checked, not redone
    inside = (b >= 0).all() & (b[:, 0::2] <= w).all() & (b[:, 1::2] <= h).all() & (valid | (b == 0).all(1)).all()
    if not inside:
        raise ValueError(f"caer_fast::face_context: boxes must be clipped to the {w}×{h} frame (an empty box as "
                         f"0, 0, 0, 0; caer_fast.ops.face_context clips them), got {b.tolist()}")
    fh, fw = face_size
    fy0, fyw = _tables(b[:, 3] - b[:, 1], fh, antialias)
    fx0, fxw = _tables(b[:, 2] - b[:, 0], fw, antialias)
    fy0 = (fy0 + b[:, 1:2].to(torch.int32)).contiguous()
    fx0 = (fx0 + b[:, 0:1].to(torch.int32)).contiguous()
    ch, cw = context_size
    top, left, oh, ow = crop  # checked by caer_fast.ops.face_context
    cy0, cyw = _tables(torch.tensor([h]), ch, antialias, keep=(top, oh))
    cx0, cxw = _tables(torch.tensor([w]), cw, antialias, keep=(left, ow))
    dev = frames.device
    out = dict(boxes=b.to(torch.int32), valid=valid.to(torch.int32), fy0=fy0, fyw=fyw, fx0=fx0, fxw=fxw,
               cy0=cy0, cyw=cyw, cx0=cx0, cxw=cxw)
    out = {k: v.to(dev, non_blocking=True) for k, v in out.items()}
    out.update(face_size=(fh, fw), context_out=(oh, ow))
    return out
