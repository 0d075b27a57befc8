// One decode step of a Mamba-2 mixer for a batch of sequences, each with its state in a slot:
// the causal depthwise conv over the kept inputs and the new one (then SiLU), and the selective
// state-space update with its output, y = C . h + D x. It follows layers/mamba.py's
// `_decode_step` (the torch reference it is checked against): all in float32, the conv state
// included; only the order of the sums differs.
//
// Eager torch runs this as about 25 small ops per layer and step, and on a 129M model spends
// more time dispatching them than the weights take to stream. Here: one pass over the conv
// channels, then one over (sequence, head) pairs, each reading and writing its [head_dim, state]
// state once.
//
// Built at run time by tokenmill/layers/native.py; plain C ABI, called through ctypes.

#include <cmath>
#include <cstdint>
#include <vector>

extern "C" {

// xbc [b, conv_dim] (row stride xbc_stride), conv_state [slots, conv_dim, k - 1],
// conv_w [conv_dim, k], conv_b [conv_dim] or null, dt [b, heads] (after softplus and clamp),
// A [heads], D [heads], ssm_state [slots, heads, head_dim, state], slots [b];
// y [b, heads * head_dim] out.
void ssm_decode_step(const float* xbc, int64_t xbc_stride, float* conv_state, const float* conv_w,
                     const float* conv_b, const float* dt, const float* A, const float* D,
                     float* ssm_state, const int64_t* slots, float* y, int64_t b,
                     int64_t conv_dim, int64_t kernel, int64_t heads, int64_t head_dim,
                     int64_t state, int64_t groups, int num_threads) {
  const int64_t kept = kernel - 1;
  const int64_t inner = heads * head_dim;
  std::vector<float> conv(b * conv_dim);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t rc = 0; rc < b * conv_dim; ++rc) {
    const int64_t r = rc / conv_dim, c = rc % conv_dim;
    float* kept_in = conv_state + (slots[r] * conv_dim + c) * kept;
    const float* w = conv_w + c * kernel;
    const float x = xbc[r * xbc_stride + c];
    float acc = conv_b ? conv_b[c] : 0.f;
    for (int64_t j = 0; j < kept; ++j) acc += w[j] * kept_in[j];
    acc += w[kept] * x;
    for (int64_t j = 0; j + 1 < kept; ++j) kept_in[j] = kept_in[j + 1];
    if (kept > 0) kept_in[kept - 1] = x;
    conv[rc] = acc / (1.f + std::exp(-acc));  // SiLU
  }
  const int64_t per_group = heads / groups;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t rh = 0; rh < b * heads; ++rh) {
    const int64_t r = rh / heads, h = rh % heads, g = h / per_group;
    const float* row = conv.data() + r * conv_dim;
    const float* x = row + h * head_dim;
    const float* B = row + inner + g * state;
    const float* C = row + inner + groups * state + g * state;
    const float d = dt[r * heads + h];
    const float decay = std::exp(d * A[h]);
    float* hs = ssm_state + ((slots[r] * heads + h) * head_dim) * state;
    float* out = y + r * inner + h * head_dim;
    for (int64_t i = 0; i < head_dim; ++i) {
      const float dx = d * x[i];
      float* hi = hs + i * state;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < state; ++j) {
        const float v = hi[j] * decay + dx * B[j];
        hi[j] = v;
        acc += v * C[j];
      }
      out[i] = acc + D[h] * x[i];
    }
  }
}
}
