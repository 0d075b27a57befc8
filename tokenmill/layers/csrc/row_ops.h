// Residual add + RMSNorm, SiLU(gate) * up and rotary embedding over rows, with the eager code's bfloat16
// roundings (see elementwise.cpp): shared by elementwise.cpp and the fused decode block of
// skinny_linear.cpp, so both round exactly alike. Header-only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec_math.h"

namespace tm::rows {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {  // round to nearest even, NaN kept
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) {
    p[i] = static_cast<uint16_t>((bits >> 16) | 0x40);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  p[i] = static_cast<uint16_t>(bits >> 16);
}
inline float round_to(const float*, float v) { return v; }
inline float round_to(const uint16_t*, float v) {
  uint16_t h;
  store(&h, 0, v);
  return load(&h, 0);
}

template <typename T>
void add_rms_norm(const T* x, const T* residual, const T* weight, T* out, T* summed, int64_t rows,
                  int64_t hidden, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * hidden >= 16384)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * hidden;
    T* sr = summed ? summed + r * hidden : nullptr;
    float ss = 0.f;
    if (residual) {
      const T* rr = residual + r * hidden;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = round_to(x, load(xr, i) + load(rr, i));  // x + residual in T
        store(sr, i, v);
        ss += v * v;
      }
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < hidden; ++i) ss += load(xr, i) * load(xr, i);
    }
    const T* src = residual ? sr : xr;
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + eps);
    T* o = out + r * hidden;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i)
      store(o, i, round_to(x, load(src, i) * inv) * load(weight, i));
  }
}

template <typename T>
void silu_mul(const T* x, T* out, int64_t rows, int64_t d, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * d >= 16384)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * d;
    const T* u = g + d;
    T* o = out + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) store(o, i, round_to(x, tm::silu(load(g, i))) * load(u, i));
  }
}

// Rotary position embedding, neox layout (layers/rotary.py): for each of `heads` heads of a row,
// out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]. The input rows may be a
// strided view (q and k inside the fused q/k/v output); the output is contiguous. Each product and
// the sum are rounded to T where the eager code rounds them; in fp32 the products are kept apart
// (no FMA contraction), so the result is the eager one bit for bit.
template <typename T>
__attribute__((optimize("fp-contract=off"))) void rotary(const T* x, int64_t row_stride,
                                                         const T* cos, const T* sin, T* out,
                                                         int64_t rows, int64_t heads,
                                                         int64_t head_dim, int num_threads) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * heads * head_dim >= 16384)
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * head_dim;
    const T* s = sin + r * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xh = x + r * row_stride + h * head_dim;
      T* o = out + (r * heads + h) * head_dim;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = load(xh, i), x2 = load(xh, i + half);
        const float a = round_to(x, x1 * load(c, i)), b = round_to(x, -x2 * load(s, i));
        const float a2 = round_to(x, x2 * load(c, i + half));
        const float b2 = round_to(x, x1 * load(s, i + half));
        store(o, i, a + b);
        store(o, i + half, a2 + b2);
      }
    }
  }
}

}  // namespace tm::rows
