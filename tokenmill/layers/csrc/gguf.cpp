// GGUF (GGML) weights on CPU, read from the file's own bytes: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
// the K-quants Q4_K, Q5_K, Q6_K, and the plain F32, F16, BF16 rows.
//
// Layout: a weight [rows, cols] is rows of GGML blocks along `cols`, exactly as the file stores
// them (quant/gguf_quants.py spells out each block). A merged layer (q/k/v, gate/up) is a list
// of segments of rows, each of one GGML type, stacked along the output dimension; the segment
// table is int64 [segments, 5]: type, rows, data pointer, bytes per row, and a fp32 scale per
// row or 0, and a pointer to block scale codes kept apart from the codes, or 0. Besides the GGML
// types, tokenmill's own weight-only layouts (quant/formats.py) are types too, so those layers
// take the same GEMVs and fused halves: 1000 int8 rows (one fp32 scale per row), 1001 nvfp4 and
// 1002 mxfp4 (E2M1 codes, element 2i in the low nibble, block scale codes beside them), 1004 and
// 1005 fp8 rows (E4M3, E5M2 codes, one fp32 scale per row), and 1003
// w8a8 rows: int8 rows with a fp32 scale per row times x quantized to int8 per row of x, as
// quant/methods/w8a8.Int8MMKernel does it (x times the smoothing factors in fp32, amax, codes
// round(x * (127 / amax)), exact int32 dot products, (float(acc) * row scale) * amax / 127),
// 1006 int4 (GPTQ/AWQ): nibbles with a fp32 scale and a uint8 zero point per group of 32-128,
// and 1007 fp8: E4M3 rows with a fp32 scale per row times x quantized to E4M3 per row of x, as
// quant/methods/fp8.Fp8Kernel does it (current scaling: amax / 448, values rounded to E4M3).
//
// A weight is computed as quant/gguf_quants.dequantize computes it in fp32, in the same order
// of operations with one rounding each (mul, add: never fused), so the dense matrix that
// tm_gguf_dequant writes equals the torch dequantization bit for bit (bf16: then rounded to
// nearest even, as torch's .to(bfloat16) does).
//   tm_gguf_gemv     y[m, r] = sum_c x[m, c] w[r, c] for 1-8 rows of x (decode): one pass over
//                    the codes for every row of x, both threads on contiguous runs of rows.
//                    fp32 x: fp32 weights, FMA. bf16 x (on AVX512-BF16 CPUs): the weights rounded
//                    to bf16 as the bf16 dequantized model holds them, one dot-product instruction
//                    per 32 weights and row (exact products summed in fp32).
//   tm_gguf_dequant  w as a dense fp32 or bf16 matrix, for a GEMM at larger batches
// Both return -1 where this CPU lacks AVX-512 (the caller stays on torch).
//
// Built at run time by tokenmill/layers/native.py; plain C ABI, called through ctypes.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "row_ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define TM_GGUF_AVX512 1
#endif

#if TM_GGUF_AVX512
namespace {

constexpr int kMaxRows = 8;  // rows of x per call (decode batches); the caller splits
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

enum GGMLType : int64_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
  kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kBF16 = 30,
  kI8 = 1000,  // tokenmill int8 rows (with a row scale)
  kNVFP4 = 1001,  // tokenmill nvfp4: E2M1 codes, an E4M3 scale per 16 (aux), a fp32 scale per row
  kMXFP4 = 1002,  // tokenmill mxfp4: E2M1 codes, an E8M0 scale per 32 (aux)
  kE4M3 = 1004,  // tokenmill fp8_e4m3 weight-only: OCP E4M3 codes (with a row scale)
  kE5M2 = 1005,  // tokenmill fp8_e5m2 weight-only: OCP E5M2 codes (with a row scale)
  kI8A8 = 1003,  // tokenmill w8a8: int8 rows (a row scale) x int8 activations per row (aux: the
                 // fp32 smoothing factors per column, or 0)
  kI4 = 1006,  // tokenmill int4 (GPTQ/AWQ): nibbles, a fp32 scale and a uint8 zero per group
  kE4M3A8 = 1007,  // tokenmill fp8: E4M3 rows (a row scale) x E4M3 activations per row (aux: the
                   // fp32 smoothing factors per column, or 0)
};
constexpr int64_t kSegFields = 7;

// What a segment has besides its rows of blocks: a fp32 scale per row (int8 rows: applied to the
// sums; nvfp4: inside each block scale, as formats.py computes it) and the block scale codes of
// the formats that keep them apart from the codes (nvfp4, mxfp4: aux [rows, cols / 32 * kAux]).
struct Extra {
  const float* rs = nullptr;
  const uint8_t* aux = nullptr;
  int64_t rs_stride = 1;  // 0: one scale for every row (nvfp4's per-tensor scale, not copied)
  const float* sx = nullptr;  // [m] fp8 activations: each row of x's scale, before the row scale
};

// one rounding each, never contracted into an FMA (the torch dequantization rounds twice)
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_round_ps(a, b, kRound); }
inline __m512 add(__m512 a, __m512 b) { return _mm512_add_round_ps(a, b, kRound); }
inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_round_ps(a, b, kRound); }

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return _cvtsh_ss(h);
}

inline __m128i load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline __m512 u8_ps(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
inline __m512 i32_ps(__m512i v) { return _mm512_cvtepi32_ps(v); }
inline __m128i lo_nibbles(__m128i b) { return _mm_and_si128(b, _mm_set1_epi8(0x0f)); }
inline __m128i hi_nibbles(__m128i b) {
  return _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0f));
}
// bit 4 (value 16) in each int32 lane whose bit of `bits` is set
inline __m512i fifth_bits(uint32_t bits) {
  return _mm512_maskz_set1_epi32(static_cast<__mmask16>(bits), 16);
}

// Each format: kBlock elements in kBytes bytes; block(p, f) calls f(g, w0, w1) for each group g
// of 32 elements (w0: elements 0-15 of the group, w1: 16-31) in order.
struct F32 {
  static constexpr int kBlock = 32, kBytes = 128;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    const float* v = reinterpret_cast<const float*>(p);
    f(0, _mm512_loadu_ps(v), _mm512_loadu_ps(v + 16));
  }
};

struct F16 {
  static constexpr int kBlock = 32, kBytes = 64;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    const __m256i* v = reinterpret_cast<const __m256i*>(p);
    f(0, _mm512_cvtph_ps(_mm256_loadu_si256(v)), _mm512_cvtph_ps(_mm256_loadu_si256(v + 1)));
  }
};

struct BF16 {
  static constexpr int kBlock = 32, kBytes = 64;
  static __m512 widen(const uint8_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) { f(0, widen(p), widen(p + 32)); }
};

struct Q8_0 {  // d f16, 32 x int8: w = q * d
  static constexpr int kBlock = 32, kBytes = 34;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    const __m512 d = _mm512_set1_ps(f16(p));
    const __m512 q0 = i32_ps(_mm512_cvtepi8_epi32(load16(p + 2)));
    const __m512 q1 = i32_ps(_mm512_cvtepi8_epi32(load16(p + 18)));
    f(0, mul(q0, d), mul(q1, d));
  }
};

struct I8 {  // 32 x int8, the scale applied per row after the sums
  static constexpr int kBlock = 32, kBytes = 32;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    f(0, i32_ps(_mm512_cvtepi8_epi32(load16(p))), i32_ps(_mm512_cvtepi8_epi32(load16(p + 16))));
  }
};

// fp8 codes (OCP E4M3 "fn", E5M2), the scale per row after the sums, as int8 rows. An E5M2 byte
// is the high byte of the fp16 number of the same value; an E4M3 byte's exponent and mantissa
// bits placed in an fp16's (sign moved to bit 15) are its value times 2^-8, subnormals included,
// so the hardware conversion decodes both exactly and E4M3's 2^8 is folded into the row scale
// (kPost: exact, a power of two). NaN codes (and E5M2's inf) are not weights (quantize clamps).
template <bool kE4M3>
struct FP8 {
  static constexpr int kBlock = 32, kBytes = 32;
  static constexpr float kPost = kE4M3 ? 256.f : 1.f;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    __m512i h;
    if constexpr (kE4M3)
      h = _mm512_or_si512(_mm512_and_si512(_mm512_slli_epi16(b, 7), _mm512_set1_epi16(0x3f80)),
                          _mm512_and_si512(_mm512_slli_epi16(b, 8), _mm512_set1_epi16(-32768)));
    else
      h = _mm512_slli_epi16(b, 8);
    f(0, _mm512_cvtph_ps(_mm512_castsi512_si256(h)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)));
  }
};

