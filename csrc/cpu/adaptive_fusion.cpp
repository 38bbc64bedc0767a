// Adaptive fusion on CPU: two-way softmax of the stream scores and the weighted concatenation in
// one kernel (no N×2 score tensor, no separate scaled copies before the cat).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include <optional>
#include <tuple>

#include "simd.h"

namespace {

using caer_fast_simd::dot;
using caer_fast_simd::scale;

int64_t grain(int64_t per_sample) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_sample)); }

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// The op's contract (caer_fast/ops/adaptive_fusion.py has checked the user's inputs already).
void check(const at::Tensor& face, const at::Tensor& context, const at::Tensor& weights_or_score,
           const at::Tensor& other_score) {
  TORCH_CHECK(face.dim() == 2 && context.dim() == 2 && context.size(0) == face.size(0),
              "caer_fast::adaptive_fusion: face and context must be N×C, got ", face.sizes(), " and ", context.sizes());
  const auto dt = face.scalar_type();
  TORCH_CHECK(context.scalar_type() == dt && weights_or_score.scalar_type() == dt &&
                  other_score.scalar_type() == dt && at::isFloatingType(dt),
              "caer_fast::adaptive_fusion: all inputs must share one floating dtype");
}

template <typename T>
void forward_kernel(const T* face, const T* ctx, const T* fs, const T* cs, T* out, T* weights, int64_t N,
                    int64_t Cf, int64_t Cc) {
  const int64_t Co = Cf + Cc;
  at::parallel_for(0, N, grain(Co), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T m = std::max(fs[n], cs[n]);  // max-shifted: stable for huge scores
      const T ef = std::exp(fs[n] - m), ec = std::exp(cs[n] - m);
      const T wf = ef / (ef + ec), wc = ec / (ef + ec);
      scale(out + n * Co, wf, face + n * Cf, Cf);
      scale(out + n * Co + Cf, wc, ctx + n * Cc, Cc);
      weights[2 * n] = wf;
      weights[2 * n + 1] = wc;
    }
  });
}

// d/dface = w_f·g_f; d/dw_f = g_f·face + gw_f (same for context); softmax: d/ds_f = w_f·w_c·(dw_f − dw_c).
template <typename T>
void backward_kernel(const T* g, const T* gw, const T* face, const T* ctx, const T* w, T* gface, T* gctx, T* gfs,
                     T* gcs, int64_t N, int64_t Cf, int64_t Cc) {
  const int64_t Co = Cf + Cc;
  at::parallel_for(0, N, grain(Co), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T wf = w[2 * n], wc = w[2 * n + 1];
      const T* gn = g + n * Co;
      T dwf = dot(gn, face + n * Cf, Cf), dwc = dot(gn + Cf, ctx + n * Cc, Cc);
      if (gw != nullptr) {
        dwf += gw[2 * n];
        dwc += gw[2 * n + 1];
      }
      scale(gface + n * Cf, wf, gn, Cf);
      scale(gctx + n * Cc, wc, gn + Cf, Cc);
      const T d = wf * wc * (dwf - dwc);
      gfs[n] = d;
      gcs[n] = -d;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> adaptive_fusion_cpu(const at::Tensor& face, const at::Tensor& context,
                                                       const at::Tensor& face_score, const at::Tensor& context_score) {
  check(face, context, face_score, context_score);
  const int64_t N = face.size(0), Cf = face.size(1), Cc = context.size(1);
  TORCH_CHECK(face_score.numel() == N && context_score.numel() == N,
              "caer_fast::adaptive_fusion: scores must be ", N, "×1, got ", face_score.sizes(), " and ",
              context_score.sizes());
  if (is_reduced(face)) {  // compute in float32, round once
    auto fl = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto [out, weights] = adaptive_fusion_cpu(fl(face), fl(context), fl(face_score), fl(context_score));
    return {out.to(face.scalar_type()), weights.to(face.scalar_type())};
  }
  at::Tensor out = at::empty({N, Cf + Cc}, face.options());
  at::Tensor weights = at::empty({N, 2}, face.options());
  if (N == 0) return {out, weights};
  const at::Tensor f = face.contiguous(), c = context.contiguous(), fs = face_score.contiguous(),
                   cs = context_score.contiguous();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "adaptive_fusion", [&] {
    forward_kernel<scalar_t>(f.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), fs.data_ptr<scalar_t>(),
                             cs.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), N, Cf,
                             Cc);
  });
  return {out, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptive_fusion_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights, const at::Tensor& face,
    const at::Tensor& context, const at::Tensor& weights) {
  check(face, context, weights, weights);
  const int64_t N = face.size(0), Cf = face.size(1), Cc = context.size(1);
  TORCH_CHECK(weights.sizes() == at::IntArrayRef({N, 2}) && grad_out.sizes() == at::IntArrayRef({N, Cf + Cc}),
              "caer_fast::adaptive_fusion_backward: weights must be ", N, "×2 and grad_out ", N, "×", Cf + Cc);
  const bool has_gw = grad_weights.has_value() && grad_weights->defined();
  TORCH_CHECK(!has_gw || grad_weights->sizes() == weights.sizes(),
              "caer_fast::adaptive_fusion_backward: grad_weights must be ", N, "×2");
  const auto dt = face.scalar_type();
  if (is_reduced(face)) {
    auto fl = [](const at::Tensor& t) { return t.to(at::kFloat); };
    std::optional<at::Tensor> gw;
    if (has_gw) gw = fl(*grad_weights);
    auto [gf, gc, gfs, gcs] = adaptive_fusion_backward_cpu(fl(grad_out), gw, fl(face), fl(context), fl(weights));
    return {gf.to(dt), gc.to(dt), gfs.to(dt), gcs.to(dt)};
  }
  at::Tensor gface = at::empty({N, Cf}, face.options()), gctx = at::empty({N, Cc}, face.options()),
             gfs = at::empty({N, 1}, face.options()), gcs = at::empty({N, 1}, face.options());
  if (N == 0) return {gface, gctx, gfs, gcs};
  const at::Tensor g = grad_out.to(dt).contiguous(), f = face.contiguous(), c = context.contiguous(),
                   w = weights.contiguous();
  const at::Tensor gw = has_gw ? grad_weights->to(dt).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dt, "adaptive_fusion_backward", [&] {
    backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), has_gw ? gw.data_ptr<scalar_t>() : nullptr,
                              f.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                              gface.data_ptr<scalar_t>(), gctx.data_ptr<scalar_t>(), gfs.data_ptr<scalar_t>(),
                              gcs.data_ptr<scalar_t>(), N, Cf, Cc);
  });
  return {gface, gctx, gfs, gcs};
}

}  // namespace

TORCH_LIBRARY_IMPL(caer_fast, CPU, m) {
  m.impl("adaptive_fusion", &adaptive_fusion_cpu);
  m.impl("adaptive_fusion_backward", &adaptive_fusion_backward_cpu);
}
