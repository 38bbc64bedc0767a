// Fused face_context on CPU: uint8 N×H×W×3 frames -> normalised face crop and face-masked context.
//
// Per frame, the rows of the frame are visited once, top to bottom. Each needed row is widened to
// float RGBX (one small row buffer), resampled horizontally for the face and then, with the box
// zeroed, for the context, into per-stream ring buffers of K rows at the OUTPUT width. An output row
// is finished (vertical pass + normalisation) as soon as its K input rows are in its ring. No
// full-resolution float frame exists, and only the cropped context pixels are computed.
//
// Resampling matches F.interpolate(mode="bilinear", align_corners=False, antialias=...) on the
// float frame (aten UpSample.h / UpSampleKernel.cpp _compute_weights_aa, guard_index_and_lambda).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "face_context.h"

// One clone per ISA, chosen at load time (same scheme as simd.cpp): no -march flag needed.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FC_CLONES
#endif

namespace {

using caer_fast::make_taps;
using caer_fast::Taps;

// uint8 RGB pixels [x0, x1) -> float RGBX at dst[4x..] (X = 0: a pixel is one 4-lane vector).
void widen_row_scalar(const uint8_t* __restrict src, float* __restrict dst, int64_t x0, int64_t x1) {
  for (int64_t x = x0; x < x1; ++x) {
    dst[4 * x + 0] = src[3 * x + 0];
    dst[4 * x + 1] = src[3 * x + 1];
    dst[4 * x + 2] = src[3 * x + 2];
    dst[4 * x + 3] = 0.f;
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
// GCC does not vectorise the 3->4 de-interleave well: a byte shuffle widens 4 pixels at a time.
__attribute__((target("avx2"))) void widen_row_avx2(const uint8_t* __restrict src, float* __restrict dst,
                                                     int64_t x0, int64_t x1) {
  const __m128i rgbx = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  int64_t x = x0;
  for (; x + 6 <= x1; x += 4) {  // the 16-byte load covers pixels x..x+5: stays inside [x0, x1)
    const __m128i q = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 3 * x)), rgbx);
    _mm256_storeu_ps(dst + 4 * x, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)));
    _mm256_storeu_ps(dst + 4 * x + 8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8))));
  }
  widen_row_scalar(src, dst, x, x1);
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
void widen_row(const uint8_t* src, float* dst, int64_t x0, int64_t x1) {
  if (x1 <= x0) return;
  if (kHasAvx2)
    widen_row_avx2(src, dst, x0, x1);
  else
    widen_row_scalar(src, dst, x0, x1);
}
#else
void widen_row(const uint8_t* src, float* dst, int64_t x0, int64_t x1) { widen_row_scalar(src, dst, x0, x1); }
#endif

// Horizontal pass: row (RGBX, already offset to the stream's first column) -> RGBX n×4 at out.
void hpass_generic(const float* __restrict row, const Taps& t, float* __restrict out) {
  const int64_t n = static_cast<int64_t>(t.start.size()), kp = t.kp;
  for (int64_t o = 0; o < n; ++o) {
    const float* p = row + 4 * t.start[o];
    const float* w = t.w8.data() + o * 8 * kp;
    float a[8] = {};
    for (int64_t g = 0; g < 8 * kp; g += 8)
      for (int l = 0; l < 8; ++l) a[l] += w[g + l] * p[g + l];
    for (int c = 0; c < 4; ++c) out[4 * o + c] = a[c] + a[4 + c];
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
// GCC reduces the 8 lanes with scalar adds; by hand it is one 128-bit add per output.
__attribute__((target("avx2,fma"))) void hpass_avx2(const float* __restrict row, const Taps& t,
                                                    float* __restrict out) {
  const int64_t n = static_cast<int64_t>(t.start.size()), kp = t.kp;
  const int64_t* start = t.start.data();
  const float* w = t.w8.data();
  for (int64_t o = 0; o < n; ++o, w += 8 * kp) {
    const float* p = row + 4 * start[o];
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(p));
    for (int64_t g = 8; g < 8 * kp; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + g), _mm256_loadu_ps(p + g), acc);
    _mm_storeu_ps(out + 4 * o, _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)));
  }
}
const bool kHasFma = kHasAvx2 && __builtin_cpu_supports("fma");
void hpass(const float* row, const Taps& t, float* out) {
  if (kHasFma)
    hpass_avx2(row, t, out);
  else
    hpass_generic(row, t, out);
}
#else
void hpass(const float* row, const Taps& t, float* out) { hpass_generic(row, t, out); }
#endif

