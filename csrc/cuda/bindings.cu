// Torch tensors -> the raw-pointer launchers of launchers.h. The only CUDA file that includes
// torch headers (slow to compile); the kernels live in the *_kernels.cu files.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it drags in cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>

#include "launchers.h"
#include "ops_cuda.h"

namespace caer_fast {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "caer_fast CUDA ops take float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return cuda::DType::kFloat32;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "caer_fast CUDA op: ", name, " must be a CUDA tensor");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

std::vector<at::Tensor> attention_pool_forward_cuda(const at::Tensor& features, const at::Tensor& logits,
                                                    bool return_attention) {
  check_cuda(features, "features");
  check_cuda(logits, "logits");
  TORCH_CHECK(features.dim() == 3 && logits.dim() == 2 && logits.size(0) == features.size(0) &&
                  logits.size(1) == features.size(2),
              "attention_pool_forward_cuda: features must be N×C×S and logits N×S");
  TORCH_CHECK(features.scalar_type() == logits.scalar_type(), "attention_pool_forward_cuda: dtypes differ");
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), c = features.size(1), s = features.size(2);
  auto out = at::empty({n, c}, features.options());
  auto out32 = at::empty({n, c}, features.options().dtype(at::kFloat));
  auto lse = at::empty({n}, features.options().dtype(at::kFloat));
  at::Tensor attention = return_attention ? at::empty({n, s}, features.options()) : at::Tensor();
  check_launch(cuda::attention_pool_forward(dtype_of(features), features.data_ptr(), logits.data_ptr(),
                                            out.data_ptr(), out32.data_ptr<float>(), lse.data_ptr<float>(),
                                            return_attention ? attention.data_ptr() : nullptr, n, c, s,
                                            features.stride(0), features.stride(1), features.stride(2),
                                            logits.stride(0), logits.stride(1), c10::cuda::getCurrentCUDAStream()),
               "attention_pool_forward_cuda");
  return {out, out32, lse, attention};
}

std::vector<at::Tensor> attention_pool_backward_cuda(const at::Tensor& grad_in, const at::Tensor& features,
                                                     const at::Tensor& logits, const at::Tensor& out32,
                                                     const at::Tensor& lse, bool need_features, bool need_logits) {
  check_cuda(grad_in, "grad");
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), c = features.size(1), s = features.size(2);
  const auto grad = grad_in.to(features.scalar_type()).contiguous();
  const auto dot = (grad.to(at::kFloat) * out32).sum(1);  // Σ_c g_c out_c, N values
  at::Tensor gf = need_features ? at::empty({n, c, s}, features.options()) : at::Tensor();
  at::Tensor gl = need_logits ? at::empty({n, s}, logits.options()) : at::Tensor();
  if (need_features || need_logits)
    check_launch(cuda::attention_pool_backward(
                     dtype_of(features), grad.data_ptr(), features.data_ptr(), logits.data_ptr(),
                     lse.data_ptr<float>(), dot.data_ptr<float>(), need_features ? gf.data_ptr() : nullptr,
                     need_logits ? gl.data_ptr() : nullptr, n, c, s, features.stride(0), features.stride(1),
                     features.stride(2), logits.stride(0), logits.stride(1), c10::cuda::getCurrentCUDAStream()),
                 "attention_pool_backward_cuda");
  return {gf, gl};
}

std::vector<at::Tensor> adaptive_fusion_forward_cuda(const at::Tensor& face_in, const at::Tensor& context_in,
                                                     const at::Tensor& face_score, const at::Tensor& context_score) {
  check_cuda(face_in, "face");
  check_cuda(context_in, "context");
  const c10::cuda::CUDAGuard guard(face_in.device());
  TORCH_CHECK(face_in.scalar_type() == context_in.scalar_type() && face_in.scalar_type() == face_score.scalar_type() &&
                  face_in.scalar_type() == context_score.scalar_type(),
              "adaptive_fusion_forward_cuda: inputs must share one dtype");
  const auto face = face_in.stride(1) == 1 ? face_in : face_in.contiguous();
  const auto context = context_in.stride(1) == 1 ? context_in : context_in.contiguous();
  const int64_t n = face.size(0), cf = face.size(1), cc = context.size(1);
  auto out = at::empty({n, cf + cc}, face.options());
  auto weights = at::empty({n, 2}, face.options().dtype(at::kFloat));
  check_launch(cuda::adaptive_fusion_forward(dtype_of(face), face.data_ptr(), context.data_ptr(),
                                             face_score.data_ptr(), context_score.data_ptr(), out.data_ptr(),
                                             weights.data_ptr<float>(), n, cf, cc, face.stride(0), context.stride(0),
                                             face_score.stride(0), context_score.stride(0),
                                             c10::cuda::getCurrentCUDAStream()),
               "adaptive_fusion_forward_cuda");
  return {out, weights};
}

