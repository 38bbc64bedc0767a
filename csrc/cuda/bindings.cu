// The CUDA kernels of the caer_fast ops (schemas: csrc/ops.cpp), registered under the CUDA dispatch
// key: torch tensors -> the raw-pointer launchers of launchers.h. The only CUDA file that includes
// torch headers (slow to compile); the kernels live in the torch-free *_kernels.cu files.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it drags in cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>

#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/launchers.h"
#include "face_context.h"

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

// features N×C×(S…) and logits N×S or N×1×(S…) (the contract of csrc/ops.cpp) are passed to the kernels
// as N×C×S and N×S views (copies where no view exists); attention and grad_logits take the logits' shape.
std::tuple<at::Tensor, at::Tensor> attention_pool_cuda(const at::Tensor& features, const at::Tensor& logits) {
  check_cuda(features, "features");
  check_cuda(logits, "logits");
  const bool mapped = features.dim() >= 3;
  const int64_t n = mapped ? features.size(0) : 0, s = mapped ? c10::multiply_integers(features.sizes().slice(2)) : 0;
  TORCH_CHECK(mapped && logits.dim() >= 1 && logits.size(0) == n && logits.numel() == n * s && s > 0,
              "caer_fast::attention_pool: features must be N×C×(S…) (S > 0) and logits N×S or N×1×(S…)");
  TORCH_CHECK(features.scalar_type() == logits.scalar_type(), "caer_fast::attention_pool: dtypes differ");
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t c = features.size(1);
  const auto f = features.reshape({n, c, s});
  const auto x = logits.reshape({n, s});
  auto out = at::empty({n, c}, features.options());
  auto lse = at::empty({n}, features.options().dtype(at::kFloat));
  auto attention = at::empty(logits.sizes(), features.options());  // written contiguous N×S
  check_launch(cuda::attention_pool_forward(dtype_of(features), f.data_ptr(), x.data_ptr(),
                                            out.data_ptr(), lse.data_ptr<float>(), attention.data_ptr(), n, c, s,
                                            f.stride(0), f.stride(1), f.stride(2),
                                            x.stride(0), x.stride(1), c10::cuda::getCurrentCUDAStream()),
               "caer_fast::attention_pool (CUDA)");
  return {out, attention};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_backward_cuda(const at::Tensor& grad_out,
                                                                const std::optional<at::Tensor>& grad_attention_in,
                                                                const at::Tensor& features,
                                                                const at::Tensor& attention_in, const at::Tensor& out) {
  check_cuda(grad_out, "grad_out");
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), c = features.size(1), s = c10::multiply_integers(features.sizes().slice(2));
  const auto dt = features.scalar_type();
  const auto f = features.reshape({n, c, s});
  const auto grad = grad_out.to(dt).contiguous();
  const auto attention = attention_in.to(dt).contiguous().view({n, s});
  auto dot = (grad.to(at::kFloat) * out.to(at::kFloat)).sum(1);  // Σ_c g_c out_c (+ Σ_s a_s ga_s), N values
  at::Tensor grad_attention;
  if (grad_attention_in.has_value() && grad_attention_in->defined()) {
    grad_attention = grad_attention_in->to(dt).contiguous().view({n, s});
    dot += (attention.to(at::kFloat) * grad_attention.to(at::kFloat)).sum(1);
  }
  auto grad_features = at::empty(features.sizes(), features.options());  // written contiguous N×C×S
  auto grad_logits = at::empty(attention_in.sizes(), features.options());
  check_launch(cuda::attention_pool_backward(dtype_of(features), grad.data_ptr(), f.data_ptr(),
                                             attention.data_ptr(),
                                             grad_attention.defined() ? grad_attention.data_ptr() : nullptr,
                                             dot.data_ptr<float>(), grad_features.data_ptr(), grad_logits.data_ptr(),
                                             n, c, s, f.stride(0), f.stride(1), f.stride(2),
                                             c10::cuda::getCurrentCUDAStream()),
               "caer_fast::attention_pool_backward (CUDA)");
  return {grad_features, grad_logits};
}

