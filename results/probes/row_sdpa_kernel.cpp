// Probe: layerskip::row_sdpa's attention alone, us per layer (4 KV heads x 64, cache of 768) by rows and keys, best of
// 20 x 100; and whether each row equals the row computed alone. Build and run (from the repository root):
//   ET=$(python -c "import executorch, os; print(list(executorch.__path__)[0])")
//   g++ -O3 -march=native -std=c++17 -DC10_USING_CUSTOM_GENERATED_MACROS -DET_USE_THREADPOOL -I$ET/include \
//     -I$ET/include/executorch/runtime/core/portable_type/c10 results/probes/row_sdpa_kernel.cpp -L$ET/lib \
//     -lexecutorch -lexecutorch_threadpool -Wl,-rpath,$ET/lib -o /tmp/row_sdpa_kernel
//   taskset -c 0 /tmp/row_sdpa_kernel POSITION ROWS
#include "../../runtime/kernels/row_sdpa.cpp"
#include <chrono>
#include <cstdio>
#include <random>
using namespace layerskip;
int main(int argc, char** argv) {
  const int S = 768, HKV = 4, D = 64, pos = atoi(argv[1]), T = atoi(argv[2]);
  std::vector<float> K(S * HKV * D), V(S * HKV * D), Q(T * HKV * D), O(T * HKV * D), w(T * S), acc(T * 2 * D);
  std::mt19937 g(0); std::normal_distribution<float> nd;
  for (auto& x : K) x = nd(g); for (auto& x : V) x = nd(g); for (auto& x : Q) x = nd(g);
  std::vector<const float*> qs(T); std::vector<float*> os(T); std::vector<int64_t> n(T);
  double best = 1e9;
  for (int rep = 0; rep < 20; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < 100; ++it)
      for (int kv = 0; kv < HKV; ++kv) {
        for (int r = 0; r < T; ++r) { qs[r] = Q.data() + (r * HKV + kv) * D; os[r] = O.data() + (r * HKV + kv) * D; n[r] = pos + r + 1; }
        attend_queries(qs.data(), n.data(), T, K.data() + kv * D, V.data() + kv * D, D, HKV * D, S, 0.125f, w.data(), acc.data(), os.data());
      }
    double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / 100;
    best = std::min(best, us);
  }
  // row invariance: row r of this call vs the same row alone
  std::vector<float> O1(HKV * D);
  int bad = 0;
  for (int r = 0; r < T; ++r) for (int kv = 0; kv < HKV; ++kv) {
    const float* q1[1] = {Q.data() + (r * HKV + kv) * D}; float* o1[1] = {O1.data() + kv * D}; int64_t n1[1] = {pos + r + 1};
    attend_queries(q1, n1, 1, K.data() + kv * D, V.data() + kv * D, D, HKV * D, S, 0.125f, w.data(), acc.data(), o1);
    for (int c = 0; c < D; ++c) bad += O1[kv * D + c] != O[(r * HKV + kv) * D + c];
  }
  printf("pos %d rows %d: %.2f us per layer, %.2f per row; %d values differ from the row alone\n", pos, T, best, best / T, bad);
}
