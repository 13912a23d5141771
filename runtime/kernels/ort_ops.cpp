// Our ONNX Runtime custom operators (domain "layerskip"), the kernels of our .pte in ONNX Runtime's calling convention:
//
// RowAttention -- GroupQueryAttention's job in our .onnx graphs (--onnx-kv-cache row), done by the attention of our
// .pte kernel (row_attention.h), so that a query row has the same bits whatever the number of rows in the call, at a
// fraction of ONNX Runtime's CPU cost for it.
// Inputs, as our graphs hand them to com.microsoft::GroupQueryAttention (export/onnx_attention.py):
//   qkv [1, T, (H + 2 H_kv) D] (q | k | v, not yet rotated), past_k, past_v [1, H_kv, S, D], seqlens_k [1] int32
//   (pos + T - 1), total_len [] int32 (pos + T), cos_cache, sin_cache [S', D/2] (S' >= pos + T).
// Outputs: attention [1, T, H D], present_k, present_v [1, H_kv, S, D]. The runtime binds each present output to
// its past buffer, and the op writes rows pos .. pos+T-1 in place; given another buffer it copies the past first.
// Attributes: num_heads, kv_num_heads. Rotary: HF's half-split layout. fp32, batch 1; KV heads in parallel in large
// calls.
//
// LinearQ4 -- MatMulNBits' job (--onnx-linear linear_q4), done by our 4-bit linear (linear_q4.h): the same 4-bit
// weights and scales (quant/onnx_schemes.py repacks them), activations quantized to 8 bits per row, each group's dot
// product in integers: a row has the same bits whatever the number of rows in the call, and all rows of a call share
// one pass over the weights. Inputs: x [..., K] fp32, weight [N/16, K/8, 64] uint8, scales [K/G, N] fp32, weight_sums
// [N] fp32 (linear_q4.cpp's header). Output [..., N]. Groups of output blocks in parallel in large calls of 3+ rows.
//
// DecoderLayer -- a whole Llama decoder layer of our int4 graphs in one node (export/onnx_fused_layer.py), as
// decoder_layer.cpp is for the .pte: x_out = h + down(silu(gate(n2)) * up(n2)), n2 = rms_norm(h), h = x + o(attend(
// qkv(rms_norm(x)))), through the same linear and attention as the ops above and the .pte kernel's norms and SiLU
// (layer_rows.h), each step row by row. Inputs: x [1, T, dim], the attention norm's weight [dim], the q|k|v linear
// (weight, scales, weight_sums), past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache (as RowAttention), the o
// linear, the MLP norm's weight, the gate, up and down linears. Outputs: x_out [1, T, dim], present_k, present_v.
// Attributes: num_heads, kv_num_heads, epsilon (the norms').
//
// Threads: the session's intra-op pool (SessionOptions.intra_op_num_threads), through KernelContext_ParallelFor on
// runtimes that serve API version 17 (ONNX Runtime >= 1.17), else this thread alone. A channel's or a head's
// arithmetic is the same whichever thread runs it, so the bits do not depend on the thread count.
//
// Built into its own library, without ExecuTorch (runtime/kernels: ort_ops_library), and registered with a session
// through SessionOptions.register_custom_ops_library, which calls RegisterCustomOps below.
#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <vector>

#include "layer_rows.h"
#include "linear_q4.h"
#include "ort_api.h"

