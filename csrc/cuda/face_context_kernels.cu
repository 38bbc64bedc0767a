// face_context resampling: uint8 N×H×W×3 frames -> normalised N×3×OH×OW, one thread per output
// pixel gathering its K_y × K_x window (all three channels). The 1-D window starts and weights
// (bilinear or antialiased, as torch's interpolate computes them) are built on the host.
#include "common.cuh"

namespace caer_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Norm {
  float mean[3], inv_std[3];
};

template <typename T>
__global__ void resize_kernel(const uint8_t* __restrict__ frames, T* __restrict__ out, const int32_t* __restrict__ y0,
                              const float* __restrict__ yw, const int32_t* __restrict__ x0,
                              const float* __restrict__ xw, const int32_t* __restrict__ boxes,
                              const int32_t* __restrict__ valid, int64_t H, int64_t W, int64_t OH, int64_t OW,
                              int64_t KY, int64_t KX, int64_t tab_sn, Norm norm, bool mask_box, bool zero_invalid) {
  const int64_t n = blockIdx.x;  // grid.x: N·T frames can pass grid.y's 65535 limit
  const int64_t p = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (p >= OH * OW) return;
  const int64_t plane = OH * OW;
  T* o = out + n * 3 * plane + p;
  if (zero_invalid && valid[n] == 0) {  // no face: the face output is plain zeros
    o[0] = o[plane] = o[2 * plane] = from_float<T>(0.f);
    return;
  }
  const int64_t oy = p / OW, ox = p % OW;
  const int64_t ty = n * tab_sn * OH + oy, tx = n * tab_sn * OW + ox;
  const int bx1 = boxes[4 * n], by1 = boxes[4 * n + 1], bx2 = boxes[4 * n + 2], by2 = boxes[4 * n + 3];
  const uint8_t* img = frames + n * H * W * 3;
  float acc[3] = {0.f, 0.f, 0.f};
  for (int64_t ky = 0; ky < KY; ++ky) {
    const float wy = yw[ty * KY + ky];
    if (wy == 0.f) continue;  // padding taps past the window
    const int64_t iy = min(static_cast<int64_t>(y0[ty]) + ky, H - 1);
    const bool row_in_box = mask_box && iy >= by1 && iy < by2;
    float row[3] = {0.f, 0.f, 0.f};
    for (int64_t kx = 0; kx < KX; ++kx) {
      const float wx = xw[tx * KX + kx];
      if (wx == 0.f) continue;
      const int64_t ix = min(static_cast<int64_t>(x0[tx]) + kx, W - 1);
      if (row_in_box && ix >= bx1 && ix < bx2) continue;  // the face box is black in the context
      const uint8_t* px = img + (iy * W + ix) * 3;
      row[0] += wx * px[0];
      row[1] += wx * px[1];
      row[2] += wx * px[2];
    }
    acc[0] += wy * row[0];
    acc[1] += wy * row[1];
    acc[2] += wy * row[2];
  }
  for (int c = 0; c < 3; ++c) o[c * plane] = from_float<T>((acc[c] / 255.f - norm.mean[c]) * norm.inv_std[c]);
}

}  // namespace

cudaError_t resize_normalize(DType dtype, const uint8_t* frames, void* out, const int32_t* y0, const float* yw,
                             const int32_t* x0, const float* xw, const int32_t* boxes, const int32_t* valid,
                             int64_t N, int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t KY, int64_t KX,
                             bool per_sample, const float mean[3], const float std[3], bool mask_box,
                             bool zero_invalid, cudaStream_t stream) {
  if (N == 0 || OH * OW == 0) return cudaSuccess;
  Norm norm;
  for (int c = 0; c < 3; ++c) {
    norm.mean[c] = mean[c];
    norm.inv_std[c] = 1.f / std[c];
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(N, ceil_div(OH * OW, kThreads));
    resize_kernel<T><<<grid, kThreads, 0, stream>>>(frames, static_cast<T*>(out), y0, yw, x0, xw, boxes, valid, H,
                                                    W, OH, OW, KY, KX, per_sample ? 1 : 0, norm, mask_box,
                                                    zero_invalid);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace caer_fast