// E2M1 (FP4) codes of tokenmill's nvfp4 / mxfp4: 16 bytes per 32 elements, element 2i in the low
// nibble; the block scales come from `aux` (kAux bytes per 32 elements) and, for nvfp4, the row's
// fp32 scale: w = value * fp32(block scale * row scale), the rounding of formats.dequantize_fast.
struct Minifloat {  // value tables of the scale codes, bit patterns decoded exactly
  float e4m3[256], e8m0[256];
  constexpr Minifloat() : e4m3{}, e8m0{} {
    for (int c = 0; c < 256; ++c) {
      const int e = (c >> 3) & 15, m = c & 7;
      float v = e == 0 ? static_cast<float>(m) / 8.f : 1.f + static_cast<float>(m) / 8.f;
      for (int k = 0; k < (e == 0 ? 6 : 0); ++k) v *= 0.5f;  // subnormal: 2^-6
      for (int k = 7; k < e; ++k) v *= 2.f;
      for (int k = e; k < 7 && e != 0; ++k) v *= 0.5f;
      e4m3[c] = (e == 15 && m == 7) ? __builtin_nanf("") : ((c & 128) ? -v : v);
      float p = 1.f;
      for (int k = 127; k < c && c < 255; ++k) p *= 2.f;
      for (int k = c; k < 127; ++k) p *= 0.5f;
      e8m0[c] = c == 255 ? __builtin_nanf("") : p;
    }
  }
};
constexpr Minifloat kMinifloat;
alignas(64) constexpr float kE2M1[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                         -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

inline void e2m1_values(const uint8_t* p, __m512& v0, __m512& v1) {
  const __m128i b = load16(p);
  const __m128i lo = lo_nibbles(b), hi = hi_nibbles(b);
  const __m512 table = _mm512_load_ps(kE2M1);
  v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), table);
  v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), table);
}

struct NVFP4 {
  static constexpr int kBlock = 32, kBytes = 16, kAux = 2;
  template <class F>
  __attribute__((always_inline)) static void block(const uint8_t* p, const uint8_t* s, float rs, F&& f) {
    __m512 v0, v1;
    e2m1_values(p, v0, v1);
    const float s0 = kMinifloat.e4m3[s[0]] * rs, s1 = kMinifloat.e4m3[s[1]] * rs;
    f(0, mul(v0, _mm512_set1_ps(s0)), mul(v1, _mm512_set1_ps(s1)));
  }
};

struct MXFP4 {
  static constexpr int kBlock = 32, kBytes = 16, kAux = 1;
  template <class F>
  __attribute__((always_inline)) static void block(const uint8_t* p, const uint8_t* s, float, F&& f) {
    __m512 v0, v1;
    e2m1_values(p, v0, v1);
    const __m512 sc = _mm512_set1_ps(kMinifloat.e8m0[s[0]]);
    f(0, mul(v0, sc), mul(v1, sc));
  }
};

// kPost of a format: what its sums are multiplied by before the row scale (1 but for E4M3)
template <class T, class = void> struct PostOf { static constexpr float value = 1.f; };
template <class T> struct PostOf<T, std::void_t<decltype(T::kPost)>> { static constexpr float value = T::kPost; };

// kAux of a format (0: its scales are inside its blocks)
template <class T, class = void> struct AuxOf { static constexpr int value = 0; };
template <class T> struct AuxOf<T, std::void_t<decltype(T::kAux)>> { static constexpr int value = T::kAux; };

// One block of a format, wherever its scales live: p the codes, s its aux bytes, rs the row scale.
template <class Fmt, class F>
__attribute__((always_inline)) inline void decode_block(const uint8_t* p, const uint8_t* s, float rs, F&& f) {
  if constexpr (AuxOf<Fmt>::value != 0)
    Fmt::block(p, s, rs, f);
  else
    Fmt::block(p, f);
}

struct Q4_0 {  // d, 16 bytes: element j < 16 the low nibble of byte j, else the high of j - 16
  static constexpr int kBlock = 32, kBytes = 18;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    const __m512 d = _mm512_set1_ps(f16(p));
    const __m128i b = load16(p + 2);
    const __m512i eight = _mm512_set1_epi32(8);
    const __m512 q0 = i32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo_nibbles(b)), eight));
    const __m512 q1 = i32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi_nibbles(b)), eight));
    f(0, mul(d, q0), mul(d, q1));
  }
};

struct Q4_1 {  // d, m, 16 bytes of nibbles: w = d * q + m
  static constexpr int kBlock = 32, kBytes = 20;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    const __m512 d = _mm512_set1_ps(f16(p)), m = _mm512_set1_ps(f16(p + 2));
    const __m128i b = load16(p + 4);
    f(0, add(mul(d, u8_ps(lo_nibbles(b))), m), add(mul(d, u8_ps(hi_nibbles(b))), m));
  }
};

struct Q5_0 {  // d, qh u32 (bit j: element j's fifth bit), 16 bytes of nibbles: w = d * (q - 16)
  static constexpr int kBlock = 32, kBytes = 22;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    const __m512 d = _mm512_set1_ps(f16(p));
    uint32_t qh;
    std::memcpy(&qh, p + 2, sizeof qh);
    const __m128i b = load16(p + 6);
    const __m512i sixteen = _mm512_set1_epi32(16);
    const __m512i q0 = _mm512_or_si512(_mm512_cvtepu8_epi32(lo_nibbles(b)), fifth_bits(qh));
    const __m512i q1 = _mm512_or_si512(_mm512_cvtepu8_epi32(hi_nibbles(b)), fifth_bits(qh >> 16));
    f(0, mul(d, i32_ps(_mm512_sub_epi32(q0, sixteen))), mul(d, i32_ps(_mm512_sub_epi32(q1, sixteen))));
  }
};

struct Q5_1 {  // d, m, qh u32, 16 bytes of nibbles: w = d * q + m
  static constexpr int kBlock = 32, kBytes = 24;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    const __m512 d = _mm512_set1_ps(f16(p)), m = _mm512_set1_ps(f16(p + 2));
    uint32_t qh;
    std::memcpy(&qh, p + 4, sizeof qh);
    const __m128i b = load16(p + 8);
    const __m512i q0 = _mm512_or_si512(_mm512_cvtepu8_epi32(lo_nibbles(b)), fifth_bits(qh));
    const __m512i q1 = _mm512_or_si512(_mm512_cvtepu8_epi32(hi_nibbles(b)), fifth_bits(qh >> 16));
    f(0, add(mul(d, i32_ps(q0)), m), add(mul(d, i32_ps(q1)), m));
  }
};

// Q4_K / Q5_K: 8 groups of 32, each with a 6-bit scale and min packed in 12 bytes;
// w = (d * sc) * q - (dmin * mn)
inline void k_scales(const uint8_t* s, float d, float dmin, float* scale, float* min) {
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    if (j < 4) {
      sc = s[j] & 63;
      mn = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
      mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    scale[j] = d * static_cast<float>(sc);
    min[j] = dmin * static_cast<float>(mn);
  }
}

struct Q4_K {  // d, dmin, scales[12], qs[128]: groups 2i and 2i+1 the low and high nibbles of 32i..
  static constexpr int kBlock = 256, kBytes = 144;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    float scale[8], min[8];
    k_scales(p + 4, f16(p), f16(p + 2), scale, min);
    const uint8_t* qs = p + 16;
    for (int i = 0; i < 4; ++i) {
      const __m128i b0 = load16(qs + 32 * i), b1 = load16(qs + 32 * i + 16);
      for (int h = 0; h < 2; ++h) {
        const int g = 2 * i + h;
        const __m512 s = _mm512_set1_ps(scale[g]), mn = _mm512_set1_ps(min[g]);
        const __m128i n0 = h ? hi_nibbles(b0) : lo_nibbles(b0);
        const __m128i n1 = h ? hi_nibbles(b1) : lo_nibbles(b1);
        f(g, sub(mul(s, u8_ps(n0)), mn), sub(mul(s, u8_ps(n1)), mn));
      }
    }
  }
};

struct Q5_K {  // d, dmin, scales[12], qh[32] (bit g of byte l: group g's element l), qs[128]
  static constexpr int kBlock = 256, kBytes = 176;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    float scale[8], min[8];
    k_scales(p + 4, f16(p), f16(p + 2), scale, min);
    const __m512i qh0 = _mm512_cvtepu8_epi32(load16(p + 16));
    const __m512i qh1 = _mm512_cvtepu8_epi32(load16(p + 32));
    const __m512i one = _mm512_set1_epi32(1);
    const uint8_t* qs = p + 48;
    for (int i = 0; i < 4; ++i) {
      const __m128i b0 = load16(qs + 32 * i), b1 = load16(qs + 32 * i + 16);
      for (int h = 0; h < 2; ++h) {
        const int g = 2 * i + h;
        const __m512 s = _mm512_set1_ps(scale[g]), mn = _mm512_set1_ps(min[g]);
        const __m128i g_shift = _mm_cvtsi32_si128(g);
        const __m512i hi0 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(qh0, g_shift), one), 4);
        const __m512i hi1 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(qh1, g_shift), one), 4);
        const __m512i q0 = _mm512_or_si512(_mm512_cvtepu8_epi32(h ? hi_nibbles(b0) : lo_nibbles(b0)), hi0);
        const __m512i q1 = _mm512_or_si512(_mm512_cvtepu8_epi32(h ? hi_nibbles(b1) : lo_nibbles(b1)), hi1);
        f(g, sub(mul(s, i32_ps(q0)), mn), sub(mul(s, i32_ps(q1)), mn));
      }
    }
  }
};

