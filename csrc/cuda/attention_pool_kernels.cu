// attention_pool: a = softmax over all S positions of the logits, out_c = mean_s a_s f_cs.
// The N×C×S attended tensor is never built: one pass over the (small) logits gives the
// log-sum-exp with a running max (stable for ±1e4 logits) and the attention map, then every
// channel's weighted mean recomputes a_s = exp(l_s - lse) on the fly. Non-finite logits behave as in
// torch.softmax: -inf weighs 0; +inf, NaN or all -inf make the sample's lse, attention and out NaN.
#include <cfloat>

#include "common.cuh"

namespace caer_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// One block per sample: lse[n] = log Σ exp(l), and the attention map.
template <typename T>
__global__ void lse_kernel(const T* __restrict__ logits, float* __restrict__ lse, T* __restrict__ attention,
                           int64_t S, int64_t l_sn, int64_t l_ss) {
  __shared__ float sm[32], sd[32];
  const T* l = logits + blockIdx.x * l_sn;
  float m = -FLT_MAX, d = 0.f;  // this thread's running max and Σ exp(l - m)
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    const float x = to_float(l[s * l_ss]);
    const float m_new = fmaxf(m, x);
    d = d * __expf(m - m_new) + __expf(x - m_new);
    m = m_new;
  }
  for (int o = 16; o > 0; o >>= 1) {  // merge (m, d) pairs within the warp
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), d2 = __shfl_xor_sync(0xffffffffu, d, o);
    const float mm = fmaxf(m, m2);
    d = d * __expf(m - mm) + d2 * __expf(m2 - mm);
    m = mm;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sm[warp] = m; sd[warp] = d; }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    m = lane < warps ? sm[lane] : -FLT_MAX;
    d = lane < warps ? sd[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), d2 = __shfl_xor_sync(0xffffffffu, d, o);
      const float mm = fmaxf(m, m2);
      d = d * __expf(m - mm) + d2 * __expf(m2 - mm);
      m = mm;
    }
    if (lane == 0) sm[0] = m + logf(d);
  }
  __syncthreads();
  const float total = sm[0];
  if (threadIdx.x == 0) lse[blockIdx.x] = total;
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
      attention[blockIdx.x * S + s] = from_float<T>(__expf(to_float(l[s * l_ss]) - total));
}

// Grid (N, ceil(C / warps)): one warp per channel, lanes stride over the positions.
template <typename T>
__global__ void pool_kernel(const T* __restrict__ features, const T* __restrict__ logits,
                            const float* __restrict__ lse, T* __restrict__ out, int64_t C,
                            int64_t S, int64_t f_sn, int64_t f_sc, int64_t f_ss, int64_t l_sn, int64_t l_ss) {
  const int64_t n = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarps + (threadIdx.x >> 5);
  if (c >= C) return;
  const int lane = threadIdx.x & 31;
  const float total = lse[n];
  const T* f = features + n * f_sn + c * f_sc;
  const T* l = logits + n * l_sn;
  float acc = 0.f;
  for (int64_t s = lane; s < S; s += 32) acc += __expf(to_float(l[s * l_ss]) - total) * to_float(f[s * f_ss]);
  acc = warp_sum(acc) / static_cast<float>(S);
  if (lane == 0) out[n * C + c] = from_float<T>(acc);
}

// Grid (N, ceil(S / threads)): one thread per position, looping over the channels.
//   dF[c, s] = g_c a_s / S,   dL[s] = a_s (Σ_c g_c f_cs / S - dot + ga_s),  dot = Σ_c g_c out_c + Σ_t a_t ga_t.
template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ features,
                                const T* __restrict__ attention, const T* __restrict__ grad_attention,
                                const float* __restrict__ dot, T* __restrict__ grad_features,
                                T* __restrict__ grad_logits, int64_t C, int64_t S, int64_t f_sn, int64_t f_sc,
                                int64_t f_ss) {
  const int64_t n = blockIdx.x;
  const int64_t s = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (s >= S) return;
  const float inv_s = 1.f / static_cast<float>(S);
  const float a = to_float(attention[n * S + s]);
  const T* g = grad + n * C;
  const T* f = features + n * f_sn + s * f_ss;
  float h = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float gc = to_float(g[c]);
    if (grad_logits != nullptr) h += gc * to_float(f[c * f_sc]);
    if (grad_features != nullptr) grad_features[(n * C + c) * S + s] = from_float<T>(gc * a * inv_s);
  }
  if (grad_logits != nullptr) {
    const float ga = grad_attention != nullptr ? to_float(grad_attention[n * S + s]) : 0.f;
    grad_logits[n * S + s] = from_float<T>(a * (h * inv_s - dot[n] + ga));
  }
}

}  // namespace

cudaError_t attention_pool_forward(DType dtype, const void* features, const void* logits, void* out, float* lse,
                                   void* attention, int64_t N, int64_t C, int64_t S, int64_t f_sn,
                                   int64_t f_sc, int64_t f_ss, int64_t l_sn, int64_t l_ss, cudaStream_t stream) {
  if (N == 0 || S == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    lse_kernel<T><<<N, kThreads, 0, stream>>>(static_cast<const T*>(logits), lse, static_cast<T*>(attention), S,
                                              l_sn, l_ss);
    if (C > 0) {
      const dim3 grid(N, ceil_div(C, kWarps));
      pool_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(features), static_cast<const T*>(logits),
                                                    lse, static_cast<T*>(out), C, S, f_sn, f_sc, f_ss, l_sn, l_ss);
    }
    return cudaGetLastError();
  });
}

cudaError_t attention_pool_backward(DType dtype, const void* grad, const void* features, const void* attention,
                                    const void* grad_attention, const float* dot, void* grad_features,
                                    void* grad_logits, int64_t N, int64_t C, int64_t S, int64_t f_sn, int64_t f_sc,
                                    int64_t f_ss, cudaStream_t stream) {
  if (N == 0 || S == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(N, ceil_div(S, kThreads));
    backward_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(features), static_cast<const T*>(attention),
        static_cast<const T*>(grad_attention), dot, static_cast<T*>(grad_features), static_cast<T*>(grad_logits), C,
        S, f_sn, f_sc, f_ss);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace caer_fast
