// Host launchers of the CUDA kernels: plain C++ over raw pointers, no torch headers, so the
// kernel files compile on their own in seconds (bindings.cu adapts torch tensors to these).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace caer_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// features N×C×S (any strides), logits N×S (same dtype as features). Writes out N×C (dtype),
// lse float N (scratch) and the attention N×S (dtype, contiguous).
cudaError_t attention_pool_forward(DType dtype, const void* features, const void* logits, void* out, float* lse,
                                   void* attention, int64_t N, int64_t C, int64_t S, int64_t f_sn, int64_t f_sc,
                                   int64_t f_ss, int64_t l_sn, int64_t l_ss, cudaStream_t stream);

// grad N×C, attention N×S and grad_attention N×S (or nullptr) contiguous, dot float N
// (Σ_c grad·out + Σ_s attention·grad_attention). grad_features N×C×S and grad_logits N×S
// contiguous, each skipped when nullptr.
cudaError_t attention_pool_backward(DType dtype, const void* grad, const void* features, const void* attention,
                                    const void* grad_attention, const float* dot, void* grad_features,
                                    void* grad_logits, int64_t N, int64_t C, int64_t S, int64_t f_sn, int64_t f_sc,
                                    int64_t f_ss, cudaStream_t stream);

// face N×CF, context N×CC (row strides face_sn / ctx_sn, unit column stride), scores N (strides
// fs_sn / cs_sn). Writes out N×(CF+CC) contiguous and weights float N×2.
cudaError_t adaptive_fusion_forward(DType dtype, const void* face, const void* context, const void* face_score,
                                    const void* context_score, void* out, float* weights, int64_t N, int64_t CF,
                                    int64_t CC, int64_t face_sn, int64_t ctx_sn, int64_t fs_sn, int64_t cs_sn,
                                    cudaStream_t stream);

// grad N×(CF+CC) contiguous, grad_weights float N×2 or nullptr, weights float N×2.
// Writes grad_face N×CF, grad_context N×CC, grad_face_score / grad_context_score N (contiguous).
cudaError_t adaptive_fusion_backward(DType dtype, const void* grad, const float* grad_weights, const void* face,
                                     const void* context, const float* weights, void* grad_face, void* grad_context,
                                     void* grad_face_score, void* grad_context_score, int64_t N, int64_t CF,
                                     int64_t CC, int64_t face_sn, int64_t ctx_sn, cudaStream_t stream);

// frames uint8 N×H×W×3 contiguous -> out N×3×OH×OW (dtype). Window starts int32 and weights
// float per output row / column (per sample when per_sample, else shared), K_y / K_x taps each.
// mask_box zeroes pixels inside boxes (int32 N×4 xyxy); zero_invalid writes 0 where valid[n] == 0.
cudaError_t resize_normalize(DType dtype, const uint8_t* frames, void* out, const int32_t* y0, const float* yw,
                             const int32_t* x0, const float* xw, const int32_t* boxes, const int32_t* valid,
                             int64_t N, int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t KY, int64_t KX,
                             bool per_sample, const float mean[3], const float std[3], bool mask_box,
                             bool zero_invalid, cudaStream_t stream);

}  // namespace cuda
}  // namespace caer_fast
