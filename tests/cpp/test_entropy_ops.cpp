// The entropy ops through the public C++ API against the naive float64 reference: softmax
// probabilities, query/key (causal, GQA, bool and additive masks, padding), every dtype.
#include <headprune/headprune.h>

#include <cmath>
#include <limits>

#include "check.h"
#include "reference.h"

namespace {

at::Tensor stats_of_probs(const at::Tensor& probs, const std::optional<at::Tensor>& query_mask = std::nullopt,
                          double eps = 1e-8) {
  at::Tensor stats = at::zeros({probs.size(1), headprune::kNumStats}, at::kDouble);
  headprune::entropy_stats_from_probs_accumulate_(stats, probs, query_mask, eps);
  return stats;
}

at::Tensor stats_of_qk(const at::Tensor& q, const at::Tensor& k, double scale,
                       const std::optional<at::Tensor>& attn_mask = std::nullopt, bool is_causal = false,
                       const std::optional<at::Tensor>& query_mask = std::nullopt) {
  at::Tensor stats = at::zeros({q.size(1), headprune::kNumStats}, at::kDouble);
  headprune::entropy_stats_from_qk_accumulate_(stats, q, k, scale, attn_mask, is_causal, query_mask);
  return stats;
}

// Softmax rows of random logits with some exact zeros (masked keys) and one all-zero row.
at::Tensor random_probs(int64_t B, int64_t H, int64_t Q, int64_t K) {
  at::Tensor z = at::randn({B, H, Q, K}, at::kDouble) * 2.5;
  z = z.masked_fill(at::rand({B, H, Q, K}).lt(0.2), -hp_ref::kInf);
  z.select(-1, 0).fill_(0.5);  // every row keeps a visible key...
  at::Tensor p = at::softmax(z, -1);
  p[0][0][0].zero_();  // ...but this one, which must be skipped
  return p;
}

double scale_of(const at::Tensor& q) { return 1.0 / std::sqrt(static_cast<double>(q.size(-1))); }

}  // namespace

HP_TEST(probs_float64_matches_reference) {
  at::manual_seed(0);
  const at::Tensor p = random_probs(3, 4, 6, 19);
  const at::Tensor qm = hp_ref::right_padding(3, 6);
  HP_CHECK_CLOSE(stats_of_probs(p, qm), hp_ref::stats_from_probs(p, qm), 1e-10, 1e-10);
  HP_CHECK_CLOSE(stats_of_probs(p), hp_ref::stats_from_probs(p), 1e-10, 1e-10);
}

HP_TEST(probs_sums_counts_match_stats_columns) {
  at::manual_seed(1);
  const at::Tensor p = random_probs(2, 3, 5, 33);
  const at::Tensor qm = hp_ref::right_padding(2, 5);
  at::Tensor sums = at::zeros({3}, at::kDouble);
  at::Tensor counts = at::zeros({3}, at::kLong);
  headprune::entropy_from_probs_accumulate_(sums, counts, p, qm);
  const at::Tensor ref = hp_ref::stats_from_probs(p, qm);
  HP_CHECK_CLOSE(sums, ref.select(1, 1), 1e-10, 1e-10);
  HP_CHECK_EQUAL(counts, ref.select(1, 0).to(at::kLong));
  headprune::entropy_from_probs_accumulate_(sums, counts, p, qm);  // accumulators are added to
  HP_CHECK_CLOSE(sums, 2 * ref.select(1, 1), 1e-10, 1e-10);
  HP_CHECK_EQUAL(counts, 2 * ref.select(1, 0).to(at::kLong));
}

HP_TEST(probs_float32_non_contiguous) {
  at::manual_seed(2);
  const at::Tensor heads_inner = random_probs(2, 5, 7, 41).to(at::kFloat).transpose(1, 2).contiguous().transpose(1, 2);
  HP_CHECK(!heads_inner.is_contiguous());
  HP_CHECK_CLOSE(stats_of_probs(heads_inner), hp_ref::stats_from_probs(heads_inner), 1e-5, 1e-4);
  const at::Tensor keys_strided = random_probs(2, 3, 4, 9).to(at::kFloat).transpose(2, 3).contiguous().transpose(2, 3);
  HP_CHECK(keys_strided.stride(3) != 1);
  HP_CHECK_CLOSE(stats_of_probs(keys_strided), hp_ref::stats_from_probs(keys_strided), 1e-5, 1e-4);
}

