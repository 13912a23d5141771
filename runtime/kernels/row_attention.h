// The attention both of our row-invariant attention kernels run (row_sdpa.cpp for ExecuTorch, ort_ops.cpp for
// ONNX Runtime): attend_queries, causal attention of one KV head's queries over a cache whose rows lie `stride`
// floats apart, each query's arithmetic in an order that depends only on its position (row_sdpa.cpp's header).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ROW_SDPA_AVX2 1
#endif

namespace layerskip {

namespace {

#ifdef ROW_SDPA_AVX2
inline float hsum(__m256 v) {  // fixed order: (lo + hi), then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The vector operations the attention below is written in, for 8 lanes (AVX2/FMA) and 16 (AVX-512). A width fixes
// every reduction order, and one build uses one width, so all calls of a process agree.
struct Lanes8 {
  using V = __m256;
  static constexpr int N = 8;
  static constexpr bool shifts_rows = false;  // no cross-lane shift by an immediate: unaligned rows are read as such
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_store_ps(p, v); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V floor(V x) { return _mm256_floor_ps(x); }
  static V pow2(V n) {  // 2^n for integral n in the float exponent's range
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static float sum(V v) { return hsum(v); }
  static V load_first(const float* p, int64_t count) {  // p[0 .. count), zeros after
    alignas(32) float part[N] = {};
    for (int64_t t = 0; t < count; ++t) part[t] = p[t];
    return _mm256_load_ps(part);
  }
  // The eight sums of a0..a7's lanes, each by the same tree: [sum a0, ..., sum a7].
  static __m256 sums8(V a0, V a1, V a2, V a3, V a4, V a5, V a6, V a7) {
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 h4 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h4, 0x20), _mm256_permute2f128_ps(h0, h4, 0x31));
  }
};
#endif

#if defined(ROW_SDPA_AVX2) && defined(__AVX512F__) && defined(__AVX512DQ__)
#define ROW_SDPA_AVX512 1
struct Lanes16 {
  using V = __m512;
  static constexpr int N = 16;
  static constexpr bool shifts_rows = true;
  static V load(const float* p) { return _mm512_load_ps(p); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_store_ps(p, v); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V floor(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static V pow2(V n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static float sum(V v) { return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))); }
  static V load_first(const float* p, int64_t count) {  // p[0 .. count), zeros after
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
  }
  // lanes M .. 15 of lo, then 0 .. M - 1 of hi (two neighbouring aligned lines -> the 16 floats from lo + M)
  template <int M>
  static V shifted(V lo, V hi) {
    return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), M));
  }
  static __m256 sums8(V a0, V a1, V a2, V a3, V a4, V a5, V a6, V a7) {
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
};
#endif

#ifdef ROW_SDPA_AVX2
// exp for x <= 0 (Cephes' polynomial, as in avx_mathfun): ~1 ulp, and the same bits for the same x.
template <class L>
typename L::V exp_nonpositive(typename L::V x) {
  using V = typename L::V;
  x = L::max(x, L::set1(-87.3365f));
  const V n = L::floor(L::fmadd(x, L::set1(1.44269504088896341f), L::set1(0.5f)));
  x = L::fnmadd(n, L::set1(0.693359375f), x);
  x = L::fnmadd(n, L::set1(-2.12194440e-4f), x);
  V y = L::set1(1.9875691500E-4f);
  for (const float c : {1.3981999507E-3f, 8.3334519073E-3f, 4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f})
    y = L::fmadd(y, x, L::set1(c));
  y = L::fmadd(y, L::mul(x, x), L::add(x, L::set1(1.0f)));
  return L::mul(y, L::pow2(n));
}
#endif

#ifdef ROW_SDPA_AVX2
// Queries of one KV head, d = L::N * C: for each query i, out_i = softmax(q_i . K[0 .. n_i) * scale) @ V[0 .. n_i).
// Keys go in blocks of KEY_BLOCK that every query reads while they are in the L1 cache; inside one query, scores go
// eight keys at a time (a last group of fewer reads the block's first key in the missing places and drops those
// scores), exp and its sum L::N keys at a time, values two at a time (even and odd keys in two sums, added at the
// end), so what a query computes depends only on its n (position + 1), never on the other queries of the call.
// Queries go two at a time over the keys both attend (each key or value row loaded once for both: multi-row calls of
// deep16's draft_verify 9-13% faster, results/probe_onnx_draft_verify_rows.txt), each alone over the rest.
constexpr int64_t KEY_BLOCK = 32;  // a multiple of 8: 8 KB of K (and of V) per block at d = 64
// With this many queries or more, a block of misaligned rows is first copied to an aligned buffer once (then read
// by every query from L1); fewer measured faster reading the rows where they lie (2 rows of 4 heads:
// 7.15 vs 7.73 us per layer at 250 keys).
constexpr int64_t PACK_QUERIES = 4;

