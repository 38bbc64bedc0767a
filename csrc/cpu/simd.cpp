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

// gemv with GCC/clang vector types: `omp simd reduction` ended each row with a lane-by-lane scalar sum
// through the stack, which costs as much as the row itself when rows are short (attention_pool: 49
// positions). Here every row keeps one 32-byte accumulator, reduced in registers by shuffle+add steps.
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only pass between inlined helpers
typedef float caer_v8f __attribute__((vector_size(32)));
typedef double caer_v4d __attribute__((vector_size(32)));

static inline caer_v8f load_v(const float* p) { caer_v8f v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline caer_v4d load_v(const double* p) { caer_v4d v; __builtin_memcpy(&v, p, sizeof v); return v; }
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)  // GCC >= 12, clang
#define CAER_HAS_SHUFFLEVECTOR 1
#endif
#endif
#ifdef CAER_HAS_SHUFFLEVECTOR
static inline float hsum(caer_v8f v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}
static inline double hsum(caer_v4d v) {
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2);
  return v[0];
}
#else
template <typename V>
static inline auto hsum(V v) -> decltype(v[0] + 0) {
  decltype(v[0] + 0) s = 0;
  for (size_t i = 0; i < sizeof(V) / sizeof(s); ++i) s += v[i];
  return s;
}
#endif

#define CAER_DEFINE_GEMV_ROWS(T, V)                                                               \
  CAER_CLONES void gemv(const T* A, int64_t rows, int64_t cols, int64_t ld, const T* x, T beta, T* y) {\
    constexpr int64_t W = sizeof(V) / sizeof(T);                                                  \
    const int64_t cv = cols - cols % W;                                                           \
    int64_t r = 0;                                                                                \
    for (; r + 4 <= rows; r += 4) { /* four rows share each load of x */                          \
      const T *a0 = A + r * ld, *a1 = a0 + ld, *a2 = a1 + ld, *a3 = a2 + ld;                      \
      V v0 = {}, v1 = {}, v2 = {}, v3 = {};                                                       \
      for (int64_t c = 0; c < cv; c += W) {                                                       \
        const V xv = load_v(x + c);                                                               \
        v0 += load_v(a0 + c) * xv;                                                                \
        v1 += load_v(a1 + c) * xv;                                                                \
        v2 += load_v(a2 + c) * xv;                                                                \
        v3 += load_v(a3 + c) * xv;                                                                \
      }                                                                                           \
      T s0 = hsum(v0), s1 = hsum(v1), s2 = hsum(v2), s3 = hsum(v3);                               \
      for (int64_t c = cv; c < cols; ++c) {                                                       \
        s0 += a0[c] * x[c], s1 += a1[c] * x[c], s2 += a2[c] * x[c], s3 += a3[c] * x[c];           \
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
      V v0 = {};                                                                                  \
      for (int64_t c = 0; c < cv; c += W) v0 += load_v(a0 + c) * load_v(x + c);                   \
      T s0 = hsum(v0);                                                                            \
      for (int64_t c = cv; c < cols; ++c) s0 += a0[c] * x[c];                                     \
      y[r] = beta == T(0) ? s0 : beta * y[r] + s0;                                                \
    }                                                                                             \
  }

#define CAER_DEFINE_GEMV_T(T)                                                                     \
  CAER_CLONES void gemv_t_outer(const T* A, const T* g, int64_t rows, int64_t cols, T* y, const T* a, \
                                T alpha, T* out) {                                                \
    /* one row at a time: four output rows at once was slower at 98 positions (bench/RESULTS.md) */ \
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
CAER_DEFINE_GEMV_ROWS(float, caer_v8f)
CAER_DEFINE_GEMV_ROWS(double, caer_v4d)
CAER_DEFINE_GEMV_T(float)
CAER_DEFINE_GEMV_T(double)

}  // namespace caer_fast_simd
