// Row-wise kernels between the GEMMs on CPU: residual add + RMSNorm, and SiLU(gate) * up.
//
// Eager torch spends tens of microseconds per call on these at decode sizes (several passes and
// temporaries per op); one pass here. They follow tokenmill/layers/norm.py and activation.py
// exactly, rounding included: in bfloat16 the residual sum, the normalized value, its product
// with the weight, SiLU(gate) and its product with up are each rounded to bfloat16 where the
// eager code rounds them; statistics are fp32. Only the order of the sum of squares differs.
//
// Built at run time by tokenmill/layers/native.py; plain C ABI, called through ctypes.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec_math.h"

namespace {

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
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * hidden >= 65536)
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
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * d >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * d;
    const T* u = g + d;
    T* o = out + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) store(o, i, round_to(x, tm::silu(load(g, i))) * load(u, i));
  }
}

}  // namespace

extern "C" {

void tm_add_rms_norm_f32(const float* x, const float* residual, const float* weight, float* out,
                         float* summed, int64_t rows, int64_t hidden, float eps, int nt) {
  add_rms_norm(x, residual, weight, out, summed, rows, hidden, eps, nt);
}

void tm_add_rms_norm_bf16(const uint16_t* x, const uint16_t* residual, const uint16_t* weight,
                          uint16_t* out, uint16_t* summed, int64_t rows, int64_t hidden, float eps,
                          int nt) {
  add_rms_norm(x, residual, weight, out, summed, rows, hidden, eps, nt);
}

void tm_silu_mul_f32(const float* x, float* out, int64_t rows, int64_t d, int nt) {
  silu_mul(x, out, rows, d, nt);
}

void tm_silu_mul_bf16(const uint16_t* x, uint16_t* out, int64_t rows, int64_t d, int nt) {
  silu_mul(x, out, rows, d, nt);
}

}  // extern "C"
