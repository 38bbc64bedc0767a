// Declarations of the CPU kernels bound into caer_fast._C by module.cpp (one PYBIND11_MODULE).
// Each op has an allocating form and an `_out` form writing into caller buffers: the `_out` forms
// let tests pass NaN-filled buffers and prove every element is written.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

// ---- attention_pool: out[n,c] = mean_s softmax(logits[n,0,:])[s] * features[n,c,s] ----
// features N×C×(S…), logits N×1×(S…) of the same dtype. Returns (out N×C, attention shaped like logits).
std::tuple<at::Tensor, at::Tensor> attention_pool_forward(const at::Tensor& features, const at::Tensor& logits);
void attention_pool_forward_out(const at::Tensor& features, const at::Tensor& logits, at::Tensor& out,
                                at::Tensor& attention);
// grad_attention may be absent (attention unused). Returns (grad_features, grad_logits).
std::tuple<at::Tensor, at::Tensor> attention_pool_backward(const at::Tensor& grad_out,
                                                           const std::optional<at::Tensor>& grad_attention,
                                                           const at::Tensor& features, const at::Tensor& attention,
                                                           const at::Tensor& out);
void attention_pool_backward_out(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attention,
                                 const at::Tensor& features, const at::Tensor& attention, const at::Tensor& out,
                                 at::Tensor& grad_features, at::Tensor& grad_logits);

// ---- adaptive_fusion: (w_f, w_c) = softmax(face_score, context_score); out = [w_f·face, w_c·context] ----
// face N×Cf, context N×Cc, scores N×1, one dtype. Returns (out N×(Cf+Cc), weights N×2).
std::tuple<at::Tensor, at::Tensor> adaptive_fusion_forward(const at::Tensor& face, const at::Tensor& context,
                                                           const at::Tensor& face_score,
                                                           const at::Tensor& context_score);
void adaptive_fusion_forward_out(const at::Tensor& face, const at::Tensor& context, const at::Tensor& face_score,
                                 const at::Tensor& context_score, at::Tensor& out, at::Tensor& weights);
// Returns (grad_face, grad_context, grad_face_score, grad_context_score).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptive_fusion_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights, const at::Tensor& face,
    const at::Tensor& context, const at::Tensor& weights);
void adaptive_fusion_backward_out(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
                                  const at::Tensor& face, const at::Tensor& context, const at::Tensor& weights,
                                  at::Tensor& grad_face, at::Tensor& grad_context, at::Tensor& grad_face_score,
                                  at::Tensor& grad_context_score);

// ---- face_context (csrc/cpu/face_context.cpp) ----
// frames uint8 N×H×W×3 RGB, boxes int64 N×4 xyxy (not yet clipped). Returns float32
// (face N×3×face_h×face_w, context N×3×h×w) with h×w = crop_h×crop_w, or ctx_h×ctx_w when crop_h == -1.
std::tuple<at::Tensor, at::Tensor> face_context_forward(const at::Tensor& frames, const at::Tensor& boxes,
                                                        int64_t face_h, int64_t face_w, int64_t ctx_h,
                                                        int64_t ctx_w, int64_t crop_top, int64_t crop_left,
                                                        int64_t crop_h, int64_t crop_w, std::vector<double> mean,
                                                        std::vector<double> std, bool antialias);
