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

}  // namespace caer_fast_simd
