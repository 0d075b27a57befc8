// E2M1 (FP4) weights on CPU, read from their packed codes: nvfp4 (16-element blocks, an E4M3
// scale each, times a fp32 scale per row) and mxfp4 (32-element blocks, an E8M0 scale each);
// and, further down, weight-only FP8 (tm_fp8_gemv / tm_fp8_dequant: a code byte per weight, a
// fp32 scale per row).
//
// Layout (tokenmill/quant/formats.py): codes uint8 [rows, cols / 2], element 2i in the low nibble;
// block scale codes uint8 [rows, cols / block]; `scale_lut` holds the value of each of the 256
// scale codes (E4M3 or E8M0, NaN where the format says), so the kernel needs no format logic;
// `row_scale` is nvfp4's per-tensor (per merged shard's rows) fp32 scale, or null.
//
// A weight is value(code) * scale, rounded once in fp32, as quant/weight_only.dequantize_fast
// computes it, then (round_bf16) to bfloat16 as that function does for a bf16 model, so both
// entry points use exactly the weights of the torch path:
//   tm_fp4_gemv     y[m, r] = sum_c x[m, c] w[r, c] for a few rows of x (decode): reads 4.5 bits
//                   per weight once for all m, fp32 accumulation (bf16 models on CPUs with
//                   AVX512-BF16: bf16 dot products of the rounded weights, exact products)
//   tm_fp4_dequant  w as a dense fp32 or bf16 matrix, for a GEMM at larger batches
//
// Built at run time by tokenmill/layers/native.py; plain C ABI, called through ctypes.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TM_FP4_AVX512 1
#endif

namespace {

constexpr float kE2M1[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                             -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
constexpr int kMaxRows = 8;  // rows of x per gemv call (decode batches); the caller splits

inline float bf16_round(float v) {  // round to nearest even, NaN kept
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) return v;
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// one weight of a dense matrix: fp32, or bfloat16 bits rounded as bf16_round does
inline void store1(float* o, float w) { *o = w; }
inline void store1(uint16_t* o, float w) {
  uint32_t bits;
  const float v = bf16_round(w);
  std::memcpy(&bits, &v, sizeof bits);
  *o = static_cast<uint16_t>(bits >> 16);
}

inline float block_scale(const uint8_t* scales, const float* lut, const float* row_scale,
                         int64_t r, int64_t b) {
  const float s = lut[scales[b]];
  return row_scale ? s * row_scale[r] : s;
}

#if TM_FP4_AVX512
// 16 weights from 8 bytes of codes: nibbles in element order, looked up in the E2M1 table.
inline __m512 decode16(const uint8_t* codes, __m512 table) {
  uint64_t raw;
  std::memcpy(&raw, codes, sizeof raw);
  const __m128i b = _mm_cvtsi64_si128(static_cast<long long>(raw));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(b, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
  return _mm512_permutexvar_ps(idx, table);
}

inline __m512 bf16_round16(__m512 v) {  // finite values (weights): round to nearest even
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(0xffff0000)));
}

// 16 weights of a dense matrix: fp32, or bfloat16 bits (rounded to nearest even)
inline void store16(float* o, __m512 w) { _mm512_storeu_ps(o, w); }
inline void store16(uint16_t* o, __m512 w) {
  const __m512i bits = _mm512_castps_si512(bf16_round16(w));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
#endif

#if TM_FP4_AVX512 && defined(__AVX512BF16__)
// bf16 model: 32 weights rounded to bf16 by one conversion, then one bf16 dot-product
// instruction per row of x (pairs of exact bf16 products, summed in fp32).
void gemv_bf16(const uint16_t* x, int64_t m, const uint8_t* codes, const uint8_t* scales,
               const float* lut, const float* row_scale, float* y, int64_t rows, int64_t cols,
               int64_t block, int num_threads) {
  const int64_t blocks = cols / block;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * cols >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* cr = codes + r * (cols / 2);
    const uint8_t* sr = scales + r * blocks;
    const __m512 table = _mm512_loadu_ps(kE2M1);
    const __m128i mask = _mm_set1_epi8(0x0f);
    const float rs = row_scale ? row_scale[r] : 1.0f;
    __m512 acc[kMaxRows];
    for (int64_t i = 0; i < m; ++i) acc[i] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cr + c / 2));
      const __m128i lo = _mm_and_si128(b, mask);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      const __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), table);
      const __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), table);
      const float s0 = lut[sr[c / block]] * rs;
      const float s1 = block == 32 ? s0 : lut[sr[c / block + 1]] * rs;
      const __m512bh w = _mm512_cvtne2ps_pbh(_mm512_mul_ps(w1, _mm512_set1_ps(s1)),
                                             _mm512_mul_ps(w0, _mm512_set1_ps(s0)));
      for (int64_t i = 0; i < m; ++i) {
        const __m512bh xi = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i * cols + c));
        acc[i] = _mm512_dpbf16_ps(acc[i], w, xi);
      }
    }
    float tail[kMaxRows] = {};
    for (; c < cols; ++c) {  // a last 16 (cols = 16 mod 32)
      const uint8_t byte = cr[c / 2];
      const float w = bf16_round(kE2M1[(c & 1) ? byte >> 4 : byte & 15] * (lut[sr[c / block]] * rs));
      for (int64_t i = 0; i < m; ++i) {
        uint32_t bits = static_cast<uint32_t>(x[i * cols + c]) << 16;
        float xv;
        std::memcpy(&xv, &bits, sizeof xv);
        tail[i] += w * xv;
      }
    }
    for (int64_t i = 0; i < m; ++i) y[i * rows + r] = _mm512_reduce_add_ps(acc[i]) + tail[i];
  }
}
#endif