// The kernels write float32 weights; the op returns (and its backward takes) them in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor> adaptive_fusion_cuda(const at::Tensor& face_in, const at::Tensor& context_in,
                                                        const at::Tensor& face_score, const at::Tensor& context_score) {
  check_cuda(face_in, "face");
  check_cuda(context_in, "context");
  const c10::cuda::CUDAGuard guard(face_in.device());
  TORCH_CHECK(face_in.scalar_type() == context_in.scalar_type() && face_in.scalar_type() == face_score.scalar_type() &&
                  face_in.scalar_type() == context_score.scalar_type(),
              "caer_fast::adaptive_fusion: inputs must share one dtype");
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
               "caer_fast::adaptive_fusion (CUDA)");
  return {out, weights.to(face.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptive_fusion_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights_in, const at::Tensor& face_in,
    const at::Tensor& context_in, const at::Tensor& weights_in) {
  check_cuda(grad_out, "grad_out");
  const c10::cuda::CUDAGuard guard(face_in.device());
  const auto face = face_in.stride(1) == 1 ? face_in : face_in.contiguous();
  const auto context = context_in.stride(1) == 1 ? context_in : context_in.contiguous();
  const auto grad = grad_out.to(face.scalar_type()).contiguous();
  const auto weights = weights_in.to(at::kFloat).contiguous();
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
               "caer_fast::adaptive_fusion_backward (CUDA)");
  return {gface, gctx, gfs, gcs};
}

