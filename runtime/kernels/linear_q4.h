// The 4-bit linear both of our linear kernels run (linear_q4.cpp for ExecuTorch, ort_ops.cpp for ONNX Runtime):
// quantize_row and blocks, in the layout and arithmetic linear_q4.cpp's header describes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LINEAR_Q4_AVX512 1
#elif defined(__AVX2__)
#define LINEAR_Q4_AVX2 1
#endif

namespace layerskip {
namespace q4 {

constexpr int64_t kBlock = 16;  // output channels per block
constexpr int64_t kChunk = 8;   // inputs per 64-byte chunk of a block
constexpr int64_t kGroup = 4;   // blocks whose chunks are interleaved

// Whether a call's output blocks are worth spreading over threads: from 3 rows on, where computing, not reading the
// weights, bounds it, and only where the call holds enough work (2^22 multiply-adds, ~20 us here) to repay waking a
// pool (the shipped model's 6-row calls, 1.2M, were slower on two threads through ONNX Runtime's pool).
inline bool rows_in_parallel(int64_t rows, int64_t k, int64_t n) { return rows >= 3 && rows * k * n >= (int64_t{1} << 22); }

// The blocks in `block`'s group of 4 (the last group may hold fewer), of `blocks` in all.
inline int64_t group_width(int64_t block, int64_t blocks) { return std::min(kGroup, blocks - block / kGroup * kGroup); }

// The packed weights: where a block's chunk lies.
struct Weights {
  const uint8_t* data;
  int64_t chunks, blocks;  // K / 8, N / 16
  const uint8_t* at(int64_t block, int64_t chunk) const {
    return data + (block / kGroup * kGroup * chunks + chunk * group_width(block, blocks) + block % kGroup) * 64;
  }
  int64_t stride(int64_t block) const { return group_width(block, blocks) * 64; }  // bytes to the block's next chunk
};

// The weights' float side: s[g][n] in the weights' order (a group of 4 blocks' scales together, by group of inputs:
// [g = 0: blocks 0..3 x 16 channels][g = 1: ...]...), and c[n].
struct Scales {
  const float* s;
  const float* sums;
  int64_t n, groups;
  const float* at(int64_t block, int64_t g) const {  // the 16 scales of `block`'s channels for group g of inputs
    return s + (block / kGroup * kGroup * groups + g * group_width(block, n / kBlock) + block % kGroup) * kBlock;
  }
};

// One call's activations, quantized per row.
struct Rows {
  const uint8_t* a;        // [rows, K]: a in 0..255
  const int32_t* offset;   // [rows, groups]: -8 sum_{k in g} a
  const float* zero;       // [rows]: z
  const float* scale;      // [rows]: s_x
  int64_t k, groups;
};

// torchao's per-token asymmetric int8 (choose_qparams_affine with the range widened to include 0, eps = float eps;
// quantize = clamp(round(x * (1 / s)) + zp)), shifted by 128 into 0..255: the scale and zero point of a row.
inline void row_range(float lo, float hi, float* zero, float* scale) {
  const float s = std::max((hi - lo) / 255.0f, 1.1920928955078125e-07f);
  *zero = std::min(127.0f, std::max(-128.0f, -128.0f - std::nearbyint(lo / s))) + 128.0f;
  *scale = s;
}

// One row, an element at a time: the arithmetic quantize_row's vector path must give the bits of (linear_q4_check).
inline void quantize_row_scalar(const float* x, int64_t k, int64_t groups, uint8_t* a, int32_t* offset, float* zero,
                                float* scale) {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  row_range(lo, hi, zero, scale);
  const float inv = 1.0f / *scale, zp = *zero - 128.0f;
  for (int64_t g = 0, size = k / groups; g < groups; ++g) {
    int32_t sum = 0;
    for (int64_t i = g * size; i < (g + 1) * size; ++i) {
      const float q = std::min(127.0f, std::max(-128.0f, std::nearbyint(x[i] * inv) + zp));
      a[i] = static_cast<uint8_t>(static_cast<int32_t>(q) + 128);
      sum += a[i];
    }
    offset[g] = -8 * sum;
  }
}

// quantize_row_scalar 8 inputs at a time where AVX2 is: the range's min and max are exact in any order, the rounding
// is the same (round to nearest even, as nearbyint in the default mode), the clamps are ordered alike (a max then a
// min, whose NaN cases pick the same operand), and the group sums are integers. Was 0.75 ns an input, 36-42% of a
// 6-row call of a 512- or 768-input linear; 2.1-3x faster now (results/probe_linear_q4_quantize.txt).
inline void quantize_row(const float* x, int64_t k, int64_t groups, uint8_t* a, int32_t* offset, float* zero,
                         float* scale) {
#if defined(__AVX2__)
  const int64_t size = k / groups;
  if (k % 8 != 0 || size % 8 != 0) return quantize_row_scalar(x, k, groups, a, offset, zero, scale);
  __m256 lo8 = _mm256_setzero_ps(), hi8 = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    lo8 = _mm256_min_ps(v, lo8);  // (v < lo) ? v : lo, as std::min(lo, v)
    hi8 = _mm256_max_ps(v, hi8);
  }
  alignas(32) float lanes_lo[8], lanes_hi[8];
  _mm256_store_ps(lanes_lo, lo8);
  _mm256_store_ps(lanes_hi, hi8);
  float lo = 0.0f, hi = 0.0f;
  for (int t = 0; t < 8; ++t) {
    lo = std::min(lo, lanes_lo[t]);
    hi = std::max(hi, lanes_hi[t]);
  }
  row_range(lo, hi, zero, scale);
  const __m256 inv = _mm256_set1_ps(1.0f / *scale), zp = _mm256_set1_ps(*zero - 128.0f);
  const __m256 below = _mm256_set1_ps(-128.0f), above = _mm256_set1_ps(127.0f);
  const __m256i shift = _mm256_set1_epi32(128);
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sums = _mm256_setzero_si256();
    for (int64_t i = g * size; i < (g + 1) * size; i += 8) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, zp), below), above);
      const __m256i u = _mm256_add_epi32(_mm256_cvtps_epi32(q), shift);  // 0..255 (q is integral)
      sums = _mm256_add_epi32(sums, u);
      const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(a + i), _mm_packus_epi16(words, words));
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sums);
    int32_t sum = 0;
    for (int t = 0; t < 8; ++t) sum += lanes[t];
    offset[g] = -8 * sum;
  }
