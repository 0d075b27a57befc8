// The skinny linear kernels' inner loops (see skinny_linear.cpp for the layout), header-only so
// that the fused decode block runs exactly the same code per GEMV.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <omp.h>

#include <cstdint>

namespace tm::skinny {

#ifndef TM_PREFETCH_BYTES
#define TM_PREFETCH_BYTES 4096
#endif
constexpr int kPrefetchBytes = TM_PREFETCH_BYTES;  // ahead of the row being read, in each thread's stream

#if defined(__AVX512F__)

// One pass over one block: V vectors (16 outputs each) of the block's rows, starting at vector
// `v0`, for M rows of x. `rows` block rows of `row_words` 32-bit words each.
template <int M, int V, bool kBf16>
inline void block_pass(const uint32_t* x, int64_t ldx_words, const uint32_t* w, int64_t rows,
                       int64_t row_words, int v0, __m512 (&acc)[M][V]) {
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = _mm512_setzero_ps();
  const char* pf = reinterpret_cast<const char*>(w) + kPrefetchBytes;
  const int64_t row_bytes = row_words * 4;
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* wr = w + r * row_words + v0 * 16;
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(pf + r * row_bytes + b, _MM_HINT_T0);
    __m512i wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_si512(wr + v * 16);
    for (int m = 0; m < M; ++m) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(x[m * ldx_words + r]));
      for (int v = 0; v < V; ++v) {
        if constexpr (kBf16) {
#if defined(__AVX512BF16__)
          acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)xb, (__m512bh)wv[v]);
#endif
        } else {
          acc[m][v] = _mm512_fmadd_ps(_mm512_castsi512_ps(xb), _mm512_castsi512_ps(wv[v]),
                                      acc[m][v]);
        }
      }
    }
  }
}

inline __m512 load_bias(const void* bias, bool bf16, int64_t n) {
  if (!bias) return _mm512_setzero_ps();
  if (!bf16) return _mm512_loadu_ps(static_cast<const float*>(bias) + n);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
      static_cast<const uint16_t*>(bias) + n));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store_row(void* y, bool bf16, int64_t at, __m512 v) {
  if (!bf16) {
    _mm512_storeu_ps(static_cast<float*>(y) + at, v);
    return;
  }
  // round to nearest even (NaN kept quiet): the bits of fp32 plus 0x7fff plus the kept lsb
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(y) + at),
                      _mm512_cvtepi32_epi16(r));
}

// y[M, N] = x[M, K] W^T + bias over the blocks [nb_begin, nb_end).
template <int M, int V, bool kBf16>
void run_blocks(const void* x, int64_t ldx, const void* w, const void* bias, void* y, int64_t ldy,
                int64_t K, int64_t block_cols, int64_t nb_begin, int64_t nb_end) {
  const int64_t pair = kBf16 ? 2 : 1;
  const int64_t rows = K / pair, row_words = block_cols;  // a row: block_cols 32-bit lanes
  const int64_t ldx_words = ldx / pair;
  const auto* xw = static_cast<const uint32_t*>(x);
  const int passes = static_cast<int>(block_cols / 16 / V);
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const auto* wb = static_cast<const uint32_t*>(w) + nb * rows * row_words;
    for (int p = 0; p < passes; ++p) {
      __m512 acc[M][V];
      block_pass<M, V, kBf16>(xw, ldx_words, wb, rows, row_words, p * V, acc);
      for (int v = 0; v < V; ++v) {
        const int64_t n = nb * block_cols + (p * V + v) * 16;
        const __m512 b = load_bias(bias, kBf16, n);
        for (int m = 0; m < M; ++m) store_row(y, kBf16, m * ldy + n, _mm512_add_ps(acc[m][v], b));
      }
    }
  }
}

template <int M, bool kBf16>
void dispatch_v(const void* x, int64_t ldx, const void* w, const void* bias, void* y, int64_t ldy,
                int64_t K, int64_t block_cols, int64_t b0, int64_t b1) {
  // as many vectors per pass as the accumulators allow (M * V <= 16 of the 32 registers)
  const int64_t vecs = block_cols / 16;
  if (vecs % 4 == 0 && M <= 4)
    run_blocks<M, 4, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
  else if (vecs % 2 == 0)
    run_blocks<M, 2, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
  else
    run_blocks<M, 1, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
}

template <bool kBf16>
void dispatch_m(int64_t M, const void* x, int64_t ldx, const void* w, const void* bias, void* y,
                int64_t ldy, int64_t K, int64_t block_cols, int64_t b0, int64_t b1) {
  switch (M) {
    case 1: return dispatch_v<1, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
    case 2: return dispatch_v<2, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
    case 3: return dispatch_v<3, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
    case 4: return dispatch_v<4, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
    case 5: return dispatch_v<5, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
    case 6: return dispatch_v<6, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
    case 7: return dispatch_v<7, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
    case 8: return dispatch_v<8, kBf16>(x, ldx, w, bias, y, ldy, K, block_cols, b0, b1);
  }
}

#endif  // __AVX512F__

}  // namespace tm::skinny
