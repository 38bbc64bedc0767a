"""Triton `face_context`: uint8 N×H×W×3 frames → normalised face crop and face-masked context.

One program per (sample, block of output pixels) gathers each output pixel's K_y × K_x input
window straight from the uint8 frame (all three channels), applies the separable bilinear /
antialiased weights, zeroes the face box on the fly for the context, normalises and stores N×3×h×w.
The 1-D window starts and weights come from ``_resize_tables`` (built on the host, O(N·(h+w)·K)
numbers), so one kernel serves both outputs, any crop and both antialias modes.

:func:`face_context` has the signature of the op ``caer_fast::face_context`` (csrc/ops.cpp), whose CUDA
kernel it replaces when the backend is "triton". It is not traced into compiled graphs (no
``INLINE``): the tables' window length K depends on the values of ``boxes``, so it cannot run on
fake tensors; the op stays one opaque node.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _resize_tables

BLOCK = 128
MAX_TAP_CHUNK = 8  # 32-wide tiles spill on sm_80/sm_90, 16-wide ones use ~250 registers (bench/RESULTS.md)


@triton.jit
def _resize_kernel(frame_ptr, out_ptr, y0_ptr, yw_ptr, x0_ptr, xw_ptr, box_ptr, valid_ptr,
                   H, W, OH, OW, KY, KX, tab_sn,
                   m0, m1, m2, r0, r1, r2,
                   MASK_BOX: tl.constexpr, ZERO_INVALID: tl.constexpr, KXC: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < OH * OW
    oy = p // OW
    ox = p % OW
    ty = n * tab_sn * OH + oy  # tab_sn: 1 for per-sample tables, 0 for shared ones
    tx = n * tab_sn * OW + ox
    y0 = tl.load(y0_ptr + ty, mask=ok, other=0)
    x0 = tl.load(x0_ptr + tx, mask=ok, other=0)
    bx1 = tl.load(box_ptr + n * 4)
    by1 = tl.load(box_ptr + n * 4 + 1)
    bx2 = tl.load(box_ptr + n * 4 + 2)
    by2 = tl.load(box_ptr + n * 4 + 3)
    base = frame_ptr + n * H * W * 3
    acc0 = tl.zeros((BLOCK,), tl.float32)
    acc1 = tl.zeros((BLOCK,), tl.float32)
    acc2 = tl.zeros((BLOCK,), tl.float32)
    # the K_x taps of each output pixel as [BLOCK, KXC] tiles (fewer, wider gathers); KXC is at most 8
    # so wide windows (large downscales) loop over chunks instead of spilling registers
    for kx0 in range(0, KX, KXC):
        kx = kx0 + tl.arange(0, KXC)
        ok2 = ok[:, None] & (kx[None, :] < KX)
        wx = tl.load(xw_ptr + tx[:, None] * KX + kx[None, :], mask=ok2, other=0.0)
        ix = tl.minimum(x0[:, None] + kx[None, :], W - 1)  # past the window the weight is 0
        in_box_x = (ix >= bx1) & (ix < bx2)
        for ky in range(0, KY):
            wy = tl.load(yw_ptr + ty * KY + ky, mask=ok, other=0.0)
            iy = tl.minimum(y0 + ky, H - 1)
            w2 = wx
            if MASK_BOX:  # the face box is black in the context
                w2 = tl.where(in_box_x & ((iy >= by1) & (iy < by2))[:, None], 0.0, wx)
            pix = base + (iy.to(tl.int64)[:, None] * W + ix) * 3
            acc0 += wy * tl.sum(w2 * tl.load(pix, mask=ok2, other=0).to(tl.float32), axis=1)
            acc1 += wy * tl.sum(w2 * tl.load(pix + 1, mask=ok2, other=0).to(tl.float32), axis=1)
            acc2 += wy * tl.sum(w2 * tl.load(pix + 2, mask=ok2, other=0).to(tl.float32), axis=1)
    v0 = (acc0 / 255.0 - m0) / r0
    v1 = (acc1 / 255.0 - m1) / r1
    v2 = (acc2 / 255.0 - m2) / r2
    if ZERO_INVALID:  # no face: the face output is plain zeros
        keep = tl.load(valid_ptr + n) != 0
        v0 = tl.where(keep, v0, 0.0)
        v1 = tl.where(keep, v1, 0.0)
        v2 = tl.where(keep, v2, 0.0)
    plane = OH * OW
    o = out_ptr + n * 3 * plane + p
    ty_out = out_ptr.dtype.element_ty
    tl.store(o, v0.to(ty_out), mask=ok)
    tl.store(o + plane, v1.to(ty_out), mask=ok)
    tl.store(o + 2 * plane, v2.to(ty_out), mask=ok)


def tap_chunk(taps: int) -> int:
    """Width of the x-tap tiles: the next power of two, at least 2 (one compiled variant fewer), at most
    ``MAX_TAP_CHUNK``."""
    return min(max(triton.next_power_of_2(taps), 2), MAX_TAP_CHUNK)


def _launch(frames, out, y0, yw, x0, xw, t, mean, std, mask_box, zero_invalid, per_sample):
    n, h, w, _ = frames.shape
    oh, ow = out.shape[-2:]
    if n == 0 or oh * ow == 0:
        return
    _resize_kernel[(n, triton.cdiv(oh * ow, BLOCK))](
        frames, out, y0, yw, x0, xw, t["boxes"], t["valid"], h, w, oh, ow, yw.shape[-1], xw.shape[-1],
        1 if per_sample else 0, *mean, *std, MASK_BOX=mask_box, ZERO_INVALID=zero_invalid,
        KXC=tap_chunk(xw.shape[-1]), BLOCK=BLOCK)


def face_context(frames, boxes, face_size, context_size, crop, mean, std, antialias, dtype):
    """(face N×3×fh×fw, context N×3×crop_h×crop_w) in ``dtype``; crop = (top, left, height, width)."""
    n = frames.shape[0]
    face = torch.empty(n, 3, *face_size, dtype=dtype, device=frames.device)
    context = torch.empty(n, 3, crop[2], crop[3], dtype=dtype, device=frames.device)
    if n == 0:
        return face, context
    frames = frames.contiguous()
    t = _resize_tables.build(frames, boxes, tuple(face_size), tuple(context_size), tuple(crop), antialias)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    _launch(frames, face, t["fy0"], t["fyw"], t["fx0"], t["fxw"], t, mean, std, False, True, True)
    _launch(frames, context, t["cy0"], t["cyw"], t["cx0"], t["cxw"], t, mean, std, True, False, False)
    return face, context
