// layerskip::row_sdpa.out -- causal attention over a KV cache in which a query row's result has the same bits
// whatever the number of rows in the call: row t (position p = start_pos + t) attends keys 0 .. p, and every
// operation on it (its scores, their max, exp, sum, and the weighted sum of values) runs in an order that
// depends only on p. So a token gets the same bits in a d+1-token verify as decoded alone, and greedy
// self-speculation equals plain decoding by construction, at the cost of plain attention.
// (llama::custom_sdpa picks its blocking by the number of query rows, so its rows do not.)
//
// Paths: AVX-512 (16 lanes) where the compiler targets it, else AVX2/FMA (8 lanes), for head_dim 32 / 64 / 128;
// a portable loop otherwise. Which path runs is fixed per build, so all calls of a process agree. ExecuTorch's
// planned buffers sit 16 bytes past a 64-byte line (glibc's large allocations), where every 64-byte load of a
// cache row would straddle two lines: the AVX-512 path reads rows by aligned loads shifted in registers
// (load_row), and with several queries per KV head copies each block of rows once to an aligned buffer; both
// move bytes only, so the bits do not depend on where the cache lies.
//
// q: [1, T, H, D]; k_cache, v_cache: [1, S, H_kv, D] (llama::update_cache's layout, rows < start_pos + T
// written); out: [1, T, H, D]. fp32. Query head h reads KV head h / (H / H_kv).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ROW_SDPA_AVX2 1
#endif

