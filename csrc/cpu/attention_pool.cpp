// Fused attention pooling on CPU: softmax over all positions + attended mean, in one pass over the
// features (online softmax over tiles of positions), without an N×C×S attended tensor.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "ops.h"
#include "simd.h"

namespace {

using caer_fast_simd::gemv;
using caer_fast_simd::gemv_t_outer;
using caer_fast_simd::dot;
using caer_fast_simd::rescale;

constexpr int64_t kTile = 256;  // positions per online-softmax step (exp weights live on the stack)

// Samples per task so a task holds at least ~32k feature elements (thread start-up is not free).
int64_t grain(int64_t per_sample) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_sample)); }

int64_t positions(const at::Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

void check_forward(const at::Tensor& features, const at::Tensor& logits) {
  TORCH_CHECK(features.device().is_cpu() && logits.device().is_cpu(), "attention_pool (cpp): CPU tensors only");
  TORCH_CHECK(features.dim() >= 3, "attention_pool: features must be N×C×(S…), got ", features.sizes());
  TORCH_CHECK(logits.dim() == features.dim() && logits.size(0) == features.size(0) && logits.size(1) == 1 &&
                  logits.sizes().slice(2) == features.sizes().slice(2),
              "attention_pool: logits must be N×1×(S…) matching features ", features.sizes(), ", got ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == features.scalar_type(), "attention_pool (cpp): features and logits must share a dtype, got ",
              features.scalar_type(), " and ", logits.scalar_type());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), "attention_pool: floating-point tensors only");
}

void check_out(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "attention_pool: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device().is_cpu(), "attention_pool: ", name,
              " must be a CPU ", like.scalar_type(), " tensor");
  TORCH_CHECK(t.is_contiguous(), "attention_pool: ", name, " must be contiguous");
}

template <typename T>
void forward_kernel(const T* F, const T* X, T* out, T* att, int64_t N, int64_t C, int64_t S) {
  at::parallel_for(0, N, grain(C * S), [&](int64_t n0, int64_t n1) {
    T w[kTile];
    for (int64_t n = n0; n < n1; ++n) {
      const T* f = F + n * C * S;
      const T* x = X + n * S;
      T* o = out + n * C;  // running (unnormalised) sums live in the output row
      const T ninf = -std::numeric_limits<T>::infinity();
      T m = ninf;
      T l = 0;
      for (int64_t s0 = 0; s0 < S; s0 += kTile) {
        const int64_t len = std::min(kTile, S - s0);
        T tile_max = ninf;
        for (int64_t i = 0; i < len; ++i) tile_max = std::max(tile_max, x[s0 + i]);
        if (tile_max == ninf) continue;  // all weights exactly 0
        const T m_new = std::max(m, tile_max);
        T tile_sum = 0;
        for (int64_t i = 0; i < len; ++i) {
          w[i] = std::exp(x[s0 + i] - m_new);
          tile_sum += w[i];
        }
        // earlier tiles were weighted with the old max: rescale them (nothing to keep before the first)
        const T r = m == ninf ? T(0) : std::exp(m - m_new);
        gemv(f + s0, C, len, S, w, r, o);
        l = l * r + tile_sum;
        m = m_new;
      }
      if (m == ninf) {  // every logit -inf: softmax is undefined (NaN), as in torch.softmax
        std::fill(o, o + C, std::numeric_limits<T>::quiet_NaN());
        std::fill(att + n * S, att + (n + 1) * S, std::numeric_limits<T>::quiet_NaN());
        continue;
      }
      const T inv_l = T(1) / l;
      rescale(o, inv_l / T(S), C);
      T* a = att + n * S;
      for (int64_t s = 0; s < S; ++s) a[s] = std::exp(x[s] - m) * inv_l;
    }
  });
}

// grad_f[c,s] = g[c]·a[s]/S;  grad_x[s] = a[s]·(Σ_c g[c]f[c,s]/S − Σ_c g[c]out[c] + ga[s] − Σ_t a[t]ga[t]).
template <typename T>
void backward_kernel(const T* G, const T* GA, const T* F, const T* A, const T* O, T* GF, T* GX, int64_t N,
                     int64_t C, int64_t S) {
  at::parallel_for(0, N, grain(C * S), [&](int64_t n0, int64_t n1) {
    std::vector<T> gf_dot(S);
    const T inv_s = T(1) / T(S);
    for (int64_t n = n0; n < n1; ++n) {
      const T* g = G + n * C;
      const T* f = F + n * C * S;
      const T* a = A + n * S;
      T* gf = GF + n * C * S;
      std::fill(gf_dot.begin(), gf_dot.end(), T(0));
      gemv_t_outer(f, g, C, S, gf_dot.data(), a, inv_s, gf);  // the one pass: read f, write grad_f
      const T g_dot_out = dot(g, O + n * C, C);
      T* gx = GX + n * S;
      if (GA != nullptr) {
        const T* ga = GA + n * S;
        const T a_dot_ga = dot(a, ga, S);
        for (int64_t s = 0; s < S; ++s) gx[s] = a[s] * (gf_dot[s] * inv_s - g_dot_out + ga[s] - a_dot_ga);
      } else {
        for (int64_t s = 0; s < S; ++s) gx[s] = a[s] * (gf_dot[s] * inv_s - g_dot_out);
      }
    }
  });
}

}  // namespace