std::vector<at::Tensor> adaptive_fusion_backward_cuda(const at::Tensor& grad_in,
                                                      const std::optional<at::Tensor>& grad_weights_in,
                                                      const at::Tensor& face_in, const at::Tensor& context_in,
                                                      const at::Tensor& weights) {
  check_cuda(grad_in, "grad");
  const c10::cuda::CUDAGuard guard(face_in.device());
  const auto face = face_in.stride(1) == 1 ? face_in : face_in.contiguous();
  const auto context = context_in.stride(1) == 1 ? context_in : context_in.contiguous();
  const auto grad = grad_in.to(face.scalar_type()).contiguous();
  at::Tensor gw;
  if (grad_weights_in.has_value() && grad_weights_in->defined()) gw = grad_weights_in->to(at::kFloat).contiguous();
  const int64_t n = face.size(0), cf = face.size(1), cc = context.size(1);
  auto gface = at::empty({n, cf}, face.options());
  auto gctx = at::empty({n, cc}, face.options());
  auto gfs = at::empty({n, 1}, face.options());
  auto gcs = at::empty({n, 1}, face.options());
  check_launch(cuda::adaptive_fusion_backward(dtype_of(face), grad.data_ptr(), gw.defined() ? gw.data_ptr<float>() : nullptr,
                                              face.data_ptr(), context.data_ptr(), weights.data_ptr<float>(),
                                              gface.data_ptr(), gctx.data_ptr(), gfs.data_ptr(), gcs.data_ptr(), n, cf,
                                              cc, face.stride(0), context.stride(0), c10::cuda::getCurrentCUDAStream()),
               "adaptive_fusion_backward_cuda");
  return {gface, gctx, gfs, gcs};
}

void face_context_resize_cuda(const at::Tensor& frames, at::Tensor& out, const at::Tensor& y0, const at::Tensor& yw,
                              const at::Tensor& x0, const at::Tensor& xw, const at::Tensor& boxes,
                              const at::Tensor& valid, bool per_sample, const std::vector<double>& mean,
                              const std::vector<double>& std, bool mask_box, bool zero_invalid) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&frames, &out, &y0, &yw, &x0, &xw, &boxes, &valid}) {
    check_cuda(*t, "every face_context tensor");
    TORCH_CHECK(t->is_contiguous(), "face_context_resize_cuda: tensors must be contiguous");
  }
  TORCH_CHECK(frames.scalar_type() == at::kByte && frames.dim() == 4 && frames.size(3) == 3,
              "face_context_resize_cuda: frames must be uint8 N×H×W×3");
  TORCH_CHECK(y0.scalar_type() == at::kInt && x0.scalar_type() == at::kInt && boxes.scalar_type() == at::kInt &&
                  valid.scalar_type() == at::kInt && yw.scalar_type() == at::kFloat && xw.scalar_type() == at::kFloat,
              "face_context_resize_cuda: tables must be int32 starts and float32 weights");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "face_context_resize_cuda: mean and std need 3 values");
  const c10::cuda::CUDAGuard guard(frames.device());
  const float m[3] = {float(mean[0]), float(mean[1]), float(mean[2])};
  const float s[3] = {float(std[0]), float(std[1]), float(std[2])};
  check_launch(cuda::resize_normalize(dtype_of(out), frames.data_ptr<uint8_t>(), out.data_ptr(), y0.data_ptr<int32_t>(),
                                      yw.data_ptr<float>(), x0.data_ptr<int32_t>(), xw.data_ptr<float>(),
                                      boxes.data_ptr<int32_t>(), valid.data_ptr<int32_t>(), frames.size(0),
                                      frames.size(1), frames.size(2), out.size(2), out.size(3), yw.size(-1),
                                      xw.size(-1), per_sample, m, s, mask_box, zero_invalid,
                                      c10::cuda::getCurrentCUDAStream()),
               "face_context_resize_cuda");
}

void register_cuda_ops(pybind11::module& m) {
  m.def("attention_pool_forward_cuda", &attention_pool_forward_cuda, "attention_pool forward (CUDA)");
  m.def("attention_pool_backward_cuda", &attention_pool_backward_cuda, "attention_pool backward (CUDA)");
  m.def("adaptive_fusion_forward_cuda", &adaptive_fusion_forward_cuda, "adaptive_fusion forward (CUDA)");
  m.def("adaptive_fusion_backward_cuda", &adaptive_fusion_backward_cuda, "adaptive_fusion backward (CUDA)");
  m.def("face_context_resize_cuda", &face_context_resize_cuda, "face_context resampling (CUDA)");
}

}  // namespace caer_fast