struct Q6_K {  // ql[128], qh[64], scales int8[16], d: 16 sub-blocks of 16, w = (d * sc) * (q - 32)
  static constexpr int kBlock = 256, kBytes = 210;
  template <class F> __attribute__((always_inline)) static void block(const uint8_t* p, F&& f) {
    const float d = f16(p + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const __m512i three = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = p + 64 * half;
      const __m512i qh0 = _mm512_cvtepu8_epi32(load16(p + 128 + 32 * half));
      const __m512i qh1 = _mm512_cvtepu8_epi32(load16(p + 128 + 32 * half + 16));
      for (int gg = 0; gg < 4; ++gg) {  // group gg of this half: element l at ql[32 (gg % 2) + l]
        const int g = 4 * half + gg;
        const __m128i b0 = load16(ql + 32 * (gg & 1)), b1 = load16(ql + 32 * (gg & 1) + 16);
        const __m128i shift = _mm_cvtsi32_si128(2 * gg);
        const __m512i h0 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(qh0, shift), three), 4);
        const __m512i h1 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(qh1, shift), three), 4);
        const __m512i q0 = _mm512_sub_epi32(
            _mm512_or_si512(_mm512_cvtepu8_epi32(gg < 2 ? lo_nibbles(b0) : hi_nibbles(b0)), h0), bias);
        const __m512i q1 = _mm512_sub_epi32(
            _mm512_or_si512(_mm512_cvtepu8_epi32(gg < 2 ? lo_nibbles(b1) : hi_nibbles(b1)), h1), bias);
        const __m512 s0 = _mm512_set1_ps(d * static_cast<float>(sc[2 * g]));
        const __m512 s1 = _mm512_set1_ps(d * static_cast<float>(sc[2 * g + 1]));
        f(g, mul(s0, i32_ps(q0)), mul(s1, i32_ps(q1)));
      }
    }
  }
};

// ---- bf16 x, Q6_K: codes as bf16 numbers, the scale factored out ----
// A group of 32 Q6_K weights is s * (q - 32) with 6-bit codes q and a scale s per 16 elements
// (lanes 0-7 and 8-15 of the dot product): w . x = s * ((q - 32) . x), one bf16 dot product of
// the exact codes with x (exact products, fp32 sums) and one FMA by the scale lanes, the file's
// weights exactly. codes(p, f) calls f(g, q, s, 0) for each group g of a block.

// bf16 bit patterns of small integers, as constants (|v| <= 255 is exact in bf16)
constexpr uint16_t bf16_int(int v) {
  if (v == 0) return 0;
  const int a = v < 0 ? -v : v;
  int e = 0;
  while ((a >> (e + 1)) > 0) ++e;  // 2^e <= a < 2^(e + 1)
  const int mantissa = (a << (7 - e)) & 0x7f;
  return static_cast<uint16_t>((v < 0 ? 0x8000 : 0) | ((127 + e) << 7) | mantissa);
}
struct Table32 {
  alignas(64) uint16_t v[32];
  constexpr explicit Table32(int offset) : v{} {
    for (int i = 0; i < 32; ++i) v[i] = bf16_int(i + offset);
  }
};
constexpr Table32 kPlain(0), kMinus32(-32);  // Q6_K's 64 codes, offset by -32
inline __m512i table(const Table32& t) { return _mm512_load_si512(t.v); }

inline __m256i load32(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

struct Q6_Kc {
  static constexpr bool kConst = false;
  template <class F> __attribute__((always_inline)) static void codes(const uint8_t* p, F&& f) {
    const float d = f16(p + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const __m256i three = _mm256_set1_epi8(3), low4 = _mm256_set1_epi8(0x0f);
    for (int half = 0; half < 2; ++half) {
      const __m256i qh = load32(p + 128 + 32 * half);
      for (int gg = 0; gg < 4; ++gg) {
        const int g = 4 * half + gg;
        __m256i ql = load32(p + 64 * half + 32 * (gg & 1));
        ql = _mm256_and_si256(gg < 2 ? ql : _mm256_srli_epi16(ql, 4), low4);
        const __m256i h = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * gg)), three);
        const __m256i q6 = _mm256_or_si256(ql, _mm256_slli_epi16(h, 4));  // 0..63, no carries
        const __m512i q = _mm512_permutex2var_epi16(table(kMinus32), _mm512_cvtepu8_epi16(q6),
                                                    table(kPlain));
        const __m512 s = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(d * static_cast<float>(sc[2 * g])),
                                              _mm512_set1_ps(d * static_cast<float>(sc[2 * g + 1])));
        f(g, q, s, 0.f);
      }
    }
  }
};


inline __m512 bf16_round16(__m512 v) {  // finite values: round to nearest even
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(0xffff0000)));
}

// The thread reads its rows as one contiguous run, a tile of R rows at a time (the rows of a
// tile interleaved): each step over a block prefetches the matching share of the bytes
// kPrefetch ahead of the tile, so the stream is always that far ahead of the reads.
constexpr int64_t kPrefetch = 4096;
inline void prefetch_share(const uint8_t* tile, int64_t step, int64_t share) {
  const uint8_t* from = tile + kPrefetch + step * share;
  for (int64_t off = 0; off < share; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(from + off), _MM_HINT_T0);
}

// `R` consecutive weight rows times `M` rows of fp32 x: two accumulators each (even and odd
// 16-element halves), so R * M * 2 independent FMA chains.
template <class Fmt, int M, int R>
void rows_fp32(const float* x, int64_t cols, const uint8_t* w, int64_t row_bytes, float* y,
               int64_t ldy, const uint8_t* aux = nullptr, const float* rs = nullptr,
               int64_t rs_stride = 1) {
  constexpr int kAux = AuxOf<Fmt>::value;
  const int64_t aux_row = cols / 32 * kAux;
  constexpr int G = Fmt::kBlock / 32;  // groups of 32 per block
  __m512 acc[R][M][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
  const int64_t blocks = cols / Fmt::kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_share(w, b, R * Fmt::kBytes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      // the decoded block in locals (the accumulators stay out of the callback, in registers)
      __m512 ws[2 * G];
      const uint8_t* sa = kAux ? aux + r * aux_row + b * kAux : nullptr;
      decode_block<Fmt>(w + r * row_bytes + b * Fmt::kBytes, sa, kAux && rs ? rs[r * rs_stride] : 1.f,
                        [&](int g, __m512 w0, __m512 w1) {
                          ws[2 * g] = w0;
                          ws[2 * g + 1] = w1;
                        });
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const float* xs = x + b * Fmt::kBlock + 32 * g;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          acc[r][m][0] = _mm512_fmadd_ps(ws[2 * g], _mm512_loadu_ps(xs + m * cols), acc[r][m][0]);
          acc[r][m][1] = _mm512_fmadd_ps(ws[2 * g + 1], _mm512_loadu_ps(xs + m * cols + 16), acc[r][m][1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      y[m * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]));
}

// w8a8: `R` int8 weight rows times `M` rows of int16 activation codes (xq, made by Prepared):
// 32 weights sign-extended to int16 once per tile row, one vpdpwssd (16 exact int32 sums of two
// products) per 32 weights and row of x; integer sums, so the order does not change the result.
template <int M, int R>
void rows_i8a8(const int16_t* xq, const float* sx, int64_t cols, const uint8_t* w,
               int64_t row_bytes, const float* rs, int64_t rs_stride, float* y, int64_t ldy) {
  __m512i acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_si512();
  for (int64_t k = 0; k < cols; k += 32) {
    prefetch_share(w, k / 32, R * 32);
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_bytes + k)));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(xq + m * cols + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#if defined(__AVX512VNNI__)
        acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], xv, wv[r]);
#else
        acc[r][m] = _mm512_add_epi32(acc[r][m], _mm512_madd_epi16(xv, wv[r]));
#endif
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      const float sum = static_cast<float>(_mm512_reduce_add_epi32(acc[r][m]));
      y[m * ldy + r] = (sum * rs[r * rs_stride]) * sx[m];  // two roundings, as torch's two muls
    }
}

template <int M>
void segment_i8a8(const int16_t* xq, const float* sx, int64_t cols, const uint8_t* w,
                  int64_t rows, int64_t row_bytes, const Extra& ex, float* y, int64_t ldy) {
  constexpr int R = M == 1 ? 4 : (M <= 4 ? 2 : 1);
  const int64_t tiles = (rows + R - 1) / R;
#pragma omp for schedule(static) nowait
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * R, n = rows - r0 < R ? rows - r0 : R;
    const float* rs = ex.rs + r0 * ex.rs_stride;
    if (n == R)
      rows_i8a8<M, R>(xq, sx, cols, w + r0 * row_bytes, row_bytes, rs, ex.rs_stride, y + r0, ldy);
    else
      for (int64_t r = 0; r < n; ++r)
        rows_i8a8<M, 1>(xq, sx, cols, w + (r0 + r) * row_bytes, row_bytes, rs + r * ex.rs_stride,
                        ex.rs_stride, y + r0 + r, ldy);
  }
}

#if defined(__AVX512BF16__)
// bf16 x, Q6_K: s * (q . x) per 16 elements (the scale lanes), codes decoded in registers.
template <class Codes, int kBlock, int kBytes, int M, int R>
void rows_bf16_codes(const uint16_t* x, int64_t cols, const uint8_t* w, int64_t row_bytes,
                     float* y, int64_t ldy) {
  constexpr int G = kBlock / 32;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t blocks = cols / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_share(w, b, R * kBytes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512i qs[G];
      __m512 ss[G];  // the decoded block in locals, the accumulators out of the callback
      Codes::codes(w + r * row_bytes + b * kBytes, [&](int g, __m512i q, __m512 scale, float) {
        qs[g] = q;
        ss[g] = scale;
      });
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const uint16_t* xs = x + b * kBlock + 32 * g;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512bh xm = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xs + m * cols));
          const __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), reinterpret_cast<__m512bh>(qs[g]), xm);
          acc[r][m] = _mm512_fmadd_ps(t, ss[g], acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]);
}