void attention_pool_forward_out(const at::Tensor& features, const at::Tensor& logits, at::Tensor& out,
                                at::Tensor& attention) {
  check_forward(features, logits);
  const int64_t N = features.size(0), C = features.size(1), S = positions(features);
  check_out(out, {N, C}, features, "out");
  check_out(attention, logits.sizes(), features, "attention");
  TORCH_CHECK(S > 0, "attention_pool: features need at least one position");
  if (N == 0) return;
  if (is_reduced(features)) {  // upcast: compute in float32, write back
    at::Tensor o = at::empty({N, C}, features.options().dtype(at::kFloat));
    at::Tensor a = at::empty(logits.sizes(), features.options().dtype(at::kFloat));
    attention_pool_forward_out(features.to(at::kFloat), logits.to(at::kFloat), o, a);
    out.copy_(o);
    attention.copy_(a);
    return;
  }
  const at::Tensor f = features.contiguous(), x = logits.contiguous();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "attention_pool_forward", [&] {
    forward_kernel<scalar_t>(f.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             attention.data_ptr<scalar_t>(), N, C, S);
  });
}

std::tuple<at::Tensor, at::Tensor> attention_pool_forward(const at::Tensor& features, const at::Tensor& logits) {
  check_forward(features, logits);
  at::Tensor out = at::empty({features.size(0), features.size(1)}, features.options());
  at::Tensor attention = at::empty(logits.sizes(), features.options());
  attention_pool_forward_out(features, logits, out, attention);
  return {out, attention};
}

void attention_pool_backward_out(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attention,
                                 const at::Tensor& features, const at::Tensor& attention, const at::Tensor& out,
                                 at::Tensor& grad_features, at::Tensor& grad_logits) {
  check_forward(features, attention);
  const int64_t N = features.size(0), C = features.size(1), S = positions(features);
  check_out(out, {N, C}, features, "out");
  check_out(grad_features, features.sizes(), features, "grad_features");
  check_out(grad_logits, attention.sizes(), features, "grad_logits");
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == features.scalar_type(),
              "attention_pool: grad_out must be ", out.sizes(), " ", features.scalar_type());
  const bool has_ga = grad_attention.has_value() && grad_attention->defined();
  if (has_ga) {
    TORCH_CHECK(grad_attention->sizes() == attention.sizes() &&
                    grad_attention->scalar_type() == features.scalar_type(),
                "attention_pool: grad_attention must match attention ", attention.sizes());
  }
  TORCH_CHECK(S > 0, "attention_pool: features need at least one position");
  if (N == 0) return;
  if (is_reduced(features)) {
    at::Tensor gf = at::empty(features.sizes(), features.options().dtype(at::kFloat));
    at::Tensor gx = at::empty(attention.sizes(), features.options().dtype(at::kFloat));
    std::optional<at::Tensor> ga;
    if (has_ga) ga = grad_attention->to(at::kFloat);
    attention_pool_backward_out(grad_out.to(at::kFloat), ga, features.to(at::kFloat), attention.to(at::kFloat),
                                out.to(at::kFloat), gf, gx);
    grad_features.copy_(gf);
    grad_logits.copy_(gx);
    return;
  }
  const at::Tensor g = grad_out.contiguous(), f = features.contiguous(), a = attention.contiguous(),
                   o = out.contiguous();
  const at::Tensor ga = has_ga ? grad_attention->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "attention_pool_backward", [&] {
    backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), has_ga ? ga.data_ptr<scalar_t>() : nullptr,
                              f.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                              grad_features.data_ptr<scalar_t>(), grad_logits.data_ptr<scalar_t>(), N, C, S);
  });
}

std::tuple<at::Tensor, at::Tensor> attention_pool_backward(const at::Tensor& grad_out,
                                                           const std::optional<at::Tensor>& grad_attention,
                                                           const at::Tensor& features, const at::Tensor& attention,
                                                           const at::Tensor& out) {
  at::Tensor grad_features = at::empty(features.sizes(), features.options());
  at::Tensor grad_logits = at::empty(attention.sizes(), features.options());
  attention_pool_backward_out(grad_out, grad_attention, features, attention, out, grad_features, grad_logits);
  return {grad_features, grad_logits};
}