#else
  quantize_row_scalar(x, k, groups, a, offset, zero, scale);
#endif
}

// The float steps, in this order on every path: f = t_0 s_0, f = fma(t_g, s_g, f) for g > 0; y = fma(-z, c, f) s_x.
// `rows` rows of x [rows, K] quantized by quantize_row into buffers kept per thread (valid until this thread's next
// call): the Rows that blocks() reads.
inline Rows quantize_rows(const float* x, int64_t rows, int64_t k, int64_t groups) {
  thread_local std::vector<uint8_t> a;
  thread_local std::vector<int32_t> offset;
  thread_local std::vector<float> zero, scale;
  a.resize(rows * k);
  offset.resize(rows * groups);
  zero.resize(rows);
  scale.resize(rows);
  for (int64_t r = 0; r < rows; ++r)
    quantize_row(x + r * k, k, groups, a.data() + r * k, &offset[r * groups], &zero[r], &scale[r]);
  return Rows{a.data(), offset.data(), zero.data(), scale.data(), k, groups};
}

inline float fold(int32_t acc, const Rows& rows, int64_t r, int64_t g, float scale, float f) {  // acc = sum a u
  const float t = static_cast<float>(acc + rows.offset[r * rows.groups + g]);
  return g == 0 ? t * scale : std::fma(t, scale, f);
}

inline float finish(float f, const Rows& rows, int64_t r, float sum) {
  return std::fma(-rows.zero[r], sum, f) * rows.scale[r];
}

// The portable path: channels [n0, n1) of rows [r0, r1).
inline void portable(const Rows& rows, int64_t r0, int64_t r1, const Weights& w, const Scales& sc, int64_t n0,
                     int64_t n1, float* out) {
  const int64_t k = rows.k, per_group = k / kChunk / rows.groups;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* a = rows.a + r * k;
    for (int64_t c = n0; c < n1; ++c) {
      float f = 0.0f;
      for (int64_t g = 0; g < rows.groups; ++g) {
        int32_t acc = 0;
        for (int64_t chunk = g * per_group; chunk < (g + 1) * per_group; ++chunk) {
          const uint8_t* bytes = w.at(c / kBlock, chunk) + (c % kBlock) * 4;
          for (int64_t j = 0; j < 4; ++j) {
            acc += static_cast<int32_t>(a[chunk * kChunk + j]) * (bytes[j] & 0x0F);
            acc += static_cast<int32_t>(a[chunk * kChunk + 4 + j]) * (bytes[j] >> 4);
          }
        }
        f = fold(acc, rows, r, g, sc.at(c / kBlock, g)[c % kBlock], f);
      }
      out[r * sc.n + c] = finish(f, rows, r, sc.sums[c]);
    }
  }
}