#endif

// cvtne2ps_pbh(w1, w0) puts w0's 16 values in the low half and w1's in the high half, i.e. the
// bf16 vector holds elements 0..31 in order; the dot product pairs lanes (2i, 2i+1) of both
// operands, so the order of x (elements 0..31 as stored) matches.

// ---- bf16 x, fast paths for the 4/5-bit formats: no shuffles per block ----
// The 16 code bytes of a Q4_0/Q4_1/Q5_0/Q5_1 block are broadcast to the four 128-bit lanes of a
// register; per-word shifts by 0, 8, 4, 12 pick, in lane L, the low nibbles of the even bytes,
// of the odd bytes, the high nibbles of the even bytes, of the odd bytes; OR 0x4300 makes each
// nibble v the bf16 number 128 + v (exact). So the codes come out in the order
// kOrder32 (element e of the block at word kOrder32^-1...), and x is permuted to that order once
// per call (`XPrep`). K-quant groups (32 bytes, one nibble each) broadcast to the two halves,
// shifts 0 and 8 (or 4 and 12): even bytes, then odd ones (kOrderK).
// With the codes offset by 128, w = s * q + c is  s * (q + 128) + (c - 128 s): the dot product
// of the offset codes, times s, plus c' = c - 128 s times the pairwise sums of x (`xpair`, the
// lanes of the same dot product), all in vector lanes, so the large offset terms cancel lane by
// lane. The scales of a row are converted once up front (16 blocks per gather).

// word w of the register holds element kOrder32[w] of the block
constexpr int order32(int w) {
  const int lane = w / 8, k = w % 8;  // lane 0: lo nibble of byte 2k, 1: lo of 2k+1, 2/3: hi
  return (lane >= 2 ? 16 : 0) + 2 * k + (lane & 1);
}
constexpr int orderK(int w) { return w < 16 ? 2 * w : 2 * (w - 16) + 1; }

struct XPrep {
  const uint16_t* x = nullptr;  // [m, cols] bf16 as given
  const float* sums = nullptr;  // [m, cols / 32]
  const uint16_t* x32 = nullptr;  // [m, cols] permuted by order32 within each 32
  const uint16_t* xk = nullptr;  // permuted by orderK
  const float* xf = nullptr;  // [m, cols] x in fp32 (the fp32 paths)
  const int16_t* xq = nullptr;  // [m, cols] w8a8: x's int8 codes (as int16)
  const float* sx = nullptr;  // [m] w8a8: x's scales, amax / 127
  const float* xi4 = nullptr;  // [m, cols] int4: x in fp32, each 32 as its even then odd elements
  const float* x8 = nullptr;  // [m, cols] fp8 activations: x's E4M3 values, in fp32
  const float* s8 = nullptr;  // [m] their scales, amax / 448
};

inline float bf16_value(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void permute_x(const uint16_t* x, int64_t m, int64_t cols, bool k_order, uint16_t* out) {
  for (int64_t i = 0; i < m * cols; i += 32)
    for (int w = 0; w < 32; ++w) out[i + w] = x[i + (k_order ? orderK(w) : order32(w))];
}

inline __m512i shifts32() {  // per word: 0 (lane 0), 8, 4, 12
  return _mm512_set_epi64(0x000c000c000c000cLL, 0x000c000c000c000cLL, 0x0004000400040004LL,
                          0x0004000400040004LL, 0x0008000800080008LL, 0x0008000800080008LL, 0, 0);
}
inline __m512i shiftsK(int high) {  // even bytes then odd bytes, low or high nibble
  const long long a = high ? 0x0004000400040004LL : 0, b = high ? 0x000c000c000c000cLL : 0x0008000800080008LL;
  return _mm512_set_epi64(b, b, b, b, a, a, a, a);
}
inline __m512i offset_codes(__m512i v, __m512i shifts) {  // ((v >> s) & 15) | 0x4300
  return _mm512_ternarylogic_epi32(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi16(0x0f),
                                   _mm512_set1_epi16(0x4300), 0xEA);
}
inline __mmask32 order32_mask(uint32_t bits) {  // element bits -> word bits in order32
  return static_cast<__mmask32>(_pext_u32(bits, 0x5555) | (_pext_u32(bits, 0xaaaa) << 8) |
                                (_pext_u32(bits, 0x55550000) << 16) |
                                (_pext_u32(bits, 0xaaaa0000) << 24));
}
inline __mmask32 orderK_mask(uint32_t bits) {
  return static_cast<__mmask32>(_pext_u32(bits, 0x55555555) | (_pext_u32(bits, 0xaaaaaaaa) << 16));
}

// Q4_0, Q4_1, Q5_0, Q5_1: (bytes per block, offset of the codes, of qh or -1, has m, q offset)
template <int kBytes_, int kQs, int kQh, bool kMin, int kBias>
struct Simple {
  static constexpr int kBytes = kBytes_;
  // d and c' = c - 128 d of `blocks` blocks of a row (c = m, or -bias * d)
  static void scales(const uint8_t* row, int64_t blocks, float* d, float* c) {
    // one gather per 16 blocks: d (and m) as the two halves of the first dword of each
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(kBytes));
    for (int64_t b = 0; b < blocks; b += 16) {
      const int64_t n = blocks - b < 16 ? blocks - b : 16;
      const __mmask16 k = static_cast<__mmask16>((1u << n) - 1);
      const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, idx, row + b * kBytes, 1);
      const __m512 dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
      __m512 cv;
      if constexpr (kMin)
        cv = _mm512_fnmadd_ps(dv, _mm512_set1_ps(128.f), _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16))));
      else
        cv = _mm512_mul_ps(dv, _mm512_set1_ps(-128.f - kBias));
      _mm512_mask_storeu_ps(d + b, k, dv);
      _mm512_mask_storeu_ps(c + b, k, cv);
    }
  }
  static __m512i codes(const uint8_t* p) {
    const __m512i v = _mm512_broadcast_i32x4(load16(p + kQs));
    __m512i q = offset_codes(v, shifts32());
    if constexpr (kQh >= 0) {
      uint32_t qh;
      std::memcpy(&qh, p + kQh, sizeof qh);
      q = _mm512_mask_add_epi16(q, order32_mask(qh), q, _mm512_set1_epi16(16));
    }
    return q;
  }
};
using Q4_0s = Simple<18, 2, -1, false, 8>;
using Q4_1s = Simple<20, 4, -1, true, 0>;
using Q5_0s = Simple<22, 6, 2, false, 16>;
using Q5_1s = Simple<24, 8, 4, true, 0>;

// c' . sum(x) of a row: the constant terms, one dot product over the groups (sums: one row of x)
inline float const_term(const float* c, const float* sums, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(c + g), _mm512_loadu_ps(sums + g), acc);
  if (g < groups) {
    const __mmask16 k = static_cast<__mmask16>((1u << (groups - g)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, c + g), _mm512_maskz_loadu_ps(k, sums + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <class S, int M, int R>
void rows_bf16_simple(const XPrep& xp, int64_t cols, const uint8_t* w, int64_t row_bytes,
                      float* y, int64_t ldy, float* scratch) {
  const int64_t blocks = cols / 32;
  float* d = scratch;  // [R][blocks]
  float* c = scratch + R * blocks;
  for (int r = 0; r < R; ++r) S::scales(w + r * row_bytes, blocks, d + r * blocks, c + r * blocks);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_share(w, b, R * S::kBytes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = w + r * row_bytes + b * S::kBytes;
      const __m512bh q = reinterpret_cast<__m512bh>(S::codes(p));
      const __m512 ds = _mm512_set1_ps(d[r * blocks + b]);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512bh xm = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xp.x32 + m * cols + 32 * b));
        acc[r][m] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q, xm), ds, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      y[m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]) + const_term(c + r * blocks, xp.sums + m * blocks, blocks);
}

// Q4_K, Q5_K: per group g of a super-block, scale sc and c' = -mn - 128 sc
template <bool kFive>
struct KQuant {
  static constexpr int kBytes = kFive ? 176 : 144;
  static void scales(const uint8_t* row, int64_t blocks, float* d, float* c) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* p = row + b * kBytes;
      float mn[8];
      k_scales(p + 4, f16(p), f16(p + 2), d + 8 * b, mn);
      for (int g = 0; g < 8; ++g) c[8 * b + g] = -mn[g] - 128.f * d[8 * b + g];
    }
  }
  static __m512i codes(const uint8_t* p, int g) {
    const uint8_t* qs = p + (kFive ? 48 : 16) + 32 * (g / 2);
    const __m512i v = _mm512_broadcast_i64x4(load32(qs));
    __m512i q = offset_codes(v, shiftsK(g & 1));
    if constexpr (kFive) {
      const __mmask32 bits = _mm256_test_epi8_mask(load32(p + 16), _mm256_set1_epi8(static_cast<char>(1 << g)));
      q = _mm512_mask_add_epi16(q, orderK_mask(static_cast<uint32_t>(bits)), q, _mm512_set1_epi16(16));
    }
    return q;
  }
};