namespace layerskip {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

#ifdef ROW_SDPA_AVX2
inline float hsum(__m256 v) {  // fixed order: (lo + hi), then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp for x <= 0 (Cephes' polynomial, as in avx_mathfun): ~1 ulp, and the same bits for the same x.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

#ifdef ROW_SDPA_AVX2
// The four sums of a0..a3's lanes, each added in the same order: [sum a0, sum a1, sum a2, sum a3].
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// Queries of one KV head, d = 8 * C: for each query i, out_i = softmax(q_i . K[0 .. n_i) * scale) @ V[0 .. n_i).
// Keys go in blocks of KEY_BLOCK that every query reads while they are in the L1 cache; inside one query,
// scores go four keys at a time (a last group of fewer reads key 0 in the missing places and drops those
// scores) and values two at a time (even and odd keys in two sums, added at the end), so what a query
// computes depends only on its n (position + 1), never on the other queries of the call.
constexpr int64_t KEY_BLOCK = 32;  // a multiple of 8: 8 KB of K (and of V) per block at d = 64

template <int C>
void attend_queries_avx2(const float* const* q, const int64_t* n, int64_t count, const float* k, const float* v,
                         int64_t stride, int64_t cache_rows, float scale, float* w, float* acc,
                         float* const* out) {
  const int64_t keys = n[count - 1] > n[0] ? n[count - 1] : n[0];
  thread_local std::vector<float> maxes, sums;  // per query: 4 running maxes (by key % 4), then the sum
  maxes.assign(count * 4, -INFINITY);
  sums.resize(count);
  for (int64_t block = 0; block < keys; block += KEY_BLOCK) {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t end = block + KEY_BLOCK < n[i] ? block + KEY_BLOCK : n[i];
      if (block >= end) continue;
      __m256 qc[C];
      for (int c = 0; c < C; ++c) qc[c] = _mm256_loadu_ps(q[i] + 8 * c);
      float* wi = w + i * cache_rows;
      __m128 m = _mm_loadu_ps(&maxes[i * 4]);
      for (int64_t j = block; j < end; j += 4) {
        const float* k0 = k + j * stride;
        const float* k1 = j + 1 < n[i] ? k0 + stride : k;
        const float* k2 = j + 2 < n[i] ? k0 + 2 * stride : k;
        const float* k3 = j + 3 < n[i] ? k0 + 3 * stride : k;
        __m256 a0 = _mm256_mul_ps(qc[0], _mm256_loadu_ps(k0));
        __m256 a1 = _mm256_mul_ps(qc[0], _mm256_loadu_ps(k1));
        __m256 a2 = _mm256_mul_ps(qc[0], _mm256_loadu_ps(k2));
        __m256 a3 = _mm256_mul_ps(qc[0], _mm256_loadu_ps(k3));
        for (int c = 1; c < C; ++c) {
          a0 = _mm256_fmadd_ps(qc[c], _mm256_loadu_ps(k0 + 8 * c), a0);
          a1 = _mm256_fmadd_ps(qc[c], _mm256_loadu_ps(k1 + 8 * c), a1);
          a2 = _mm256_fmadd_ps(qc[c], _mm256_loadu_ps(k2 + 8 * c), a2);
          a3 = _mm256_fmadd_ps(qc[c], _mm256_loadu_ps(k3 + 8 * c), a3);
        }
        const __m128 s = _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(scale));
        if (j + 4 <= n[i]) {
          _mm_storeu_ps(wi + j, s);
          m = _mm_max_ps(m, s);
        } else {  // the last keys: their scores, and the max over them only
          alignas(16) float four[4];
          _mm_store_ps(four, s);
          for (int64_t t = 0; t < n[i] - j; ++t) {
            wi[j + t] = four[t];
            m = _mm_max_ps(m, _mm_set1_ps(four[t]));
          }
        }
      }
      _mm_storeu_ps(&maxes[i * 4], m);
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    const __m128 mi = _mm_loadu_ps(&maxes[i * 4]);
    __m128 m4 = _mm_max_ps(mi, _mm_movehl_ps(mi, mi));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float m = _mm_cvtss_f32(m4);  // a max is exact in any order
    // w = exp(s - m) and their sum: 8 lanes by j % 8, then a fixed reduction, then the tail in order
    float* wi = w + i * cache_rows;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sumv = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n[i]; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(wi + j), mv));
      _mm256_storeu_ps(wi + j, e);
      sumv = _mm256_add_ps(sumv, e);
    }
    float sum = hsum(sumv);
    if (j < n[i]) {
      alignas(32) float tail[8];
      for (int64_t t = 0; t < 8; ++t) tail[t] = j + t < n[i] ? wi[j + t] - m : -INFINITY;
      _mm256_store_ps(tail, exp_nonpositive(_mm256_load_ps(tail)));
      for (int64_t t = j; t < n[i]; ++t) {
        wi[t] = tail[t - j];
        sum += wi[t];
      }
    }
    sums[i] = sum;
  }
  // out_i = sum_j w_ij V_j / sum_i; the two sums of each query kept in acc between blocks (stored exactly)
  for (int64_t i = 0; i < count * 2 * 8 * C; ++i) acc[i] = 0.f;
  for (int64_t block = 0; block < keys; block += KEY_BLOCK) {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t end = block + KEY_BLOCK < n[i] ? block + KEY_BLOCK : n[i];
      if (block >= end) continue;
      const float* wi = w + i * cache_rows;
      float* ai = acc + i * 2 * 8 * C;
      __m256 acc0[C], acc1[C];
      for (int c = 0; c < C; ++c) {
        acc0[c] = _mm256_loadu_ps(ai + 8 * c);
        acc1[c] = _mm256_loadu_ps(ai + 8 * (C + c));
      }
      int64_t j = block;
      for (; j + 2 <= end; j += 2) {
        const __m256 w0 = _mm256_set1_ps(wi[j]), w1 = _mm256_set1_ps(wi[j + 1]);
        const float* v0 = v + j * stride;
        const float* v1 = v0 + stride;
        for (int c = 0; c < C; ++c) {
          acc0[c] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v0 + 8 * c), acc0[c]);
          acc1[c] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(v1 + 8 * c), acc1[c]);
        }
      }
      if (j < end) {  // an odd n's last key (blocks are even)
        const __m256 w0 = _mm256_set1_ps(wi[j]);
        for (int c = 0; c < C; ++c) acc0[c] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v + j * stride + 8 * c), acc0[c]);
      }
      for (int c = 0; c < C; ++c) {
        _mm256_storeu_ps(ai + 8 * c, acc0[c]);
        _mm256_storeu_ps(ai + 8 * (C + c), acc1[c]);
      }
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    const float* ai = acc + i * 2 * 8 * C;
    const __m256 inv = _mm256_set1_ps(1.0f / sums[i]);
    for (int c = 0; c < C; ++c) {
      const __m256 sum = _mm256_add_ps(_mm256_loadu_ps(ai + 8 * c), _mm256_loadu_ps(ai + 8 * (C + c)));
      _mm256_storeu_ps(out[i] + 8 * c, _mm256_mul_ps(sum, inv));
    }
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define ROW_SDPA_AVX512 1
inline __m512 exp_nonpositive(__m512 x) {  // the same polynomial, 16 lanes
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3365f));
  __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, z, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// The eight sums of a0..a7's 16 lanes, each by the same tree: [sum a0, ..., sum a7].