void gemv(const float* x, int64_t m, const uint8_t* codes, const uint8_t* scales,
          const float* lut, const float* row_scale, float* y, int64_t rows, int64_t cols,
          int64_t block, bool round_bf16, int num_threads) {
  const int64_t blocks = cols / block;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * cols >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* cr = codes + r * (cols / 2);
    const uint8_t* sr = scales + r * blocks;
#if TM_FP4_AVX512
    const __m512 table = _mm512_loadu_ps(kE2M1);
    const __m128i mask = _mm_set1_epi8(0x0f);
    const float rs = row_scale ? row_scale[r] : 1.0f;
    // two accumulators per row of x (even and odd 16-weight halves): independent FMA chains
    __m512 acc[2 * kMaxRows];
    for (int64_t i = 0; i < 2 * m; ++i) acc[i] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {  // 16 bytes of codes: 32 weights
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cr + c / 2));
      const __m128i lo = _mm_and_si128(b, mask);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), table);
      __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), table);
      const float s0 = lut[sr[c / block]] * rs;
      const float s1 = block == 32 ? s0 : lut[sr[c / block + 1]] * rs;
      w0 = _mm512_mul_ps(w0, _mm512_set1_ps(s0));
      w1 = _mm512_mul_ps(w1, _mm512_set1_ps(s1));
      if (round_bf16) {
        w0 = bf16_round16(w0);
        w1 = bf16_round16(w1);
      }
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = x + i * cols + c;
        acc[2 * i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), acc[2 * i]);
        acc[2 * i + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), acc[2 * i + 1]);
      }
    }
    for (; c < cols; c += 16) {  // a last half (cols = 16 mod 32)
      __m512 w = _mm512_mul_ps(decode16(cr + c / 2, table),
                               _mm512_set1_ps(lut[sr[c / block]] * rs));
      if (round_bf16) w = bf16_round16(w);
      for (int64_t i = 0; i < m; ++i)
        acc[2 * i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * cols + c), acc[2 * i]);
    }
    for (int64_t i = 0; i < m; ++i)
      y[i * rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * i], acc[2 * i + 1]));
#else
    float acc[kMaxRows] = {};
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t byte = cr[c / 2];
      float w = kE2M1[(c & 1) ? byte >> 4 : byte & 15] *
                block_scale(sr, lut, row_scale, r, c / block);
      if (round_bf16) w = bf16_round(w);
      for (int64_t i = 0; i < m; ++i) acc[i] += w * x[i * cols + c];
    }
    for (int64_t i = 0; i < m; ++i) y[i * rows + r] = acc[i];
#endif
  }
}