// Vertical pass for one output row: acc = sum_j w[j]*rows[j] over n RGBX pixels, then
// out[c][x] = acc[x][c]*a[c] + b[c] into the 3 planes (plane stride `plane`).
FC_CLONES void vpass(const float* const* rows, const float* w, int64_t k, int64_t n, const float* a,
                     const float* b, float* __restrict acc, float* __restrict out, int64_t plane) {
  const int64_t m = 4 * n;
  for (int64_t x = 0; x < m; ++x) acc[x] = w[0] * rows[0][x];
  for (int64_t j = 1; j < k; ++j) {
    const float wj = w[j];
    const float* r = rows[j];
    for (int64_t x = 0; x < m; ++x) acc[x] += wj * r[x];
  }
  for (int c = 0; c < 3; ++c) {
    const float ac = a[c], bc = b[c];
    float* o = out + c * plane;
    for (int64_t x = 0; x < n; ++x) o[x] = acc[4 * x + c] * ac + bc;
  }
}

// One resized output (face or context) fed row by row through a ring of tv.k horizontal results.
struct Stream {
  const Taps* th = nullptr;  // columns (cropped outputs only)
  const Taps* tv = nullptr;  // rows (cropped outputs only)
  int64_t x0 = 0, y0 = 0;    // frame position of input index 0 (the box corner for the face)
  float* out = nullptr;      // 3 planes of tv->start.size() × th->start.size()
  std::vector<float> ring;
  std::vector<const float*> rows;  // the k ring rows of one output row's window
  int64_t next = 0;          // next output row to finish

  int64_t ow() const { return static_cast<int64_t>(th->start.size()); }
  int64_t oh() const { return static_cast<int64_t>(tv->start.size()); }
  bool wants(int64_t y) const { return y >= y0 + tv->lo && y < y0 + tv->hi; }

  void reset(float* out_) {
    out = out_;
    next = 0;
    ring.resize(static_cast<size_t>(tv->k * 4 * ow()));
    rows.resize(static_cast<size_t>(tv->k));
  }