inline __m256 hsum8(__m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 a4, __m512 a5, __m512 a6, __m512 a7) {
  // 16 -> 8 lanes: b01 = [a0 (quads 0+2, 1+3), a1 (...)]
  const __m512 b01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 b23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  const __m512 b45 = _mm512_add_ps(_mm512_shuffle_f32x4(a4, a5, 0x44), _mm512_shuffle_f32x4(a4, a5, 0xEE));
  const __m512 b67 = _mm512_add_ps(_mm512_shuffle_f32x4(a6, a7, 0x44), _mm512_shuffle_f32x4(a6, a7, 0xEE));
  // 8 -> 4 lanes: quad i of c0 = a_i folded to 4 lanes (i = 0..3), of c4 = a_{4+i}
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b01, b23, 0x88), _mm512_shuffle_f32x4(b01, b23, 0xDD));
  const __m512 c4 = _mm512_add_ps(_mm512_shuffle_f32x4(b45, b67, 0x88), _mm512_shuffle_f32x4(b45, b67, 0xDD));
  // 4 -> 1: per quad i, r = [c0[0]+c0[2], c4[0]+c4[2], c0[1]+c0[3], c4[1]+c4[3]], then lanes 0+2 and 1+3
  const __m512 r = _mm512_add_ps(_mm512_unpacklo_ps(c0, c4), _mm512_unpackhi_ps(c0, c4));
  const __m512 s = _mm512_add_ps(r, _mm512_permute_ps(r, 0x4E));  // quad i: [sum a_i, sum a_{4+i}, ...]
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, s));
}

// A row of 16 * C floats at p, as C vectors, read by aligned loads when p is M floats past a 64-byte boundary
// (M = 0, 4, 8, 12; -1: unknown, plain unaligned loads). Only how the row is read depends on M, not its values.
template <int C, int M>
inline void load_row(const float* p, __m512* r) {
  if constexpr (M < 0) {
    for (int c = 0; c < C; ++c) r[c] = _mm512_loadu_ps(p + 16 * c);
  } else if constexpr (M == 0) {
    for (int c = 0; c < C; ++c) r[c] = _mm512_load_ps(p + 16 * c);
  } else {  // C + 1 aligned lines (each holds a float of the row, so none faults), shifted together
    const float* base = p - M;
    __m512i lo = _mm512_castps_si512(_mm512_load_ps(base));
    for (int c = 0; c < C; ++c) {
      const __m512i hi = _mm512_castps_si512(_mm512_load_ps(base + 16 * (c + 1)));
      r[c] = _mm512_castsi512_ps(_mm512_alignr_epi32(hi, lo, M));
      lo = hi;
    }
  }
}

