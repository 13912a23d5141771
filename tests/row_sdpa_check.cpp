// The row_sdpa kernel's attention (attend_queries) checked directly, built by tests/test_executorch.py with the
// kernel's own flags (once as the machine's compiler targets it, once forced to AVX2 where that differs):
//   - a query's output has the same bits in a call of any row count as computed alone, in a call of its own (row
//     invariance; the kernel takes queries two at a time where it can);
//   - the same bits wherever the caches lie relative to a 64-byte line (0 .. 15 floats past it: the aligned-load
//     paths for 0 / 4 / 8 / 12, the unaligned one otherwise);
//   - within 2e-5 (relative, past 1) of attention computed in double.
// For head_dim 16 (portable), 32, 64, 128 (vectorized), 2 query heads per KV head, positions across key blocks.
// Prints "ok" and exits 0, or names the first failure and exits 1.
#include "../runtime/kernels/row_sdpa.cpp"

#include <cstdio>
#include <cstdlib>
#include <random>

using layerskip::attend_queries;

namespace {

constexpr int64_t kCacheRows = 160, kKvHeads = 2, kGroup = 2;

struct Case {
  int64_t d, pos, rows;
};

// Attention of `rows` query rows at positions pos .. pos + rows - 1, every query head, caches `offset` floats past a
// 64-byte line; all queries of a KV head in one call, or each query in a call of its own (`alone`). Returns
// [rows, heads, d].
std::vector<float> attend(const Case& c, const std::vector<float>& k, const std::vector<float>& v,
                          const std::vector<float>& q, int64_t offset, int64_t first_row, int64_t rows,
                          bool alone = false) {
  const int64_t stride = kKvHeads * c.d, heads = kKvHeads * kGroup;
  std::vector<float> k_room(kCacheRows * stride + 32), v_room(kCacheRows * stride + 32);
  float* kp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(k_room.data()) + 63) / 64 * 64) + offset;
  float* vp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v_room.data()) + 63) / 64 * 64) + offset;
  std::copy(k.begin(), k.end(), kp);
  std::copy(v.begin(), v.end(), vp);
  std::vector<float> out(rows * heads * c.d), w(rows * kGroup * kCacheRows), acc(rows * kGroup * 2 * c.d);
  std::vector<const float*> queries(rows * kGroup);
  std::vector<float*> outs(rows * kGroup);
  std::vector<int64_t> keys(rows * kGroup);
  for (int64_t kv = 0; kv < kKvHeads; ++kv) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < kGroup; ++g) {
        const int64_t head = kv * kGroup + g, i = r * kGroup + g;
        queries[i] = q.data() + ((first_row + r) * heads + head) * c.d;
        outs[i] = out.data() + (r * heads + head) * c.d;
        keys[i] = c.pos + first_row + r + 1;
      }
    const int64_t count = rows * kGroup, per_call = alone ? 1 : count;
    for (int64_t i = 0; i < count; i += per_call)
      attend_queries(queries.data() + i, keys.data() + i, per_call, kp + kv * c.d, vp + kv * c.d, c.d, stride,
                     kCacheRows, 1.0f / std::sqrt(static_cast<float>(c.d)), w.data(), acc.data(), outs.data() + i);
  }
  return out;
}

// One query's output in double: [d].
std::vector<double> reference(const Case& c, const std::vector<float>& k, const std::vector<float>& v,
                              const std::vector<float>& q, int64_t row, int64_t head) {
  const int64_t stride = kKvHeads * c.d, heads = kKvHeads * kGroup, kv = head / kGroup, n = c.pos + row + 1;
  const float* qr = q.data() + (row * heads + head) * c.d;
  std::vector<double> s(n);
  std::vector<double> out(c.d);
  double top = -1e300, sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    double dot = 0;
    for (int64_t e = 0; e < c.d; ++e) dot += double(qr[e]) * k[j * stride + kv * c.d + e];
    s[j] = dot / std::sqrt(double(c.d));
    top = std::max(top, s[j]);
  }
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    sum += s[j];
    for (int64_t x = 0; x < c.d; ++x) out[x] += s[j] * v[j * stride + kv * c.d + x];
  }
  for (double& x : out) x /= sum;
  return out;
}

}  // namespace

int main() {
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  for (const Case c : {Case{16, 40, 5}, Case{32, 3, 4}, Case{64, 0, 1}, Case{64, 37, 7}, Case{64, 100, 13},
                       Case{128, 70, 6}}) {
    const int64_t stride = kKvHeads * c.d, heads = kKvHeads * kGroup;
    std::vector<float> k(kCacheRows * stride), v(kCacheRows * stride), q(c.rows * heads * c.d);
    for (auto* t : {&k, &v, &q})
      for (float& x : *t) x = 2.0f * normal(gen);
    const std::vector<float> together = attend(c, k, v, q, 0, 0, c.rows);
    for (int64_t r = 0; r < c.rows; ++r) {
      const std::vector<float> alone = attend(c, k, v, q, 0, r, 1, true);
      if (!std::equal(alone.begin(), alone.end(), together.begin() + r * heads * c.d)) {
        std::printf("d %ld pos %ld: row %ld of %ld differs from the row alone\n", c.d, c.pos, r, c.rows);
        return 1;
      }
    }
    for (int64_t offset = 1; offset < 16; ++offset)
      if (attend(c, k, v, q, offset, 0, c.rows) != together) {
        std::printf("d %ld pos %ld rows %ld: caches %ld floats past a line give other bits\n", c.d, c.pos, c.rows,
                    offset);
        return 1;
      }
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t h = 0; h < heads; ++h) {
        const std::vector<double> expected = reference(c, k, v, q, r, h);
        for (int64_t x = 0; x < c.d; ++x) {
          const double err = std::fabs(together[(r * heads + h) * c.d + x] - expected[x]);
          if (err > 2e-5 * (1.0 + std::fabs(expected[x]))) {
            std::printf("d %ld pos %ld: row %ld head %ld off by %g from attention in double\n", c.d, c.pos, r, h,
                        err);
            return 1;
          }
        }
      }
  }
  std::printf("ok\n");
  return 0;
}
