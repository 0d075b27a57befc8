// Paged decode attention on CPU: each sequence's single query attends to its cached keys, read in
// place from the block pool through its block table (no gather into a contiguous copy).
//
// Cache layout (tokenmill/layers/attention.py): [2, kv_heads, num_slots, head_dim], slot =
// block_id * block_size + offset. One work item is one (sequence, KV head): the `group` query
// heads that share that KV head read each key and value row once. Softmax is computed online,
// block by block (running max and sum, as flash attention does), accumulating in fp32.
//
// Built at run time by tokenmill/layers/native.py (g++ -O3 -march=native -fopenmp); plain C ABI,
// no torch headers, so it compiles in about a second and is called through ctypes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }

inline float load(const uint16_t* p, int64_t i) {  // bfloat16 -> fp32 is a 16-bit shift
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }

inline void store(uint16_t* p, int64_t i, float v) {  // fp32 -> bfloat16, round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) {
    p[i] = static_cast<uint16_t>((bits >> 16) | 0x40);  // keep NaN a NaN
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  p[i] = static_cast<uint16_t>(bits >> 16);
}

// One block of the online softmax for one head: scores sg[0..n) become exp(score - max), the
// running max m and sum l advance; returns the factor that rescales the sums so far.
inline float softmax_block(float* sg, int64_t n, float& m, float& l) {
  float bmax = sg[0];
  for (int64_t t = 1; t < n; ++t) bmax = std::max(bmax, sg[t]);
  const float new_m = std::max(m, bmax);
  const float corr = tm::exp_nonpositive(m - new_m);  // 0 on the first block (m = -inf)
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    sg[t] = tm::exp_nonpositive(sg[t] - new_m);
    sum += sg[t];
  }
  l = l * corr + sum;
  m = new_m;
  return corr;
}

// D > 0: head_dim known at compile time (fully unrolled, vectorized); D == 0: read `dim`.
template <typename T, int D>
void decode_one(const T* q, const T* kv, const int64_t* table, int64_t len, T* out, int64_t group,
                int64_t dim_rt, int64_t kv_head, int64_t num_kv_heads, int64_t num_slots,
                int64_t block_size, float scale, float* scratch) {
  const int64_t dim = D > 0 ? D : dim_rt;
  float* qf = scratch;                  // [group, dim] query in fp32, pre-scaled
  float* acc = qf + group * dim;        // [group, dim] running sum of p * V
  float* m = acc + group * dim;         // [group] running max
  float* l = m + group;                 // [group] running sum of p
  float* s = l + group;                 // [group, block_size] this block's scores
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = load(q, g * dim + d) * scale;
    for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] = 0.f;
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  const T* kbase = kv + kv_head * num_slots * dim;
  const T* vbase = kv + (num_kv_heads + kv_head) * num_slots * dim;
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n = std::min(block_size, len - b * block_size);
    const int64_t slot0 = table[b] * block_size;
    for (int64_t t = 0; t < n; ++t) {
      const T* k = kbase + (slot0 + t) * dim;
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = qf + g * dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += qg[d] * load(k, d);
        s[g * block_size + t] = dot;
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      const float corr = softmax_block(s + g * block_size, n, m[g], l[g]);
      float* ag = acc + g * dim;
      if (corr != 1.f) {
        for (int64_t d = 0; d < dim; ++d) ag[d] *= corr;
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      const T* v = vbase + (slot0 + t) * dim;
      for (int64_t g = 0; g < group; ++g) {
        const float p = s[g * block_size + t];
        float* ag = acc + g * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) ag[d] += p * load(v, d);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int64_t d = 0; d < dim; ++d) store(out, g * dim + d, acc[g * dim + d] * inv);
  }
}


