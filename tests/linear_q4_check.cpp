// The linear_q4 kernel's arithmetic (quantize_row, blocks) checked directly, built by tests/test_executorch.py with
// the kernel's own flags (once as the machine's compiler targets it, once forced to AVX2, once to the portable loop):
//   - the vectorized path gives the bits of the portable loop, for calls of 1 .. 13 rows (passes of up to 5 rows,
//     groups of 4 blocks of 16 channels, and the single blocks of a last, smaller group) and over part of the blocks;
//   - so a row has the same bits in a call of any row count as computed alone;
//   - quantize_row (8 inputs at a time where AVX2 is) gives quantize_row_scalar's bytes, group sums, zero point and
//     scale, on rows of ties (x / s halfway between integers), clamped values, zeros and one sign only;
//   - the result equals s_x (sum_g s[g] sum_{k in g} (a - z) q) computed in double, to the float steps' rounding
//     (4e-7 of the magnitudes of the terms they add: s[g] t_g and z c);
// per output channel (one group) and per group of 8 .. 128 inputs.
// Prints "ok (<path>)" and exits 0, or names the first failure and exits 1.
#include "../runtime/kernels/linear_q4.cpp"

#include <cstdio>
#include <cstdlib>
#include <random>

using namespace layerskip::q4;

namespace {

struct Layer {
  int64_t n, k, groups;
  std::vector<uint8_t> packed;  // [n/16, k/8, 64], in the kernel's order
  std::vector<int8_t> q;        // [n, k] in -8..7
  std::vector<float> scales;    // [groups, n], in the kernel's order (Scales::at)
  std::vector<float> sums;      // [n]: c = sum_k s q
  Scales side() const { return Scales{scales.data(), sums.data(), n, groups}; }
  float scale(int64_t g, int64_t c) const { return side().at(c / kBlock, g)[c % kBlock]; }
};

Layer make_layer(int64_t n, int64_t k, int64_t groups, std::mt19937& rng) {
  Layer l{n, k, groups, std::vector<uint8_t>(n * k / 2), std::vector<int8_t>(n * k), std::vector<float>(groups * n),
          std::vector<float>(n)};
  std::uniform_int_distribution<int> nibble(-8, 7);
  std::uniform_real_distribution<float> scale(0.001f, 0.1f);
  const int64_t blocks = n / kBlock;
  for (int64_t c = 0; c < n; ++c) {
    // blocks go in groups of 4 (the last may hold fewer): the group of c's block, and how many blocks it holds
    const int64_t group = c / kBlock / kGroup, width = std::min(kGroup, blocks - group * kGroup);
    for (int64_t g = 0; g < groups; ++g)
      l.scales[(group * kGroup * groups + g * width + (c / kBlock) % kGroup) * kBlock + c % kBlock] = scale(rng);
    double sum = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      const int8_t q = static_cast<int8_t>(nibble(rng));
      l.q[c * k + i] = q;
      sum += static_cast<double>(q) * l.scale(i / (k / groups), c);
      // byte 4 lane + j of chunk i / 8 of block c / 16 (a group's chunks interleaved): input j in the low nibble,
      // 4 + j in the high one
      const int64_t chunk_at = (group * kGroup * (k / kChunk) + (i / kChunk) * width + (c / kBlock) % kGroup) * 64;
      l.packed[chunk_at + (c % kBlock) * 4 + (i % 4)] |= static_cast<uint8_t>(q + 8) << ((i % kChunk) < 4 ? 0 : 4);
    }
    l.sums[c] = static_cast<float>(sum);
  }
  return l;
}

struct Quantized {
  std::vector<uint8_t> a;
  std::vector<int32_t> offset;
  std::vector<float> zero, scale;
  int64_t k, groups;
  Rows rows(int64_t first) const {
    return Rows{a.data() + first * k, offset.data() + first * groups, zero.data() + first, scale.data() + first, k,
                groups};
  }
};

Quantized quantize(const std::vector<float>& x, int64_t rows, int64_t k, int64_t groups) {
  Quantized out{std::vector<uint8_t>(rows * k), std::vector<int32_t>(rows * groups), std::vector<float>(rows),
                std::vector<float>(rows), k, groups};
  for (int64_t r = 0; r < rows; ++r)
    quantize_row(x.data() + r * k, k, groups, out.a.data() + r * k, &out.offset[r * groups], &out.zero[r],
                 &out.scale[r]);
  return out;
}

bool fail(const char* what, int64_t n, int64_t k, int64_t groups, int64_t rows, int64_t r, int64_t c, float got,
          float want) {
  std::printf("%s: n %lld k %lld groups %lld rows %lld, row %lld channel %lld: %.9g vs %.9g\n", what, (long long)n,
              (long long)k, (long long)groups, (long long)rows, (long long)r, (long long)c, got, want);
  return false;
}

