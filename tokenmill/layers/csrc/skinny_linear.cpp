// Small-batch linear layers (1-8 rows) that stream the weight once at the memory limit, reading
// the weight in the blocked layout oneDNN packed it into, so prefill's GEMM and these kernels
// share one copy.
//
// Layout (checked exactly against the packed bytes in layers/skinny.py before use): the [N, K]
// weight is cut into column blocks of `block_cols` outputs; a block is K/ `pair` rows of
// block_cols * pair elements, row r holding elements k = r*pair .. r*pair+pair-1 of each output,
// output-major inside the row:
//   bf16 (pair 2): w[nb][k/2][n % block_cols][k % 2]   (the VNNI pairs vdpbf16ps takes)
//   fp32 (pair 1): w[nb][k][n % block_cols]
// Every block row is block_cols * 4 bytes: one 32-bit lane per output, block_cols / 16 vectors.
//
// Each thread takes a contiguous run of blocks and reads it front to back with software prefetch
// a fixed distance ahead: the two cores' streams then reach the bandwidth that a hardware
// prefetcher alone does not at one row (BENCHMARKS.md, "single-stream decode"). Accumulation is
// in fp32; bf16 outputs are rounded to nearest even once, as oneDNN does.

#include <omp.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "row_ops.h"
#include "skinny_gemv.h"

namespace {

struct MlpBlock {  // int64 fields, laid out by fused_decode.MLPBlock
  int64_t w_o, bias_o, cols_o, in_o;  // o_proj: [hidden, in_o]
  int64_t w_gu, bias_gu, cols_gu;     // gate_up_proj: [2 * inter, hidden]
  int64_t w_down, bias_down, cols_down;  // down_proj: [hidden, inter]
  int64_t norm_weight, hidden, inter;
};

struct QkvBlock {  // int64 fields, laid out by fused_decode.QKVBlock
  int64_t w_qkv, bias_qkv, cols_qkv, n_qkv;  // qkv_proj: [n_qkv, hidden]
  int64_t norm_weight, hidden;
  int64_t rotated_heads, head_dim;  // q and k heads, side by side at the start of each row
};

#if defined(__AVX512F__)
using tm::skinny::dispatch_m;

// This thread's contiguous run of the column blocks of y[M, N] = x W^T + bias, inside a
// parallel region.
template <bool kBf16>
void share_of(int64_t M, const void* x, int64_t ldx, const void* w, const void* bias, void* y,
              int64_t ldy, int64_t N, int64_t K, int64_t cols) {
  const int64_t blocks = N / cols, t = omp_get_thread_num(), nt = omp_get_num_threads();
  const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
  if (b0 < b1) dispatch_m<kBf16>(M, x, ldx, w, bias, y, ldy, K, cols, b0, b1);
}

template <bool kBf16>
int skinny(int64_t M, const void* x, int64_t ldx, const void* w, const void* bias, void* y,
           int64_t ldy, int64_t N, int64_t K, int64_t block_cols, int num_threads) {
  if (M < 1 || M > 8 || block_cols % 16 || N % block_cols || K % (kBf16 ? 2 : 1)) return 0;
#pragma omp parallel num_threads(num_threads)
  share_of<kBf16>(M, x, ldx, w, bias, y, ldy, N, K, block_cols);
  return 1;
}

inline const void* ptr(int64_t address) { return reinterpret_cast<const void*>(address); }

// The output half of a decoder layer at decode sizes, as one call: o_proj, residual add +
// RMSNorm, gate_up, SiLU(gate) * up, down (layers/fused_decode.py). The GEMVs are split over
// the threads as skinny() splits them, the row ops (a few microseconds at <= 8 rows) run on one
// thread between barriers; every intermediate is rounded to the model dtype where the unfused
// layers round it, so the result is the same bits as those layers' calls in a row.

template <bool kBf16>
int mlp_block(int64_t M, const void* a, const void* residual, void* out, void* summed,
              const MlpBlock& d, float eps, int num_threads) {
  using T = std::conditional_t<kBf16, uint16_t, float>;
  const int64_t H = d.hidden, I = d.inter, pair = kBf16 ? 2 : 1;
  const bool fits = M >= 1 && M <= 8 && H % d.cols_o == 0 && (2 * I) % d.cols_gu == 0 &&
                    H % d.cols_down == 0 && d.in_o % pair == 0 && H % pair == 0 && I % pair == 0;
  if (!fits) return 0;
  std::vector<T> x1(M * H), normed(M * H), gate_up(M * 2 * I), act(M * I);
#pragma omp parallel num_threads(num_threads)
  {
    share_of<kBf16>(M, a, d.in_o, ptr(d.w_o), ptr(d.bias_o), x1.data(), H, H, d.in_o, d.cols_o);
#pragma omp barrier
#pragma omp single
    tm::rows::add_rms_norm<T>(x1.data(), static_cast<const T*>(residual),
                              reinterpret_cast<const T*>(d.norm_weight), normed.data(),
                              static_cast<T*>(summed), M, H, eps, 1);
    share_of<kBf16>(M, normed.data(), H, ptr(d.w_gu), ptr(d.bias_gu), gate_up.data(), 2 * I,
                    2 * I, H, d.cols_gu);
#pragma omp barrier
#pragma omp single
    tm::rows::silu_mul<T>(gate_up.data(), act.data(), M, I, 1);
    share_of<kBf16>(M, act.data(), I, ptr(d.w_down), ptr(d.bias_down), out, H, H, I,
                    d.cols_down);
  }
  return 1;
}

// The input half: residual add + RMSNorm, qkv_proj, rotary on q and k; the same kernels and
// roundings as the layers (norm.py, linear.py, rotary.py) called one by one.
template <bool kBf16>
int qkv_block(int64_t M, const void* x, const void* residual, void* summed, void* qkv,
              void* rotated, const void* cos, const void* sin, const QkvBlock& d, float eps,
              int num_threads) {
  using T = std::conditional_t<kBf16, uint16_t, float>;
  const int64_t H = d.hidden, pair = kBf16 ? 2 : 1;
  if (M < 1 || M > 8 || d.n_qkv % d.cols_qkv || H % pair ||
      d.rotated_heads * d.head_dim > d.n_qkv || d.head_dim % 2)
    return 0;
  std::vector<T> normed(M * H);
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp single
    tm::rows::add_rms_norm<T>(static_cast<const T*>(x), static_cast<const T*>(residual),
                              reinterpret_cast<const T*>(d.norm_weight), normed.data(),
                              static_cast<T*>(summed), M, H, eps, 1);
    share_of<kBf16>(M, normed.data(), H, ptr(d.w_qkv), ptr(d.bias_qkv), qkv, d.n_qkv, d.n_qkv, H,
                    d.cols_qkv);
#pragma omp barrier
#pragma omp single
    tm::rows::rotary<T>(static_cast<const T*>(qkv), d.n_qkv, static_cast<const T*>(cos),
                        static_cast<const T*>(sin), static_cast<T*>(rotated), M, d.rotated_heads,
                        d.head_dim, 1);
  }
  return 1;
}