template <typename T>
void dequant(const uint8_t* codes, const uint8_t* scales, const float* lut,
             const float* row_scale, T* out, int64_t rows, int64_t cols, int64_t block,
             int num_threads) {
  const int64_t blocks = cols / block;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * cols >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* cr = codes + r * (cols / 2);
    const uint8_t* sr = scales + r * blocks;
    T* o = out + r * cols;
#if TM_FP4_AVX512
    const __m512 table = _mm512_loadu_ps(kE2M1);
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512 w = _mm512_mul_ps(decode16(cr + c / 2, table),
                                     _mm512_set1_ps(block_scale(sr, lut, row_scale, r, c / block)));
      store16(o + c, w);
    }
#else
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t byte = cr[c / 2];
      const float w = kE2M1[(c & 1) ? byte >> 4 : byte & 15] *
                      block_scale(sr, lut, row_scale, r, c / block);
      store1(o + c, w);
    }
#endif
  }
}

// ---- FP8 weights (weight-only fp8_e4m3 / fp8_e5m2): one code byte per weight, one fp32 scale
// per row. A code becomes FP16 bits (E5M2: the high byte of an FP16; E4M3 with its 4-bit
// exponent in FP16's exponent field, exact for normals and subnormals once multiplied by 2^8),
// then one vcvtph2ps. The NaN code of E4M3 would read 480; quantized weights never hold it.
[[maybe_unused]] float fp8_value(uint8_t code, bool e5m2) {  // the scalar path
  const uint16_t bits = e5m2 ? static_cast<uint16_t>(code << 8)
                             : static_cast<uint16_t>(((code & 0x7f) << 7) | ((code & 0x80) << 8));
  const uint32_t sign = (bits & 0x8000u) << 16;
  const int exp = (bits >> 10) & 0x1f;
  const float mant = static_cast<float>(bits & 0x3ff);
  float v = exp ? std::ldexp(1.0f + mant / 1024.0f, exp - 15) : std::ldexp(mant / 1024.0f, -14);
  if (exp == 31) v = mant ? NAN : INFINITY;
  uint32_t out;
  std::memcpy(&out, &v, sizeof out);
  out |= sign;
  std::memcpy(&v, &out, sizeof v);
  return e5m2 ? v : v * 256.0f;
}

#if TM_FP4_AVX512
inline __m512 decode16_fp8(const uint8_t* codes, bool e5m2) {
  const __m256i h = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  if (e5m2) return _mm512_cvtph_ps(_mm256_slli_epi16(h, 8));
  const __m256i mag = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7f)), 7);
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x80)), 8);
  return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_or_si256(mag, sign)), _mm512_set1_ps(256.0f));
}
#endif

// y[m, r] = sum_c x[m, c] w[r, c]; x fp32 [m, cols] (weights rounded to bf16 if round_bf16)
void gemv_fp8(const float* x, int64_t m, const uint8_t* codes, const float* row_scale, float* y,
              int64_t rows, int64_t cols, bool e5m2, bool round_bf16, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * cols >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* cr = codes + r * cols;
    const float rs = row_scale[r];
#if TM_FP4_AVX512
    __m512 acc[kMaxRows];
    for (int64_t i = 0; i < m; ++i) acc[i] = _mm512_setzero_ps();
    const __m512 scale = _mm512_set1_ps(rs);
    for (int64_t c = 0; c < cols; c += 16) {
      __m512 w = _mm512_mul_ps(decode16_fp8(cr + c, e5m2), scale);
      if (round_bf16) w = bf16_round16(w);
      for (int64_t i = 0; i < m; ++i)
        acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * cols + c), acc[i]);
    }
    for (int64_t i = 0; i < m; ++i) y[i * rows + r] = _mm512_reduce_add_ps(acc[i]);
#else
    float acc[kMaxRows] = {};
    for (int64_t c = 0; c < cols; ++c) {
      float w = fp8_value(cr[c], e5m2) * rs;
      if (round_bf16) w = bf16_round(w);
      for (int64_t i = 0; i < m; ++i) acc[i] += w * x[i * cols + c];
    }
    for (int64_t i = 0; i < m; ++i) y[i * rows + r] = acc[i];
#endif
  }
}

template <typename T>
void dequant_fp8(const uint8_t* codes, const float* row_scale, T* out, int64_t rows, int64_t cols,
                 bool e5m2, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * cols >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* cr = codes + r * cols;
    T* o = out + r * cols;
#if TM_FP4_AVX512
    const __m512 scale = _mm512_set1_ps(row_scale[r]);
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512 w = _mm512_mul_ps(decode16_fp8(cr + c, e5m2), scale);
      store16(o + c, w);
    }