template <class K, int M, int R>
void rows_bf16_k(const XPrep& xp, int64_t cols, const uint8_t* w, int64_t row_bytes, float* y,
                 int64_t ldy, float* scratch) {
  const int64_t blocks = cols / 256, groups = cols / 32;
  float* d = scratch;  // [R][groups]
  float* c = scratch + R * groups;
  for (int r = 0; r < R; ++r) K::scales(w + r * row_bytes, blocks, d + r * groups, c + r * groups);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_share(w, b, R * K::kBytes);
    for (int g = 0; g < 8; ++g) {
      const int64_t gi = 8 * b + g;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = w + r * row_bytes + b * K::kBytes;
        const __m512bh q = reinterpret_cast<__m512bh>(K::codes(p, g));
        const __m512 ds = _mm512_set1_ps(d[r * groups + gi]);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512bh xm = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xp.xk + m * cols + 32 * gi));
          acc[r][m] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q, xm), ds, acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      y[m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]) + const_term(c + r * groups, xp.sums + m * groups, groups);
}

template <class Fmt> struct FastOf { using type = void; static constexpr int kind = 0; };
template <> struct FastOf<Q4_0> { using type = Q4_0s; static constexpr int kind = 1; };
template <> struct FastOf<Q4_1> { using type = Q4_1s; static constexpr int kind = 1; };
template <> struct FastOf<Q5_0> { using type = Q5_0s; static constexpr int kind = 1; };
template <> struct FastOf<Q5_1> { using type = Q5_1s; static constexpr int kind = 1; };
template <> struct FastOf<Q4_K> { using type = KQuant<false>; static constexpr int kind = 2; };
template <> struct FastOf<Q5_K> { using type = KQuant<true>; static constexpr int kind = 2; };


#if defined(__AVX512BF16__)
template <class Fmt, int M, int R>
void rows_bf16(const XPrep& xp, int64_t cols, const uint8_t* w, int64_t row_bytes, float* y,
               int64_t ldy, float* scratch) {
  using Fast = typename FastOf<Fmt>::type;
  if constexpr (FastOf<Fmt>::kind == 1)
    rows_bf16_simple<Fast, M, R>(xp, cols, w, row_bytes, y, ldy, scratch);
  else if constexpr (FastOf<Fmt>::kind == 2)
    rows_bf16_k<Fast, M, R>(xp, cols, w, row_bytes, y, ldy, scratch);
  else
    rows_bf16_codes<Q6_Kc, Fmt::kBlock, Fmt::kBytes, M, R>(xp.x, cols, w, row_bytes, y, ldy);
}
#endif

template <class Fmt>
constexpr bool kBf16Dots = FastOf<Fmt>::kind != 0 || std::is_same_v<Fmt, Q6_K>;  // see segment

// ---- tokenmill int4 (quant/formats._int4: round-to-nearest, GPTQ, AWQ) ----
// 16 bytes of codes per 32 elements (element 2j the low nibble of byte j) and, per group of
// G = cols / groups elements (32, 64 or 128), a fp32 scale s and a uint8 zero point z (8 where
// symmetric), both kept apart: the segment's row scale column points at the scales [rows,
// groups], its aux column at the zero points [rows, groups] (or 0), its stride is `groups`.
// A weight is w = fp32((c - z) * s), the one rounding of formats.dequantize_fast (the dense
// matrix of a bf16 model: then rounded to bf16). With 16 codes per group, a row's group is a
// table of its 16 weights in one register: the codes, one byte per int32 lane, index it directly
// (vpermps reads bits 0-3: the low nibble; shifted by 4, the high one), so decoding 32 weights is
// four instructions and the GEMV multiplies the file's weights exactly, as the GGML paths do
// (rounding the tables to bf16 as well cost a quarter of the speed, measured). The lanes hold the
// even elements, then the odd: x is permuted to that order once per call (`xi4`).
struct I4Row {
  const float* s;  // the row's scales [groups]
  const uint8_t* z;  // its zero points, or null (8)
  int64_t groups, per;  // groups, and blocks of 32 per group
};
inline I4Row i4_row(const Extra& ex, int64_t r, int64_t cols) {
  const int64_t groups = ex.rs_stride;
  return {ex.rs + r * groups, ex.aux ? ex.aux + r * groups : nullptr, groups, cols / 32 / groups};
}
// a row's zero points as fp32 (16 groups per conversion)
inline void i4_zeros(const I4Row& rr, float* out) {
  for (int64_t g = 0; g < rr.groups; g += 16) {
    const int64_t n = rr.groups - g < 16 ? rr.groups - g : 16;
    const __mmask16 k = static_cast<__mmask16>((1u << n) - 1);
    const __m512 z = rr.z ? u8_ps(_mm_maskz_loadu_epi8(k, rr.z + g)) : _mm512_set1_ps(8.f);
    _mm512_mask_storeu_ps(out + g, k, z);
  }
}
// the 16 weights of a group: entry i = (i - z) * s (i - z exact), rounded once
inline __m512 i4_table(float z, float s) {
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  return mul(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
}
// a block's codes, one byte per lane: the even elements' weights, then the odd ones'
inline void i4_weights(const uint8_t* p, __m512 table, __m512& even, __m512& odd) {
  const __m512i c = _mm512_cvtepu8_epi32(load16(p));
  even = _mm512_permutexvar_ps(c, table);
  odd = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
}

// `R` weight rows times `M` rows of x (fp32, permuted): R * M * 2 independent FMA chains.
template <int M, int R>
void rows_i4(const float* x, int64_t cols, const uint8_t* w, int64_t row_bytes, const Extra& ex,
             int64_t r0, float* zf, float* y, int64_t ldy) {
  I4Row rr[R];
  const int64_t groups = ex.rs_stride;
  for (int r = 0; r < R; ++r) {
    rr[r] = i4_row(ex, r0 + r, cols);
    i4_zeros(rr[r], zf + r * groups);  // zf: [R][groups]
  }
  __m512 acc[R][M][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
  const int64_t per = rr[0].per;
  for (int64_t g = 0; g < rr[0].groups; ++g) {
    __m512 table[R];
    for (int r = 0; r < R; ++r) table[r] = i4_table(zf[r * groups + g], rr[r].s[g]);
    for (int64_t b = g * per; b < (g + 1) * per; ++b) {
      prefetch_share(w, b, R * 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        __m512 even, odd;
        i4_weights(w + r * row_bytes + 16 * b, table[r], even, odd);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const float* xs = x + m * cols + 32 * b;
          acc[r][m][0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xs), acc[r][m][0]);
          acc[r][m][1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xs + 16), acc[r][m][1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      y[m * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]));
}

template <int M>
void segment_i4(const XPrep& xp, int64_t cols, const uint8_t* w, int64_t rows,
                int64_t row_bytes, const Extra& ex, float* y, int64_t ldy) {
  constexpr int R = M == 1 ? 4 : (M <= 4 ? 2 : 1);
  const int64_t tiles = (rows + R - 1) / R;
  thread_local std::vector<float> zf;  // a row tile's zero points in fp32
  if (static_cast<int64_t>(zf.size()) < R * ex.rs_stride) zf.resize(R * ex.rs_stride);
#pragma omp for schedule(static) nowait
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * R;
    const int64_t n = rows - r0 < R ? rows - r0 : R;
    if (n == R)
      rows_i4<M, R>(xp.xi4, cols, w + r0 * row_bytes, row_bytes, ex, r0, zf.data(), y + r0, ldy);
    else
      for (int64_t r = r0; r < r0 + n; ++r)
        rows_i4<M, 1>(xp.xi4, cols, w + r * row_bytes, row_bytes, ex, r, zf.data(), y + r, ldy);
  }
}

template <class Fmt, int M>
void segment(const void* x, const XPrep& xp, bool bf16, int64_t cols, const uint8_t* w,
             int64_t rows, int64_t row_bytes, const Extra& ex, float* y, int64_t ldy) {
  constexpr int kAux = AuxOf<Fmt>::value;
  const float* rs = ex.rs;
  constexpr int R = M == 1 ? 4 : (M <= 4 ? 2 : 1);
  const int64_t tiles = (rows + R - 1) / R;
  thread_local std::vector<float> scratch;  // a row tile's scales (the fast paths)
  if (static_cast<int64_t>(scratch.size()) < 2 * R * (cols / 32)) scratch.resize(2 * R * (cols / 32));
  // bf16 x: the bf16 dot products where they win (1-2 rows of the 4-6-bit formats: decoding the
  // codes costs two instructions); else x in fp32 (exact) and fp32 FMAs, which this CPU runs at
  // 4x the rate of vdpbf16ps (measured), once the decode is shared by 3+ rows
  const bool dot_bf16 = bf16 && (M <= 2 || std::is_same_v<Fmt, Q6_K>) && kBf16Dots<Fmt>;
  const float* xf = bf16 ? xp.xf : static_cast<const float*>(x);
#pragma omp for schedule(static) nowait
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * R;
    const int64_t n = rows - r0 < R ? rows - r0 : R;
    for (int64_t r = r0; r < r0 + n; r += (n == R ? R : 1)) {
      const uint8_t* wr = w + r * row_bytes;
#if defined(__AVX512BF16__)
      if constexpr (kBf16Dots<Fmt>) if (dot_bf16) {
        if (n == R)
          rows_bf16<Fmt, M, R>(xp, cols, wr, row_bytes, y + r, ldy, scratch.data());
        else
          rows_bf16<Fmt, M, 1>(xp, cols, wr, row_bytes, y + r, ldy, scratch.data());
        continue;
      }
#endif
      const uint8_t* aux = kAux ? ex.aux + r * (cols / 32 * kAux) : nullptr;
      const float* rrs = kAux && rs ? rs + r * ex.rs_stride : nullptr;  // nvfp4: in the block scales
      if (n == R)
        rows_fp32<Fmt, M, R>(xf, cols, wr, row_bytes, y + r, ldy, aux, rrs, ex.rs_stride);
      else
        rows_fp32<Fmt, M, 1>(xf, cols, wr, row_bytes, y + r, ldy, aux, rrs, ex.rs_stride);
    }
    if (rs && !kAux)  // a scale per row (int8, fp8 rows): applied to the finished sums
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = r0; r < r0 + n; ++r) {
          float v = y[m * ldy + r] * PostOf<Fmt>::value;  // exact: a power of 2
          if (ex.sx) v = v * ex.sx[m];  // fp8 activations: (acc * x scale) * row scale
          y[m * ldy + r] = v * rs[r * ex.rs_stride];
        }
  }
}

