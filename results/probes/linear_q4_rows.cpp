// Probe: linear_q4's blocks() over every linear of the Llama-3.2-1B shape (16 layers of q, k, v, o, gate, up, down,
// and the 128256-token head; 618 MB of 4-bit weights, random), 1..6 rows per call, one thread, medians of 7 passes.
// Argument: the group size G (0: per output channel). Build as the kernel is built:
//   g++ -O3 -march=native -std=c++17 -DC10_USING_CUSTOM_GENERATED_MACROS -DET_USE_THREADPOOL -I$EI \
//       -I$EI/executorch/runtime/core/portable_type/c10 results/probes/linear_q4_rows.cpp -L$EL -lexecutorch \
//       -lexecutorch_threadpool -Wl,-rpath,$EL -o linear_q4_rows   (EI, EL: executorch's include and lib folders)
//   taskset -c 0 ./linear_q4_rows 0
#include "../../runtime/kernels/linear_q4.cpp"
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

using namespace layerskip::q4;

struct Linear {
  int64_t n, k, groups;
  std::vector<uint8_t> w;
  std::vector<float> scales, sums, out;
};

int main(int argc, char** argv) {
  const int64_t group = argc > 1 ? atoi(argv[1]) : 0;
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (N, K)
  for (int layer = 0; layer < 16; ++layer)
    for (auto nk : {std::pair<int64_t, int64_t>{2048, 2048}, {512, 2048}, {512, 2048}, {2048, 2048}, {8192, 2048},
                    {8192, 2048}, {2048, 8192}})
      shapes.push_back(nk);
  shapes.push_back({128256, 2048});
  std::mt19937 rng(0);
  std::vector<Linear> linears;
  for (auto [n, k] : shapes) {
    const int64_t groups = group ? k / group : 1;
    Linear l{n, k, groups, std::vector<uint8_t>(n * k / 2), std::vector<float>(groups * n, 0.01f),
             std::vector<float>(n, 0.5f), std::vector<float>(8 * n)};
    for (auto& b : l.w) b = static_cast<uint8_t>(rng());
    linears.push_back(std::move(l));
  }
  std::vector<float> x(8 * 8192);
  for (auto& v : x) v = (rng() % 1000) / 500.0f - 1.0f;
  std::vector<uint8_t> a(8 * 8192);
  std::vector<int32_t> offset(8 * 1024);
  float zero[8], scale[8];
  for (int rows = 1; rows <= 6; ++rows) {
    std::vector<double> ms;
    for (int repeat = 0; repeat < 7; ++repeat) {
      const auto start = std::chrono::steady_clock::now();
      for (auto& l : linears) {
        for (int r = 0; r < rows; ++r)
          quantize_row(x.data() + r * l.k, l.k, l.groups, a.data() + r * l.k, &offset[r * l.groups], &zero[r],
                       &scale[r]);
        const Rows quantized{a.data(), offset.data(), zero, scale, l.k, l.groups};
        blocks(quantized, rows, Weights{l.w.data(), l.k / 8, l.n / 16},
               Scales{l.scales.data(), l.sums.data(), l.n, l.groups}, 0, l.n / 16, l.out.data());
      }
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(ms.begin(), ms.end());
    std::printf("group %lld, %d rows: %.2f ms\n", static_cast<long long>(group), rows, ms[3]);
  }
}
