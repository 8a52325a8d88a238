// GPU-free test harness for the CUDA device code in csrc/ops/cuda/entropy_rows.cuh (driven by
// tests/test_cuda_emulation.py, which builds it once: g++ -std=c++20 -O1 -pthread -I csrc emu.cpp).
// Runs the device code of csrc/ops/cuda/entropy_rows.cuh on CPU threads: one std::thread per
// CUDA thread, one block at a time, barriers for __syncthreads and warp intrinsics.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct Dim { unsigned x = 0; };
thread_local Dim threadIdx, blockIdx;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

static std::barrier<>* g_block;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp;
alignas(8) static unsigned char g_slots[64][32][8];

void __syncthreads() { g_block->arrive_and_wait(); }
template <class T> T exch(T v, int src) {
  int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  std::memcpy(g_slots[w][lane], &v, sizeof(T));
  g_warp[w]->arrive_and_wait();
  T r; std::memcpy(&r, g_slots[w][src], sizeof(T));
  g_warp[w]->arrive_and_wait();
  return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return exch(v, (threadIdx.x % 32) ^ o); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return exch(v, src); }
unsigned __ballot_sync(unsigned, int pred) {
  int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  int p = pred ? 1 : 0;
  std::memcpy(g_slots[w][lane], &p, sizeof(int));
  g_warp[w]->arrive_and_wait();
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) { int x; std::memcpy(&x, g_slots[w][i], sizeof(int)); if (x) m |= 1u << i; }
  g_warp[w]->arrive_and_wait();
  return m;
}
int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

#include "ops/cuda/entropy_rows.cuh"

template <class F> void launch(unsigned grid, unsigned block, F f) {
  for (unsigned bx = 0; bx < grid; ++bx) {
    std::barrier<> bar(block);
    g_block = &bar;
    g_warp.clear();
    for (unsigned w = 0; w < block / 32; ++w) g_warp.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; ++t) ts.emplace_back([&, t] { threadIdx.x = t; blockIdx.x = bx; f(); });
    for (auto& t : ts) t.join();
  }
}

template <class T> std::vector<T> load(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  std::fseek(f, 0, SEEK_END); long n = std::ftell(f); std::fseek(f, 0, SEEK_SET);
  std::vector<T> v(n / sizeof(T) + 1);
  if (n) std::fread(v.data(), 1, n, f);
  std::fclose(f);
  return v;
}

using namespace headprune::cuda;

template <class T> int run_qk(const std::string& d, std::vector<long long> m, double scale) {
  // m: B Hq Hkv Q K D causal mask_kind sm0 sm1 sm2 sm3
  QkArgs<T, T> a{};
  auto q = load<T>(d + "/q.bin"), k = load<T>(d + "/k.bin");
  auto mb = load<unsigned char>(d + "/mask.bin");
  auto ma = load<T>(d + "/mask.bin");
  int64_t B = m[0];
  a.query = q.data(); a.key = k.data(); a.Hq = m[1]; a.Hkv = m[2]; a.Q = m[3]; a.K = m[4]; a.D = m[5];
  a.causal = m[6]; a.scale = static_cast<T>(scale);
  if (m[7] == 1) a.mask_bool = reinterpret_cast<const bool*>(mb.data());
  if (m[7] == 2) a.mask_add = ma.data();
  for (int i = 0; i < 4; ++i) a.mask_stride[i] = m[8 + i];
  std::vector<double> rows(B * a.Hq * a.Q * 4, -12345.0);
  a.rows = rows.data();
  using TT = QkTile<T>;
  unsigned grid = B * a.Hq * ceil_div(a.Q, TT::kBlockQ);
  launch(grid, TT::kThreads, [&] { qk_rows_kernel<T, T>(a); });
  FILE* f = std::fopen((d + "/rows.bin").c_str(), "wb");
  std::fwrite(rows.data(), sizeof(double), rows.size(), f);
  std::fclose(f);
  return 0;
}

template <class T> int run_probs(const std::string& d, std::vector<long long> m, double eps) {
  // m: B H Q K sb sh sq sk
  auto p = load<T>(d + "/probs.bin");
  int64_t n_rows = m[0] * m[1] * m[2];
  std::vector<double> rows(n_rows * 4, -12345.0);
  launch(ceil_div(n_rows, kProbsWarps), kProbsWarps * kWarp,
         [&] { probs_rows_kernel<T, T>(p.data(), n_rows, m[1], m[2], m[3], m[4], m[5], m[6], m[7], eps, rows.data()); });
  FILE* f = std::fopen((d + "/rows.bin").c_str(), "wb");
  std::fwrite(rows.data(), sizeof(double), rows.size(), f);
  std::fclose(f);
  return 0;
}

int main(int argc, char** argv) {
  // emu <qk|probs> <f32|f64> <dir> <scale|eps> ints...
  std::string mode = argv[1], dt = argv[2], dir = argv[3];
  double x = std::atof(argv[4]);
  std::vector<long long> m;
  for (int i = 5; i < argc; ++i) m.push_back(std::atoll(argv[i]));
  if (mode == "qk") return dt == "f32" ? run_qk<float>(dir, m, x) : run_qk<double>(dir, m, x);
  return dt == "f32" ? run_probs<float>(dir, m, x) : run_probs<double>(dir, m, x);
}