// A row of L::N * C floats at p, as C vectors. M: how far p is past a 64-byte line in floats, where L shifts rows
// (0, 4, 8, 12: C + 1 aligned lines, each holding a float of the row so none faults, shifted in registers), or -1
// (unaligned loads). Only how the row is read depends on M, never its values.
template <class L, int C, int M>
inline void load_row(const float* p, typename L::V* r) {
  if constexpr (M < 0) {
    for (int c = 0; c < C; ++c) r[c] = L::loadu(p + L::N * c);
  } else if constexpr (M == 0) {
    for (int c = 0; c < C; ++c) r[c] = L::load(p + L::N * c);
  } else {
    typename L::V lo = L::load(p - M);
    for (int c = 0; c < C; ++c) {
      const typename L::V hi = L::load(p - M + L::N * (c + 1));
      r[c] = L::template shifted<M>(lo, hi);
      lo = hi;
    }
  }
}

// One call's queries of one KV head and its scratch.
struct Queries {
  const float* const* q;  // count query rows of d floats
  const int64_t* n;       // keys each query attends (its position + 1), ascending
  int64_t count;
  int64_t cache_rows;  // w's row length
  float scale;
  float* w;       // count x cache_rows: scores, then their exp
  float* maxes;   // count x 8 running maxes of the scores, by key % 8
  float* acc;     // count x 2d: each query's two sums of values
};

// The scores of query i for keys [from, end) of a block (from - block a multiple of 8): w[i][j] = scale * q_i . k_j,
// and its maxes. Key j's row is at rows + (j - block) * stride.
template <class L, int C, int M>
void query_scores(const Queries& b, int64_t i, int64_t block, int64_t from, const float* rows, int64_t stride) {
  const int64_t n = b.n[i], end = block + KEY_BLOCK < n ? block + KEY_BLOCK : n;
  if (from >= end) return;
  const __m256 scale = _mm256_set1_ps(b.scale);  // b's fields read once: the stores below are floats too
  typename L::V qc[C];
  for (int c = 0; c < C; ++c) qc[c] = L::loadu(b.q[i] + L::N * c);
  float* wi = b.w + i * b.cache_rows;
  __m256 m = _mm256_loadu_ps(b.maxes + i * 8);
  for (int64_t j = from; j < end; j += 8) {
    typename L::V a[8];
    for (int t = 0; t < 8; ++t) {
      typename L::V kr[C];
      load_row<L, C, M>(j + t < n ? rows + (j + t - block) * stride : rows, kr);
      a[t] = L::mul(qc[0], kr[0]);
      for (int c = 1; c < C; ++c) a[t] = L::fmadd(qc[c], kr[c], a[t]);
    }
    const __m256 s = _mm256_mul_ps(L::sums8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]), scale);
    if (j + 8 <= n) {
      _mm256_storeu_ps(wi + j, s);
      m = _mm256_max_ps(m, s);
    } else {  // the last keys: their scores, and the max over them only
      alignas(32) float eight[8];
      _mm256_store_ps(eight, s);
      for (int64_t t = 0; t < n - j; ++t) {
        wi[j + t] = eight[t];
        m = _mm256_max_ps(m, _mm256_set1_ps(eight[t]));
      }
    }
  }
  _mm256_storeu_ps(b.maxes + i * 8, m);
}