HP_TEST(probs_half_and_bfloat16) {
  at::manual_seed(3);
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    // The reference sees the same rounded inputs, so only the float32 math differs.
    const at::Tensor p = random_probs(2, 3, 4, 300).to(dtype);
    HP_CHECK_CLOSE(stats_of_probs(p), hp_ref::stats_from_probs(p), 1e-4, 1e-3);
  }
}

HP_TEST(probs_float32_subnormal_rest) {
  // Every entry after the first is a subnormal float (no zeros, so the reference's
  // p log(p + eps) is defined for eps = 0 too): the rest entropy as computed in float64.
  at::manual_seed(10);
  const double tiny = std::numeric_limits<float>::min();
  at::Tensor p = (at::rand({1, 3, 2, 70}, at::kDouble) * tiny + tiny * 1e-3).to(at::kFloat);
  p.select(-1, 0).fill_(0.5);
  for (double eps : {0.0, 1e-8}) {
    HP_CHECK_CLOSE(stats_of_probs(p, std::nullopt, eps), hp_ref::stats_from_probs(p, std::nullopt, eps), 1e-9, 1e-6);
  }
}

HP_TEST(qk_float64_causal_gqa_padding) {
  at::manual_seed(4);
  const at::Tensor q = at::randn({2, 6, 7, 8}, at::kDouble) * 2;
  const at::Tensor k = at::randn({2, 2, 11, 8}, at::kDouble) * 2;  // 3 query heads per KV head
  const at::Tensor qm = hp_ref::right_padding(2, 7);
  HP_CHECK_CLOSE(stats_of_qk(q, k, scale_of(q), std::nullopt, true, qm),
                 hp_ref::stats_from_qk(q, k, scale_of(q), std::nullopt, true, qm), 1e-10, 1e-10);
  HP_CHECK_CLOSE(stats_of_qk(q, k, 0.7), hp_ref::stats_from_qk(q, k, 0.7), 1e-10, 1e-10);
}

HP_TEST(qk_float32_long_rows_key_padding) {
  at::manual_seed(5);
  const int64_t K = 1300;  // several key blocks per row
  const at::Tensor q = at::randn({2, 4, 9, 16});
  const at::Tensor k = at::randn({2, 4, K, 16});
  const at::Tensor keep = at::arange(K).unsqueeze(0).lt(at::tensor({K, K - 257}).unsqueeze(1));
  const at::Tensor attn = keep.view({2, 1, 1, K});  // bool, broadcast over heads and queries
  HP_CHECK_CLOSE(stats_of_qk(q, k, scale_of(q), attn, true), hp_ref::stats_from_qk(q, k, scale_of(q), attn, true),
                 1e-5, 1e-4);
}

HP_TEST(qk_additive_mask_with_fully_masked_row) {
  at::manual_seed(6);
  const at::Tensor q = at::randn({1, 2, 5, 8});
  const at::Tensor k = at::randn({1, 1, 6, 8});
  at::Tensor bias = at::randn({1, 1, 5, 6});
  bias = bias.masked_fill(at::rand({1, 1, 5, 6}).lt(0.3), std::numeric_limits<float>::lowest());
  bias[0][0][2].fill_(-hp_ref::kInf);  // row 2 sees no key: skipped
  const at::Tensor got = stats_of_qk(q, k, 0.5, bias);
  HP_CHECK_CLOSE(got, hp_ref::stats_from_qk(q, k, 0.5, bias), 1e-5, 1e-5);
  HP_CHECK(got.select(1, 0).le(4).all().item<bool>());
}

