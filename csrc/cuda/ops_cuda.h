// Torch-facing entry points of the CUDA kernels (implemented in bindings.cu). Safe to include
// from plain C++ (module.cpp): no CUDA headers here.
#pragma once
#include <optional>
#include <vector>

#include <torch/extension.h>

namespace caer_fast {

// features N×C×S and logits N×S of the same floating dtype on one GPU.
// Returns {out N×C (dtype), out32 N×C float, lse N float, attention N×S (dtype; empty unless asked)}.
std::vector<at::Tensor> attention_pool_forward_cuda(const at::Tensor& features, const at::Tensor& logits,
                                                    bool return_attention);
// Returns {grad_features N×C×S, grad_logits N×S}; an entry not needed is an undefined tensor.
std::vector<at::Tensor> attention_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& features,
                                                     const at::Tensor& logits, const at::Tensor& out32,
                                                     const at::Tensor& lse, bool need_features, bool need_logits);

// face N×CF, context N×CC, scores N×1, one dtype. Returns {out N×(CF+CC), weights N×2 float}.
std::vector<at::Tensor> adaptive_fusion_forward_cuda(const at::Tensor& face, const at::Tensor& context,
                                                     const at::Tensor& face_score, const at::Tensor& context_score);
// Returns {grad_face, grad_context, grad_face_score N×1, grad_context_score N×1}.
std::vector<at::Tensor> adaptive_fusion_backward_cuda(const at::Tensor& grad,
                                                      const std::optional<at::Tensor>& grad_weights,
                                                      const at::Tensor& face, const at::Tensor& context,
                                                      const at::Tensor& weights);

// One face_context output: frames uint8 N×H×W×3 -> out N×3×OH×OW (float/half/bf16), using the
// window tables of caer_fast/ops/_resize_tables.py.
void face_context_resize_cuda(const at::Tensor& frames, at::Tensor& out, const at::Tensor& y0, const at::Tensor& yw,
                              const at::Tensor& x0, const at::Tensor& xw, const at::Tensor& boxes,
                              const at::Tensor& valid, bool per_sample, const std::vector<double>& mean,
                              const std::vector<double>& std, bool mask_box, bool zero_invalid);

// Adds the functions above to the extension module (called from csrc/cpu/module.cpp).
void register_cuda_ops(pybind11::module& m);

}  // namespace caer_fast