#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The same computation as decode_one with AVX-512 for head_dim = 16 * C, for G query heads that
// share one KV head: each K and V row is loaded once into registers and used by all G, and the
// running sums p * V (G * C vectors) stay in registers for the whole sequence. G * C <= 28; a
// larger group is computed in slices of heads (decode_registers), the later slices re-reading
// K/V rows that the first has just brought into cache.
template <typename T, int C, int G>
void decode_group_avx512(const T* q, const T* kv, const int64_t* table, int64_t len, T* out,
                         int64_t kv_head, int64_t num_kv_heads, int64_t num_slots,
                         int64_t block_size, float scale, float* scratch) {
  constexpr int64_t dim = 16 * C;
  float* qf = scratch;      // [G, dim] query in fp32, pre-scaled
  float* s = qf + G * dim;  // [G, block_size] this block's scores, then probabilities
  __m512 acc[G][C];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = load(q, g * dim + d) * scale;
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  const T* kbase = kv + kv_head * num_slots * dim;
  const T* vbase = kv + (num_kv_heads + kv_head) * num_slots * dim;
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  constexpr int64_t row_bytes = dim * static_cast<int64_t>(sizeof(T));
  __m512 row[C];
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n = std::min(block_size, len - b * block_size);
    const int64_t slot0 = table[b] * block_size;
    const int64_t next = b + 1 < num_blocks ? table[b + 1] * block_size : slot0;
    for (int64_t t = 0; t < n; ++t) {
      const T* k = kbase + (slot0 + t) * dim;
      const char* nk = reinterpret_cast<const char*>(kbase + (next + t) * dim);
      const char* nv = reinterpret_cast<const char*>(vbase + (next + t) * dim);
      for (int64_t o = 0; o < row_bytes; o += 64) {
        __builtin_prefetch(nk + o);
        __builtin_prefetch(nv + o);
      }
      for (int c = 0; c < C; ++c) row[c] = load16(k + 16 * c);
      for (int g = 0; g < G; ++g) {
        const float* qg = qf + g * dim;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), row[0]);
        for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), row[c], a);
        s[g * block_size + t] = _mm512_reduce_add_ps(a);
      }
    }
    for (int g = 0; g < G; ++g) {
      const float corr = softmax_block(s + g * block_size, n, m[g], l[g]);
      const __m512 cv = _mm512_set1_ps(corr);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_mul_ps(acc[g][c], cv);
    }
    for (int64_t t = 0; t < n; ++t) {
      const T* v = vbase + (slot0 + t) * dim;
      for (int c = 0; c < C; ++c) row[c] = load16(v + 16 * c);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(s[g * block_size + t]);
        for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, row[c], acc[g][c]);
      }
    }
  }
  alignas(64) float tmp[16];
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);
    for (int c = 0; c < C; ++c) {
      _mm512_store_ps(tmp, _mm512_mul_ps(acc[g][c], inv));
      for (int i = 0; i < 16; ++i) store(out, g * dim + 16 * c + i, tmp[i]);
    }
  }
}

// A group of `group` query heads in slices of at most 28 / C heads.
template <typename T, int C>
void decode_registers(int64_t group, const T* q, const T* kv, const int64_t* table, int64_t len,
                      T* out, int64_t h, int64_t num_kv_heads, int64_t num_slots,
                      int64_t block_size, float scale, float* scratch) {
  constexpr int64_t dim = 16 * C, most = 28 / C;
  for (int64_t g0 = 0; g0 < group; g0 += most) {
    const T* qs = q + g0 * dim;
    T* os = out + g0 * dim;
#define TM_GROUP(G)                                                                        \
  case G:                                                                                  \
    if constexpr (G <= most)                                                               \
      decode_group_avx512<T, C, G>(qs, kv, table, len, os, h, num_kv_heads, num_slots,     \
                                   block_size, scale, scratch);                            \
    break;
    switch (std::min(most, group - g0)) {
      TM_GROUP(1)
      TM_GROUP(2)
      TM_GROUP(3)
      TM_GROUP(4)
      TM_GROUP(5)
      TM_GROUP(6)
      TM_GROUP(7)
    }
#undef TM_GROUP
  }
}
#endif

