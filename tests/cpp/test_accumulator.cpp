// headprune::EntropyAccumulator: streaming == one shot, merge, summaries, state save/load.
#include <headprune/headprune.h>

#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "reference.h"

namespace {

constexpr int64_t kHeads = 4;
constexpr int64_t kQ = 6;
constexpr int64_t kK = 6;
constexpr double kScale = 0.35;

struct Batch {
  at::Tensor q, k, query_mask;
};

std::vector<Batch> batches(int64_t n, uint64_t seed) {
  at::manual_seed(seed);
  std::vector<Batch> out;
  for (int64_t i = 0; i < n; ++i)
    out.push_back({at::randn({2, kHeads, kQ, 8}, at::kDouble), at::randn({2, 2, kK, 8}, at::kDouble),
                   hp_ref::right_padding(2, kQ).roll(i, 0)});
  return out;
}

at::Tensor cat(const std::vector<Batch>& bs, at::Tensor Batch::*field) {
  std::vector<at::Tensor> parts;
  for (const Batch& b : bs) parts.push_back(b.*field);
  return at::cat(parts, 0);
}

}  // namespace

HP_TEST(merge_of_shards_equals_one_shot) {
  const std::vector<Batch> bs = batches(4, 10);
  headprune::EntropyAccumulator shard_a(kHeads), shard_b(kHeads), one_shot(kHeads);
  for (size_t i = 0; i < bs.size(); ++i)
    (i % 2 ? shard_b : shard_a).entropy_stats_from_qk(bs[i].q, bs[i].k, kScale, std::nullopt, true, bs[i].query_mask);
  shard_a.merge(shard_b);
  one_shot.entropy_stats_from_qk(cat(bs, &Batch::q), cat(bs, &Batch::k), kScale, std::nullopt, true, cat(bs, &Batch::query_mask));
  HP_CHECK_CLOSE(shard_a.stats(), one_shot.stats(), 1e-12, 1e-12);
  HP_CHECK_CLOSE(one_shot.stats(), hp_ref::stats_from_qk(cat(bs, &Batch::q), cat(bs, &Batch::k), kScale, std::nullopt,
                                                         true, cat(bs, &Batch::query_mask)),
                 1e-10, 1e-10);
}

HP_TEST(summaries_follow_the_stats_columns) {
  const std::vector<Batch> bs = batches(2, 11);
  headprune::EntropyAccumulator acc(kHeads);
  for (const Batch& b : bs) acc.entropy_stats_from_qk(b.q, b.k, kScale, std::nullopt, false, b.query_mask);
  const at::Tensor s = acc.stats();
  HP_CHECK(s.scalar_type() == at::kDouble && s.size(0) == kHeads && s.size(1) == headprune::kNumStats);
  const at::Tensor c = s.select(1, 0);
  const at::Tensor mean = s.select(1, 1) / c;
  HP_CHECK_EQUAL(acc.count(), c.to(at::kLong));
  HP_CHECK_CLOSE(acc.mean(), mean, 1e-14, 0);
  HP_CHECK_CLOSE(acc.std(), (s.select(1, 2) / c - mean * mean).clamp_min(0).sqrt(), 1e-12, 1e-12);
  HP_CHECK_CLOSE(acc.normalized_mean(), s.select(1, 3) / c, 1e-14, 0);
  HP_CHECK_CLOSE(acc.first_mass_mean(), s.select(1, 4) / c, 1e-14, 0);
  HP_CHECK_CLOSE(acc.rest_mean(), s.select(1, 5) / c, 1e-14, 0);
  HP_CHECK(acc.std().gt(0).all().item<bool>());
}

HP_TEST(identical_rows_have_zero_std) {
  // E[H^2] - E[H]^2 of identical rows is rounding, not spread: 0, not about 1e-8
  at::manual_seed(13);
  const at::Tensor rows = at::softmax(at::randn({1, kHeads, 1, 7}, at::kFloat), -1);
  headprune::EntropyAccumulator acc(kHeads);
  acc.entropy_stats_from_probs(rows.expand({4, kHeads, 50, 7}).contiguous());
  HP_CHECK_EQUAL(acc.std(), at::zeros({kHeads}, at::kDouble));
  HP_CHECK(acc.mean().gt(0).all().item<bool>());
}

HP_TEST(empty_heads_have_nan_means) {
  headprune::EntropyAccumulator acc(3);
  HP_CHECK(acc.num_heads() == 3 && acc.device() == c10::Device(c10::kCPU));
  HP_CHECK(at::isnan(acc.mean()).all().item<bool>());
  HP_CHECK(at::isnan(acc.std()).all().item<bool>());
  HP_CHECK_EQUAL(acc.count(), at::zeros({3}, at::kLong));
}

