// adaptive_fusion: (w_f, w_c) = softmax(face_score, context_score); out = [w_f·face, w_c·context].
#include "common.cuh"

namespace caer_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void two_way_softmax(float sf, float sc, float& wf, float& wc) {
  const float m = fmaxf(sf, sc), ef = __expf(sf - m), ec = __expf(sc - m);
  wf = ef / (ef + ec);
  wc = ec / (ef + ec);
}

// Grid (N, ceil((CF + CC) / threads)): one thread per output column; the weights are
// recomputed per thread (two exps) instead of a second launch.
template <typename T>
__global__ void forward_kernel(const T* __restrict__ face, const T* __restrict__ context,
                               const T* __restrict__ face_score, const T* __restrict__ context_score,
                               T* __restrict__ out, float* __restrict__ weights, int64_t CF, int64_t CC,
                               int64_t face_sn, int64_t ctx_sn, int64_t fs_sn, int64_t cs_sn) {
  const int64_t n = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  float wf, wc;
  two_way_softmax(to_float(face_score[n * fs_sn]), to_float(context_score[n * cs_sn]), wf, wc);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    weights[2 * n] = wf;
    weights[2 * n + 1] = wc;
  }
  if (j < CF) out[n * (CF + CC) + j] = from_float<T>(wf * to_float(face[n * face_sn + j]));
  else if (j < CF + CC) out[n * (CF + CC) + j] = from_float<T>(wc * to_float(context[n * ctx_sn + j - CF]));
}

// One block per row. d face_score = -d context_score = w_f w_c (Σ g_f·face + gw_f - Σ g_c·context - gw_c).
template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const float* __restrict__ grad_weights,
                                const T* __restrict__ face, const T* __restrict__ context,
                                const float* __restrict__ weights, T* __restrict__ grad_face,
                                T* __restrict__ grad_context, T* __restrict__ grad_face_score,
                                T* __restrict__ grad_context_score, int64_t CF, int64_t CC, int64_t face_sn,
                                int64_t ctx_sn) {
  __shared__ float shared32[32];
  const int64_t n = blockIdx.x;
  const float wf = weights[2 * n], wc = weights[2 * n + 1];
  const T* g = grad + n * (CF + CC);
  float dot_f = 0.f, dot_c = 0.f;
  for (int64_t j = threadIdx.x; j < CF; j += blockDim.x) {
    const float gj = to_float(g[j]);
    dot_f += gj * to_float(face[n * face_sn + j]);
    grad_face[n * CF + j] = from_float<T>(gj * wf);
  }
  for (int64_t j = threadIdx.x; j < CC; j += blockDim.x) {
    const float gj = to_float(g[CF + j]);
    dot_c += gj * to_float(context[n * ctx_sn + j]);
    grad_context[n * CC + j] = from_float<T>(gj * wc);
  }
  dot_f = block_sum(dot_f, shared32);
  dot_c = block_sum(dot_c, shared32);
  if (threadIdx.x == 0) {
    if (grad_weights != nullptr) {
      dot_f += grad_weights[2 * n];
      dot_c += grad_weights[2 * n + 1];
    }
    const float d = wf * wc * (dot_f - dot_c);
    grad_face_score[n] = from_float<T>(d);
    grad_context_score[n] = from_float<T>(-d);
  }
}

}  // namespace

cudaError_t adaptive_fusion_forward(DType dtype, const void* face, const void* context, const void* face_score,
                                    const void* context_score, void* out, float* weights, int64_t N, int64_t CF,
                                    int64_t CC, int64_t face_sn, int64_t ctx_sn, int64_t fs_sn, int64_t cs_sn,
                                    cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(N, ceil_div(CF + CC, kThreads) > 0 ? ceil_div(CF + CC, kThreads) : 1);
    forward_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(face), static_cast<const T*>(context), static_cast<const T*>(face_score),
        static_cast<const T*>(context_score), static_cast<T*>(out), weights, CF, CC, face_sn, ctx_sn, fs_sn, cs_sn);
    return cudaGetLastError();
  });
}

cudaError_t adaptive_fusion_backward(DType dtype, const void* grad, const float* grad_weights, const void* face,
                                     const void* context, const float* weights, void* grad_face, void* grad_context,
                                     void* grad_face_score, void* grad_context_score, int64_t N, int64_t CF,
                                     int64_t CC, int64_t face_sn, int64_t ctx_sn, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    backward_kernel<T><<<N, kThreads, 0, stream>>>(
        static_cast<const T*>(grad), grad_weights, static_cast<const T*>(face), static_cast<const T*>(context),
        weights, static_cast<T*>(grad_face), static_cast<T*>(grad_context), static_cast<T*>(grad_face_score),
        static_cast<T*>(grad_context_score), CF, CC, face_sn, ctx_sn);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace caer_fast
