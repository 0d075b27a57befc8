// A prototype for issue #18, built and timed by benchmarks/linear_bandwidth.py (not used by the
// engine: it reads the plain [n, k] layout, which the engine's oneDNN-packed weights are not).
//
// Skinny GEMM on CPU: y[m, n] = sum_k x[m, k] * w[n, k] for a few rows (decode: m <= 8), the
// weight in its plain row-major [n, k] layout, float32 or bfloat16, float32 sums, the output in
// the input's dtype (bfloat16 rounded to nearest even, as torch's matmul does).
//
// At a few rows a matmul is a stream of the weight through the cores: the work is one
// multiply-add per weight element and row, the time is reading the weight from memory.
// Library GEMMs at m = 1 (oneDNN's packed bf16 path here) read it at about half the machine's
// bandwidth. Here:
// - threads split the output columns, 4 columns (4 weight rows) at a time, each one
//   contiguous stream of k elements;
// - software prefetch runs kPrefetch blocks ahead, so the short streams (k = 576 is 1152
//   bytes) do not wait for the hardware prefetcher to notice them;
// - bfloat16 uses AVX512-BF16's dot product (vdpbf16ps: pairs of bf16 products summed into
//   float32) where the CPU has it, float32 AVX-512 FMAs, and elsewhere portable vector code
//   (bf16 widened to float32 by a shift).
//
// Plain C ABI, called through ctypes.

#include <cstdint>
#include <cstring>

#include "vec_math.h"  // tokenmill/layers/csrc, on the include path

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kCols = 4;      // output columns (weight rows) per block
constexpr int64_t kPrefetch = 8;  // blocks ahead of the one being read

using tm::bf16_to_f32;
using tm::f32_to_bf16;

inline void store(float* y, float v) { *y = v; }
inline void store(uint16_t* y, float v) { *y = f32_to_bf16(v); }

template <typename T>
inline void prefetch_block(const T* w, int64_t j0, int64_t n, int64_t k) {
  const int64_t ahead = j0 + kPrefetch * kCols;
  if (ahead >= n) return;
  const int64_t rows = n - ahead < kCols ? n - ahead : kCols;
  const char* p = reinterpret_cast<const char*>(w + ahead * k);
  const int64_t bytes = rows * k * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// ---- one block of up to kCols columns, every row of x ----------------------------------------
#if defined(__AVX512BF16__)
void block(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m, int64_t k, int64_t n,
           int64_t j0, int64_t cols) {
  const int64_t body = k / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (k - body)) - 1);
  for (int64_t r = 0; r < m; ++r) {
    const uint16_t* xr = x + r * k;
    __m512 acc[kCols] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
    for (int64_t kk = 0; kk < body; kk += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr + kk);
      for (int64_t c = 0; c < cols; ++c)
        acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_loadu_si512(w + (j0 + c) * k + kk), xv);
    }
    if (tail) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, xr + body);
      for (int64_t c = 0; c < cols; ++c)
        acc[c] = _mm512_dpbf16_ps(
            acc[c], (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (j0 + c) * k + body), xv);
    }
    for (int64_t c = 0; c < cols; ++c) store(y + r * n + j0 + c, _mm512_reduce_add_ps(acc[c]));
  }
}
#else
typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const uint16_t* p) {
  v8 v;
  for (int i = 0; i < 8; ++i) v[i] = bf16_to_f32(p[i]);
  return v;
}

inline float sum8(v8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

void block(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m, int64_t k, int64_t n,
           int64_t j0, int64_t cols) {
  const int64_t body = k / 8 * 8;
  for (int64_t r = 0; r < m; ++r) {
    const uint16_t* xr = x + r * k;
    v8 acc[kCols] = {};
    for (int64_t kk = 0; kk < body; kk += 8) {
      const v8 xv = load8(xr + kk);
      for (int64_t c = 0; c < cols; ++c) acc[c] += load8(w + (j0 + c) * k + kk) * xv;
    }
    for (int64_t c = 0; c < cols; ++c) {
      float s = sum8(acc[c]);
      for (int64_t kk = body; kk < k; ++kk) s += bf16_to_f32(xr[kk]) * bf16_to_f32(w[(j0 + c) * k + kk]);
      store(y + r * n + j0 + c, s);
    }
  }
}
#endif

#if defined(__AVX512F__)
void block(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n, int64_t j0,
           int64_t cols) {
  const int64_t body = k / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - body)) - 1);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    __m512 acc[kCols] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
    for (int64_t kk = 0; kk < body; kk += 16) {
      const __m512 xv = _mm512_loadu_ps(xr + kk);
      for (int64_t c = 0; c < cols; ++c)
        acc[c] = _mm512_fmadd_ps(_mm512_loadu_ps(w + (j0 + c) * k + kk), xv, acc[c]);
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, xr + body);
      for (int64_t c = 0; c < cols; ++c)
        acc[c] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + (j0 + c) * k + body), xv, acc[c]);
    }
    for (int64_t c = 0; c < cols; ++c) y[r * n + j0 + c] = _mm512_reduce_add_ps(acc[c]);
  }
}
#else
typedef float f8 __attribute__((vector_size(32)));

void block(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n, int64_t j0,
           int64_t cols) {
  const int64_t body = k / 8 * 8;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    f8 acc[kCols] = {};
    for (int64_t kk = 0; kk < body; kk += 8) {
      f8 xv;
      std::memcpy(&xv, xr + kk, sizeof xv);
      for (int64_t c = 0; c < cols; ++c) {
        f8 wv;
        std::memcpy(&wv, w + (j0 + c) * k + kk, sizeof wv);
        acc[c] += wv * xv;
      }
    }
    for (int64_t c = 0; c < cols; ++c) {
      float s = 0.f;
      for (int i = 0; i < 8; ++i) s += acc[c][i];
      for (int64_t kk = body; kk < k; ++kk) s += xr[kk] * w[(j0 + c) * k + kk];
      y[r * n + j0 + c] = s;
    }
  }
}
#endif

template <typename T>
void gemm(const T* x, const T* w, T* y, int64_t m, int64_t k, int64_t n, int threads) {
  const int64_t blocks = (n + kCols - 1) / kCols;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kCols;
    prefetch_block(w, j0, n, k);
    block(x, w, y, m, k, n, j0, n - j0 < kCols ? n - j0 : kCols);
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16 (bits). x [m, k], w [n, k], y [m, n], all contiguous.
int tm_skinny_gemm(const void* x, const void* w, void* y, int64_t m, int64_t k, int64_t n,
                   int dtype, int threads) {
  if (m < 0 || k <= 0 || n <= 0) return 1;
  if (dtype == 0)
    gemm(static_cast<const float*>(x), static_cast<const float*>(w), static_cast<float*>(y), m, k,
         n, threads);
  else if (dtype == 1)
    gemm(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w),
         static_cast<uint16_t*>(y), m, k, n, threads);
  else
    return 2;
  return 0;
}

// Which bf16 path this build took: 1 AVX512-BF16, 0 portable.
int tm_skinny_has_bf16_dot() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
