// Row-wise kernels between the GEMMs on CPU: residual add + RMSNorm, SiLU(gate) * up (also
// followed by a block Hadamard transform, for rotated models), rotary embedding, and the
// sampler's grammar bitmask (structured outputs: -inf where a token's bit is 0).
//
// Eager torch spends tens of microseconds per call on these at decode sizes (several passes and
// temporaries per op); one pass here. They follow tokenmill/layers/norm.py and activation.py
// exactly, rounding included: in bfloat16 the residual sum, the normalized value, its product
// with the weight, SiLU(gate) and its product with up are each rounded to bfloat16 where the
// eager code rounds them; statistics are fp32. Only the order of the sum of squares differs.
//
// Rows are split over the threads from 16K elements on (a decode batch of 32: 32 x 1536 SiLU * up
// in 31 us on 2 threads against 58 us on one, 32 x 576 bf16 add + RMSNorm 13 us against 20).
//
// Built at run time by tokenmill/layers/native.py; plain C ABI, called through ctypes.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "row_ops.h"
#include "vec_math.h"

namespace {

using namespace tm::rows;

constexpr int64_t kMaxHadamard = 1024;  // the largest block the Python side hands over

// The 16 x 16 Sylvester matrix, unnormalized: H[b][c] = (-1)^popcount(b & c).
struct Hadamard16 {
  float h[16][16];
  Hadamard16() {
    for (int b = 0; b < 16; ++b)
      for (int c = 0; c < 16; ++c) h[b][c] = (__builtin_popcount(b & c) & 1) ? -1.f : 1.f;
  }
};
const Hadamard16 kH16;

// buf[0:n] <- H_n buf (unnormalized), n a power of two. The butterfly stages with a stride under
// 16 would each shuffle inside a vector; for n >= 16 they are one 16 x 16 product per group of
// 16 instead (16 broadcast FMAs over a contiguous row), and the wider stages are contiguous.
inline void hadamard_inplace(float* buf, int64_t n) {
  int64_t len = 1;
  if (n >= 16) {
    for (int64_t g = 0; g < n; g += 16) {
      float acc[16] = {};
      for (int b = 0; b < 16; ++b) {
        const float v = buf[g + b];
#pragma omp simd
        for (int c = 0; c < 16; ++c) acc[c] += v * kH16.h[b][c];
      }
      std::memcpy(buf + g, acc, sizeof acc);
    }
    len = 16;
  }
  for (; len < n; len <<= 1)
    for (int64_t i = 0; i < n; i += 2 * len)
#pragma omp simd
      for (int64_t j = i; j < i + len; ++j) {
        const float a = buf[j], b = buf[j + len];
        buf[j] = a + b;
        buf[j + len] = a - b;
      }
}

// SiLU(gate) * up (rounded to T, as silu_mul stores it), then each block of `block` channels
// times the orthonormal Sylvester Hadamard matrix (quant/rotation.py's OnlineRotation): a fast
// Walsh-Hadamard transform in fp32 on the row in cache, instead of a GEMM over the stored row.
template <typename T>
void silu_mul_hadamard(const T* x, T* out, int64_t rows, int64_t d, int64_t block,
                       int num_threads) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(block));
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * d >= 16384)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * d;
    const T* u = g + d;
    T* o = out + r * d;
    // the whole row in fp32 (long loops vectorize; a loop per block of 16 or 64 did not pay)
    thread_local std::vector<float> row;
    row.resize(static_cast<size_t>(d));
    float* buf = row.data();
#pragma omp simd
    for (int64_t i = 0; i < d; ++i)
      buf[i] = round_to(x, round_to(x, tm::silu(load(g, i))) * load(u, i));
    for (int64_t b0 = 0; b0 < d; b0 += block) hadamard_inplace(buf + b0, block);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) store(o, i, buf[i] * scale);
  }
}

// One row of logits: -inf where bit t % 32 of word t / 32 is 0, and past the mask's width.
// A data-dependent choice per token: torch's masked_fill branches on every element (1.5 ms for
// 8 rows of 49k: mispredicted branches); here it is a blend, 16 tokens per 16 mask bits.
void apply_bitmask_row(float* logits, const uint32_t* words, int64_t vocab, int64_t num_words) {
  const float neg = -std::numeric_limits<float>::infinity();
  const int64_t covered = std::min(vocab, num_words * 32);
  int64_t t = 0;
#if defined(__AVX512F__)
  const __m512 ninf = _mm512_set1_ps(neg);
  for (; t + 16 <= covered; t += 16) {
    const __mmask16 keep = static_cast<__mmask16>(words[t >> 5] >> (t & 31));
    _mm512_storeu_ps(logits + t, _mm512_mask_blend_ps(keep, ninf, _mm512_loadu_ps(logits + t)));
  }
#endif
  for (; t < covered; ++t)
    logits[t] = (words[t >> 5] >> (t & 31)) & 1u ? logits[t] : neg;
  for (; t < vocab; ++t) logits[t] = neg;
}

}  // namespace

extern "C" {

// logits [*, row_stride] float32; rows: m row indices; words: m x num_words.
void tm_apply_bitmask_f32(float* logits, int64_t row_stride, const int64_t* rows,
                          const int32_t* words, int64_t m, int64_t vocab, int64_t num_words,
                          int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (m * vocab >= 262144)
  for (int64_t i = 0; i < m; ++i)
    apply_bitmask_row(logits + rows[i] * row_stride,
                      reinterpret_cast<const uint32_t*>(words) + i * num_words, vocab, num_words);
}

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

// block: a power of two dividing d, at most kMaxHadamard (the caller checks)
void tm_silu_mul_hadamard_f32(const float* x, float* out, int64_t rows, int64_t d, int64_t block,
                              int nt) {
  silu_mul_hadamard(x, out, rows, d, block, nt);
}

void tm_silu_mul_hadamard_bf16(const uint16_t* x, uint16_t* out, int64_t rows, int64_t d,
                               int64_t block, int nt) {
  silu_mul_hadamard(x, out, rows, d, block, nt);
}

void tm_rotary_f32(const float* x, int64_t row_stride, const float* cos, const float* sin,
                   float* out, int64_t rows, int64_t heads, int64_t head_dim, int nt) {
  rotary(x, row_stride, cos, sin, out, rows, heads, head_dim, nt);
}

void tm_rotary_bf16(const uint16_t* x, int64_t row_stride, const uint16_t* cos,
                    const uint16_t* sin, uint16_t* out, int64_t rows, int64_t heads,
                    int64_t head_dim, int nt) {
  rotary(x, row_stride, cos, sin, out, rows, heads, head_dim, nt);
}

}  // extern "C"
