// Small math shared by the native CPU kernels (header-only; each .cpp includes it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tm {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float v) {  // round to nearest even, NaN kept
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu))
    return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// exp(x) for x <= 0 (scores minus their running max): 2^k * p(r), r = x - k ln2 in [-ln2/2, ln2/2],
// a degree-6 polynomial (relative error ~2e-7, as vectorized expf in oneDNN or Sleef). Plain
// arithmetic, so the compiler vectorizes the loops that call it, unlike std::exp.
inline float exp_nonpositive(float x) {
  const bool tiny = x < -87.0f;  // exp(-87) ~ 1.6e-38: below it, flush to 0
  x = std::max(x, -87.0f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  float p = 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return tiny ? 0.f : p * two_k;
}

// SiLU(g) = g * sigmoid(g), with exp only of non-positive arguments: vectorizable, no overflow.
inline float silu(float g) {
  const float e = exp_nonpositive(-std::fabs(g));
  const float sigmoid = g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
  return g * sigmoid;
}

}  // namespace tm