// The scores of keys [block, block + KEY_BLOCK) for every query, two queries at a time over the keys both attend in
// full groups of 8 (each key row read once for both), then each query's remaining keys alone. A score is the same
// arithmetic either way (sums8 reduces each vector by its own tree), so a query's bits do not depend on its partner.
template <class L, int C, int M>
void block_scores(const Queries& b, int64_t block, const float* rows, int64_t stride) {
  const __m256 scale = _mm256_set1_ps(b.scale);
  int64_t i = 0;
  for (; i + 1 < b.count; i += 2) {
    const int64_t n = std::min(b.n[i], b.n[i + 1]), end = std::min(block + KEY_BLOCK, n);
    int64_t j = block;
    if (j + 8 <= end) {
      typename L::V q0[C], q1[C];
      for (int c = 0; c < C; ++c) {
        q0[c] = L::loadu(b.q[i] + L::N * c);
        q1[c] = L::loadu(b.q[i + 1] + L::N * c);
      }
      float* w0 = b.w + i * b.cache_rows;
      float* w1 = w0 + b.cache_rows;
      __m256 m0 = _mm256_loadu_ps(b.maxes + i * 8), m1 = _mm256_loadu_ps(b.maxes + (i + 1) * 8);
      for (; j + 8 <= end; j += 8) {
        typename L::V a0[8], a1[8];
        for (int t = 0; t < 8; ++t) {
          typename L::V kr[C];
          load_row<L, C, M>(rows + (j + t - block) * stride, kr);
          a0[t] = L::mul(q0[0], kr[0]);
          a1[t] = L::mul(q1[0], kr[0]);
          for (int c = 1; c < C; ++c) {
            a0[t] = L::fmadd(q0[c], kr[c], a0[t]);
            a1[t] = L::fmadd(q1[c], kr[c], a1[t]);
          }
        }
        const __m256 s0 = _mm256_mul_ps(L::sums8(a0[0], a0[1], a0[2], a0[3], a0[4], a0[5], a0[6], a0[7]), scale);
        const __m256 s1 = _mm256_mul_ps(L::sums8(a1[0], a1[1], a1[2], a1[3], a1[4], a1[5], a1[6], a1[7]), scale);
        _mm256_storeu_ps(w0 + j, s0);
        _mm256_storeu_ps(w1 + j, s1);
        m0 = _mm256_max_ps(m0, s0);
        m1 = _mm256_max_ps(m1, s1);
      }
      _mm256_storeu_ps(b.maxes + i * 8, m0);
      _mm256_storeu_ps(b.maxes + (i + 1) * 8, m1);
    }
    query_scores<L, C, M>(b, i, block, j, rows, stride);
    query_scores<L, C, M>(b, i + 1, block, j, rows, stride);
  }
  if (i < b.count) query_scores<L, C, M>(b, i, block, block, rows, stride);
}

// Query i's acc += sum_j w_ij V_j over keys [from, end) of a block (from - block even), key j into sum j % 2. Key j's
// row is at rows + (j - block) * stride.
template <class L, int C, int M>
void query_values(const Queries& b, int64_t i, int64_t block, int64_t from, const float* rows, int64_t stride) {
  const int64_t end = block + KEY_BLOCK < b.n[i] ? block + KEY_BLOCK : b.n[i];
  if (from >= end) return;
  const float* wi = b.w + i * b.cache_rows;
  float* ai = b.acc + i * 2 * L::N * C;
  typename L::V a0[C], a1[C];
  for (int c = 0; c < C; ++c) {
    a0[c] = L::loadu(ai + L::N * c);
    a1[c] = L::loadu(ai + L::N * (C + c));
  }
  int64_t j = from;
  for (; j + 2 <= end; j += 2) {
    typename L::V v0[C], v1[C];
    load_row<L, C, M>(rows + (j - block) * stride, v0);
    load_row<L, C, M>(rows + (j + 1 - block) * stride, v1);
    const typename L::V w0 = L::set1(wi[j]), w1 = L::set1(wi[j + 1]);
    for (int c = 0; c < C; ++c) {
      a0[c] = L::fmadd(w0, v0[c], a0[c]);
      a1[c] = L::fmadd(w1, v1[c], a1[c]);
    }
  }
  if (j < end) {  // an odd n's last key (blocks are even)
    typename L::V v0[C];
    load_row<L, C, M>(rows + (j - block) * stride, v0);
    const typename L::V w0 = L::set1(wi[j]);
    for (int c = 0; c < C; ++c) a0[c] = L::fmadd(w0, v0[c], a0[c]);
  }
  for (int c = 0; c < C; ++c) {
    L::storeu(ai + L::N * c, a0[c]);
    L::storeu(ai + L::N * (C + c), a1[c]);
  }
}