HP_TEST(update_probs_matches_reference) {
  at::manual_seed(12);
  const at::Tensor probs = at::softmax(at::randn({2, kHeads, 5, 9}, at::kDouble) * 3, -1);
  headprune::EntropyAccumulator acc(kHeads);
  acc.entropy_stats_from_probs(probs).entropy_stats_from_probs(probs.narrow(0, 0, 1));
  const at::Tensor expected = hp_ref::stats_from_probs(probs) + hp_ref::stats_from_probs(probs.narrow(0, 0, 1));
  HP_CHECK_CLOSE(acc.stats(), expected, 1e-10, 1e-10);
}

HP_TEST(attend_returns_attention_and_adds_the_rows) {
  at::manual_seed(13);
  const at::Tensor q = at::randn({2, kHeads, 6, 8}, at::kDouble);
  const at::Tensor k = at::randn({2, kHeads, 9, 8}, at::kDouble);
  const at::Tensor v = at::randn({2, kHeads, 9, 4}, at::kDouble);
  headprune::EntropyAccumulator acc(kHeads);
  const at::Tensor out = acc.attention_stats(q, k, v, 0.4, std::nullopt, true);
  HP_CHECK_CLOSE(acc.stats(), hp_ref::stats_from_qk(q, k, 0.4, std::nullopt, true), 1e-10, 1e-10);
  const at::Tensor z = hp_ref::attention_logits(q, k, 0.4, std::nullopt, true);
  HP_CHECK_CLOSE(out, at::matmul(at::softmax(z, -1), v), 1e-10, 1e-10);
}

HP_TEST(load_stats_round_trip_and_reset) {
  const std::vector<Batch> bs = batches(1, 13);
  headprune::EntropyAccumulator acc(kHeads), restored(kHeads);
  acc.entropy_stats_from_qk(bs[0].q, bs[0].k, kScale);
  at::Tensor saved = acc.stats().clone().to(at::kFloat).to(at::kDouble);  // any floating dtype loads
  restored.load_stats(saved);
  saved.zero_();  // load_stats copied
  HP_CHECK_EQUAL(restored.stats(), acc.stats().to(at::kFloat).to(at::kDouble));
  restored.merge(restored);  // self-merge doubles
  HP_CHECK_EQUAL(restored.count(), 2 * acc.count());
  restored.reset();
  HP_CHECK(restored.stats().eq(0).all().item<bool>());
}

HP_TEST(bad_state_and_merge_are_refused) {
  headprune::EntropyAccumulator acc(kHeads), other(kHeads + 1);
  HP_CHECK_THROWS(headprune::EntropyAccumulator(0), "num_heads");
  HP_CHECK_THROWS(acc.merge(other), "other");
  HP_CHECK_THROWS(acc.load_stats(at::zeros({kHeads + 1, headprune::kNumStats}, at::kDouble)), "stats");
  HP_CHECK_THROWS(acc.load_stats(at::zeros({kHeads, headprune::kNumStats}, at::kLong)), "stats");
  HP_CHECK_THROWS(acc.load_stats(at::Tensor()), "stats");
  at::Tensor bad = at::zeros({kHeads, headprune::kNumStats}, at::kDouble);
  bad[1][2] = std::numeric_limits<double>::quiet_NaN();
  HP_CHECK_THROWS(acc.load_stats(bad), "stats");
  bad.zero_();
  bad[0][0] = -1;
  HP_CHECK_THROWS(acc.load_stats(bad), "stats");
  const at::Tensor q = at::randn({1, kHeads + 1, 5, 8});  // the op would have named its `stats`
  HP_CHECK_THROWS(acc.entropy_stats_from_qk(q, q, 0.3), "query: expected 4 heads");
  HP_CHECK_THROWS(acc.attention_stats(q, q, q, 0.3), "query: expected 4 heads");
  HP_CHECK_THROWS(acc.entropy_stats_from_probs(at::softmax(q, -1)), "probs: expected 4 heads");
  HP_CHECK(acc.stats().eq(0).all().item<bool>());  // untouched by the refused loads and updates
}

HP_TEST(failed_update_leaves_state_untouched) {
  const std::vector<Batch> bs = batches(1, 14);
  headprune::EntropyAccumulator acc(kHeads);
  acc.entropy_stats_from_qk(bs[0].q, bs[0].k, kScale);
  const at::Tensor before = acc.stats().clone();
  at::Tensor q = bs[0].q.clone();
  q[1][2][3][4] = std::numeric_limits<double>::quiet_NaN();
  HP_CHECK_THROWS(acc.entropy_stats_from_qk(q, bs[0].k, kScale), "NaN");
  HP_CHECK_THROWS(acc.entropy_stats_from_qk(bs[0].q.narrow(1, 0, 2), bs[0].k, kScale), "query: expected 4 heads");
  HP_CHECK_EQUAL(acc.stats(), before);
}

int main(int argc, char** argv) { return hp_test::run_all(argc, argv); }
