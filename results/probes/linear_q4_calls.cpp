// Probe: runtime/kernels/linear_q4.h alone, us per call of the int8 row quantization (quantize_rows) and of the whole
// linear (quantize_rows + blocks) by rows, best of 30 x 200 calls, random weights. Build and run from a checkout:
//   g++ -O3 -march=native -std=c++17 -I. results/probes/linear_q4_calls.cpp -o /tmp/linear_q4_calls
//   taskset -c 0 /tmp/linear_q4_calls K N GROUP
#include "runtime/kernels/linear_q4.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

using namespace layerskip::q4;

template <class F>
double best_us(F call) {
  double best = 1e9;
  for (int rep = 0; rep < 30; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < 200; ++it) call();
    best = std::min(best, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / 200);
  }
  return best;
}

int main(int argc, char** argv) {
  const int64_t k = atoi(argv[1]), n = atoi(argv[2]), group = atoi(argv[3]), groups = k / group;
  std::vector<uint8_t> packed(k * n / 2);
  std::vector<float> scales(groups * n, 0.01f), sums(n), x(6 * k), y(6 * n);
  std::mt19937 rng(0);
  for (auto& b : packed) b = static_cast<uint8_t>(rng());
  for (auto& v : x) v = static_cast<float>(rng() % 1000) / 500.0f - 1.0f;
  const Weights w{packed.data(), k / kChunk, n / kBlock};
  const Scales sc{scales.data(), sums.data(), n, groups};
  for (int rows = 1; rows <= 6; ++rows) {
    const double quantize = best_us([&] {
      const Rows r = quantize_rows(x.data(), rows, k, groups);
      asm volatile("" : : "r"(r.a) : "memory");
    });
    const double linear = best_us([&] { blocks(quantize_rows(x.data(), rows, k, groups), rows, w, sc, 0, n / kBlock, y.data()); });
    std::printf("%lldx%lld group %lld, %d rows: quantize %.2f us, linear %.2f us (%.0f G MAC/s)\n", (long long)k,
                (long long)n, (long long)group, rows, quantize, linear, rows * k * n / linear / 1e3);
  }
}