// acc_i += sum_j w_ij V_j over keys [block, block + KEY_BLOCK) for every query: two queries at a time over the keys
// both attend (each pair of value rows read once for both), then each query's remaining keys alone; per query the
// same FMAs in the same order either way.
template <class L, int C, int M>
void block_values(const Queries& b, int64_t block, const float* rows, int64_t stride) {
  int64_t i = 0;
  for (; i + 1 < b.count; i += 2) {
    const int64_t end = std::min(block + KEY_BLOCK, std::min(b.n[i], b.n[i + 1]));
    int64_t j = block;
    if (j + 2 <= end) {
      const float* w0 = b.w + i * b.cache_rows;
      const float* w1 = w0 + b.cache_rows;
      float* acc0 = b.acc + i * 2 * L::N * C;
      float* acc1 = acc0 + 2 * L::N * C;
      typename L::V e0[C], o0[C], e1[C], o1[C];  // even and odd keys' sums of the two queries
      for (int c = 0; c < C; ++c) {
        e0[c] = L::loadu(acc0 + L::N * c);
        o0[c] = L::loadu(acc0 + L::N * (C + c));
        e1[c] = L::loadu(acc1 + L::N * c);
        o1[c] = L::loadu(acc1 + L::N * (C + c));
      }
      for (; j + 2 <= end; j += 2) {
        typename L::V v0[C], v1[C];
        load_row<L, C, M>(rows + (j - block) * stride, v0);
        load_row<L, C, M>(rows + (j + 1 - block) * stride, v1);
        const typename L::V x0 = L::set1(w0[j]), y0 = L::set1(w0[j + 1]);
        const typename L::V x1 = L::set1(w1[j]), y1 = L::set1(w1[j + 1]);
        for (int c = 0; c < C; ++c) {
          e0[c] = L::fmadd(x0, v0[c], e0[c]);
          o0[c] = L::fmadd(y0, v1[c], o0[c]);
          e1[c] = L::fmadd(x1, v0[c], e1[c]);
          o1[c] = L::fmadd(y1, v1[c], o1[c]);
        }
      }
      for (int c = 0; c < C; ++c) {
        L::storeu(acc0 + L::N * c, e0[c]);
        L::storeu(acc0 + L::N * (C + c), o0[c]);
        L::storeu(acc1 + L::N * c, e1[c]);
        L::storeu(acc1 + L::N * (C + c), o1[c]);
      }
    }
    query_values<L, C, M>(b, i, block, j, rows, stride);
    query_values<L, C, M>(b, i + 1, block, j, rows, stride);
  }
  if (i < b.count) query_values<L, C, M>(b, i, block, block, rows, stride);
}

// One phase (the scores, or VALUES) over all blocks of a cache whose rows sit M floats past a 64-byte line; with
// PACK_QUERIES queries or more a misaligned block is first copied to `packed` (64-byte aligned) and read from there.
template <class L, int C, bool VALUES, int M>
void over_blocks(const Queries& b, int64_t keys, const float* cache, int64_t stride, float* packed) {
  for (int64_t block = 0; block < keys; block += KEY_BLOCK) {
    const bool pack = M != 0 && b.count >= PACK_QUERIES;
    if (pack) {
      const int64_t rows = keys - block < KEY_BLOCK ? keys - block : KEY_BLOCK;
      for (int64_t r = 0; r < rows; ++r) {
        typename L::V row[C];
        load_row<L, C, M>(cache + (block + r) * stride, row);
        for (int c = 0; c < C; ++c) L::store(packed + (r * C + c) * L::N, row[c]);
      }
    }
    const float* rows = pack ? packed : cache + block * stride;
    const int64_t rows_stride = pack ? L::N * C : stride;
    if constexpr (VALUES) {
      pack ? block_values<L, C, 0>(b, block, rows, rows_stride) : block_values<L, C, M>(b, block, rows, rows_stride);
    } else {
      pack ? block_scores<L, C, 0>(b, block, rows, rows_stride) : block_scores<L, C, M>(b, block, rows, rows_stride);
    }
  }
}

