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

// Four rows per step share each load of x and keep four independent vector accumulators.
#define CAER_DEFINE_GEMV(T)                                                                       \
  CAER_CLONES void gemv(const T* A, int64_t rows, int64_t cols, int64_t ld, const T* x, T beta, T* y) {\
    int64_t r = 0;                                                                                \
    for (; r + 4 <= rows; r += 4) {                                                               \
      const T *a0 = A + r * ld, *a1 = a0 + ld, *a2 = a1 + ld, *a3 = a2 + ld;                      \
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                           \
      _Pragma("omp simd reduction(+ : s0, s1, s2, s3)")                                           \
      for (int64_t c = 0; c < cols; ++c) {                                                        \
        s0 += a0[c] * x[c];                                                                       \
        s1 += a1[c] * x[c];                                                                       \
        s2 += a2[c] * x[c];                                                                       \
        s3 += a3[c] * x[c];                                                                       \
      }                                                                                           \
      if (beta == T(0)) {                                                                         \
        y[r] = s0, y[r + 1] = s1, y[r + 2] = s2, y[r + 3] = s3;                                   \
      } else {                                                                                    \
        y[r] = beta * y[r] + s0, y[r + 1] = beta * y[r + 1] + s1;                                 \
        y[r + 2] = beta * y[r + 2] + s2, y[r + 3] = beta * y[r + 3] + s3;                         \
      }                                                                                           \
    }                                                                                             \
    for (; r < rows; ++r) {                                                                       \
      const T* a0 = A + r * ld;                                                                   \
      T s0 = 0;                                                                                   \
      _Pragma("omp simd reduction(+ : s0)")                                                       \
      for (int64_t c = 0; c < cols; ++c) s0 += a0[c] * x[c];                                      \
      y[r] = beta == T(0) ? s0 : beta * y[r] + s0;                                                \
    }                                                                                             \
  }                                                                                               \
  CAER_CLONES void gemv_t_outer(const T* A, const T* g, int64_t rows, int64_t cols, T* y, const T* a, \
                                T alpha, T* out) {                                                \
    for (int64_t r = 0; r < rows; ++r) {                                                          \
      const T gr = g[r], ga = g[r] * alpha;                                                       \
      const T* ar = A + r * cols;                                                                 \
      T* o = out + r * cols;                                                                      \
      _Pragma("omp simd")                                                                         \
      for (int64_t c = 0; c < cols; ++c) {                                                        \
        y[c] += gr * ar[c];                                                                       \
        o[c] = ga * a[c];                                                                         \
      }                                                                                           \
    }                                                                                             \
  }

CAER_DEFINE_HELPERS(float)
CAER_DEFINE_HELPERS(double)
CAER_DEFINE_GEMV(float)
CAER_DEFINE_GEMV(double)

}  // namespace caer_fast_simd
