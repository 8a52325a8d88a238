// What a C++ inference service does with headprune: stream attention entropies per head over
// incoming batches, merge the workers' statistics, pick heads to prune and mask them in the
// output projection. Copy it; it only needs find_package(headprune) (see CMakeLists.txt here).
//
//   service_example                        random toy attention (8 query heads, 2 KV heads)
//   service_example qk.pt [state.pt]       tensors saved in Python with
//       torch.save({"query": q, "key": k, "query_mask": m}, "qk.pt")   # query_mask optional
//     q [B, Hq, Q, D], k [B, Hkv, K, D], m [B, Q] bool; state.pt receives the [Hq, 6] float64
//     statistics (torch.load it in Python: EntropyAccumulator.load_state_dict({"stats": ...})).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <headprune/headprune.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <numeric>
#include <string>
#include <vector>

namespace {

struct Batch {
  at::Tensor query, key;
  std::optional<at::Tensor> query_mask;
};

// Each sample of the file is one "request" (a batch of one).
std::vector<Batch> load_batches(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const c10::IValue saved = torch::jit::pickle_load(bytes);
  TORCH_CHECK(saved.isGenericDict(), path, ": expected a dict {\"query\", \"key\", [\"query_mask\"]}");
  const auto dict = saved.toGenericDict();
  const at::Tensor q = dict.at("query").toTensor();
  const at::Tensor k = dict.at("key").toTensor();
  std::optional<at::Tensor> m;
  if (dict.contains("query_mask")) m = dict.at("query_mask").toTensor();
  std::vector<Batch> batches;
  for (int64_t b = 0; b < q.size(0); ++b) {
    Batch one{q.narrow(0, b, 1), k.narrow(0, b, 1), std::nullopt};
    if (m) one.query_mask = m->narrow(0, b, 1);
    batches.push_back(one);
  }
  return batches;
}

// Four batches of two right-padded sequences of a toy GQA layer.
std::vector<Batch> random_batches() {
  at::manual_seed(0);
  std::vector<Batch> batches;
  for (int i = 0; i < 4; ++i) {
    const at::Tensor lengths = at::tensor({32 - 3 * i, 20 + i});
    batches.push_back({at::randn({2, 8, 32, 16}) * 1.5, at::randn({2, 2, 32, 16}) * 1.5,
                       at::arange(32).unsqueeze(0).lt(lengths.unsqueeze(1))});
  }
  return batches;
}

void save_stats(const at::Tensor& stats, const std::string& path) {
  const std::vector<char> bytes = torch::jit::pickle_save(stats.cpu());
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  TORCH_CHECK(out.good(), "cannot write ", path);
}

// Fail at start-up, not on the first request, if the library's ops did not load.
void check_ops_loaded() {
  const auto op = c10::Dispatcher::singleton().findSchema({"headprune::entropy_from_qk_accumulate_", ""});
  TORCH_CHECK(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU),
              "headprune::entropy_from_qk_accumulate_ is not registered: is libheadprune linked?");
  std::printf("ops: headprune::entropy_from_qk_accumulate_ registered (CPU kernel)\n");
}

}  // namespace

int main(int argc, char** argv) try {
  check_ops_loaded();
  const std::vector<Batch> batches = argc > 1 ? load_batches(argv[1]) : random_batches();
  const int64_t heads = batches.front().query.size(1);
  const int64_t head_dim = batches.front().query.size(3);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const headprune::BuildInfo info = headprune::build_info();
  std::printf("headprune %s (libtorch %s, CPU kernels %s)\n", info.version.c_str(), info.torch_version.c_str(),
              headprune::cpu_isa().c_str());

  // Two "workers" each see every other batch; their states merge by addition at the end.
  headprune::EntropyAccumulator worker_a(heads), worker_b(heads);
  for (size_t i = 0; i < batches.size(); ++i) {
    const Batch& b = batches[i];
    (i % 2 == 0 ? worker_a : worker_b).entropy_stats_from_qk(b.query, b.key, scale, std::nullopt, /*is_causal=*/true, b.query_mask);
  }
  headprune::EntropyAccumulator& acc = worker_a.merge(worker_b);

  const at::Tensor mean = acc.mean(), stdev = acc.std(), sink = acc.first_mass_mean(), rows = acc.count();
  std::printf("%zu batches, per-head attention entropy (nats):\n head    rows    mean     std   sink mass\n",
              batches.size());
  for (int64_t h = 0; h < heads; ++h)
    std::printf("%5lld %7lld %7.4f %7.4f %8.4f\n", static_cast<long long>(h), static_cast<long long>(rows[h].item<int64_t>()),
                mean[h].item<double>(), stdev[h].item<double>(), sink[h].item<double>());

  // Prune the quarter of heads with the most diffuse attention (highest mean entropy).
  const int64_t n_prune = std::max<int64_t>(1, heads / 4);
  const at::Tensor pruned = std::get<1>(mean.nan_to_num(0.0).topk(n_prune));
  const at::Tensor mask = at::ones({heads}).index_fill_(0, pruned, 0.0);

  // o_proj.weight [hidden, heads * head_dim]: a pruned head's input columns become zero.
  at::Tensor o_proj = at::randn({64, heads * head_dim});
  {
    at::NoGradGuard no_grad;  // the op refuses to modify a parameter while grad mode is on
    headprune::apply_head_mask_(o_proj, mask, head_dim, /*dim=*/1);
  }
  const int64_t zero_columns = o_proj.eq(0).all(0).sum().item<int64_t>();
  std::printf("pruned heads:");
  for (int64_t i = 0; i < n_prune; ++i) std::printf(" %lld", static_cast<long long>(pruned[i].item<int64_t>()));
  std::printf("\no_proj %lld x %lld: %lld zero columns (%lld heads x %lld)\n", static_cast<long long>(o_proj.size(0)),
              static_cast<long long>(o_proj.size(1)), static_cast<long long>(zero_columns),
              static_cast<long long>(n_prune), static_cast<long long>(head_dim));

  if (argc > 2) {
    save_stats(acc.stats(), argv[2]);
    std::printf("statistics [%lld, %lld] written to %s\n", static_cast<long long>(heads),
                static_cast<long long>(headprune::kNumStats), argv[2]);
  }
  return zero_columns == n_prune * head_dim ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "service_example: %s\n", e.what());
  return 2;
}