template <int M>
bool segment_m(int64_t type, const void* x, const XPrep& sums, bool bf16, int64_t cols, const uint8_t* w,
               int64_t rows, int64_t row_bytes, const Extra& rs, float* y, int64_t ldy) {
  switch (type) {
    case kF32: segment<F32, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kF16: segment<F16, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kBF16: segment<BF16, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kQ8_0: segment<Q8_0, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kQ4_0: segment<Q4_0, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kQ4_1: segment<Q4_1, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kQ5_0: segment<Q5_0, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kQ5_1: segment<Q5_1, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kQ4_K: segment<Q4_K, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kQ5_K: segment<Q5_K, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kQ6_K: segment<Q6_K, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kI8: segment<I8, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kE4M3: segment<FP8<true>, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kE5M2: segment<FP8<false>, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kNVFP4: segment<NVFP4, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kMXFP4: segment<MXFP4, M>(x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kI8A8: segment_i8a8<M>(sums.xq, sums.sx, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kI4: segment_i4<M>(sums, cols, w, rows, row_bytes, rs, y, ldy); return true;
    case kE4M3A8: {  // the E4M3 rows times x's E4M3 values (exact in fp32), then both scales
      Extra e = rs;
      e.sx = sums.s8;
      segment<FP8<true>, M>(sums.x8, sums, false, cols, w, rows, row_bytes, e, y, ldy);
      return true;
    }
    default: return false;
  }
}

bool segment_any(int64_t m, int64_t type, const void* x, const XPrep& sums, bool bf16, int64_t cols,
                 const uint8_t* w, int64_t rows, int64_t row_bytes, const Extra& rs, float* y,
                 int64_t ldy) {
  switch (m) {
    case 1: return segment_m<1>(type, x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy);
    case 2: return segment_m<2>(type, x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy);
    case 3: return segment_m<3>(type, x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy);
    case 4: return segment_m<4>(type, x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy);
    case 5: return segment_m<5>(type, x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy);
    case 6: return segment_m<6>(type, x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy);
    case 7: return segment_m<7>(type, x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy);
    case 8: return segment_m<8>(type, x, sums, bf16, cols, w, rows, row_bytes, rs, y, ldy);
    default: return false;
  }
}

inline void store16(float* o, __m512 w) { _mm512_storeu_ps(o, w); }
inline void store16(uint16_t* o, __m512 w) {
  const __m512i bits = _mm512_castps_si512(bf16_round16(w));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

template <class Fmt, class T>
void dequant_segment(const uint8_t* w, int64_t rows, int64_t row_bytes, const Extra& ex,
                     int64_t cols, T* out) {
  constexpr int kAux = AuxOf<Fmt>::value;
  const int64_t blocks = cols / Fmt::kBlock, aux_row = cols / 32 * kAux;
  const float* rs = kAux ? nullptr : ex.rs;  // int8 rows: value x scale, one rounding
#pragma omp for schedule(static) nowait
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 scale = _mm512_set1_ps(rs ? rs[r * ex.rs_stride] : 1.f);
    const float block_rs = kAux && ex.rs ? ex.rs[r * ex.rs_stride] : 1.f;  // nvfp4: in the blocks
    for (int64_t b = 0; b < blocks; ++b) {
      T* o = out + r * cols + b * Fmt::kBlock;
      const uint8_t* sa = kAux ? ex.aux + r * aux_row + b * kAux : nullptr;
      decode_block<Fmt>(w + r * row_bytes + b * Fmt::kBytes, sa, block_rs,
                        [&](int g, __m512 w0, __m512 w1) {
                          if constexpr (PostOf<Fmt>::value != 1.f) {  // exact: a power of 2
                            w0 = mul(w0, _mm512_set1_ps(PostOf<Fmt>::value));
                            w1 = mul(w1, _mm512_set1_ps(PostOf<Fmt>::value));
                          }
                          store16(o + 32 * g, rs ? mul(w0, scale) : w0);
                          store16(o + 32 * g + 16, rs ? mul(w1, scale) : w1);
                        });
    }
  }
}

template <class T>
void dequant_i4(const uint8_t* w, int64_t rows, int64_t row_bytes, const Extra& ex, int64_t cols,
                T* out) {
#pragma omp for schedule(static) nowait
  for (int64_t r = 0; r < rows; ++r) {
    const I4Row rr = i4_row(ex, r, cols);
    for (int64_t g = 0; g < rr.groups; ++g) {
      // store16 rounds a bf16 output once more, as formats.dequantize_fast's .to(bfloat16)
      const __m512 table = i4_table(static_cast<float>(rr.z ? rr.z[g] : 8), rr.s[g]);
      for (int64_t b = g * rr.per; b < (g + 1) * rr.per; ++b) {
        __m512 even, odd;
        i4_weights(w + r * row_bytes + 16 * b, table, even, odd);
        const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
        store16(out + r * cols + 32 * b, _mm512_permutex2var_ps(even, lo, odd));
        store16(out + r * cols + 32 * b + 16, _mm512_permutex2var_ps(even, hi, odd));
      }
    }
  }
}

template <class T>
bool dequant_any(int64_t type, const uint8_t* w, int64_t rows, int64_t row_bytes,
                 const Extra& rs, int64_t cols, T* out) {
  switch (type) {
    case kF32: dequant_segment<F32>(w, rows, row_bytes, rs, cols, out); return true;
    case kF16: dequant_segment<F16>(w, rows, row_bytes, rs, cols, out); return true;
    case kBF16: dequant_segment<BF16>(w, rows, row_bytes, rs, cols, out); return true;
    case kQ8_0: dequant_segment<Q8_0>(w, rows, row_bytes, rs, cols, out); return true;
    case kQ4_0: dequant_segment<Q4_0>(w, rows, row_bytes, rs, cols, out); return true;
    case kQ4_1: dequant_segment<Q4_1>(w, rows, row_bytes, rs, cols, out); return true;
    case kQ5_0: dequant_segment<Q5_0>(w, rows, row_bytes, rs, cols, out); return true;
    case kQ5_1: dequant_segment<Q5_1>(w, rows, row_bytes, rs, cols, out); return true;
    case kQ4_K: dequant_segment<Q4_K>(w, rows, row_bytes, rs, cols, out); return true;
    case kQ5_K: dequant_segment<Q5_K>(w, rows, row_bytes, rs, cols, out); return true;
    case kQ6_K: dequant_segment<Q6_K>(w, rows, row_bytes, rs, cols, out); return true;
    case kI8: dequant_segment<I8>(w, rows, row_bytes, rs, cols, out); return true;
    case kE4M3: dequant_segment<FP8<true>>(w, rows, row_bytes, rs, cols, out); return true;
    case kE5M2: dequant_segment<FP8<false>>(w, rows, row_bytes, rs, cols, out); return true;
    case kNVFP4: dequant_segment<NVFP4>(w, rows, row_bytes, rs, cols, out); return true;
    case kMXFP4: dequant_segment<MXFP4>(w, rows, row_bytes, rs, cols, out); return true;
    case kI4: dequant_i4(w, rows, row_bytes, rs, cols, out); return true;
    case kE4M3A8: dequant_segment<FP8<true>>(w, rows, row_bytes, rs, cols, out); return true;  // the weight alone
    default: return false;
  }
}

bool known(int64_t type) {
  switch (type) {
    case kF32: case kF16: case kBF16: case kQ8_0: case kQ4_0: case kQ4_1: case kQ5_0:
    case kQ5_1: case kQ4_K: case kQ5_K: case kQ6_K: case kI8: case kNVFP4: case kMXFP4:
    case kI8A8: case kE4M3: case kE5M2: case kI4: case kE4M3A8:
      return true;
    default: return false;
  }
}

// A segment the kernels can read: a known type, and int4's groups whole blocks of 32 of `cols`
bool valid(const int64_t* seg, int64_t cols) {
  if (!known(seg[0])) return false;
  if (seg[0] != kI4) return true;
  const int64_t groups = seg[6];
  return seg[4] != 0 && groups > 0 && cols % groups == 0 && (cols / groups) % 32 == 0;
}

inline const uint8_t* seg_data(const int64_t* seg) {
  return reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(seg[2]));
}
inline Extra seg_extra(const int64_t* seg) {
  Extra e;
  e.rs = reinterpret_cast<const float*>(static_cast<uintptr_t>(seg[4]));
  e.aux = reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(seg[5]));
  e.rs_stride = seg[6];
  return e;
}

}  // namespace
#endif