// The scores of keys [block, block + KEY_BLOCK) for every query, 8 keys at a time: w[i][j] = scale * q_i . k_j
// for j < n_i; maxes: per query 8 running maxes by key % 8. Key j's row is at rows + (j - block) * stride.
template <int C, int M>
void block_scores(const float* const* q, const int64_t* n, int64_t count, int64_t block, const float* rows,
                  int64_t stride, int64_t cache_rows, float scale, float* w, float* maxes) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t end = block + KEY_BLOCK < n[i] ? block + KEY_BLOCK : n[i];
    if (block >= end) continue;
    __m512 qc[C];
    for (int c = 0; c < C; ++c) qc[c] = _mm512_loadu_ps(q[i] + 16 * c);
    float* wi = w + i * cache_rows;
    __m256 m = _mm256_loadu_ps(maxes + i * 8);
    for (int64_t j = block; j < end; j += 8) {
      __m512 a[8];
      for (int t = 0; t < 8; ++t) {  // past n, the block's first key fills in (its score is dropped)
        __m512 kr[C];
        load_row<C, M>(j + t < n[i] ? rows + (j + t - block) * stride : rows, kr);
        a[t] = _mm512_mul_ps(qc[0], kr[0]);
        for (int c = 1; c < C; ++c) a[t] = _mm512_fmadd_ps(qc[c], kr[c], a[t]);
      }
      const __m256 s = _mm256_mul_ps(hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]), _mm256_set1_ps(scale));
      if (j + 8 <= n[i]) {
        _mm256_storeu_ps(wi + j, s);
        m = _mm256_max_ps(m, s);
      } else {  // the last keys: their scores, and the max over them only
        alignas(32) float eight[8];
        _mm256_store_ps(eight, s);
        for (int64_t t = 0; t < n[i] - j; ++t) {
          wi[j + t] = eight[t];
          m = _mm256_max_ps(m, _mm256_set1_ps(eight[t]));
        }
      }
    }
    _mm256_storeu_ps(maxes + i * 8, m);
  }
}

// acc_i += sum_j w_ij V_j over keys [block, block + KEY_BLOCK), key j into sum j % 2 (two sums of 16 * C floats
// per query). Key j's row is at rows + (j - block) * stride.
template <int C, int M>
void block_values(const int64_t* n, int64_t count, int64_t block, const float* rows, int64_t stride,
                  int64_t cache_rows, const float* w, float* acc) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t end = block + KEY_BLOCK < n[i] ? block + KEY_BLOCK : n[i];
    if (block >= end) continue;
    const float* wi = w + i * cache_rows;
    float* ai = acc + i * 2 * 16 * C;
    __m512 a0[C], a1[C];
    for (int c = 0; c < C; ++c) {
      a0[c] = _mm512_loadu_ps(ai + 16 * c);
      a1[c] = _mm512_loadu_ps(ai + 16 * (C + c));
    }
    int64_t j = block;
    for (; j + 2 <= end; j += 2) {
      __m512 v0[C], v1[C];
      load_row<C, M>(rows + (j - block) * stride, v0);
      load_row<C, M>(rows + (j + 1 - block) * stride, v1);
      const __m512 w0 = _mm512_set1_ps(wi[j]), w1 = _mm512_set1_ps(wi[j + 1]);
      for (int c = 0; c < C; ++c) {
        a0[c] = _mm512_fmadd_ps(w0, v0[c], a0[c]);
        a1[c] = _mm512_fmadd_ps(w1, v1[c], a1[c]);
      }
    }
    if (j < end) {  // an odd n's last key (blocks are even)
      __m512 v0[C];
      load_row<C, M>(rows + (j - block) * stride, v0);
      const __m512 w0 = _mm512_set1_ps(wi[j]);
      for (int c = 0; c < C; ++c) a0[c] = _mm512_fmadd_ps(w0, v0[c], a0[c]);
    }
    for (int c = 0; c < C; ++c) {
      _mm512_storeu_ps(ai + 16 * c, a0[c]);
      _mm512_storeu_ps(ai + 16 * (C + c), a1[c]);
    }
  }
}

// Both phases block by block over a cache whose rows sit M floats past a 64-byte line. With PACK_QUERIES queries or
// more, a misaligned block is first copied to an aligned buffer (shifted once, then read by every query from L1;
// fewer queries measured faster shifting each row as they read it). Only where the rows are read from differs.
constexpr int64_t PACK_QUERIES = 4;