namespace layerskip {
namespace {

using namespace ort_abi;

const Api* g_api = nullptr;
bool g_parallel = false;  // g_api serves KernelContext_ParallelFor

// body(i) for i in 0 .. tasks-1, on the session's intra-op threads where the runtime lends them, else in order here.
template <class Body>
void parallel_for(KernelContext* ctx, size_t tasks, const Body& body) {
  if (g_parallel && tasks > 1) {
    const auto call = [](void* b, size_t i) { (*static_cast<const Body*>(b))(static_cast<int64_t>(i)); };
    Status* status = fn<274, KernelContextParallelFor>(g_api)(ctx, call, tasks, 0,
                                                              const_cast<void*>(static_cast<const void*>(&body)));
    if (status == nullptr) return;
    fn<93, ReleaseStatus>(g_api)(status);  // refused before running anything (a minimal build): run it here
  }
  for (size_t i = 0; i < tasks; ++i) body(static_cast<int64_t>(i));
}

struct RowAttentionKernel {
  int64_t heads = 0, kv_heads = 0;
};

struct Tensor {
  void* data = nullptr;
  std::vector<int64_t> dims;
};

bool read_input(KernelContext* ctx, size_t index, Tensor& out) {
  const Value* value = nullptr;
  if (fn<90, KernelContextGetInput>(g_api)(ctx, index, &value) || value == nullptr) return false;
  TensorInfo* info = nullptr;
  if (fn<65, GetTensorTypeAndShape>(g_api)(value, &info)) return false;
  size_t rank = 0;
  bool ok = !fn<61, GetDimensionsCount>(g_api)(info, &rank);
  out.dims.assign(rank, 0);
  ok = ok && !fn<62, GetDimensions>(g_api)(info, out.dims.data(), rank);
  fn<99, ReleaseTensorInfo>(g_api)(info);
  return ok && !fn<51, GetTensorMutableData>(g_api)(const_cast<Value*>(value), &out.data);
}

float* output(KernelContext* ctx, size_t index, const std::vector<int64_t>& dims) {
  Value* value = nullptr;
  void* data = nullptr;
  if (fn<91, KernelContextGetOutput>(g_api)(ctx, index, dims.data(), dims.size(), &value) || value == nullptr ||
      fn<51, GetTensorMutableData>(g_api)(value, &data))
    return nullptr;
  return static_cast<float*>(data);
}

void poison(float* y, int64_t count) {  // no status to return at this API version: NaN outputs instead
  for (int64_t i = 0; i < count; ++i) y[i] = NAN;
}

// The present_k, present_v outputs (1, 2): the past buffers themselves where the runtime binds them so, else copies
// of the past; false where they cannot be had.
bool present_caches(KernelContext* ctx, const Tensor& past_k, const Tensor& past_v, float*& k_cache, float*& v_cache) {
  k_cache = output(ctx, 1, past_k.dims);
  v_cache = output(ctx, 2, past_k.dims);
  if (k_cache == nullptr || v_cache == nullptr) return false;
  size_t cache_bytes = sizeof(float);
  for (int64_t n : past_k.dims) cache_bytes *= static_cast<size_t>(n);
  if (k_cache != past_k.data) std::memcpy(k_cache, past_k.data, cache_bytes);
  if (v_cache != past_v.data) std::memcpy(v_cache, past_v.data, cache_bytes);
  return true;
}

// Rotates one head's row x [D] at rotary row (cos, sin) [D/2] into y: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin.
void rotate(const float* x, const float* cos, const float* sin, int64_t d, float* y) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    y[i] = x1 * cos[i] - x2 * sin[i];
    y[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

// Attention of t rows at positions pos .. pos+t-1: their q | k | v (not yet rotated) at qkv [t, (H + 2 H_kv) D]; k
// rotated and v written into the caches [H_kv, S, D] at those rows; the results [t, H D] at out.
void attend_qkv(KernelContext* ctx, const float* qkv, int64_t t, int64_t h, int64_t h_kv, int64_t d, int64_t s,
                int64_t pos, const float* cos_rows, const float* sin_rows, float* k_cache, float* v_cache, float* out) {
  // q rotated into a buffer [T, H, D]; k rotated and v copied into the caches at rows pos .. pos+T-1
  thread_local std::vector<float> q;
  q.resize(t * h * d);
  const int64_t width = (h + 2 * h_kv) * d;
  for (int64_t row = 0; row < t; ++row) {
    const float* xr = qkv + row * width;
    const float* c = cos_rows + (pos + row) * (d / 2);
    const float* sn = sin_rows + (pos + row) * (d / 2);
    for (int64_t head = 0; head < h; ++head) rotate(xr + head * d, c, sn, d, q.data() + (row * h + head) * d);
    for (int64_t kv = 0; kv < h_kv; ++kv) {
      float* k_row = k_cache + (kv * s + pos + row) * d;
      rotate(xr + (h + kv) * d, c, sn, d, k_row);
      std::memcpy(v_cache + (kv * s + pos + row) * d, xr + (h + h_kv + kv) * d, d * sizeof(float));
    }
  }
  // each KV head's queries (rows x the query heads that share it) over that head's [S, D] cache rows
  const int64_t group = h / h_kv, count = t * group;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float* rotated = q.data();  // this thread's buffer: `q` names another one in a pool thread
  const auto kv_head = [&](int64_t kv) {
    thread_local std::vector<float> w, acc;
    thread_local std::vector<const float*> queries;
    thread_local std::vector<float*> outs;
    thread_local std::vector<int64_t> keys;
    if (static_cast<int64_t>(w.size()) < count * s) w.resize(count * s);
    if (static_cast<int64_t>(acc.size()) < count * 2 * d) acc.resize(count * 2 * d);
    queries.resize(count);
    outs.resize(count);
    keys.resize(count);
    for (int64_t row = 0; row < t; ++row)
      for (int64_t g = 0; g < group; ++g) {
        const int64_t head = kv * group + g, i = row * group + g;
        queries[i] = rotated + (row * h + head) * d;
        outs[i] = out + (row * h + head) * d;
        keys[i] = pos + row + 1;
      }
    attend_queries(queries.data(), keys.data(), count, k_cache + kv * s * d, v_cache + kv * s * d, d, d, s, scale,
                   w.data(), acc.data(), outs.data());
  };
  // KV heads in parallel where the call's scores hold 2^20 multiply-adds or more (the 1B shape's 4-row verify, not
  // its 1-row call nor any call of the shipped model, where waking the pool per layer cost more than it saved)
  if (t * h * (pos + t) * d >= (int64_t{1} << 20)) {
    parallel_for(ctx, h_kv, kv_head);
  } else {
    for (int64_t kv = 0; kv < h_kv; ++kv) kv_head(kv);
  }
}

void attention(void* kernel_state, KernelContext* ctx) {
  const auto& kernel = *static_cast<RowAttentionKernel*>(kernel_state);
  Tensor qkv, past_k, past_v, total, cos, sin;
  if (!read_input(ctx, 0, qkv) || !read_input(ctx, 1, past_k) || !read_input(ctx, 2, past_v) ||
      !read_input(ctx, 4, total) || !read_input(ctx, 5, cos) || !read_input(ctx, 6, sin))
    return;
  const int64_t h = kernel.heads, h_kv = kernel.kv_heads;
  if (qkv.dims.size() != 3 || past_k.dims.size() != 4 || cos.dims.size() != 2 || h <= 0 || h_kv <= 0 || h % h_kv)
    return;
  const int64_t t = qkv.dims[1], s = past_k.dims[2], d = past_k.dims[3];
  const int64_t end = *static_cast<const int32_t*>(total.data), pos = end - t;
  float* out = output(ctx, 0, {1, t, h * d});
  if (out == nullptr) return;
  if (qkv.dims[2] != (h + 2 * h_kv) * d || past_k.dims[1] != h_kv || pos < 0 || end > s || end > cos.dims[0] ||
      cos.dims[1] * 2 != d) {
    return poison(out, t * h * d);
  }
  float *k_cache, *v_cache;
  if (!present_caches(ctx, past_k, past_v, k_cache, v_cache)) return;

  attend_qkv(ctx, static_cast<const float*>(qkv.data), t, h, h_kv, d, s, pos, static_cast<const float*>(cos.data),
             static_cast<const float*>(sin.data), k_cache, v_cache, out);
}

// A linear's weights (weight, scales, weight_sums: three inputs) as the last call found them. They are the node's
// initializers, whose buffers stay put for the session's life, so a call reads only their addresses (2 API calls each)
// and their shapes once: the shapes' 4 API calls and a heap allocation per input were a good part of a small linear's
// cost (the shipped model's forward call 231-233 -> 219-223 us; results/probe_ort_call_overhead.txt).
struct LinearWeights {
  const void* data[3] = {};
  int64_t k = -1, n = 0, groups = 0;  // k = -1: the weights do not make a linear
};

const void* input_data(KernelContext* ctx, size_t index) {
  const Value* value = nullptr;
  void* data = nullptr;
  if (fn<90, KernelContextGetInput>(g_api)(ctx, index, &value) || value == nullptr ||
      fn<51, GetTensorMutableData>(g_api)(const_cast<Value*>(value), &data))
    return nullptr;
  return data;
}

// The linear of inputs first .. first+2 into w (the caller holds the kernel's mutex: sessions may run concurrently);
// false where an input cannot be read.
bool linear_weights(KernelContext* ctx, size_t first, LinearWeights& w) {
  const void* data[3] = {input_data(ctx, first), input_data(ctx, first + 1), input_data(ctx, first + 2)};
  if (!data[0] || !data[1] || !data[2]) return false;
  if (std::equal(data, data + 3, w.data)) return true;
  Tensor weight, scales, sums;
  if (!read_input(ctx, first, weight) || !read_input(ctx, first + 1, scales) || !read_input(ctx, first + 2, sums) ||
      weight.dims.size() != 3 || scales.dims.size() != 2 || sums.dims.size() != 1)
    return false;
  w.k = weight.dims[1] * q4::kChunk;
  w.groups = scales.dims[0];
  w.n = scales.dims[1];
  if (weight.dims[0] * q4::kBlock != w.n || weight.dims[2] != 64 || sums.dims[0] != w.n || w.groups <= 0 ||
      w.k % (w.groups * q4::kChunk) != 0 || w.k >= (int64_t{1} << 19))
    w.k = -1;
  std::copy(data, data + 3, w.data);
  return true;
}

// y [rows, N] = x [rows, K] through the linear w (w.k = K).
void linear_rows(KernelContext* ctx, const float* x, int64_t rows, const LinearWeights& w, float* y) {
  const int64_t k = w.k, n = w.n;
  const q4::Rows quantized = q4::quantize_rows(x, rows, k, w.groups);
  const q4::Weights weights{static_cast<const uint8_t*>(w.data[0]), k / q4::kChunk, n / q4::kBlock};
  const q4::Scales sc{static_cast<const float*>(w.data[1]), static_cast<const float*>(w.data[2]), n, w.groups};
  // groups of 4 output blocks in parallel where q4::rows_in_parallel (as linear_q4.cpp's op on ExecuTorch's pool);
  // else here, sparing the pool's wake-ups
  const int64_t blocks = n / q4::kBlock, tasks = (blocks + q4::kGroup - 1) / q4::kGroup;
  if (q4::rows_in_parallel(rows, k, n)) {
    parallel_for(ctx, tasks, [&](int64_t task) {
      q4::blocks(quantized, rows, weights, sc, task * q4::kGroup, std::min(blocks, (task + 1) * q4::kGroup), y);
    });
  } else {
    q4::blocks(quantized, rows, weights, sc, 0, blocks, y);
  }
}

struct LinearQ4Kernel {
  std::mutex mutex;
  LinearWeights weights;
};

void linear_q4(void* kernel_state, KernelContext* ctx) {
  auto& kernel = *static_cast<LinearQ4Kernel*>(kernel_state);
  Tensor x;
  if (!read_input(ctx, 0, x) || x.dims.empty()) return;
  LinearWeights w;
  {
    std::lock_guard<std::mutex> lock(kernel.mutex);
    if (!linear_weights(ctx, 1, kernel.weights)) return;
    w = kernel.weights;
  }
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x.dims.size(); ++i) rows *= x.dims[i];
  std::vector<int64_t> out_dims(x.dims);
  out_dims.back() = w.n;
  float* y = output(ctx, 0, out_dims);
  if (y == nullptr) return;
  if (w.k != x.dims.back()) return poison(y, rows * w.n);
  linear_rows(ctx, static_cast<const float*>(x.data), rows, w, y);
}

// DecoderLayer's kernel: its attributes and its five linears' weights as the last call found them.
struct DecoderLayerKernel {
  int64_t heads = 0, kv_heads = 0;
  float eps = 0.f;
  std::mutex mutex;
  LinearWeights qkv, o, gate, up, down;
};

bool has_dims(const Tensor& x, std::initializer_list<int64_t> dims) {
  return std::equal(x.dims.begin(), x.dims.end(), dims.begin(), dims.end());
}

void decoder_layer(void* kernel_state, KernelContext* ctx) {
  auto& kernel = *static_cast<DecoderLayerKernel*>(kernel_state);
  Tensor x, attn_norm, past_k, past_v, total, cos, sin, mlp_norm;
  if (!read_input(ctx, 0, x) || !read_input(ctx, 1, attn_norm) || !read_input(ctx, 5, past_k) ||
      !read_input(ctx, 6, past_v) || !read_input(ctx, 8, total) || !read_input(ctx, 9, cos) ||
      !read_input(ctx, 10, sin) || !read_input(ctx, 14, mlp_norm))
    return;
  LinearWeights qkv, o, gate, up, down;
  {
    std::lock_guard<std::mutex> lock(kernel.mutex);
    if (!linear_weights(ctx, 2, kernel.qkv) || !linear_weights(ctx, 11, kernel.o) ||
        !linear_weights(ctx, 15, kernel.gate) || !linear_weights(ctx, 18, kernel.up) ||
        !linear_weights(ctx, 21, kernel.down))
      return;
    qkv = kernel.qkv, o = kernel.o, gate = kernel.gate, up = kernel.up, down = kernel.down;
  }
  const int64_t h = kernel.heads, h_kv = kernel.kv_heads;
  if (x.dims.size() != 3 || x.dims[0] != 1 || past_k.dims.size() != 4 || cos.dims.size() != 2 || h <= 0 || h_kv <= 0 ||
      h % h_kv)
    return;
  const int64_t t = x.dims[1], dim = x.dims[2], s = past_k.dims[2], d = past_k.dims[3], width = gate.n;
  const int64_t end = *static_cast<const int32_t*>(total.data), pos = end - t;
  float* y = output(ctx, 0, x.dims);
  if (y == nullptr) return;
  if (past_k.dims[1] != h_kv || pos < 0 || end > s || end > cos.dims[0] || cos.dims[1] * 2 != d ||
      !has_dims(attn_norm, {dim}) || !has_dims(mlp_norm, {dim}) || qkv.k != dim || qkv.n != (h + 2 * h_kv) * d ||
      o.k != h * d || o.n != dim || gate.k != dim || up.k != dim || up.n != width || down.k != width || down.n != dim)
    return poison(y, t * dim);
  float *k_cache, *v_cache;
  if (!present_caches(ctx, past_k, past_v, k_cache, v_cache)) return;

  thread_local std::vector<float> normed, qkv_rows, attended, g, u, act, delta;
  normed.resize(t * dim);
  qkv_rows.resize(t * qkv.n);
  attended.resize(t * h * d);
  g.resize(t * width);
  u.resize(t * width);
  act.resize(t * width);
  delta.resize(t * dim);
  const float* xp = static_cast<const float*>(x.data);
  // attention: h = x + o(attend(q, k, v)), q | k | v = qkv(rms_norm(x))
  rms_norm(xp, static_cast<const float*>(attn_norm.data), t, dim, kernel.eps, normed.data());
  linear_rows(ctx, normed.data(), t, qkv, qkv_rows.data());
  attend_qkv(ctx, qkv_rows.data(), t, h, h_kv, d, s, pos, static_cast<const float*>(cos.data),
             static_cast<const float*>(sin.data), k_cache, v_cache, attended.data());
  linear_rows(ctx, attended.data(), t, o, delta.data());
  for (int64_t i = 0; i < t * dim; ++i) y[i] = xp[i] + delta[i];
  // MLP: out = h + down(silu(gate(n)) * up(n)), n = rms_norm(h)
  rms_norm(y, static_cast<const float*>(mlp_norm.data), t, dim, kernel.eps, normed.data());
  linear_rows(ctx, normed.data(), t, gate, g.data());
  linear_rows(ctx, normed.data(), t, up, u.data());
  for (int64_t r = 0; r < t; ++r) silu_mul(g.data() + r * width, u.data() + r * width, width, act.data() + r * width);
  linear_rows(ctx, act.data(), t, down, delta.data());
  for (int64_t i = 0; i < t * dim; ++i) y[i] += delta[i];
}

void* create_decoder_layer(const CustomOp*, const Api* api, const KernelInfo* info) {
  auto* kernel = new DecoderLayerKernel;
  if (fn<86, KernelInfoGetAttributeInt64>(api)(info, "num_heads", &kernel->heads)) kernel->heads = 0;
  if (fn<86, KernelInfoGetAttributeInt64>(api)(info, "kv_num_heads", &kernel->kv_heads)) kernel->kv_heads = 0;
  if (fn<85, KernelInfoGetAttributeFloat>(api)(info, "epsilon", &kernel->eps)) kernel->heads = 0;  // refused above
  return kernel;
}

void* create_attention(const CustomOp*, const Api* api, const KernelInfo* info) {
  auto* kernel = new RowAttentionKernel;
  if (fn<86, KernelInfoGetAttributeInt64>(api)(info, "num_heads", &kernel->heads)) kernel->heads = 0;
  if (fn<86, KernelInfoGetAttributeInt64>(api)(info, "kv_num_heads", &kernel->kv_heads)) kernel->kv_heads = 0;
  return kernel;
}

// An op as ONNX Runtime sees it (CustomOp, first, so that its callbacks find the rest from the pointer they get):
// name, input types, output count (all fp32), and its kernel's life cycle. Every input and output is required.
struct OpSpec {
  CustomOp op;
  const char* name;
  const ElementType* inputs;
  size_t input_count, output_count;
};

const OpSpec& spec(const CustomOp* op) { return *reinterpret_cast<const OpSpec*>(op); }

constexpr OpSpec make_op(const char* name, const ElementType* inputs, size_t input_count, size_t output_count,
                         void* (*create)(const CustomOp*, const Api*, const KernelInfo*),
                         void (*run)(void*, KernelContext*), void (*destroy)(void*)) {
  return OpSpec{{kApiVersion, create, [](const CustomOp* op) { return spec(op).name; },
                 [](const CustomOp*) -> const char* { return nullptr; },
                 [](const CustomOp* op, size_t i) { return spec(op).inputs[i]; },
                 [](const CustomOp* op) { return spec(op).input_count; },
                 [](const CustomOp*, size_t) { return kFloat; },
                 [](const CustomOp* op) { return spec(op).output_count; }, run, destroy,
                 [](const CustomOp*, size_t) { return kRequired; }, [](const CustomOp*, size_t) { return kRequired; },
                 [](const CustomOp*, size_t) { return kMemDefault; }},
                name, inputs, input_count, output_count};
}

constexpr ElementType kAttentionInputs[] = {kFloat, kFloat, kFloat, kInt32, kInt32, kFloat, kFloat};
constexpr ElementType kLinearInputs[] = {kFloat, kUint8, kFloat, kFloat};
constexpr ElementType kLayerInputs[] = {kFloat, kFloat, kUint8, kFloat, kFloat, kFloat, kFloat, kInt32, kInt32, kFloat,
                                        kFloat, kUint8, kFloat, kFloat, kFloat, kUint8, kFloat, kFloat, kUint8, kFloat,
                                        kFloat, kUint8, kFloat, kFloat};

const OpSpec kOps[] = {
    make_op("RowAttention", kAttentionInputs, 7, 3, create_attention, attention,
            [](void* kernel) { delete static_cast<RowAttentionKernel*>(kernel); }),
    make_op("LinearQ4", kLinearInputs, 4, 1,
            [](const CustomOp*, const Api*, const KernelInfo*) -> void* { return new LinearQ4Kernel; }, linear_q4,
            [](void* kernel) { delete static_cast<LinearQ4Kernel*>(kernel); }),
    make_op("DecoderLayer", kLayerInputs, 24, 3, create_decoder_layer, decoder_layer,
            [](void* kernel) { delete static_cast<DecoderLayerKernel*>(kernel); }),
};

CustomOpDomain* g_domain = nullptr;  // lives as long as the process: sessions may outlive any one registration

}  // namespace
}  // namespace layerskip

extern "C" __attribute__((visibility("default"))) ort_abi::Status* RegisterCustomOps(
    ort_abi::SessionOptions* options, const ort_abi::ApiBase* base) {
  using namespace ort_abi;
  using layerskip::g_api;
  using layerskip::g_domain;
  using layerskip::g_parallel;
  g_api = base->GetApi(kParallelApiVersion);  // the same table, longer; runtimes before 1.17 serve only the first part
  g_parallel = g_api != nullptr;
  if (g_api == nullptr) g_api = base->GetApi(kApiVersion);
  if (g_api == nullptr) return nullptr;  // cannot happen on runtimes >= 1.13; nothing to report the error with
  if (g_domain == nullptr) {
    if (Status* s = fn<26, CreateCustomOpDomain>(g_api)("layerskip", &g_domain)) return s;
    for (const auto& spec : layerskip::kOps)
      if (Status* s = fn<27, CustomOpDomainAdd>(g_api)(g_domain, &spec.op)) return s;
  }
  return fn<28, AddCustomOpDomain>(g_api)(options, g_domain);
}
