// Adaptive fusion on CPU: two-way softmax of the stream scores and the weighted concatenation in
// one kernel (no N×2 score tensor, no separate scaled copies before the cat).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "ops.h"
#include "simd.h"

namespace {

using caer_fast_simd::dot;
using caer_fast_simd::scale;

int64_t grain(int64_t per_sample) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_sample)); }

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

void check_inputs(const at::Tensor& face, const at::Tensor& context, const at::Tensor& fs, const at::Tensor& cs) {
  TORCH_CHECK(face.device().is_cpu() && context.device().is_cpu() && fs.device().is_cpu() && cs.device().is_cpu(),
              "adaptive_fusion (cpp): CPU tensors only");
  TORCH_CHECK(face.dim() == 2 && context.dim() == 2 && context.size(0) == face.size(0),
              "adaptive_fusion: face and context must be N×C, got ", face.sizes(), " and ", context.sizes());
  const int64_t N = face.size(0);
  TORCH_CHECK(fs.dim() == 2 && fs.size(0) == N && fs.size(1) == 1 && cs.dim() == 2 && cs.size(0) == N &&
                  cs.size(1) == 1,
              "adaptive_fusion: scores must be ", N, "×1, got ", fs.sizes(), " and ", cs.sizes());
  const auto dt = face.scalar_type();
  TORCH_CHECK(context.scalar_type() == dt && fs.scalar_type() == dt && cs.scalar_type() == dt,
              "adaptive_fusion (cpp): all inputs must share one dtype");
  TORCH_CHECK(at::isFloatingType(dt), "adaptive_fusion: floating-point tensors only");
}

void check_out(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "adaptive_fusion: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device().is_cpu() && t.is_contiguous(),
              "adaptive_fusion: ", name, " must be a contiguous CPU ", like.scalar_type(), " tensor");
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

}  // namespace

void adaptive_fusion_forward_out(const at::Tensor& face, const at::Tensor& context, const at::Tensor& face_score,
                                 const at::Tensor& context_score, at::Tensor& out, at::Tensor& weights) {
  check_inputs(face, context, face_score, context_score);
  const int64_t N = face.size(0), Cf = face.size(1), Cc = context.size(1);
  check_out(out, {N, Cf + Cc}, face, "out");
  check_out(weights, {N, 2}, face, "weights");
  if (N == 0) return;
  if (is_reduced(face)) {  // upcast: compute in float32, write back
    auto fl = [](const at::Tensor& t) { return t.to(at::kFloat); };
    at::Tensor o = at::empty(out.sizes(), face.options().dtype(at::kFloat));
    at::Tensor w = at::empty(weights.sizes(), face.options().dtype(at::kFloat));
    adaptive_fusion_forward_out(fl(face), fl(context), fl(face_score), fl(context_score), o, w);
    out.copy_(o);
    weights.copy_(w);
    return;
  }
  const at::Tensor f = face.contiguous(), c = context.contiguous(), fs = face_score.contiguous(),
                   cs = context_score.contiguous();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "adaptive_fusion_forward", [&] {
    forward_kernel<scalar_t>(f.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), fs.data_ptr<scalar_t>(),
                             cs.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), N, Cf,
                             Cc);
  });
}

std::tuple<at::Tensor, at::Tensor> adaptive_fusion_forward(const at::Tensor& face, const at::Tensor& context,
                                                           const at::Tensor& face_score,
                                                           const at::Tensor& context_score) {
  check_inputs(face, context, face_score, context_score);
  at::Tensor out = at::empty({face.size(0), face.size(1) + context.size(1)}, face.options());
  at::Tensor weights = at::empty({face.size(0), 2}, face.options());
  adaptive_fusion_forward_out(face, context, face_score, context_score, out, weights);
  return {out, weights};
}

void adaptive_fusion_backward_out(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
                                  const at::Tensor& face, const at::Tensor& context, const at::Tensor& weights,
                                  at::Tensor& grad_face, at::Tensor& grad_context, at::Tensor& grad_face_score,
                                  at::Tensor& grad_context_score) {
  TORCH_CHECK(face.dim() == 2 && context.dim() == 2 && face.size(0) == context.size(0),
              "adaptive_fusion: face and context must be N×C");
  const int64_t N = face.size(0), Cf = face.size(1), Cc = context.size(1);
  TORCH_CHECK(context.scalar_type() == face.scalar_type(), "adaptive_fusion (cpp): one dtype for all tensors");
  check_out(weights, {N, 2}, face, "weights");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({N, Cf + Cc}) && grad_out.scalar_type() == face.scalar_type(),
              "adaptive_fusion: grad_out must be ", N, "×", Cf + Cc, " ", face.scalar_type());
  const bool has_gw = grad_weights.has_value() && grad_weights->defined();
  if (has_gw) {
    TORCH_CHECK(grad_weights->sizes() == weights.sizes() && grad_weights->scalar_type() == face.scalar_type(),
                "adaptive_fusion: grad_weights must be ", N, "×2");
  }
  check_out(grad_face, face.sizes(), face, "grad_face");
  check_out(grad_context, context.sizes(), face, "grad_context");
  check_out(grad_face_score, {N, 1}, face, "grad_face_score");
  check_out(grad_context_score, {N, 1}, face, "grad_context_score");
  if (N == 0) return;
  if (is_reduced(face)) {
    auto fl = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto buf = [&](const at::Tensor& t) { return at::empty(t.sizes(), face.options().dtype(at::kFloat)); };
    at::Tensor gf = buf(grad_face), gc = buf(grad_context), gfs = buf(grad_face_score), gcs = buf(grad_context_score);
    std::optional<at::Tensor> gw;
    if (has_gw) gw = fl(*grad_weights);
    adaptive_fusion_backward_out(fl(grad_out), gw, fl(face), fl(context), fl(weights), gf, gc, gfs, gcs);
    grad_face.copy_(gf);
    grad_context.copy_(gc);
    grad_face_score.copy_(gfs);
    grad_context_score.copy_(gcs);
    return;
  }
  const at::Tensor g = grad_out.contiguous(), f = face.contiguous(), c = context.contiguous();
  const at::Tensor gw = has_gw ? grad_weights->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "adaptive_fusion_backward", [&] {
    backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), has_gw ? gw.data_ptr<scalar_t>() : nullptr,
                              f.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                              grad_face.data_ptr<scalar_t>(), grad_context.data_ptr<scalar_t>(),
                              grad_face_score.data_ptr<scalar_t>(), grad_context_score.data_ptr<scalar_t>(), N, Cf,
                              Cc);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptive_fusion_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights, const at::Tensor& face,
    const at::Tensor& context, const at::Tensor& weights) {
  auto like = [](const at::Tensor& t, at::IntArrayRef shape) { return at::empty(shape, t.options()); };
  const int64_t N = face.size(0);
  at::Tensor gf = like(face, face.sizes()), gc = like(face, context.sizes()), gfs = like(face, {N, 1}),
             gcs = like(face, {N, 1});
  adaptive_fusion_backward_out(grad_out, grad_weights, face, context, weights, gf, gc, gfs, gcs);
  return {gf, gc, gfs, gcs};
}
