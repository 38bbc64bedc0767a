// The autograd formulas of the ops with gradients, in C++ under the Autograd dispatch key, as
// torchvision registers roi_align's (csrc/ops/autograd): an eager call that needs gradients records
// one C++ node, with no Python frame in the forward or the backward; torch.compile traces the same
// formula (AOTAutograd runs this kernel on fake tensors). Each formula saves what every backend's
// <op>_backward takes (csrc/ops.cpp's contract) and calls that op through the dispatcher, so the
// backward runs the chosen backend's kernels (C++, CUDA, or the Triton ones registered under CUDA).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;

// the typed handle of caer_fast::<name>, looked up once
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::optional<at::Tensor> maybe(const at::Tensor& grad) {
  return grad.defined() ? std::optional<at::Tensor>(grad) : std::nullopt;
}

// ---- attention_pool: saves (features, attention, out) ----------------------------------------------
using PoolForward = Pair(const at::Tensor&, const at::Tensor&);
using PoolBackward = Pair(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&);

Pair pool_forward(const at::Tensor& features, const at::Tensor& logits) {
  static const auto forward = op<PoolForward>("caer_fast::attention_pool");
  at::AutoDispatchBelowADInplaceOrView below;
  return forward.call(features, logits);
}

class AttentionPool : public torch::autograd::Function<AttentionPool> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& logits) {
    auto [out, attention] = pool_forward(features, logits);
    ctx->save_for_backward({features, attention, out});
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no zeros made
    return {out, attention};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<PoolBackward>("caer_fast::attention_pool_backward");
    const auto saved = ctx->get_saved_variables();
    // grad_out is not optional in the schema: only the attention map was used
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(saved[2]);
    auto [grad_features, grad_logits] = backward_op.call(grad_out, maybe(grads[1]), saved[0], saved[1], saved[2]);
    return {grad_features, grad_logits};
  }
};

Pair attention_pool_autograd(const at::Tensor& features, const at::Tensor& logits) {
  if (!(at::GradMode::is_enabled() && (features.requires_grad() || logits.requires_grad()))) {
    return pool_forward(features, logits);  // nothing to record: no node, no saved tensors
  }
  auto outputs = AttentionPool::apply(features, logits);
  return {outputs[0], outputs[1]};
}

// ---- adaptive_fusion: saves (face, context, weights) -----------------------------------------------
using FusionForward = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using FusionBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

Pair fusion_forward(const at::Tensor& face, const at::Tensor& context, const at::Tensor& face_score,
                    const at::Tensor& context_score) {
  static const auto forward = op<FusionForward>("caer_fast::adaptive_fusion");
  at::AutoDispatchBelowADInplaceOrView below;
  return forward.call(face, context, face_score, context_score);
}

class AdaptiveFusion : public torch::autograd::Function<AdaptiveFusion> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& face, const at::Tensor& context,
                               const at::Tensor& face_score, const at::Tensor& context_score) {
    auto [out, weights] = fusion_forward(face, context, face_score, context_score);
    ctx->save_for_backward({face, context, weights});
    ctx->set_materialize_grads(false);
    return {out, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<FusionBackward>("caer_fast::adaptive_fusion_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad_out =
        grads[0].defined() ? grads[0]
                           : at::zeros({saved[0].size(0), saved[0].size(1) + saved[1].size(1)}, saved[0].options());
    auto [g_face, g_context, g_face_score, g_context_score] =
        backward_op.call(grad_out, maybe(grads[1]), saved[0], saved[1], saved[2]);
    return {g_face, g_context, g_face_score, g_context_score};
  }
};

Pair adaptive_fusion_autograd(const at::Tensor& face, const at::Tensor& context, const at::Tensor& face_score,
                              const at::Tensor& context_score) {
  if (!(at::GradMode::is_enabled() && (face.requires_grad() || context.requires_grad() ||
                                       face_score.requires_grad() || context_score.requires_grad()))) {
    return fusion_forward(face, context, face_score, context_score);
  }
  auto outputs = AdaptiveFusion::apply(face, context, face_score, context_score);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(caer_fast, Autograd, m) {
  m.impl("attention_pool", &attention_pool_autograd);
  m.impl("adaptive_fusion", &adaptive_fusion_autograd);
}
