// Fused attention pooling on CPU: softmax over all positions + attended mean, in one pass over the
// features (online softmax over tiles of positions), without an N×C×S attended tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "simd.h"

namespace {

using caer_fast_simd::gemv;
using caer_fast_simd::gemv_t_outer;
using caer_fast_simd::dot;
using caer_fast_simd::rescale;

constexpr int64_t kTile = 256;  // positions per online-softmax step (exp weights live on the stack)

// Samples per task so a task holds at least ~32k feature elements (thread start-up is not free).
int64_t grain(int64_t per_sample) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_sample)); }

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// positions per sample: the product of the dims after N and C
int64_t positions(const at::Tensor& features) { return c10::multiply_integers(features.sizes().slice(2)); }

// The op's contract (caer_fast/ops/attention_pool.py has checked the user's inputs already): features
// N×C×(S…), logits N×… with S values per sample (N×S or N×1×(S…)); the kernels see both flat.
void check(const at::Tensor& features, const at::Tensor& logits) {
  TORCH_CHECK(features.dim() >= 3 && logits.dim() >= 1 && logits.size(0) == features.size(0) &&
                  logits.numel() == features.size(0) * positions(features),
              "caer_fast::attention_pool: features must be N×C×(S…) and logits N×S or N×1×(S…), got ",
              features.sizes(), " and ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == features.scalar_type() && at::isFloatingType(features.scalar_type()),
              "caer_fast::attention_pool: features and logits must share one floating dtype");
  TORCH_CHECK(positions(features) > 0, "caer_fast::attention_pool: features need at least one position");
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
      if (S <= kTile) {  // one tile: w already holds exp(x - m) for the final m
        for (int64_t s = 0; s < S; ++s) a[s] = w[s] * inv_l;
      } else {
        for (int64_t s = 0; s < S; ++s) a[s] = std::exp(x[s] - m) * inv_l;
      }
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

std::tuple<at::Tensor, at::Tensor> attention_pool_cpu(const at::Tensor& features, const at::Tensor& logits) {
  check(features, logits);
  if (is_reduced(features)) {  // compute in float32, round once
    auto [out, attention] = attention_pool_cpu(features.to(at::kFloat), logits.to(at::kFloat));
    return {out.to(features.scalar_type()), attention.to(features.scalar_type())};
  }
  const int64_t N = features.size(0), C = features.size(1), S = positions(features);
  at::Tensor out = at::empty({N, C}, features.options());
  at::Tensor attention = at::empty(logits.sizes(), features.options());
  if (N == 0) return {out, attention};
  const at::Tensor f = features.contiguous(), x = logits.contiguous();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "attention_pool", [&] {
    forward_kernel<scalar_t>(f.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             attention.data_ptr<scalar_t>(), N, C, S);
  });
  return {out, attention};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_backward_cpu(const at::Tensor& grad_out,
                                                               const std::optional<at::Tensor>& grad_attention,
                                                               const at::Tensor& features, const at::Tensor& attention,
                                                               const at::Tensor& out) {
  check(features, attention);
  const int64_t N = features.size(0), C = features.size(1), S = positions(features);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({N, C}) && out.sizes() == at::IntArrayRef({N, C}),
              "caer_fast::attention_pool_backward: grad_out and out must be ", N, "×", C);
  const bool has_ga = grad_attention.has_value() && grad_attention->defined();
  TORCH_CHECK(!has_ga || grad_attention->sizes() == attention.sizes(),
              "caer_fast::attention_pool_backward: grad_attention must be ", attention.sizes());
  const auto dt = features.scalar_type();
  if (is_reduced(features)) {
    std::optional<at::Tensor> ga;
    if (has_ga) ga = grad_attention->to(at::kFloat);
    auto [gf, gx] = attention_pool_backward_cpu(grad_out.to(at::kFloat), ga, features.to(at::kFloat),
                                                attention.to(at::kFloat), out.to(at::kFloat));
    return {gf.to(dt), gx.to(dt)};
  }
  at::Tensor grad_features = at::empty(features.sizes(), features.options());
  at::Tensor grad_logits = at::empty(attention.sizes(), features.options());
  if (N == 0) return {grad_features, grad_logits};
  const at::Tensor g = grad_out.to(dt).contiguous(), f = features.contiguous(), a = attention.contiguous(),
                   o = out.to(dt).contiguous();
  const at::Tensor ga = has_ga ? grad_attention->to(dt).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dt, "attention_pool_backward", [&] {
    backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), has_ga ? ga.data_ptr<scalar_t>() : nullptr,
                              f.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                              grad_features.data_ptr<scalar_t>(), grad_logits.data_ptr<scalar_t>(), N, C, S);
  });
  return {grad_features, grad_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(caer_fast, CPU, m) {
  m.impl("attention_pool", &attention_pool_cpu);
  m.impl("attention_pool_backward", &attention_pool_backward_cpu);
}