#if defined(LINEAR_Q4_AVX512)
// Named accumulators (GCC spills arrays of them): t<b><r> for block b < 4, row r < 5; those past NB x R are dead code.
#define Q4_FOR_ROWS(M, b) M(b, 0) M(b, 1) M(b, 2) M(b, 3) M(b, 4)
#define Q4_FOR_ALL(M) Q4_FOR_ROWS(M, 0) Q4_FOR_ROWS(M, 1) Q4_FOR_ROWS(M, 2) Q4_FOR_ROWS(M, 3)
#define Q4_DECLARE(b, r) __m512i t##b##r = _mm512_setzero_si512();
#define Q4_BROADCAST(r) \
  const __m512i x##r = r < R ? broadcast4(a + r * k + chunk * kChunk + half * 4) : _mm512_setzero_si512();
#define Q4_DOT(b, r) \
  if constexpr (b < NB && r < R) t##b##r = _mm512_dpbusd_epi32(t##b##r, x##r, u##b);
#define Q4_UNPACK(b) \
  const __m512i u##b = b < NB ? unpack(base + chunk * stride + b * 64, half) : _mm512_setzero_si512();
#define Q4_FOLD(b, r)                                                                     \
  if constexpr (b < NB && r < R) {                                                        \
    fold_channels(t##b##r, rows.offset[(r0 + r) * rows.groups + g], g, sc.at(b0 + b, g), f[b][r]); \
    t##b##r = _mm512_setzero_si512();                                                     \
  }
#define Q4_STORE(b, r) \
  if constexpr (b < NB && r < R) finish_channels(f[b][r], rows, r0 + r, sc, (b0 + b) * kBlock, out);

inline __m512i broadcast4(const uint8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm512_set1_epi32(four);
}

inline __m512i unpack(const uint8_t* chunk, int half) {  // the 16 channels x 4 inputs of one half, as bytes u
  const __m512i packed = _mm512_loadu_si512(chunk);
  return _mm512_and_si512(half ? _mm512_srli_epi16(packed, 4) : packed, _mm512_set1_epi8(0x0F));
}

inline void fold_channels(__m512i acc, int32_t offset, int64_t g, const float* scales, float* f) {  // fold(), 16 lanes
  const __m512 tf = _mm512_cvtepi32_ps(_mm512_add_epi32(acc, _mm512_set1_epi32(offset))), s = _mm512_loadu_ps(scales);
  _mm512_store_ps(f, g == 0 ? _mm512_mul_ps(tf, s) : _mm512_fmadd_ps(tf, s, _mm512_load_ps(f)));
}

inline void finish_channels(const float* f, const Rows& rows, int64_t row, const Scales& sc, int64_t c0, float* out) {
  const __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(-rows.zero[row]), _mm512_loadu_ps(sc.sums + c0), _mm512_load_ps(f));
  _mm512_storeu_ps(out + row * sc.n + c0, _mm512_mul_ps(y, _mm512_set1_ps(rows.scale[row])));
}

// NB blocks (16 NB channels from block b0, in one group of blocks) x R rows (from r0), in one pass over those blocks'
// weights. Each chunk is taken in two halves (inputs 0..3, then 4..7), so that R broadcasts and NB x R integer
// accumulators fit the 32 registers; at the end of each group of inputs they are folded into float sums kept in memory
// (in registers they would crowd out the accumulators).
template <int NB, int R>
inline void tile(const Rows& rows, int64_t r0, const Weights& w, int64_t b0, const Scales& sc, float* out) {
  static_assert(NB <= 4 && R <= 5, "accumulators must fit the registers");
  const int64_t k = rows.k, stride = w.stride(b0), per_group = k / kChunk / rows.groups;
  const uint8_t* base = w.at(b0, 0);
  const uint8_t* a = rows.a + r0 * k;
  alignas(64) float f[NB][R][16];
  asm volatile("" : : "r"(f) : "memory");  // f's address escapes: it stays in memory, not in registers
  Q4_FOR_ALL(Q4_DECLARE)
  for (int64_t g = 0; g < rows.groups; ++g) {
    for (int64_t chunk = g * per_group; chunk < (g + 1) * per_group; ++chunk) {
      for (int half = 0; half < 2; ++half) {
        asm volatile("" ::: "memory");  // keeps the halves apart: interleaved, they need more than 32 registers
        Q4_BROADCAST(0) Q4_BROADCAST(1) Q4_BROADCAST(2) Q4_BROADCAST(3) Q4_BROADCAST(4)
        Q4_UNPACK(0) Q4_UNPACK(1) Q4_UNPACK(2) Q4_UNPACK(3)
        Q4_FOR_ALL(Q4_DOT)
      }
    }
    Q4_FOR_ALL(Q4_FOLD)
  }
  Q4_FOR_ALL(Q4_STORE)
}

constexpr int64_t kMaxRows = 5;  // rows one pass carries (4 blocks x 5 rows: 20 accumulators)

