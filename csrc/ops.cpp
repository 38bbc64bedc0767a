// The schemas of caer_fast's ops, each defined once. Kernels register under their dispatch keys
// in their own files: TORCH_LIBRARY_IMPL(caer_fast, CPU, m) in csrc/cpu/<op>.cpp and
// TORCH_LIBRARY_IMPL(caer_fast, CUDA, m) in csrc/cuda/bindings.cu; the autograd formulas under the
// Autograd key in csrc/autograd.cpp. The fake (meta) implementations are registered once, in Python
// (caer_fast/ops/<op>.py); the Triton kernels (kernels/<op>.py) take the CUDA key's place while the
// backend is "triton".
//
// Contracts the kernels share (caer_fast/ops/<op>.py checks the user's inputs before any of them):
// - attention_pool: features N×C×(S…), logits N×S or N×1×(S…) (S values per sample), one floating
//   dtype. Returns (out N×C, attention in the logits' shape) in that dtype; the kernels read both
//   flat, so the front door reshapes nothing. The backward gets what autograd saved: (features,
//   attention, out), and returns gradients in the shapes of features and attention.
// - adaptive_fusion: face N×Cf, context N×Cc, scores N×1, one floating dtype. Returns
//   (out N×(Cf+Cc), weights N×2). The backward gets (face, context, weights).
// - face_context: frames uint8 N×H×W×3, boxes integer N×4 xyxy already clipped to the frame (the
//   front door clips them once; an empty box is 0, 0, 0, 0, "no face"; kernels check, never clip),
//   crop = (top, left, height, width) inside context_size, mean/std 3 finite values, std nonzero.
//   Returns (face, context) in dtype.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(caer_fast, m) {
  m.def("attention_pool(Tensor features, Tensor logits) -> (Tensor, Tensor)");
  m.def("attention_pool_backward(Tensor grad_out, Tensor? grad_attention, Tensor features, Tensor attention, "
        "Tensor out) -> (Tensor, Tensor)");
  m.def("adaptive_fusion(Tensor face, Tensor context, Tensor face_score, Tensor context_score) -> (Tensor, Tensor)");
  m.def("adaptive_fusion_backward(Tensor grad_out, Tensor? grad_weights, Tensor face, Tensor context, "
        "Tensor weights) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("face_context(Tensor frames, Tensor boxes, int[] face_size, int[] context_size, int[] crop, float[] mean, "
        "float[] std, bool antialias, ScalarType dtype) -> (Tensor, Tensor)");
}

// `import caer_fast._C` loads this library (running the registrations above); the module is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "caer_fast's kernels: use them through caer_fast.ops",
                               -1, nullptr};
  return PyModule_Create(&module);
}
