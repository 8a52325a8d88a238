// Naive float64 ATen reference of the entropy statistics: materialises the full attention map,
// a line-by-line port of python/headprune/reference.py (the Python tests' oracle).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>

namespace hp_ref {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Rows {  // each [B, H, Q]
  at::Tensor H, n, p_first, H_rest;
};

inline at::Tensor zero_like(const at::Tensor& t) { return at::zeros({}, t.options()); }

// Float64 logits [B, Hq, Q, K] with -inf at masked keys.
inline at::Tensor attention_logits(const at::Tensor& query, const at::Tensor& key, double scale,
                                   const std::optional<at::Tensor>& attn_mask, bool is_causal) {
  const at::Tensor q = query.to(at::kDouble);
  at::Tensor k = key.to(at::kDouble);
  const int64_t group = q.size(1) / k.size(1);
  if (group > 1) k = k.repeat_interleave(group, 1);
  at::Tensor z = at::matmul(q, k.transpose(-1, -2)) * scale;
  const int64_t Q = z.size(-2), K = z.size(-1);
  if (attn_mask.has_value()) {
    z = attn_mask->scalar_type() == at::kBool ? z.masked_fill(attn_mask->logical_not(), -kInf)
                                              : z + attn_mask->to(at::kDouble);
  }
  if (is_causal) {
    const at::Tensor i = at::arange(Q).unsqueeze(1);
    const at::Tensor j = at::arange(K).unsqueeze(0);
    z = z.masked_fill(j.gt(i + (K - Q)), -kInf);
  }
  return z.masked_fill(z.le(-1e37), -kInf);
}

inline at::Tensor first_visible(const at::Tensor& visible) { return visible.to(at::kInt).argmax(-1, true); }

inline Rows rows_from_logits(const at::Tensor& z) {
  const at::Tensor visible = at::isfinite(z);
  const at::Tensor n = visible.sum(-1);
  const at::Tensor p = at::softmax(z, -1).nan_to_num(0.0);
  const at::Tensor H = -at::where(visible, p * at::log_softmax(z, -1), zero_like(z)).sum(-1);
  const at::Tensor first = first_visible(visible);
  const at::Tensor p_first = p.gather(-1, first).squeeze(-1);
  const at::Tensor rest = z.scatter(-1, first, -kInf);
  const at::Tensor pr = at::softmax(rest, -1).nan_to_num(0.0);
  at::Tensor H_rest = -at::where(at::isfinite(rest), pr * at::log_softmax(rest, -1), zero_like(z)).sum(-1);
  H_rest = at::where(n.ge(2), H_rest, zero_like(H_rest));
  return {H, n, p_first, H_rest};
}

// The formula as written: H = -sum p log(p + eps); n counts non-zero entries.
inline Rows rows_from_probs(const at::Tensor& probs, double eps) {
  const at::Tensor p = probs.to(at::kDouble);
  const at::Tensor plogp = p * at::log(p + eps);
  const at::Tensor H = -plogp.sum(-1);
  const at::Tensor visible = p.ne(0);
  const at::Tensor n = visible.sum(-1);
  const at::Tensor first = first_visible(visible);
  const at::Tensor p_first = p.gather(-1, first).squeeze(-1);
  const at::Tensor is_first = at::zeros_like(visible).scatter(-1, first, true);
  const at::Tensor s_rest = at::where(is_first, zero_like(p), p).sum(-1).clamp_min(1e-300);
  const at::Tensor a_rest = at::where(is_first, zero_like(p), plogp).sum(-1);
  const at::Tensor H_rest = at::where(n.ge(2), at::log(s_rest) - a_rest / s_rest, zero_like(p));
  return {H, n, p_first, H_rest};
}

// Per-head statistics [H, 6] over valid rows (n > 0 and query_mask).
inline at::Tensor reduce(const Rows& r, const std::optional<at::Tensor>& query_mask) {
  at::Tensor valid = r.n.gt(0);
  if (query_mask.has_value()) valid = valid.logical_and(query_mask->unsqueeze(1));
  const at::Tensor zero = zero_like(r.H);
  const at::Tensor logn = at::log(r.n.to(at::kDouble).clamp_min(1)).clamp_min(1e-300);
  const at::Tensor norm = at::where(r.n.ge(2), r.H / logn, zero);
  std::vector<at::Tensor> cols;
  for (const at::Tensor& c : {valid.to(at::kDouble), r.H, r.H * r.H, norm, r.p_first, r.H_rest})
    cols.push_back(at::where(valid, c, zero).sum(at::IntArrayRef{0, 2}));
  return at::stack(cols, -1);
}

inline at::Tensor stats_from_probs(const at::Tensor& probs, const std::optional<at::Tensor>& query_mask = std::nullopt,
                                   double eps = 1e-8) {
  return reduce(rows_from_probs(probs, eps), query_mask);
}

inline at::Tensor stats_from_qk(const at::Tensor& query, const at::Tensor& key, double scale,
                                const std::optional<at::Tensor>& attn_mask = std::nullopt, bool is_causal = false,
                                const std::optional<at::Tensor>& query_mask = std::nullopt) {
  return reduce(rows_from_logits(attention_logits(query, key, scale, attn_mask, is_causal)), query_mask);
}

// Right-padding query mask [B, Q]: batch b keeps its first Q - b rows (at least one).
inline at::Tensor right_padding(int64_t B, int64_t Q) {
  const at::Tensor pos = at::arange(Q).unsqueeze(0);
  const at::Tensor len = (Q - at::arange(B)).clamp_min(1).unsqueeze(1);
  return pos.lt(len);
}

}  // namespace hp_ref