// Blocks [b0, b0 + nb) of one group of blocks, R rows from r0.
template <int R>
inline void pass(const Rows& rows, int64_t r0, const Weights& w, int64_t b0, int64_t nb, const Scales& sc, float* out) {
  if (nb == kGroup) return tile<kGroup, R>(rows, r0, w, b0, sc, out);
  for (int64_t b = b0; b < b0 + nb; ++b) tile<1, R>(rows, r0, w, b, sc, out);
}
#elif defined(LINEAR_Q4_AVX2)
// As above in 8 lanes: each 64-byte chunk is two halves of 8 channels; u8 x s8 pairs by vpmaddubsw (255 * 15 * 2 does
// not saturate int16), then pairs of those by vpmaddwd with ones. One block and up to 4 rows a pass (16 registers).
template <int R>
inline void tile(const Rows& rows, int64_t r0, const Weights& w, int64_t b0, const Scales& sc, float* out) {
  const int64_t k = rows.k, stride = w.stride(b0), per_group = k / kChunk / rows.groups;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* base = w.at(b0, 0);
  const uint8_t* a = rows.a + r0 * k;
  __m256i t[2][R];
  alignas(32) float f[2][R][8];
  for (int64_t g = 0; g < rows.groups; ++g) {
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < R; ++r) t[h][r] = _mm256_setzero_si256();
    for (int64_t chunk = g * per_group; chunk < (g + 1) * per_group; ++chunk) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + chunk * stride + h * 32));
        const __m256i first = _mm256_and_si256(packed, low);
        const __m256i second = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          int32_t x0, x1;
          std::memcpy(&x0, a + r * k + chunk * kChunk, 4);
          std::memcpy(&x1, a + r * k + chunk * kChunk + 4, 4);
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_set1_epi32(x0), first),
                                             _mm256_maddubs_epi16(_mm256_set1_epi32(x1), second));
          t[h][r] = _mm256_add_epi32(t[h][r], _mm256_madd_epi16(p, ones));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {  // fold(), 8 channels at a time
      const __m256 s = _mm256_loadu_ps(sc.at(b0, g) + h * 8);
      for (int r = 0; r < R; ++r) {
        const __m256i offset = _mm256_set1_epi32(rows.offset[(r0 + r) * rows.groups + g]);
        const __m256 tf = _mm256_cvtepi32_ps(_mm256_add_epi32(t[h][r], offset));
        _mm256_store_ps(f[h][r], g == 0 ? _mm256_mul_ps(tf, s) : _mm256_fmadd_ps(tf, s, _mm256_load_ps(f[h][r])));
      }
    }
  }
  for (int h = 0; h < 2; ++h)  // finish()
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r, c0 = b0 * kBlock + h * 8;
      const __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(-rows.zero[row]), _mm256_loadu_ps(sc.sums + c0),
                                       _mm256_load_ps(f[h][r]));
      _mm256_storeu_ps(out + row * sc.n + c0, _mm256_mul_ps(y, _mm256_set1_ps(rows.scale[row])));
    }
}

constexpr int64_t kMaxRows = 4;

template <int R>
inline void pass(const Rows& rows, int64_t r0, const Weights& w, int64_t b0, int64_t nb, const Scales& sc, float* out) {
  for (int64_t b = b0; b < b0 + nb; ++b) tile<R>(rows, r0, w, b, sc, out);
}
#endif

// Blocks [block0, block1) of all rows: a group of blocks (or the part of it in range) at a time, in passes of up to
// kMaxRows rows over its weights, as even as can be (6 rows: 3 + 3); a second pass finds them in the cache.
inline void blocks(const Rows& rows, int64_t count, const Weights& w, const Scales& sc, int64_t block0,
                   int64_t block1, float* out) {
#if defined(LINEAR_Q4_AVX512) || defined(LINEAR_Q4_AVX2)
  for (int64_t b = block0, next; b < block1; b = next) {
    next = std::min(block1, (b / kGroup + 1) * kGroup);
    const int64_t nb = next - b, passes = (count + kMaxRows - 1) / kMaxRows;
    for (int64_t i = 0, r = 0, now; i < passes; ++i, r += now) {
      now = count / passes + (i < count % passes);
      switch (now) {
        case 1: pass<1>(rows, r, w, b, nb, sc, out); break;
        case 2: pass<2>(rows, r, w, b, nb, sc, out); break;
        case 3: pass<3>(rows, r, w, b, nb, sc, out); break;
#if defined(LINEAR_Q4_AVX512)
        case 4: pass<4>(rows, r, w, b, nb, sc, out); break;
        default: pass<5>(rows, r, w, b, nb, sc, out); break;
#else
        default: pass<4>(rows, r, w, b, nb, sc, out); break;
#endif
      }
    }
  }
#else
  portable(rows, 0, count, w, sc, block0 * kBlock, block1 * kBlock, out);
#endif
}

}  // namespace q4

}  // namespace layerskip
