// 1-D resampling tables of a bilinear resize (antialiased or not) exactly as
// F.interpolate(mode="bilinear", align_corners=False, antialias=...) computes them on CPU
// (aten UpSample.h / UpSampleKernel.cpp _compute_weights_aa, guard_index_and_lambda).
// Host code shared by the CPU kernel (csrc/cpu/face_context.cpp) and the CUDA one (csrc/cuda/bindings.cu),
// with the op's argument contract.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace caer_fast {

// 1-D resampling table for output indices [o_begin, o_end): output o reads inputs
// start[o]..start[o]+k-1 with weights w[o*k..]. Windows are shifted to end inside the input (the
// extra taps get weight 0), so every read is in bounds and no padding is needed.
struct Taps {
  int64_t k = 1;
  std::vector<int64_t> start;
  std::vector<float> w;
  // Horizontal form: taps in pairs, each weight repeated for the R, G, B, X lanes, so one output
  // is kp 8-float FMAs over contiguous RGBX pixels (reads up to 1 pixel past the window, weight 0).
  int64_t kp = 1;
  std::vector<float> w8;
  int64_t lo = 0, hi = 0;  // union of the windows: input range this axis touches
};

inline Taps make_taps(int64_t in, int64_t out, int64_t o_begin, int64_t o_end, bool antialias) {
  const int64_t n = o_end - o_begin;
  std::vector<int64_t> xmin(n);
  std::vector<std::vector<float>> ws(n);
  // aten's float arithmetic, mixed float/double exactly as written there: on noisy frames a window
  // position off by one float ulp moves outputs by ~1e-4 after normalisation.
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = o_begin + i;
    if (antialias) {
      // Triangle filter widened by the downscale factor, weights normalised over the window.
      const float support = scale >= 1.0 ? scale : 1.0f;
      const float invscale = scale >= 1.0 ? static_cast<float>(1.0 / scale) : 1.0f;
      const float center = static_cast<float>(scale * (o + 0.5));
      const int64_t lo = std::max<int64_t>(static_cast<int64_t>((center - support) + 0.5), 0);
      const int64_t size = std::min<int64_t>(static_cast<int64_t>((center + support) + 0.5), in) - lo;
      float total = 0.f;
      for (int64_t j = 0; j < size; ++j) {
        float x = static_cast<float>(((static_cast<float>(j + lo) - center) + 0.5) * invscale);
        x = x < 0.f ? -x : x;
        const float w = x < 1.f ? static_cast<float>(1.0 - x) : 0.f;
        ws[i].push_back(w);
        total += w;
      }
      if (total != 0.f)
        for (auto& w : ws[i]) w /= total;
      xmin[i] = lo;
    } else if (in == out) {
      xmin[i] = o;
      ws[i] = {1.f};
    } else {
      // Plain bilinear: source index clamped at 0, last pixel repeated.
      float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
      src = src < 0.f ? 0.f : src;
      const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      const float lam = std::min(std::max(src - static_cast<float>(i0), 0.f), 1.f);
      xmin[i] = i0;
      ws[i] = i0 < in - 1 ? std::vector<float>{1.f - lam, lam} : std::vector<float>{1.f};
    }
  }
  Taps t;
  for (const auto& w : ws) t.k = std::max<int64_t>(t.k, static_cast<int64_t>(w.size()));
  t.k = std::min(t.k, in);
  t.start.resize(n);
  t.w.assign(n * t.k, 0.f);
  t.lo = in;
  t.hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = std::min(xmin[i], in - t.k);  // shift the window left to end inside
    const int64_t off = xmin[i] - s;
    for (size_t j = 0; j < ws[i].size(); ++j) t.w[i * t.k + off + j] = ws[i][j];
    t.start[i] = s;
    t.lo = std::min(t.lo, s);
    t.hi = std::max(t.hi, s + t.k);
  }
  t.kp = (t.k + 1) / 2;
  t.w8.assign(n * 8 * t.kp, 0.f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < t.k; ++j)
      for (int c = 0; c < 4; ++c) t.w8[i * 8 * t.kp + 4 * j + c] = t.w[i * t.k + j];
  return t;
}