#else
    for (int64_t c = 0; c < cols; ++c) {
      const float w = fp8_value(cr[c], e5m2) * row_scale[r];
      store1(o + c, w);
    }
#endif
  }
}

}  // namespace

extern "C" {

// x: [m, cols], m <= 8, fp32 (x_bf16 == 0) or bfloat16 bits (a bf16 model: the weights are
// rounded to bf16 as well); y: fp32 [m, rows]; cols a multiple of 16 and of block (16 or 32).
// Returns 1 (nothing done) where the shapes are outside that.
int tm_fp4_gemv(const void* x, int64_t m, const uint8_t* codes, const uint8_t* scales,
                const float* lut, const float* row_scale, float* y, int64_t rows, int64_t cols,
                int64_t block, int x_bf16, int nt) {
  if (m < 1 || m > kMaxRows || cols % 16 || (block != 16 && block != 32) || cols % block)
    return 1;
  if (!x_bf16) {
    gemv(static_cast<const float*>(x), m, codes, scales, lut, row_scale, y, rows, cols, block,
         false, nt);
    return 0;
  }
  const uint16_t* xb = static_cast<const uint16_t*>(x);
#if TM_FP4_AVX512 && defined(__AVX512BF16__)
  gemv_bf16(xb, m, codes, scales, lut, row_scale, y, rows, cols, block, nt);
#else
  std::vector<float> xf(static_cast<size_t>(m * cols));  // bf16 -> fp32 is exact
  for (int64_t i = 0; i < m * cols; ++i) {
    const uint32_t bits = static_cast<uint32_t>(xb[i]) << 16;
    std::memcpy(&xf[static_cast<size_t>(i)], &bits, sizeof(float));
  }
  gemv(xf.data(), m, codes, scales, lut, row_scale, y, rows, cols, block, true, nt);
#endif
  return 0;
}

// out: [rows, cols] fp32 (bf16 == 0) or bfloat16 bits (bf16 == 1)
int tm_fp4_dequant(const uint8_t* codes, const uint8_t* scales, const float* lut,
                   const float* row_scale, void* out, int64_t rows, int64_t cols, int64_t block,
                   int bf16, int nt) {
  if (cols % 16 || (block != 16 && block != 32) || cols % block) return 1;
  if (bf16)
    dequant(codes, scales, lut, row_scale, static_cast<uint16_t*>(out), rows, cols, block, nt);
  else
    dequant(codes, scales, lut, row_scale, static_cast<float*>(out), rows, cols, block, nt);
  return 0;
}

// FP8 weight-only: codes uint8 [rows, cols] (E4M3 fn when e5m2 == 0), row_scale fp32 [rows];
// x [m, cols] fp32 or bfloat16 bits (x_bf16); y fp32 [m, rows]; cols a multiple of 16.
int tm_fp8_gemv(const void* x, int64_t m, const uint8_t* codes, const float* row_scale, float* y,
                int64_t rows, int64_t cols, int e5m2, int x_bf16, int nt) {
  if (m < 1 || m > kMaxRows || cols % 16) return 1;
  if (!x_bf16) {
    gemv_fp8(static_cast<const float*>(x), m, codes, row_scale, y, rows, cols, e5m2, false, nt);
    return 0;
  }
  const uint16_t* xb = static_cast<const uint16_t*>(x);
  std::vector<float> xf(static_cast<size_t>(m * cols));  // bf16 -> fp32 is exact
  for (int64_t i = 0; i < m * cols; ++i) {
    const uint32_t bits = static_cast<uint32_t>(xb[i]) << 16;
    std::memcpy(&xf[static_cast<size_t>(i)], &bits, sizeof(float));
  }
  gemv_fp8(xf.data(), m, codes, row_scale, y, rows, cols, e5m2, true, nt);
  return 0;
}

int tm_fp8_dequant(const uint8_t* codes, const float* row_scale, void* out, int64_t rows,
                   int64_t cols, int e5m2, int bf16, int nt) {
  if (cols % 16) return 1;
  if (bf16)
    dequant_fp8(codes, row_scale, static_cast<uint16_t*>(out), rows, cols, e5m2, nt);
  else
    dequant_fp8(codes, row_scale, static_cast<float*>(out), rows, cols, e5m2, nt);
  return 0;
}

}  // extern "C"