#if TM_GGUF_AVX512
namespace {

// fp32 values |v| <= 448 rounded to the nearest E4M3 number, ties to even (as c10's
// fp8e4m3fn_from_fp32_value): below 2^-6 the subnormal multiples of 2^-9, else 3 mantissa bits.
inline __m512 e4m3_round(__m512 v) {
  const __m512 a = _mm512_abs_ps(v);
  const __m512 sub = _mm512_mul_ps(_mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(512.f)),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                   _mm512_set1_ps(1.f / 512.f));  // exact: powers of 2
  const __m512i bits = _mm512_castps_si512(a);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7ffff)), odd);
  const __m512 normal = _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(0xfff00000u)));
  const __mmask16 tiny = _mm512_cmp_ps_mask(a, _mm512_set1_ps(1.f / 64.f), _CMP_LT_OQ);
  const __m512 r = _mm512_mask_blend_ps(tiny, normal, sub);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x80000000u));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign));
}

// What a GEMV pass needs of x besides x itself (bf16 x): the sums per group, the permuted
// copies the fast paths read. Built by one thread before the pass.
struct Prepared {
  XPrep prep;
  std::vector<float> sums, xf, sx, xi4, x8, s8;
  std::vector<uint16_t> x32, xk;
  std::vector<int16_t> xq;

  // Row r of x in fp32, times the smoothing factors (one fp32 rounding) where given, into
  // `row`; returns its largest magnitude. What both activation quantizations start from.
  static float smoothed_row(const void* x, int64_t r, bool bf16, int64_t cols,
                            const float* smooth, float* row) {
    float amax = 0.f;
    for (int64_t c = 0; c < cols; ++c) {
      float v = bf16 ? bf16_value(static_cast<const uint16_t*>(x)[r * cols + c])
                     : static_cast<const float*>(x)[r * cols + c];
      if (smooth) v = v * smooth[c];
      row[c] = v;
      amax = std::fabs(v) > amax ? std::fabs(v) : amax;
    }
    return amax;
  }

  // w8a8 (Int8MMKernel's arithmetic): x2 = x in fp32 (times the smoothing factors: one fp32
  // rounding), amax = max |x2| (at least 1e-12), codes round-half-even(x2 * (127 / amax)),
  // which lie in [-127, 127], and the scale amax / 127 (a true division).
  void quantize_rows(const void* x, int64_t m, bool bf16, int64_t cols, const float* smooth) {
    xq.resize(m * cols);
    sx.resize(m);
    std::vector<float> row(cols);
    for (int64_t r = 0; r < m; ++r) {
      float amax = smoothed_row(x, r, bf16, cols, smooth, row.data());
      amax = amax < 1e-12f ? 1e-12f : amax;
      // torch computes 127.0 / amax as reciprocal(amax) * 127: two roundings (measured)
      const __m512 inv = _mm512_set1_ps((1.0f / amax) * 127.0f);
      for (int64_t c = 0; c < cols; c += 16) {
        const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(row.data() + c), inv),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq.data() + r * cols + c),
                            _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(q)));
      }
      sx[r] = amax / 127.0f;
    }
    prep.xq = xq.data();
    prep.sx = sx.data();
  }

  // fp8 (quant/methods/fp8.Fp8Kernel, current scaling): x2 = x in fp32 (times the smoothing
  // factors: one fp32 rounding), scale = max(amax / 448, 1e-12) (true divisions), values
  // E4M3(clamp(x2 / scale, -448, 448)), rounded to nearest even as torch's .to(float8_e4m3fn).
  void quantize_fp8(const void* x, int64_t m, bool bf16, int64_t cols, const float* smooth) {
    x8.resize(m * cols);
    s8.resize(m);
    for (int64_t r = 0; r < m; ++r) {
      float* row = x8.data() + r * cols;
      float scale = smoothed_row(x, r, bf16, cols, smooth, row) / 448.0f;
      scale = scale < 1e-12f ? 1e-12f : scale;
      const __m512 sv = _mm512_set1_ps(scale), limit = _mm512_set1_ps(448.f);
      for (int64_t c = 0; c < cols; c += 16) {
        __m512 q = _mm512_div_ps(_mm512_loadu_ps(row + c), sv);
        q = _mm512_max_ps(_mm512_min_ps(q, limit), _mm512_sub_ps(_mm512_setzero_ps(), limit));
        _mm512_storeu_ps(row + c, e4m3_round(q));
      }
      s8[r] = scale;
    }
    prep.x8 = x8.data();
    prep.s8 = s8.data();
  }

  void build(const void* x, int64_t m, bool bf16, int64_t cols, const int64_t* segs,
             int64_t nsegs) {
    prep = XPrep();
    for (int64_t s = 0; s < nsegs; ++s)
      if (segs[kSegFields * s] == kI8A8) {  // every w8a8 segment has the same smoothing (fits)
        quantize_rows(x, m, bf16, cols, reinterpret_cast<const float*>(
                                            static_cast<uintptr_t>(segs[kSegFields * s + 5])));
        break;
      }
    for (int64_t s = 0; s < nsegs; ++s)
      if (segs[kSegFields * s] == kE4M3A8) {  // likewise
        quantize_fp8(x, m, bf16, cols, reinterpret_cast<const float*>(
                                           static_cast<uintptr_t>(segs[kSegFields * s + 5])));
        break;
      }
    for (int64_t s = 0; s < nsegs; ++s)
      if (segs[kSegFields * s] == kI4) {  // x in fp32, each 32 as elements 0, 2, .., 30, 1, ..
        xi4.resize(m * cols);
        for (int64_t i = 0; i < m * cols; i += 32)
          for (int j = 0; j < 32; ++j) {
            const int64_t from = i + (j < 16 ? 2 * j : 2 * (j - 16) + 1);
            xi4[i + j] = bf16 ? bf16_value(static_cast<const uint16_t*>(x)[from])
                              : static_cast<const float*>(x)[from];
          }
        prep.xi4 = xi4.data();
        break;
      }
    if (!bf16) return;
    prep.x = static_cast<const uint16_t*>(x);
    sums.resize(m * (cols / 32));
    for (int64_t i = 0; i < m * (cols / 32); ++i) {
      const __m512i h = _mm512_cvtepu16_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(prep.x + 32 * i)));
      const __m512i h1 = _mm512_cvtepu16_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(prep.x + 32 * i + 16)));
      sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(h, 16)),
                                                   _mm512_castsi512_ps(_mm512_slli_epi32(h1, 16))));
    }
    prep.sums = sums.data();
    bool simple = false, kquant = false;
    for (int64_t s = 0; s < nsegs; ++s) {
      const int64_t t = segs[kSegFields * s];
      simple |= t == kQ4_0 || t == kQ4_1 || t == kQ5_0 || t == kQ5_1;
      kquant |= t == kQ4_K || t == kQ5_K;
    }
    xf.resize(m * cols);
    for (int64_t i = 0; i < m * cols; ++i) xf[i] = bf16_value(prep.x[i]);
    prep.xf = xf.data();
    if (simple) {
      x32.resize(m * cols);
      permute_x(prep.x, m, cols, false, x32.data());
      prep.x32 = x32.data();
    }
    if (kquant) {
      xk.resize(m * cols);
      permute_x(prep.x, m, cols, true, xk.data());
      prep.xk = xk.data();
    }
  }
};

// Whether the kernels take this weight and x; `total` its rows.
bool fits(int64_t m, bool bf16, const int64_t* segs, int64_t nsegs, int64_t cols, int64_t* total) {
#if !defined(__AVX512BF16__)
  if (bf16) return false;
#endif
  if (m < 1 || m > kMaxRows || cols % 32) return false;
  *total = 0;
  int64_t smooth[2] = {-1, -1};  // the w8a8 / fp8 segments' smoothing factors: one vector each
  for (int64_t s = 0; s < nsegs; ++s) {
    const int64_t* seg = segs + kSegFields * s;
    if (!valid(seg, cols)) return false;
    if (seg[0] == kI8A8 || seg[0] == kE4M3A8) {
      int64_t& sm = smooth[seg[0] == kE4M3A8];
      if (!seg[4] || seg[6] != 1 || (sm >= 0 && seg[5] != sm)) return false;
      sm = seg[5];
    }
    *total += seg[1];
  }
  return true;
}