template <int C, int M>
void scores_avx512(const float* const* q, const int64_t* n, int64_t count, int64_t keys, const float* k,
                   int64_t stride, int64_t cache_rows, float scale, float* w, float* maxes, float* packed) {
  for (int64_t block = 0; block < keys; block += KEY_BLOCK) {
    if (M == 0 || count < PACK_QUERIES) {
      block_scores<C, M>(q, n, count, block, k + block * stride, stride, cache_rows, scale, w, maxes);
      continue;
    }
    const int64_t rows = keys - block < KEY_BLOCK ? keys - block : KEY_BLOCK;
    for (int64_t r = 0; r < rows; ++r) {
      __m512 kr[C];
      load_row<C, M>(k + (block + r) * stride, kr);
      for (int c = 0; c < C; ++c) _mm512_store_ps(packed + r * 16 * C + 16 * c, kr[c]);
    }
    block_scores<C, 0>(q, n, count, block, packed, 16 * C, cache_rows, scale, w, maxes);
  }
}

template <int C, int M>
void values_avx512(const int64_t* n, int64_t count, int64_t keys, const float* v, int64_t stride,
                   int64_t cache_rows, const float* w, float* acc, float* packed) {
  for (int64_t block = 0; block < keys; block += KEY_BLOCK) {
    if (M == 0 || count < PACK_QUERIES) {
      block_values<C, M>(n, count, block, v + block * stride, stride, cache_rows, w, acc);
      continue;
    }
    const int64_t rows = keys - block < KEY_BLOCK ? keys - block : KEY_BLOCK;
    for (int64_t r = 0; r < rows; ++r) {
      __m512 vr[C];
      load_row<C, M>(v + (block + r) * stride, vr);
      for (int c = 0; c < C; ++c) _mm512_store_ps(packed + r * 16 * C + 16 * c, vr[c]);
    }
    block_values<C, 0>(n, count, block, packed, 16 * C, cache_rows, w, acc);
  }
}

// where p sits past a 64-byte boundary, in floats (0, 4, 8, 12), or -1
inline int misalignment(const float* p) {
  const uintptr_t bytes = reinterpret_cast<uintptr_t>(p) % 64;
  return bytes % 16 == 0 ? static_cast<int>(bytes / 4) : -1;
}

// attend_queries_avx2 with 16 lanes, d = 16 * C: scores eight keys at a time (hsum8), values by key % 2; each
// phase specialized for the caches' offset from a 64-byte line.
template <int C>
void attend_queries_avx512(const float* const* q, const int64_t* n, int64_t count, const float* k, const float* v,
                           int64_t stride, int64_t cache_rows, float scale, float* w, float* acc,
                           float* const* out) {
  const int64_t keys = n[count - 1] > n[0] ? n[count - 1] : n[0];
  thread_local std::vector<float> maxes, sums;
  maxes.assign(count * 8, -INFINITY);
  sums.resize(count);
  // every row of a head is as far from a 64-byte boundary as the first (stride and head offsets: 64-byte multiples)
  const int mk = stride % 16 == 0 ? misalignment(k) : -1, mv = stride % 16 == 0 ? misalignment(v) : -1;
  thread_local std::vector<float> room(KEY_BLOCK * 16 * C + 16);  // a block of rows, 64-byte aligned
  float* packed = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(room.data()) + 63) / 64 * 64);
#define ROW_SDPA_SCORES(M) \
  scores_avx512<C, M>(q, n, count, keys, k, stride, cache_rows, scale, w, maxes.data(), packed)
  switch (mk) {
    case 0: ROW_SDPA_SCORES(0); break;
    case 4: ROW_SDPA_SCORES(4); break;
    case 8: ROW_SDPA_SCORES(8); break;
    case 12: ROW_SDPA_SCORES(12); break;
    default: ROW_SDPA_SCORES(-1); break;
  }
#undef ROW_SDPA_SCORES
  for (int64_t i = 0; i < count; ++i) {
    float m = -INFINITY;
    for (int t = 0; t < 8; ++t) m = maxes[i * 8 + t] > m ? maxes[i * 8 + t] : m;  // a max is exact in any order
    float* wi = w + i * cache_rows;
    const __m512 mv16 = _mm512_set1_ps(m);
    __m512 sumv = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n[i]; j += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(wi + j), mv16));
      _mm512_storeu_ps(wi + j, e);
      sumv = _mm512_add_ps(sumv, e);
    }
    float sum = hsum(_mm256_add_ps(_mm512_castps512_ps256(sumv), _mm512_extractf32x8_ps(sumv, 1)));
    if (j < n[i]) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (n[i] - j)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, wi + j), mv16));
      alignas(64) float t16[16];
      _mm512_store_ps(t16, e);
      for (int64_t t = j; t < n[i]; ++t) {
        wi[t] = t16[t - j];
        sum += wi[t];
      }
    }
    sums[i] = sum;
  }
  for (int64_t i = 0; i < count * 2 * 16 * C; ++i) acc[i] = 0.f;
