// Row statistics of softmax(q k^T * scale + mask) streamed over blocks of logits, without
// forming the Q x K map.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "logit_blocks.h"

namespace headprune::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
namespace k = headprune::kernels;

template <typename acc_t>
void push_block(k::RowState& s, acc_t* z, int64_t kn) {
  using Vec = Vectorized<acc_t>;
  int64_t start = 0;
  if (s.n == 0) {  // the first visible key is kept apart (attention-sink statistics)
    while (start < kn && !k::is_visible(z[start])) ++start;
    if (start == kn) return;
    s.z0 = static_cast<double>(z[start]);
    s.n = 1;
    ++start;
  }
  const auto [bmax, cnt] = block_max_count(z, start, kn);
  s.n += cnt;
  if (cnt == 0) return;
  if (!(static_cast<double>(bmax) <= s.m)) k::rescale(s, static_cast<double>(bmax));
  const acc_t m = static_cast<acc_t>(s.m);
  const Vec vm(m), vfloor(static_cast<acc_t>(k::kExpFloor));
  Vec vl(acc_t(0)), vt(acc_t(0));
  int64_t j = start;
  for (; j + Vec::size() <= kn; j += Vec::size()) {
    Vec x = at::vec::maximum(Vec::loadu(z + j) - vm, vfloor);
    Vec e = x.exp();
    vl = vl + e;
    vt = at::vec::fmadd(e, x, vt);
  }
  if (j < kn) {
    // Tail padded with the floor: exp(floor) == 0 adds nothing.
    Vec x = Vec::set(vfloor, Vec::loadu(z + j, kn - j) - vm, kn - j);
    x = at::vec::maximum(x, vfloor);
    Vec e = x.exp();
    vl = vl + e;
    vt = at::vec::fmadd(e, x, vt);
  }
  auto hsum = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v); };
  s.l += hsum(vl);
  s.t += hsum(vt);
}

// Applies attn_mask and the causal limit to a [bq, kn] block of logits (row stride ldz).

// The QK kernel's per-thread worker: one running state per row of the query block.
template <typename acc_t>
struct QkWorker {
  std::vector<k::RowState> state;
  double* rows;
  int64_t Hq, Q;

  void begin(const QueryBlock&) { std::fill(state.begin(), state.end(), k::RowState{}); }
  void block(const QueryBlock& t, const at::Tensor& z, int64_t, int64_t kn) {
    acc_t* zp = z.data_ptr<acc_t>();
    for (int64_t i = 0; i < t.bq; ++i) push_block<acc_t>(state[i], zp + i * kn, kn);
  }
  void end(const QueryBlock& t) {
    for (int64_t i = 0; i < t.bq; ++i) k::finalize(state[i], rows + (((t.b * Hq + t.h) * Q) + t.i0 + i) * k::kRowFields);
  }
};

template <typename acc_t>
void qk_rows_typed(const at::Tensor& query, const at::Tensor& key, double scale, const std::optional<at::Tensor>& mask,
                   bool is_causal, at::Tensor& rows) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  // Half/bfloat16 inputs are widened once (O(inputs)); logits are formed in acc_t.
  const at::Tensor q = query.to(acc).contiguous();
  const at::Tensor kk = key.to(acc).contiguous();
  double* out = rows.data_ptr<double>();
  stream_logit_blocks<acc_t>(q, kk, scale, mask, is_causal, q.size(3), [&](int64_t bq_max) {
    return QkWorker<acc_t>{std::vector<k::RowState>(bq_max), out, q.size(1), q.size(2)};
  });
}

inline void qk_rows(const at::Tensor& query, const at::Tensor& key, double scale, const std::optional<at::Tensor>& mask,
                    bool is_causal, at::Tensor& rows) {
  if (query.scalar_type() == at::kDouble) return qk_rows_typed<double>(query, key, scale, mask, is_causal, rows);
  return qk_rows_typed<float>(query, key, scale, mask, is_causal, rows);
}

}  // namespace CPU_CAPABILITY
}  // namespace headprune::cpu
