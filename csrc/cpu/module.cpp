// The one Python module of the CPU kernels: caer_fast._C. Kernels are declared in ops.h.
#include "ops.h"

#ifdef CAER_FAST_WITH_CUDA  // CUDA kernels (csrc/cuda), only in builds with a CUDA torch + nvcc
#include "cuda/ops_cuda.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "caer_fast CPU kernels (use them through caer_fast.ops, which registers them with torch.library)";
  m.def("attention_pool_forward", &attention_pool_forward, "features, logits -> (out N×C, attention)");
  m.def("attention_pool_forward_out", &attention_pool_forward_out, "features, logits, out, attention");
  m.def("attention_pool_backward", &attention_pool_backward,
        "grad_out, grad_attention|None, features, attention, out -> (grad_features, grad_logits)");
  m.def("attention_pool_backward_out", &attention_pool_backward_out,
        "grad_out, grad_attention|None, features, attention, out, grad_features, grad_logits");
  m.def("adaptive_fusion_forward", &adaptive_fusion_forward,
        "face, context, face_score, context_score -> (out N×(Cf+Cc), weights N×2)");
  m.def("adaptive_fusion_forward_out", &adaptive_fusion_forward_out,
        "face, context, face_score, context_score, out, weights");
  m.def("adaptive_fusion_backward", &adaptive_fusion_backward,
        "grad_out, grad_weights|None, face, context, weights -> (grad_face, grad_context, grad_fs, grad_cs)");
  m.def("adaptive_fusion_backward_out", &adaptive_fusion_backward_out,
        "grad_out, grad_weights|None, face, context, weights, grad_face, grad_context, grad_fs, grad_cs");
  m.def("face_context_forward", &face_context_forward,
        "frames, boxes, face_h, face_w, ctx_h, ctx_w, crop_top, crop_left, crop_h, crop_w, mean, std, antialias "
        "-> (face, context)");

#ifdef CAER_FAST_WITH_CUDA
  caer_fast::register_cuda_ops(m);  // attention_pool_*_cuda, adaptive_fusion_*_cuda, face_context_resize_cuda
#endif
}