// Inside a parallel region: this thread's share of y[m, total] (fp32) = x W^T.
void gemv_share(int64_t m, const void* x, const Prepared& p, bool bf16, const int64_t* segs,
                int64_t nsegs, int64_t cols, float* y, int64_t total) {
  int64_t row0 = 0;
  for (int64_t s = 0; s < nsegs; ++s) {
    const int64_t* seg = segs + kSegFields * s;
    segment_any(m, seg[0], x, p.prep, bf16, cols, seg_data(seg), seg[1], seg[3], seg_extra(seg),
                y + row0, total);
    row0 += seg[1];
  }
}

// ---- a decoder layer's halves at decode sizes, one call each (layers/fused_decode.py) ----
// The same stages and roundings as the layers called one by one: each GEMV's fp32 result
// rounded to the model dtype, then its bias added in that dtype (quant/methods/base.finish),
// the row ops of row_ops.h on one thread between the passes.
struct GLinear {  // int64 fields, laid out by fused_decode._gguf_fields
  int64_t segs, nsegs, rows, cols, bias;
};
struct GMlp {
  GLinear o, gu, down;
  int64_t norm_weight, hidden, inter;
};
struct GQkv {
  GLinear qkv;
  int64_t norm_weight, hidden, rotated_heads, head_dim;
};

inline const int64_t* table_of(const GLinear& l) {
  return reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(l.segs));
}

template <typename T>
void finish_rows(const float* y, const GLinear& l, T* out, int64_t m) {
  const T* bias = reinterpret_cast<const T*>(static_cast<uintptr_t>(l.bias));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < l.rows; ++i) {
      float v = tm::rows::round_to(out, y[r * l.rows + i]);
      if (bias) v = tm::rows::round_to(out, v + tm::rows::load(bias, i));
      tm::rows::store(out + r * l.rows, i, v);
    }
}

template <typename T>
bool linear_fits(const GLinear& l, int64_t m, int64_t in) {
  int64_t total = 0;
  return l.cols == in && fits(m, std::is_same_v<T, uint16_t>, table_of(l), l.nsegs, l.cols, &total) &&
         total == l.rows;
}

template <typename T>
int mlp_half(int64_t M, const T* a, const T* residual, T* out, T* summed, const GMlp& d,
             float eps, int num_threads) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t H = d.hidden, I = d.inter;
  if (!linear_fits<T>(d.o, M, d.o.cols) || d.o.rows != H || !linear_fits<T>(d.gu, M, H) ||
      d.gu.rows != 2 * I || !linear_fits<T>(d.down, M, I) || d.down.rows != H)
    return 0;
  std::vector<float> y(M * (2 * I > H ? 2 * I : H));
  std::vector<T> x1(M * H), normed(M * H), gate_up(M * 2 * I), act(M * I);
  Prepared pa, pn, pact;
  pa.build(a, M, bf16, d.o.cols, table_of(d.o), d.o.nsegs);
#pragma omp parallel num_threads(num_threads)
  {
    gemv_share(M, a, pa, bf16, table_of(d.o), d.o.nsegs, d.o.cols, y.data(), H);
#pragma omp barrier
#pragma omp single
    {
      finish_rows(y.data(), d.o, x1.data(), M);
      tm::rows::add_rms_norm<T>(x1.data(), residual, reinterpret_cast<const T*>(d.norm_weight),
                                normed.data(), summed, M, H, eps, 1);
      pn.build(normed.data(), M, bf16, H, table_of(d.gu), d.gu.nsegs);
    }
    gemv_share(M, normed.data(), pn, bf16, table_of(d.gu), d.gu.nsegs, H, y.data(), 2 * I);
#pragma omp barrier
#pragma omp single
    {
      finish_rows(y.data(), d.gu, gate_up.data(), M);
      tm::rows::silu_mul<T>(gate_up.data(), act.data(), M, I, 1);
      pact.build(act.data(), M, bf16, I, table_of(d.down), d.down.nsegs);
    }
    gemv_share(M, act.data(), pact, bf16, table_of(d.down), d.down.nsegs, I, y.data(), H);
#pragma omp barrier
#pragma omp single
    finish_rows(y.data(), d.down, out, M);
  }
  return 1;
}

template <typename T>
int qkv_half(int64_t M, const T* x, const T* residual, T* summed, T* qkv, T* rotated,
             const T* cos, const T* sin, const GQkv& d, float eps, int num_threads) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t H = d.hidden, N = d.qkv.rows;
  if (!linear_fits<T>(d.qkv, M, H) || d.rotated_heads * d.head_dim > N || d.head_dim % 2) return 0;
  std::vector<float> y(M * N);
  std::vector<T> normed(M * H);
  Prepared pn;
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp single
    {
      tm::rows::add_rms_norm<T>(x, residual, reinterpret_cast<const T*>(d.norm_weight),
                                normed.data(), summed, M, H, eps, 1);
      pn.build(normed.data(), M, bf16, H, table_of(d.qkv), d.qkv.nsegs);
    }
    gemv_share(M, normed.data(), pn, bf16, table_of(d.qkv), d.qkv.nsegs, H, y.data(), N);
#pragma omp barrier
#pragma omp single
    {
      finish_rows(y.data(), d.qkv, qkv, M);
      tm::rows::rotary<T>(qkv, N, cos, sin, rotated, M, d.rotated_heads, d.head_dim, 1);
    }
  }
  return 1;
}

}  // namespace
#endif

extern "C" {

// x [m, cols] (fp32, or bf16 bits if x_bf16), 1 <= m <= 8; y [m, total rows] fp32.
// Returns 0, or -1 (no AVX-512 / an unknown type / bf16 x without AVX512-BF16: use torch).
int tm_gguf_gemv(const void* x, int64_t m, int x_bf16, const int64_t* segs, int64_t nsegs,
                 int64_t cols, float* y, int num_threads) {
#if TM_GGUF_AVX512
  const bool bf16 = x_bf16 != 0;
  int64_t total = 0;
  if (!fits(m, bf16, segs, nsegs, cols, &total)) return -1;
  Prepared p;
  p.build(x, m, bf16, cols, segs, nsegs);
#pragma omp parallel num_threads(num_threads) if (total * cols >= 65536)
  gemv_share(m, x, p, bf16, segs, nsegs, cols, y, total);
  return 0;
#else
  (void)x; (void)m; (void)x_bf16; (void)segs; (void)nsegs; (void)cols; (void)y;
  (void)num_threads;
  return -1;
#endif
}

// The two halves of a decoder layer (see mlp_half, qkv_half): 1 when done, 0 where they do not
// apply (the caller runs the layers one by one). T is bf16 bits (x_bf16) or fp32.
int tm_gguf_decode_mlp(int64_t M, const void* a, const void* residual, void* out, void* summed,
                       const void* block, float eps, int x_bf16, int num_threads) {
#if TM_GGUF_AVX512
  const GMlp& d = *static_cast<const GMlp*>(block);
  if (x_bf16)
    return mlp_half<uint16_t>(M, static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(residual),
                              static_cast<uint16_t*>(out), static_cast<uint16_t*>(summed), d, eps, num_threads);
  return mlp_half<float>(M, static_cast<const float*>(a), static_cast<const float*>(residual),
                         static_cast<float*>(out), static_cast<float*>(summed), d, eps, num_threads);
#else
  return 0;
#endif
}

int tm_gguf_decode_qkv(int64_t M, const void* x, const void* residual, void* summed, void* qkv,
                       void* rotated, const void* cos, const void* sin, const void* block,
                       float eps, int x_bf16, int num_threads) {
#if TM_GGUF_AVX512
  const GQkv& d = *static_cast<const GQkv*>(block);
  if (x_bf16)
    return qkv_half<uint16_t>(M, static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(residual),
                              static_cast<uint16_t*>(summed), static_cast<uint16_t*>(qkv),
                              static_cast<uint16_t*>(rotated), static_cast<const uint16_t*>(cos),
                              static_cast<const uint16_t*>(sin), d, eps, num_threads);
  return qkv_half<float>(M, static_cast<const float*>(x), static_cast<const float*>(residual),
                         static_cast<float*>(summed), static_cast<float*>(qkv), static_cast<float*>(rotated),
                         static_cast<const float*>(cos), static_cast<const float*>(sin), d, eps, num_threads);
#else
  return 0;
#endif
}

// The weight as a dense [total rows, cols] matrix: fp32, or bf16 bits (round to nearest even).
int tm_gguf_dequant(const int64_t* segs, int64_t nsegs, int64_t cols, void* out, int out_bf16,
                    int num_threads) {
#if TM_GGUF_AVX512
  if (cols % 32) return -1;
  for (int64_t s = 0; s < nsegs; ++s)
    if (!valid(segs + kSegFields * s, cols)) return -1;
#pragma omp parallel num_threads(num_threads)
  {
    int64_t row0 = 0;
    for (int64_t s = 0; s < nsegs; ++s) {
      const int64_t* seg = segs + kSegFields * s;
      if (out_bf16)
        dequant_any(seg[0], seg_data(seg), seg[1], seg[3], seg_extra(seg), cols,
                    static_cast<uint16_t*>(out) + row0 * cols);
      else
        dequant_any(seg[0], seg_data(seg), seg[1], seg[3], seg_extra(seg), cols,
                    static_cast<float*>(out) + row0 * cols);
      row0 += seg[1];
    }
  }
  return 0;
#else
  (void)segs; (void)nsegs; (void)cols; (void)out; (void)out_bf16; (void)num_threads;
  return -1;
#endif
}

}  // extern "C"
