#include "simd.h"

// One clone per ISA, chosen by the loader (ifunc); `omp simd reduction` lets GCC vectorise the
// reductions without -ffast-math (each lane keeps its own partial sum).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CAER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CAER_CLONES
#endif

namespace caer_fast_simd {

#define CAER_DEFINE_HELPERS(T)                                        \
  CAER_CLONES T dot(const T* a, const T* b, int64_t n) {             \
    T acc = 0;                                                        \
    _Pragma("omp simd reduction(+ : acc)")                            \
    for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];               \
    return acc;                                                       \
  }                                                                   \
  CAER_CLONES void axpy(T* y, T alpha, const T* x, int64_t n) {      \
    _Pragma("omp simd")                                               \
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];             \
  }                                                                   \
  CAER_CLONES void scale(T* y, T alpha, const T* x, int64_t n) {     \
    _Pragma("omp simd")                                               \
    for (int64_t i = 0; i < n; ++i) y[i] = alpha * x[i];              \
  }                                                                   \
  CAER_CLONES void rescale(T* y, T beta, int64_t n) {                \
    _Pragma("omp simd")                                               \
    for (int64_t i = 0; i < n; ++i) y[i] *= beta;                     \
  }

CAER_DEFINE_HELPERS(float)
CAER_DEFINE_HELPERS(double)

}  // namespace caer_fast_simd