// The caer_fast::face_context contract every kernel relies on (the Python front door has checked the
// user's arguments; this guards direct calls). Returns the normalisation v*a + b == (v/255 - mean)/std.
struct FaceContextArgs {
  int64_t face_h, face_w, ctx_h, ctx_w, top, left, crop_h, crop_w;
  float a[3], b[3];
};

inline FaceContextArgs check_face_context(const at::Tensor& frames, const at::Tensor& boxes,
                                          at::IntArrayRef face_size, at::IntArrayRef context_size,
                                          at::IntArrayRef crop, at::ArrayRef<double> mean, at::ArrayRef<double> std) {
  TORCH_CHECK(frames.scalar_type() == at::kByte && frames.dim() == 4 && frames.size(3) == 3 && frames.size(1) > 0 &&
                  frames.size(2) > 0,
              "caer_fast::face_context: frames must be uint8 N×H×W×3 with H, W > 0, got ", frames.sizes(), " ",
              frames.scalar_type());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == frames.size(0) && boxes.size(1) == 4 &&
                  !boxes.is_floating_point() && boxes.scalar_type() != at::kBool,
              "caer_fast::face_context: boxes must be integer N×4 xyxy, got ", boxes.sizes(), " ", boxes.scalar_type());
  TORCH_CHECK(face_size.size() == 2 && context_size.size() == 2 && crop.size() == 4 && mean.size() == 3 &&
                  std.size() == 3,
              "caer_fast::face_context: face_size and context_size take 2 values, crop 4, mean and std 3");
  FaceContextArgs r{face_size[0], face_size[1], context_size[0], context_size[1], crop[0], crop[1], crop[2], crop[3]};
  TORCH_CHECK(r.face_h > 0 && r.face_w > 0 && r.ctx_h > 0 && r.ctx_w > 0 && r.top >= 0 && r.left >= 0 &&
                  r.crop_h > 0 && r.crop_w > 0 && r.top + r.crop_h <= r.ctx_h && r.left + r.crop_w <= r.ctx_w,
              "caer_fast::face_context: sizes must be positive and the crop inside the context");
  for (int c = 0; c < 3; ++c) {
    TORCH_CHECK(std[c] != 0.0, "caer_fast::face_context: std must be nonzero");
    r.a[c] = static_cast<float>(1.0 / (255.0 * std[c]));
    r.b[c] = static_cast<float>(-mean[c] / std[c]);
  }
  return r;
}

// Boxes come clipped (caer_fast/ops/face_context.py clips them once, for every backend): each row of the
// int64 N×4 xyxy `b` has 0 <= x1, x2 <= W and 0 <= y1, y2 <= H, and one with no area is (0, 0, 0, 0),
// "no face". A kernel checks this instead of clipping again: a direct call with boxes outside the frame
// is an error, never a read out of bounds.
inline void check_clipped_boxes(const int64_t* b, int64_t n, int64_t H, int64_t W) {
  for (int64_t i = 0; i < n; ++i, b += 4) {
    const bool inside = b[0] >= 0 && b[1] >= 0 && b[2] <= W && b[3] <= H;
    const bool empty_is_zero = (b[2] > b[0] && b[3] > b[1]) || (b[0] == 0 && b[1] == 0 && b[2] == 0 && b[3] == 0);
    TORCH_CHECK(inside && empty_is_zero, "caer_fast::face_context: boxes must be clipped to the ", W, "×", H,
                " frame (an empty box as 0, 0, 0, 0; caer_fast.ops.face_context clips them), got box ", i, " = (",
                b[0], ", ", b[1], ", ", b[2], ", ", b[3], ")");
  }
}

}  // namespace caer_fast