bool check(int64_t n, int64_t k, int64_t groups, std::mt19937& rng) {
  const Layer l = make_layer(n, k, groups, rng);
  const Weights w{l.packed.data(), k / kChunk, n / kBlock};
  constexpr int64_t kRows = 13;
  std::vector<float> x(kRows * k);
  std::normal_distribution<float> normal(0.3f, 2.0f);
  for (float& v : x) v = normal(rng);
  const Quantized all = quantize(x, kRows, k, groups);
  std::vector<float> portable_out(kRows * n);
  portable(all.rows(0), 0, kRows, w, l.side(), 0, n, portable_out.data());
  for (int64_t r = 0; r < kRows; ++r)  // in double
    for (int64_t c = 0; c < n; ++c) {
      double want = 0.0, magnitude = std::abs(all.zero[r] * l.sums[c]);
      for (int64_t g = 0; g < groups; ++g) {
        int64_t t = 0, centred = 0;
        for (int64_t i = g * (k / groups); i < (g + 1) * (k / groups); ++i) {
          t += int64_t{all.a[r * k + i]} * l.q[c * k + i];
          centred += (int64_t{all.a[r * k + i]} - static_cast<int64_t>(all.zero[r])) * l.q[c * k + i];
        }
        want += static_cast<double>(centred) * l.scale(g, c);
        magnitude += std::abs(static_cast<double>(t) * l.scale(g, c));
      }
      want *= all.scale[r];
      magnitude *= all.scale[r];
      const float got = portable_out[r * n + c];
      if (std::abs(got - want) > 4e-7 * magnitude) return fail("exact", n, k, groups, kRows, r, c, got, want);
    }
  for (int64_t rows = 1; rows <= kRows; ++rows) {
    for (int64_t first : {int64_t{0}, kRows - rows}) {  // the call's rows: the first `rows`, or the last
      std::vector<float> out(rows * n, -1.0f);
      blocks(all.rows(first), rows, w, l.side(), 0, n / kBlock, out.data());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < n; ++c)
          if (std::memcmp(&out[r * n + c], &portable_out[(first + r) * n + c], 4) != 0)
            return fail("bits", n, k, groups, rows, first + r, c, out[r * n + c], portable_out[(first + r) * n + c]);
    }
  }
  if (n / kBlock > 1) {  // a call over part of the blocks (from the middle of a group of blocks) writes those alike
    std::vector<float> out(kRows * n, -1.0f);
    blocks(all.rows(0), kRows, w, l.side(), 1, n / kBlock, out.data());
    for (int64_t c = kBlock; c < n; ++c)
      if (std::memcmp(&out[c], &portable_out[c], 4) != 0)
        return fail("part", n, k, groups, kRows, 0, c, out[c], portable_out[c]);
  }
  return true;
}

// quantize_row against quantize_row_scalar on one row of k inputs in `groups` groups.
bool check_quantize(const std::vector<float>& x, int64_t groups, const char* kind) {
  const int64_t k = static_cast<int64_t>(x.size());
  std::vector<uint8_t> a(k), a_scalar(k);
  std::vector<int32_t> offset(groups), offset_scalar(groups);
  float zero, scale, zero_scalar, scale_scalar;
  quantize_row(x.data(), k, groups, a.data(), offset.data(), &zero, &scale);
  quantize_row_scalar(x.data(), k, groups, a_scalar.data(), offset_scalar.data(), &zero_scalar, &scale_scalar);
  if (a == a_scalar && offset == offset_scalar && std::memcmp(&zero, &zero_scalar, 4) == 0 &&
      std::memcmp(&scale, &scale_scalar, 4) == 0)
    return true;
  std::printf("quantize_row: %s row, k %lld groups %lld: not quantize_row_scalar's\n", kind, (long long)k,
              (long long)groups);
  return false;
}

bool check_quantize_rows(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.3f, 2.0f);
  for (int64_t k : {8, 24, 64, 192, 512})
    for (int64_t groups : {int64_t{1}, k / 8}) {
      std::vector<float> x(k);
      for (float& v : x) v = normal(rng);
      if (!check_quantize(x, groups, "random")) return false;
      for (int64_t i = 0; i < k; ++i) x[i] = (static_cast<float>(i % 23) - 11.0f) * 0.5f;  // ties: s = 22 / 255
      x[0] = -11.0f;  // the range's ends: lo / s and every x / s on a half
      x[k - 1] = 11.0f;
      if (!check_quantize(x, groups, "ties")) return false;
      for (float& v : x) v = std::abs(normal(rng)) * 1e4f;  // one sign: the range widened to 0
      if (!check_quantize(x, groups, "positive")) return false;
      for (float& v : x) v = -v;
      if (!check_quantize(x, groups, "negative")) return false;
      std::fill(x.begin(), x.end(), 0.0f);  // the scale at its floor
      if (!check_quantize(x, groups, "zero")) return false;
    }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  if (!check_quantize_rows(rng)) return 1;
  for (int64_t n : {16, 32, 48, 64, 80, 112, 160, 208})
    for (int64_t k : {8, 64, 256, 1024})
      for (int64_t group : {k, int64_t{8}, int64_t{32}, int64_t{128}})  // per channel, then groups of G inputs
        if (group <= k && !check(n, k, k / group, rng)) return 1;
#if defined(LINEAR_Q4_AVX512)
  std::printf("ok (avx512)\n");
#elif defined(LINEAR_Q4_AVX2)
  std::printf("ok (avx2)\n");
#else
  std::printf("ok (portable)\n");
#endif
  return 0;
}