HP_TEST(qk_half_and_bfloat16) {
  at::manual_seed(7);
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    const at::Tensor q = at::randn({2, 4, 6, 32}).to(dtype);
    const at::Tensor k = at::randn({2, 2, 70, 32}).to(dtype);
    const at::Tensor qm = hp_ref::right_padding(2, 6);
    HP_CHECK_CLOSE(stats_of_qk(q, k, scale_of(q), std::nullopt, true, qm),
                   hp_ref::stats_from_qk(q, k, scale_of(q), std::nullopt, true, qm), 1e-4, 1e-3);
  }
}

HP_TEST(qk_sums_counts_match_stats_columns) {
  at::manual_seed(8);
  const at::Tensor q = at::randn({3, 2, 4, 8}, at::kDouble);
  const at::Tensor k = at::randn({3, 2, 5, 8}, at::kDouble);
  at::Tensor sums = at::zeros({2}, at::kDouble);
  at::Tensor counts = at::zeros({2}, at::kLong);
  headprune::entropy_from_qk_accumulate_(sums, counts, q, k, 0.3, std::nullopt, true);
  const at::Tensor ref = hp_ref::stats_from_qk(q, k, 0.3, std::nullopt, true);
  HP_CHECK_CLOSE(sums, ref.select(1, 1), 1e-10, 1e-10);
  HP_CHECK_EQUAL(counts, ref.select(1, 0).to(at::kLong));
}

HP_TEST(attention_output_and_stats_match_reference) {
  at::manual_seed(9);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const at::Tensor q = at::randn({2, 6, 7, 8}, dtype) * 2;
    const at::Tensor k = at::randn({2, 2, 600, 8}, dtype);  // GQA, two key blocks
    const at::Tensor v = at::randn({2, 2, 600, 5}, dtype);
    const at::Tensor qm = hp_ref::right_padding(2, 7);
    at::Tensor stats = at::zeros({6, headprune::kNumStats}, at::kDouble);
    const at::Tensor out = headprune::attention_stats_accumulate_(stats, q, k, v, scale_of(q), std::nullopt, true, qm);
    const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
    HP_CHECK_CLOSE(stats, hp_ref::stats_from_qk(q, k, scale_of(q), std::nullopt, true, qm), tol, tol);
    const at::Tensor z = hp_ref::attention_logits(q, k, scale_of(q), std::nullopt, true);
    const at::Tensor want = at::matmul(at::softmax(z, -1), v.to(at::kDouble).repeat_interleave(3, 1));
    HP_CHECK(out.scalar_type() == dtype);
    HP_CHECK_CLOSE(out.to(at::kDouble), want, tol, tol);
  }
}


HP_TEST(undefined_tensors_are_refused_by_name) {
  const at::Tensor q = at::randn({1, 2, 3, 4}), k = at::randn({1, 2, 5, 4}), v = at::randn({1, 2, 5, 4});
  const at::Tensor p = random_probs(1, 2, 3, 5);
  at::Tensor stats = at::zeros({2, headprune::kNumStats}, at::kDouble);
  at::Tensor sums = at::zeros({2}, at::kDouble), counts = at::zeros({2}, at::kLong), none;
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, none, 0.5), "key: expected a tensor, got an undefined");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, none, k, 0.5), "query: expected a tensor");
  HP_CHECK_THROWS(headprune::entropy_stats_from_probs_accumulate_(stats, none), "probs: expected a tensor");
  HP_CHECK_THROWS(headprune::entropy_stats_from_probs_accumulate_(none, p), "stats: expected a tensor");
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums, none, p), "counts: expected a tensor");
  HP_CHECK_THROWS(headprune::attention_stats_accumulate_(stats, q, k, none, 0.5), "value: expected a tensor");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k, 0.5, at::Tensor()),
                  "attn_mask: got an undefined tensor");
  HP_CHECK_THROWS(headprune::entropy_stats_from_probs_accumulate_(stats, p, at::Tensor()),
                  "query_mask: got an undefined tensor");
  at::Tensor x = at::randn({3, 8});
  HP_CHECK_THROWS(headprune::apply_head_mask_(x, none, 4, 1), "mask: expected a tensor");
  HP_CHECK(stats.eq(0).all().item<bool>() && sums.eq(0).all().item<bool>() && counts.eq(0).all().item<bool>());
}

int main(int argc, char** argv) { return hp_test::run_all(argc, argv); }