// over_blocks for a cache at p: its rows are as far from a 64-byte line as p (the stride and head offsets are
// multiples of 64 bytes, checked), read shifted where L shifts rows, else unaligned
template <class L, int C, bool VALUES>
void over_cache(const Queries& b, int64_t keys, const float* p, int64_t stride, float* packed) {
  const uintptr_t bytes = reinterpret_cast<uintptr_t>(p) % 64;
  const int offset = stride % 16 == 0 && bytes % 16 == 0 ? static_cast<int>(bytes / 4) : -1;
  if (offset == 0) return over_blocks<L, C, VALUES, 0>(b, keys, p, stride, packed);
  if constexpr (L::shifts_rows) {
    if (offset == 4) return over_blocks<L, C, VALUES, 4>(b, keys, p, stride, packed);
    if (offset == 8) return over_blocks<L, C, VALUES, 8>(b, keys, p, stride, packed);
    if (offset == 12) return over_blocks<L, C, VALUES, 12>(b, keys, p, stride, packed);
  }
  over_blocks<L, C, VALUES, -1>(b, keys, p, stride, packed);
}

template <class L, int C>
void attend_queries_simd(const float* const* q, const int64_t* n, int64_t count, const float* k, const float* v,
                         int64_t stride, int64_t cache_rows, float scale, float* w, float* acc, float* const* out) {
  using V = typename L::V;
  const int64_t keys = n[count - 1] > n[0] ? n[count - 1] : n[0];
  thread_local std::vector<float> maxes, sums;
  thread_local std::vector<float> room(KEY_BLOCK * L::N * C + 16);  // a block of rows, 64-byte aligned
  float* packed = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(room.data()) + 63) / 64 * 64);
  maxes.assign(count * 8, -INFINITY);
  sums.resize(count);
  const Queries b{q, n, count, cache_rows, scale, w, maxes.data(), acc};
  over_cache<L, C, false>(b, keys, k, stride, packed);
  // w = exp(s - m) and their sum: L::N lanes by j % L::N, then a fixed reduction, then the tail in order
  for (int64_t i = 0; i < count; ++i) {
    float m = -INFINITY;
    for (int t = 0; t < 8; ++t) m = maxes[i * 8 + t] > m ? maxes[i * 8 + t] : m;  // a max is exact in any order
    float* wi = w + i * cache_rows;
    const V mv = L::set1(m);
    V sumv = L::zero();
    int64_t j = 0;
    for (; j + L::N <= n[i]; j += L::N) {
      const V e = exp_nonpositive<L>(L::sub(L::loadu(wi + j), mv));
      L::storeu(wi + j, e);
      sumv = L::add(sumv, e);
    }
    float sum = L::sum(sumv);
    if (j < n[i]) {  // the last keys (the other lanes' exp is dropped)
      alignas(64) float tail[L::N];
      L::store(tail, exp_nonpositive<L>(L::sub(L::load_first(wi + j, n[i] - j), mv)));
      for (int64_t t = j; t < n[i]; ++t) {
        wi[t] = tail[t - j];
        sum += wi[t];
      }
    }
    sums[i] = sum;
  }
  for (int64_t i = 0; i < count * 2 * L::N * C; ++i) acc[i] = 0.f;
  over_cache<L, C, true>(b, keys, v, stride, packed);
  for (int64_t i = 0; i < count; ++i) {  // out_i = (sum of even keys + sum of odd keys) / the exp sum
    const float* ai = acc + i * 2 * L::N * C;
    const V inv = L::set1(1.0f / sums[i]);
    for (int c = 0; c < C; ++c) {
      const V even_and_odd = L::add(L::loadu(ai + L::N * c), L::loadu(ai + L::N * (C + c)));
      L::storeu(out[i] + L::N * c, L::mul(even_and_odd, inv));
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
#if defined(ROW_SDPA_AVX512)
  using L = Lanes16;
#elif defined(ROW_SDPA_AVX2)
  using L = Lanes8;
#endif
#ifdef ROW_SDPA_AVX2
  switch (d) {
    case 32: return attend_queries_simd<L, 32 / L::N>(q, n, count, k, v, stride, cache_rows, scale, w, acc, out);
    case 64: return attend_queries_simd<L, 64 / L::N>(q, n, count, k, v, stride, cache_rows, scale, w, acc, out);
    case 128: return attend_queries_simd<L, 128 / L::N>(q, n, count, k, v, stride, cache_rows, scale, w, acc, out);
    default: break;
  }
#endif
  for (int64_t i = 0; i < count; ++i) attend_query(q[i], k, v, n[i], d, stride, scale, w, out[i]);
}

}  // namespace

}  // namespace layerskip