#endif  // __AVX512F__

}  // namespace

extern "C" {

// summed (= x + residual; untouched without residual), qkv[M, n_qkv] and rotated[M,
// rotated_heads, head_dim] of the block above; 1 when done, 0 where it does not apply.
int tm_decode_qkv_f32(int64_t M, const float* x, const float* residual, float* summed, float* qkv,
                      float* rotated, const float* cos, const float* sin, const QkvBlock* block,
                      float eps, int num_threads) {
#if defined(__AVX512F__)
  return qkv_block<false>(M, x, residual, summed, qkv, rotated, cos, sin, *block, eps,
                          num_threads);
#else
  return 0;
#endif
}

int tm_decode_qkv_bf16(int64_t M, const uint16_t* x, const uint16_t* residual, uint16_t* summed,
                       uint16_t* qkv, uint16_t* rotated, const uint16_t* cos, const uint16_t* sin,
                       const QkvBlock* block, float eps, int num_threads) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return qkv_block<true>(M, x, residual, summed, qkv, rotated, cos, sin, *block, eps,
                         num_threads);
#else
  return 0;
#endif
}

// out[M, hidden] and summed[M, hidden] (= o_proj(a) + residual) of the block above, a[M, in_o]
// contiguous; 1 when
// done, 0 where it does not apply (the caller then runs the layers one by one).
int tm_decode_mlp_f32(int64_t M, const float* a, const float* residual, float* out, float* summed,
                      const MlpBlock* block, float eps, int num_threads) {
#if defined(__AVX512F__)
  return mlp_block<false>(M, a, residual, out, summed, *block, eps, num_threads);
#else
  return 0;
#endif
}

int tm_decode_mlp_bf16(int64_t M, const uint16_t* a, const uint16_t* residual, uint16_t* out,
                       uint16_t* summed, const MlpBlock* block, float eps, int num_threads) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return mlp_block<true>(M, a, residual, out, summed, *block, eps, num_threads);
#else
  return 0;
#endif
}

// Which kernels this build has: bit 0 fp32 (AVX-512F), bit 1 bf16 (AVX512-BF16).
int tm_skinny_available() {
  int bits = 0;
#if defined(__AVX512F__)
  bits |= 1;
#if defined(__AVX512BF16__)
  bits |= 2;
#endif
#endif
  return bits;
}

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) W^T + bias, W in the blocked layout above.
// Returns 1 when done, 0 where the kernel does not apply (the caller then uses its GEMM).
int tm_skinny_linear_f32(int64_t M, const float* x, int64_t ldx, const float* w, const float* bias,
                         float* y, int64_t ldy, int64_t N, int64_t K, int64_t block_cols,
                         int num_threads) {
#if defined(__AVX512F__)
  return skinny<false>(M, x, ldx, w, bias, y, ldy, N, K, block_cols, num_threads);
#else
  return 0;
#endif
}

int tm_skinny_linear_bf16(int64_t M, const uint16_t* x, int64_t ldx, const uint16_t* w,
                          const uint16_t* bias, uint16_t* y, int64_t ldy, int64_t N, int64_t K,
                          int64_t block_cols, int num_threads) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return skinny<true>(M, x, ldx, w, bias, y, ldy, N, K, block_cols, num_threads);
#else
  return 0;
#endif
}

}  // extern "C"