  // Row y (frame coordinates) is widened in rgbx: resample it, then finish every output row whose
  // window ends here (windows are nondecreasing, so the ring holds exactly that window).
  void push(int64_t y, const float* rgbx, const float* a, const float* b, float* acc) {
    const int64_t r = y - y0, k = tv->k, w = ow();
    hpass(rgbx + 4 * x0, *th, ring.data() + (r % k) * 4 * w);
    while (next < oh() && tv->start[next] + k <= r + 1) {
      const int64_t s = tv->start[next];
      for (int64_t j = 0; j < k; ++j) rows[j] = ring.data() + ((s + j) % k) * 4 * w;
      vpass(rows.data(), tv->w.data() + next * k, k, w, a, b, acc, out + next * w, oh() * w);
      ++next;
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> face_context_cpu(const at::Tensor& frames, const at::Tensor& boxes,
                                                    at::IntArrayRef face_size, at::IntArrayRef context_size,
                                                    at::IntArrayRef crop, at::ArrayRef<double> mean,
                                                    at::ArrayRef<double> std, bool antialias, at::ScalarType dtype) {
  const caer_fast::FaceContextArgs args = caer_fast::check_face_context(frames, boxes, face_size, context_size, crop,
                                                                        mean, std);
  const int64_t n = frames.size(0), H = frames.size(1), W = frames.size(2);
  const int64_t face_h = args.face_h, face_w = args.face_w, ctx_h = args.ctx_h, ctx_w = args.ctx_w;
  const int64_t crop_top = args.top, crop_left = args.left, crop_h = args.crop_h, crop_w = args.crop_w;
  const float* a = args.a;
  const float* b = args.b;

  const at::Tensor src = frames.contiguous();
  const at::Tensor bx = boxes.to(at::kLong).contiguous();
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor face = at::empty({n, 3, face_h, face_w}, opts);
  at::Tensor ctx = at::empty({n, 3, crop_h, crop_w}, opts);
  if (n == 0) return {face.to(dtype), ctx.to(dtype)};

  // The context tables are the same for every frame.
  const Taps cth = make_taps(W, ctx_w, crop_left, crop_left + crop_w, antialias);
  const Taps ctv = make_taps(H, ctx_h, crop_top, crop_top + crop_h, antialias);

  const uint8_t* src_p = src.data_ptr<uint8_t>();
  const int64_t* box_p = bx.data_ptr<int64_t>();
  caer_fast::check_clipped_boxes(box_p, n, H, W);
  float* face_p = face.data_ptr<float>();
  float* ctx_p = ctx.data_ptr<float>();
  const int64_t face_numel = 3 * face_h * face_w, ctx_numel = 3 * crop_h * crop_w;

  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rgbx(static_cast<size_t>(4 * (W + 4)), 0.f);  // +4: hpass over-reads, weight 0
    std::vector<float> acc(static_cast<size_t>(4 * std::max(face_w, crop_w)));
    Stream cs;
    cs.th = &cth;
    cs.tv = &ctv;
    Stream fs;
    Taps fth, ftv;
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* frame = src_p + i * H * W * 3;
      const int64_t* bb = box_p + 4 * i;  // clipped (checked above); (0, 0, 0, 0) is no face
      const int64_t x1 = bb[0], y1 = bb[1], x2 = bb[2], y2 = bb[3];
      const bool has_face = x2 > x1;
      cs.reset(ctx_p + i * ctx_numel);
      int64_t y_begin = ctv.lo, y_end = ctv.hi;
      if (has_face) {
        fth = make_taps(x2 - x1, face_w, 0, face_w, antialias);
        ftv = make_taps(y2 - y1, face_h, 0, face_h, antialias);
        fs.th = &fth;
        fs.tv = &ftv;
        fs.x0 = x1;
        fs.y0 = y1;
        fs.reset(face_p + i * face_numel);
        y_begin = std::min(y_begin, y1 + ftv.lo);
        y_end = std::max(y_end, y1 + ftv.hi);
      } else {
        std::fill(face_p + i * face_numel, face_p + (i + 1) * face_numel, 0.f);
      }
      for (int64_t y = y_begin; y < y_end; ++y) {
        const bool for_face = has_face && fs.wants(y), for_ctx = cs.wants(y);
        if (!for_face && !for_ctx) continue;
        const uint8_t* row = frame + y * W * 3;
        if (for_face) {
          widen_row(row, rgbx.data(), x1 + fth.lo, x1 + fth.hi);
          fs.push(y, rgbx.data(), a, b, acc.data());
        }
        if (for_ctx) {
          // Widen only what the face pass did not already widen; then black out the box.
          if (for_face) {
            widen_row(row, rgbx.data(), cth.lo, std::min(cth.hi, x1 + fth.lo));
            widen_row(row, rgbx.data(), std::max(cth.lo, x1 + fth.hi), cth.hi);
          } else {
            widen_row(row, rgbx.data(), cth.lo, cth.hi);
          }
          if (has_face && y >= y1 && y < y2) {
            const int64_t m0 = std::max(x1, cth.lo), m1 = std::min(x2, cth.hi);
            if (m1 > m0) std::fill(rgbx.data() + 4 * m0, rgbx.data() + 4 * m1, 0.f);
          }
          cs.push(y, rgbx.data(), a, b, acc.data());
        }
      }
    }
  });
  if (dtype != at::kFloat) return {face.to(dtype), ctx.to(dtype)};  // float32 arithmetic, one rounding
  return {face, ctx};
}

TORCH_LIBRARY_IMPL(caer_fast, CPU, m) { m.impl("face_context", &face_context_cpu); }
