// Batch-invariant GEMM on CPU: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), float32 or
// bfloat16 weights and activations, float32 sums.
//
// Library GEMMs (MKL, oneDNN) pick blockings, K splits and edge kernels by the shape, so one row's
// result changes with the number of rows it is computed with (measured: tokenmill's BENCHMARKS.md,
// "batch-invariant"). Here every output element is one chain of fused multiply-adds over
// k = 0, 1, ..., K-1 in its own vector lane, whatever M is and wherever the row sits:
// - the weight is packed once into panels of 16 output columns, wp[panel][k][16];
// - rows are computed 6 at a time from a zero-padded float32 copy, so every row runs through the
//   same instructions (no remainder loop with other code);
// - threads split the panels, never k; a panel (K x 16) stays in cache while each block of rows
//   reads it, so the weight is read from memory once per call.
//
// Built at run time by tokenmill/layers/native.py; plain C ABI, called through ctypes.

#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int64_t kCols = 16;  // columns per panel: one AVX-512 vector, two AVX2 vectors
constexpr int64_t kRows = 6;   // rows per block: 6 accumulators (12 on AVX2) in registers

typedef float v16 __attribute__((vector_size(64)));

using tm::bf16_to_f32;
using tm::f32_to_bf16;

inline v16 load_panel_row(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v16 load_panel_row(const uint16_t* p) {
  v16 v;
  for (int c = 0; c < kCols; ++c) v[c] = bf16_to_f32(p[c]);
  return v;
}

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = f32_to_bf16(v); }

template <typename W>
void pack(const W* w, W* wp, int64_t n, int64_t k) {
  const int64_t panels = (n + kCols - 1) / kCols;
  std::memset(wp, 0, sizeof(W) * panels * k * kCols);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t kk = 0; kk < k; ++kk) wp[((j / kCols) * k + kk) * kCols + j % kCols] = w[j * k + kk];
}

template <typename T>
void gemm(const T* x, const T* wp, const float* bias, T* y, int64_t m, int64_t k, int64_t n,
          int threads) {
  const int64_t panels = (n + kCols - 1) / kCols;
  const int64_t rows = (m + kRows - 1) / kRows * kRows;
  std::vector<float> xf(static_cast<size_t>(rows * k), 0.f);
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_f32(x[i]);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    const T* panel = wp + p * k * kCols;
    const int64_t c0 = p * kCols, width = n - c0 < kCols ? n - c0 : kCols;
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const float* xr = xf.data() + r0 * k;
      v16 acc[kRows] = {};
      for (int64_t kk = 0; kk < k; ++kk) {
        const v16 w = load_panel_row(panel + kk * kCols);
        for (int r = 0; r < kRows; ++r) acc[r] += xr[r * k + kk] * w;
      }
      for (int r = 0; r < kRows && r0 + r < m; ++r)
        for (int64_t c = 0; c < width; ++c)
          put(y + (r0 + r) * n + c0 + c, acc[r][c] + (bias ? bias[c0 + c] : 0.f));
    }
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16 (bits). wp holds ceil(n / 16) * k * 16 elements.
int tm_invariant_pack(const void* w, void* wp, int64_t n, int64_t k, int dtype) {
  if (n <= 0 || k <= 0) return 1;
  if (dtype == 0) pack(static_cast<const float*>(w), static_cast<float*>(wp), n, k);
  else if (dtype == 1) pack(static_cast<const uint16_t*>(w), static_cast<uint16_t*>(wp), n, k);
  else return 2;
  return 0;
}

int tm_invariant_gemm(const void* x, const void* wp, const float* bias, void* y, int64_t m,
                      int64_t k, int64_t n, int dtype, int threads) {
  if (m < 0 || k <= 0 || n <= 0) return 1;
  if (dtype == 0)
    gemm(static_cast<const float*>(x), static_cast<const float*>(wp), bias, static_cast<float*>(y),
         m, k, n, threads);
  else if (dtype == 1)
    gemm(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(wp), bias,
         static_cast<uint16_t*>(y), m, k, n, threads);
  else return 2;
  return 0;
}

}  // extern "C"
