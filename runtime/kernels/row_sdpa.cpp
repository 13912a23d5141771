// layerskip::row_sdpa.out -- causal attention over a KV cache in which a query row's result has the same bits
// whatever the number of rows in the call: row t (position p = start_pos + t) attends keys 0 .. p, and every
// operation on it (its scores, their max, exp, sum, and the weighted sum of values) runs in an order that
// depends only on p. So a token gets the same bits in a d+1-token verify as decoded alone, and greedy
// self-speculation equals plain decoding by construction, at the cost of plain attention.
// (llama::custom_sdpa picks its blocking by the number of query rows, so its rows do not.)
//
// Paths: one attention written over a lane width (Lanes16: AVX-512, where the compiler targets it; else Lanes8:
// AVX2/FMA), for head_dim 32 / 64 / 128; a portable loop otherwise. The width fixes every reduction order and a build
// has one, so all calls of a process agree. ExecuTorch's planned buffers sit 16 bytes past a 64-byte line (glibc's
// large allocations), where a 64-byte load of a cache row straddles two lines: the AVX-512 path reads rows by aligned
// loads shifted in registers (load_row), and with several queries per KV head each block of rows is copied once to
// an aligned buffer; both move bytes only, so the bits do not depend on where the cache lies.
//
// q: [1, T, H, D]; k_cache, v_cache: [1, S, H_kv, D] (llama::update_cache's layout, rows < start_pos + T
// written); out: [1, T, H, D]. fp32. Query head h reads KV head h / (H / H_kv).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include "et_kernels.h"
#include "row_attention.h"

namespace layerskip {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

void attend_rows(const float* q, int64_t q_stride, int64_t t, int64_t h, int64_t d, const float* k_cache,
                 const float* v_cache, int64_t s, int64_t h_kv, int64_t start_pos, float* out) {
  const int64_t group = h / h_kv, stride = h_kv * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // KV heads in parallel (ExecuTorch's thread pool, as its own kernels use it): each query's arithmetic is the same
  // whichever thread runs it
  executorch::extension::parallel_for(0, h_kv, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> w, acc;
    thread_local std::vector<const float*> queries;
    thread_local std::vector<float*> outs;
    thread_local std::vector<int64_t> keys;
    const int64_t count = t * group;  // the queries of one KV head: rows x the query heads that share it
    if (static_cast<int64_t>(w.size()) < count * s) w.resize(count * s);
    if (static_cast<int64_t>(acc.size()) < count * 2 * d) acc.resize(count * 2 * d);
    queries.resize(count);
    outs.resize(count);
    keys.resize(count);
    for (int64_t kv = begin; kv < end; ++kv) {
      for (int64_t row = 0; row < t; ++row)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t head = kv * group + g, i = row * group + g;
          queries[i] = q + row * q_stride + head * d;
          outs[i] = out + (row * h + head) * d;
          keys[i] = start_pos + row + 1;
        }
      attend_queries(queries.data(), keys.data(), count, k_cache + kv * d, v_cache + kv * d, d, stride, s, scale,
                     w.data(), acc.data(), outs.data());
    }
  });
}

Tensor& row_sdpa_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                     int64_t start_pos, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, InvalidArgument, out,
                      "row_sdpa: q and the caches must be 4-D");
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == ScalarType::Float && k_cache.scalar_type() == ScalarType::Float &&
                      v_cache.scalar_type() == ScalarType::Float, InvalidArgument, out, "row_sdpa: fp32 only");
  const int64_t t = q.size(1), h = q.size(2), d = q.size(3);
  const int64_t s = k_cache.size(1), h_kv = k_cache.size(2);
  ET_KERNEL_CHECK_MSG(ctx, k_cache.size(3) == d && h % h_kv == 0 && start_pos >= 0 && start_pos + t <= s,
                      InvalidArgument, out, "row_sdpa: shapes or start_pos out of range");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == executorch::runtime::Error::Ok,
                  InvalidArgument, out);
  attend_rows(q.const_data_ptr<float>(), h * d, t, h, d, k_cache.const_data_ptr<float>(),
              v_cache.const_data_ptr<float>(), s, h_kv, start_pos, out.mutable_data_ptr<float>());
  return out;
}

}  // namespace layerskip

EXECUTORCH_LIBRARY(layerskip, "row_sdpa.out", layerskip::row_sdpa_out);