template <typename T>
int decode(const T* q, const T* kv, const int64_t* tables, const int32_t* lens, T* out,
           int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
           int64_t num_slots, int64_t block_size, int64_t max_blocks, float scale,
           int num_threads) {
  if (num_kv_heads <= 0 || num_heads % num_kv_heads) return 1;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t scratch = group * (2 * head_dim + 2 + block_size);
  const int64_t items = num_seqs * num_kv_heads;
  // chunks of 4 items amortize the scheduling, but with few items (batch 1: one per KV head)
  // they would leave every thread but one idle
  const int chunk = items >= 16 * num_threads ? 4 : 1;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> buf(scratch);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t seq = i / num_kv_heads, h = i % num_kv_heads;
      const int64_t off = (seq * num_heads + h * group) * head_dim;
      const int64_t* table = tables + seq * max_blocks;
      const int64_t len = lens[seq];
#if defined(__AVX512F__)
      if (head_dim == 64 || head_dim == 128) {
        (head_dim == 64 ? decode_registers<T, 4> : decode_registers<T, 8>)(
            group, q + off, kv, table, len, out + off, h, num_kv_heads, num_slots, block_size,
            scale, buf.data());
        continue;
      }
#endif
      if (head_dim == 64)
        decode_one<T, 64>(q + off, kv, table, len, out + off, group, head_dim, h, num_kv_heads,
                          num_slots, block_size, scale, buf.data());
      else if (head_dim == 128)
        decode_one<T, 128>(q + off, kv, table, len, out + off, group, head_dim, h, num_kv_heads,
                           num_slots, block_size, scale, buf.data());
      else
        decode_one<T, 0>(q + off, kv, table, len, out + off, group, head_dim, h, num_kv_heads,
                         num_slots, block_size, scale, buf.data());
    }
  }
  return 0;
}

}  // namespace

extern "C" {

int tm_paged_decode_f32(const float* q, const float* kv, const int64_t* tables,
                        const int32_t* lens, float* out, int64_t num_seqs, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, int64_t num_slots,
                        int64_t block_size, int64_t max_blocks, float scale, int num_threads) {
  return decode(q, kv, tables, lens, out, num_seqs, num_heads, num_kv_heads, head_dim, num_slots,
                block_size, max_blocks, scale, num_threads);
}

int tm_paged_decode_bf16(const uint16_t* q, const uint16_t* kv, const int64_t* tables,
                         const int32_t* lens, uint16_t* out, int64_t num_seqs, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, int64_t num_slots,
                         int64_t block_size, int64_t max_blocks, float scale, int num_threads) {
  return decode(q, kv, tables, lens, out, num_seqs, num_heads, num_kv_heads, head_dim, num_slots,
                block_size, max_blocks, scale, num_threads);
}

}  // extern "C"

extern "C" {

// New K and V rows into their cache slots: k, v [tokens, kv_heads, head_dim] with token strides
// of `k_stride` and `v_stride` elements (v is a view of the fused q/k/v projection), any element
// type of `elem_bytes`; cache [2, kv_heads, num_slots, head_dim] contiguous.
int tm_kv_write(const char* k, const char* v, char* cache, const int64_t* slots, int64_t num_tokens,
                int64_t num_kv_heads, int64_t head_dim, int64_t num_slots, int64_t k_stride,
                int64_t v_stride, int64_t elem_bytes, int num_threads) {
  const int64_t row = head_dim * elem_bytes;
  const int64_t plane = num_kv_heads * num_slots * row;  // K, then V
  int64_t bad = 0;  // slots outside the pool: skipped, never written, reported
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_tokens >= 256) \
    reduction(+ : bad)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= num_slots) {
      ++bad;
      continue;
    }
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const int64_t dst = (h * num_slots + slot) * row;
      std::memcpy(cache + dst, k + t * k_stride * elem_bytes + h * row, row);
      std::memcpy(cache + plane + dst, v + t * v_stride * elem_bytes + h * row, row);
    }
  }
  return bad ? 1 : 0;
}

}  // extern "C"
