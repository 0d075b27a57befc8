// A decode step's decoder layers as one native call (layers/decode_layers.py): for each layer,
// the fused input half (norm, q/k/v, rotary), the KV write, the paged decode attention and the
// fused output half (o_proj .. down), in that order, with nothing between them but pointer
// arithmetic. The four stages are the kernels the layers call one by one from Python
// (csrc/skinny_linear.cpp or csrc/gguf.cpp for the halves, csrc/paged_attention.cpp for the
// attention), reached through function pointers that layers/decode_layers.py takes from their
// libraries; so the result is the same bits, and at batch 1 the step no longer spends about a
// third of its time in the Python around them.
//
// Plain C ABI, called through ctypes. No OpenMP here: each kernel opens its own parallel region
// over the same libgomp team.

#include <cstdint>
#include <cstring>

namespace {

// the halves' signatures: plain (skinny_linear.cpp) and GGUF (gguf.cpp, an x_bf16 flag more)
using QkvPlain = int (*)(int64_t, const void*, const void*, void*, void*, void*, const void*,
                         const void*, const void*, float, int);
using QkvGguf = int (*)(int64_t, const void*, const void*, void*, void*, void*, const void*,
                        const void*, const void*, float, int, int);
using MlpPlain = int (*)(int64_t, const void*, const void*, void*, void*, const void*, float, int);
using MlpGguf = int (*)(int64_t, const void*, const void*, void*, void*, const void*, float, int,
                        int);
using KvWrite = int (*)(const char*, const char*, char*, const int64_t*, int64_t, int64_t, int64_t,
                        int64_t, int64_t, int64_t, int64_t, int);
using PagedDecode = int (*)(const void*, const void*, const int64_t*, const int32_t*, void*,
                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                            int);

}  // namespace

extern "C" {

// One layer, laid out by decode_layers.LayerPlan.
struct TmLayerPlan {
  int64_t qkv_gguf;  // 0: QkvPlain, 1: QkvGguf
  void* qkv_fn;
  const void* qkv_desc;
  int64_t mlp_gguf;
  void* mlp_fn;
  const void* mlp_desc;
  char* kv_cache;  // [2, kv_heads, num_slots, head_dim]
  int64_t num_slots;
  float qkv_eps, mlp_eps, scale, pad;
};

// One step, laid out by decode_layers.StepPlan. Buffers are the caller's, sized for M rows.
struct TmStepPlan {
  int64_t M, hidden, heads, kv_heads, head_dim, elem_bytes, x_bf16;
  void* write_fn;   // KvWrite
  void* decode_fn;  // PagedDecode for the model dtype
  const void* x0;   // [M, hidden] the embedding: layer 0's input and residual
  const void* cos;  // [M, head_dim]
  const void* sin;
  const int64_t* slots;   // [M] KV slot of each row's new token
  const int64_t* tables;  // [M, max_blocks]
  const int32_t* lens;    // [M] keys of each row, the new one included
  int64_t block_size, max_blocks;
  void* x;       // [M, hidden] a layer's input, the output half's output
  void* res_a;   // [M, hidden] the residual after the input half
  void* res_b;   // [M, hidden] the residual after the output half
  void* qkv;     // [M, (heads + 2 kv_heads) head_dim]
  void* rotated; // [M, heads + kv_heads, head_dim]
  void* q;       // [M, heads, head_dim] q made contiguous (M > 1)
  void* o;       // [M, heads, head_dim] attention output
  int64_t threads;
};

// Runs layers [0, num_layers). Returns 0 when done, with the last layer's output in `x` and its
// residual in `res_b`; otherwise 1 + 4 * layer + stage, stage 0/3 a half that did not apply (the
// caller runs the layers in Python again: the KV rows written so far are rewritten with the same
// values), 1 a KV slot outside the pool, 2 the attention kernel rejecting its arguments.
int64_t tm_decode_layers(const TmLayerPlan* layers, int64_t num_layers, const TmStepPlan* s) {
  const int64_t M = s->M, h = s->heads, kvh = s->kv_heads, d = s->head_dim, eb = s->elem_bytes;
  const int nt = static_cast<int>(s->threads);
  const int64_t rot_row = (h + kvh) * d, qkv_row = (h + 2 * kvh) * d;
  char* rotated = static_cast<char*>(s->rotated);
  char* qkv = static_cast<char*>(s->qkv);
  const char* q = rotated;
  if (M > 1) q = static_cast<const char*>(s->q);  // the rows' q heads, side by side
  for (int64_t i = 0; i < num_layers; ++i) {
    const TmLayerPlan& L = layers[i];
    const void* x = i ? s->x : s->x0;
    const void* res = i ? s->res_b : nullptr;  // layer 0: the input is its own residual
    int done = L.qkv_gguf
                   ? reinterpret_cast<QkvGguf>(L.qkv_fn)(M, x, res, s->res_a, qkv, rotated,
                                                         s->cos, s->sin, L.qkv_desc, L.qkv_eps,
                                                         static_cast<int>(s->x_bf16), nt)
                   : reinterpret_cast<QkvPlain>(L.qkv_fn)(M, x, res, s->res_a, qkv, rotated,
                                                          s->cos, s->sin, L.qkv_desc, L.qkv_eps,
                                                          nt);
    if (!done) return 1 + 4 * i;
    if (reinterpret_cast<KvWrite>(s->write_fn)(rotated + h * d * eb, qkv + (h + kvh) * d * eb,
                                               L.kv_cache, s->slots, M, kvh, d, L.num_slots,
                                               rot_row, qkv_row, eb, nt))
      return 1 + 4 * i + 1;
    if (M > 1)
      for (int64_t m = 0; m < M; ++m)
        std::memcpy(static_cast<char*>(s->q) + m * h * d * eb, rotated + m * rot_row * eb,
                    h * d * eb);
    if (reinterpret_cast<PagedDecode>(s->decode_fn)(q, L.kv_cache, s->tables, s->lens, s->o, M,
                                                    h, kvh, d, L.num_slots, s->block_size,
                                                    s->max_blocks, L.scale, nt))
      return 1 + 4 * i + 2;
    const void* residual = i ? s->res_a : s->x0;  // layer 0's: its input
    done = L.mlp_gguf
               ? reinterpret_cast<MlpGguf>(L.mlp_fn)(M, s->o, residual, s->x,
                                                     s->res_b, L.mlp_desc, L.mlp_eps,
                                                     static_cast<int>(s->x_bf16), nt)
               : reinterpret_cast<MlpPlain>(L.mlp_fn)(M, s->o, residual, s->x, s->res_b,
                                                      L.mlp_desc, L.mlp_eps, nt);
    if (!done) return 1 + 4 * i + 3;
  }
  return 0;
}

}  // extern "C"