// The resampling tables are built on the host (the CPU kernel's, csrc/face_context.h), per sample
// for the face (padded to the widest window) and shared for the context, then copied to the GPU.
std::tuple<at::Tensor, at::Tensor> face_context_cuda(const at::Tensor& frames_in, const at::Tensor& boxes,
                                                     at::IntArrayRef face_size, at::IntArrayRef context_size,
                                                     at::IntArrayRef crop, at::ArrayRef<double> mean,
                                                     at::ArrayRef<double> std, bool antialias, at::ScalarType dtype) {
  check_cuda(frames_in, "frames");
  const FaceContextArgs args = check_face_context(frames_in, boxes, face_size, context_size, crop, mean, std);
  const c10::cuda::CUDAGuard guard(frames_in.device());
  const auto frames = frames_in.contiguous();
  const int64_t n = frames.size(0), H = frames.size(1), W = frames.size(2);
  auto face = at::empty({n, 3, args.face_h, args.face_w}, frames.options().dtype(dtype));
  auto context = at::empty({n, 3, args.crop_h, args.crop_w}, frames.options().dtype(dtype));
  if (n == 0) return {face, context};
  const auto kernel_dtype = dtype_of(face);

  const at::Tensor b = boxes.to(at::kCPU, at::kLong).contiguous();
  const int64_t* bp = b.data_ptr<int64_t>();
  check_clipped_boxes(bp, n, H, W);
  std::vector<int32_t> clipped(4 * n, 0), valid(n, 0);
  std::vector<Taps> fy(n), fx(n);
  int64_t ky = 1, kx = 1;
  for (int64_t i = 0; i < n; ++i) {  // clipped (checked above); (0, 0, 0, 0) is no face
    const int64_t x1 = bp[4 * i], y1 = bp[4 * i + 1], x2 = bp[4 * i + 2], y2 = bp[4 * i + 3];
    if (x2 <= x1) continue;
    valid[i] = 1;
    clipped[4 * i] = x1, clipped[4 * i + 1] = y1, clipped[4 * i + 2] = x2, clipped[4 * i + 3] = y2;
    fy[i] = make_taps(y2 - y1, args.face_h, 0, args.face_h, antialias);
    fx[i] = make_taps(x2 - x1, args.face_w, 0, args.face_w, antialias);
    ky = std::max(ky, fy[i].k);
    kx = std::max(kx, fx[i].k);
  }
  // starts (int32, rows × out) offset by `offset`, weights (float, rows × out × k, zero-padded)
  auto tables = [&](const std::vector<const Taps*>& taps, const std::vector<int64_t>& offset, int64_t out,
                    int64_t k) {
    const int64_t rows = static_cast<int64_t>(taps.size());
    auto start = at::zeros({rows, out}, at::kInt);
    auto weight = at::zeros({rows, out, k}, at::kFloat);
    int32_t* sp = start.data_ptr<int32_t>();
    float* wp = weight.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      if (taps[r] == nullptr) continue;
      const Taps& t = *taps[r];
      for (int64_t o = 0; o < out; ++o) {
        sp[r * out + o] = static_cast<int32_t>(t.start[o] + offset[r]);
        for (int64_t j = 0; j < t.k; ++j) wp[(r * out + o) * k + j] = t.w[o * t.k + j];
      }
    }
    return std::make_pair(start.to(frames.device()), weight.to(frames.device()));
  };
  std::vector<const Taps*> fy_p(n, nullptr), fx_p(n, nullptr);
  std::vector<int64_t> oy(n, 0), ox(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (!valid[i]) continue;
    fy_p[i] = &fy[i], fx_p[i] = &fx[i], oy[i] = clipped[4 * i + 1], ox[i] = clipped[4 * i];
  }
  const auto [fy0, fyw] = tables(fy_p, oy, args.face_h, ky);
  const auto [fx0, fxw] = tables(fx_p, ox, args.face_w, kx);
  const Taps cty = make_taps(H, args.ctx_h, args.top, args.top + args.crop_h, antialias);
  const Taps ctx = make_taps(W, args.ctx_w, args.left, args.left + args.crop_w, antialias);
  const auto [cy0, cyw] = tables({&cty}, {0}, args.crop_h, cty.k);
  const auto [cx0, cxw] = tables({&ctx}, {0}, args.crop_w, ctx.k);
  const auto box_t = at::from_blob(clipped.data(), {n, 4}, at::kInt).to(frames.device());
  const auto valid_t = at::from_blob(valid.data(), {n}, at::kInt).to(frames.device());

  float m[3], sd[3];
  for (int c = 0; c < 3; ++c) m[c] = static_cast<float>(mean[c]), sd[c] = static_cast<float>(std[c]);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::resize_normalize(kernel_dtype, frames.data_ptr<uint8_t>(), face.data_ptr(), fy0.data_ptr<int32_t>(),
                                      fyw.data_ptr<float>(), fx0.data_ptr<int32_t>(), fxw.data_ptr<float>(),
                                      box_t.data_ptr<int32_t>(), valid_t.data_ptr<int32_t>(), n, H, W, args.face_h,
                                      args.face_w, ky, kx, true, m, sd, false, true, stream),
               "caer_fast::face_context (CUDA, face)");
  check_launch(cuda::resize_normalize(kernel_dtype, frames.data_ptr<uint8_t>(), context.data_ptr(),
                                      cy0.data_ptr<int32_t>(), cyw.data_ptr<float>(), cx0.data_ptr<int32_t>(),
                                      cxw.data_ptr<float>(), box_t.data_ptr<int32_t>(), valid_t.data_ptr<int32_t>(), n,
                                      H, W, args.crop_h, args.crop_w, cty.k, ctx.k, false, m, sd, true, false, stream),
               "caer_fast::face_context (CUDA, context)");
  return {face, context};
}

}  // namespace

TORCH_LIBRARY_IMPL(caer_fast, CUDA, m) {
  m.impl("attention_pool", &attention_pool_cuda);
  m.impl("attention_pool_backward", &attention_pool_backward_cuda);
  m.impl("adaptive_fusion", &adaptive_fusion_cuda);
  m.impl("adaptive_fusion_backward", &adaptive_fusion_backward_cuda);
  m.impl("face_context", &face_context_cuda);
}

}  // namespace caer_fast
