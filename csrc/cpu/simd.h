// Small contiguous vector helpers shared by the CPU kernels. They are compiled once per ISA in
// simd.cpp (target_clones) and picked at load time, so the extension needs no -march flag.
#pragma once

#include <cstdint>

namespace caer_fast_simd {

float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);
// y[i] += alpha * x[i]
void axpy(float* y, float alpha, const float* x, int64_t n);
void axpy(double* y, double alpha, const double* x, int64_t n);
// y[i] = alpha * x[i]
void scale(float* y, float alpha, const float* x, int64_t n);
void scale(double* y, double alpha, const double* x, int64_t n);
// y[i] = y[i] * beta (in place)
void rescale(float* y, float beta, int64_t n);
void rescale(double* y, double beta, int64_t n);

// y[r] = beta * y[r] + sum_c A[r * ld + c] * x[c] for r < rows (beta == 0: y is only written).
void gemv(const float* A, int64_t rows, int64_t cols, int64_t ld, const float* x, float beta, float* y);
void gemv(const double* A, int64_t rows, int64_t cols, int64_t ld, const double* x, double beta, double* y);
// attention_pool backward rows, for r < rows and c < cols:
//   y[c] += g[r] * A[r * cols + c]   and   out[r * cols + c] = g[r] * alpha * a[c]
void gemv_t_outer(const float* A, const float* g, int64_t rows, int64_t cols, float* y, const float* a, float alpha,
                  float* out);
void gemv_t_outer(const double* A, const double* g, int64_t rows, int64_t cols, double* y, const double* a,
                  double alpha, double* out);

}  // namespace caer_fast_simd