#define ROW_SDPA_VALUES(M) values_avx512<C, M>(n, count, keys, v, stride, cache_rows, w, acc, packed)
  switch (mv) {
    case 0: ROW_SDPA_VALUES(0); break;
    case 4: ROW_SDPA_VALUES(4); break;
    case 8: ROW_SDPA_VALUES(8); break;
    case 12: ROW_SDPA_VALUES(12); break;
    default: ROW_SDPA_VALUES(-1); break;
  }
#undef ROW_SDPA_VALUES
  for (int64_t i = 0; i < count; ++i) {
    const float* ai = acc + i * 2 * 16 * C;
    const __m512 inv = _mm512_set1_ps(1.0f / sums[i]);
    for (int c = 0; c < C; ++c) {
      const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(ai + 16 * c), _mm512_loadu_ps(ai + 16 * (C + c)));
      _mm512_storeu_ps(out[i] + 16 * c, _mm512_mul_ps(sum, inv));
    }
  }
}
#endif


// The portable version of the above, one query at a time.
void attend_query(const float* q, const float* k, const float* v, int64_t n, int64_t d, int64_t stride,
                  float scale, float* w, float* out) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = k + j * stride;
    float s = 0.f;
    for (int64_t c = 0; c < d; ++c) s += q[c] * kj[c];
    w[j] = s * scale;
    m = w[j] > m ? w[j] : m;
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    w[j] = std::exp(w[j] - m);
    sum += w[j];
  }
  for (int64_t c = 0; c < d; ++c) out[c] = 0.f;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) out[c] += w[j] * v[j * stride + c];
  const float inv = 1.0f / sum;
  for (int64_t c = 0; c < d; ++c) out[c] *= inv;
}

// All queries of one KV head. w: count x cache_rows floats; acc: count x 2d floats.
void attend_queries(const float* const* q, const int64_t* n, int64_t count, const float* k, const float* v,
                    int64_t d, int64_t stride, int64_t cache_rows, float scale, float* w, float* acc,
                    float* const* out) {
#ifdef ROW_SDPA_AVX512
  switch (d) {
    case 32: return attend_queries_avx512<2>(q, n, count, k, v, stride, cache_rows, scale, w, acc, out);
    case 64: return attend_queries_avx512<4>(q, n, count, k, v, stride, cache_rows, scale, w, acc, out);
    case 128: return attend_queries_avx512<8>(q, n, count, k, v, stride, cache_rows, scale, w, acc, out);
    default: break;
  }
#endif
#ifdef ROW_SDPA_AVX2
  switch (d) {
    case 32: return attend_queries_avx2<4>(q, n, count, k, v, stride, cache_rows, scale, w, acc, out);
    case 64: return attend_queries_avx2<8>(q, n, count, k, v, stride, cache_rows, scale, w, acc, out);
    case 128: return attend_queries_avx2<16>(q, n, count, k, v, stride, cache_rows, scale, w, acc, out);
    default: break;
  }
#endif
  for (int64_t i = 0; i < count; ++i) attend_query(q[i], k, v, n[i], d, stride, scale, w, out[i]);
}

}  // namespace

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
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k_cache.const_data_ptr<float>();
  const float* vp = v_cache.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
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
          queries[i] = qp + (row * h + head) * d;
          outs[i] = op + (row * h + head) * d;
          keys[i] = start_pos + row + 1;
        }
      attend_queries(queries.data(), keys.data(), count, kp + kv * d, vp + kv * d, d, stride, s, scale, w.data(),
                     acc.data(), outs.data());
    }
  });
  return out;
}

}  // namespace layerskip

EXECUTORCH_LIBRARY(layerskip, "row_sdpa.out", layerskip::row_sdpa_out);
