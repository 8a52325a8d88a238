// The fused attention kernel: softmax(q k^T * scale + mask) @ v and the rows' statistics from one
// streaming pass over the logits (float32 exponentials as ATen's CPU flash attention).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <vector>

#include "logit_blocks.h"

namespace headprune::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
namespace k = headprune::kernels;

// Per-row state of the fused attention: the entropy state exactly as the qk kernel keeps it
// (the keys after the first, shifted by their running max), and the output's shift om, the
// running max over every visible key. A key's output weight is its entropy-state weight
// e^(z - s.m) times e^(s.m - om) <= 1, so the statistics never lose keys to underflow next
// to a dominant first key, whatever the gap.
struct AttnRow {
  k::RowState s;
  double om = -INFINITY;
};

// Streams one block of logits z[0, kn) of a row: updates the statistics, rescales the row's
// output accumulator o[0, dv) when om grows, and overwrites z with the output weights
// e^(z - om) of the block's keys (0 for masked keys).
template <typename acc_t>
void attend_block(AttnRow& r, acc_t* z, int64_t kn, acc_t* o, int64_t dv) {
  using Vec = Vectorized<acc_t>;
  k::RowState& s = r.s;
  int64_t first = -1;
  if (s.n == 0) {  // the first visible key is kept apart (attention-sink statistics)
    int64_t j = 0;
    while (j < kn && !k::is_visible(z[j])) ++j;
    if (j == kn) {
      std::fill(z, z + kn, acc_t(0));
      return;
    }
    first = j;
    s.z0 = static_cast<double>(z[j]);
    s.n = 1;
    z[j] = -std::numeric_limits<acc_t>::infinity();  // out of the vector passes below
  }
  const auto [bmax, cnt] = block_max_count(z, 0, kn);  // the first key now reads as masked
  s.n += cnt;
  if (cnt > 0 && !(static_cast<double>(bmax) <= s.m)) k::rescale(s, static_cast<double>(bmax));
  double om = r.om;
  if (first >= 0 && !(s.z0 <= om)) om = s.z0;
  if (!(s.m <= om)) om = s.m;  // s.m is -inf until a key after the first is seen
  if (!(om <= r.om)) {  // the output so far was weighted with the old shift
    if (r.om > -INFINITY) {
      const acc_t a = static_cast<acc_t>(std::exp(r.om - om));
      const Vec va(a);
      int64_t d = 0;
      for (; d + Vec::size() <= dv; d += Vec::size()) (Vec::loadu(o + d) * va).store(o + d);
      for (; d < dv; ++d) o[d] *= a;
    }
    r.om = om;
  }
  if (cnt == 0) {
    std::fill(z, z + kn, acc_t(0));
  } else {
    const acc_t m = static_cast<acc_t>(s.m);
    const Vec vm(m), vfloor(static_cast<acc_t>(k::kExpFloor));
    const Vec vc(static_cast<acc_t>(std::exp(s.m - r.om)));
    Vec vl(acc_t(0)), vt(acc_t(0));
    int64_t j = 0;
    for (; j + Vec::size() <= kn; j += Vec::size()) {
      Vec x = at::vec::maximum(Vec::loadu(z + j) - vm, vfloor);
      Vec e = fast_exp(x);
      (e * vc).store(z + j);
      vl = vl + e;
      vt = at::vec::fmadd(e, x, vt);
    }
    if (j < kn) {
      // Tail padded with the floor: exp(floor) == 0 adds nothing.
      Vec x = Vec::set(vfloor, Vec::loadu(z + j, kn - j) - vm, kn - j);
      x = at::vec::maximum(x, vfloor);
      Vec e = fast_exp(x);
      (e * vc).store(z + j, kn - j);
      vl = vl + e;
      vt = at::vec::fmadd(e, x, vt);
    }
    auto hsum = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& c) { return a + c; }, v); };
    s.l += hsum(vl);
    s.t += hsum(vt);
  }
  if (first >= 0) z[first] = static_cast<acc_t>(std::exp(s.z0 - r.om));
}

// The fused kernel's per-thread worker: the rows' states and an output accumulator per query
// block; each block of logits becomes output weights (attend_block), then one GEMM adds
// weights @ values.
template <typename acc_t>
struct AttentionWorker {
  std::vector<AttnRow> state;
  at::Tensor obuf;  // [bq_max, Dv]
  const at::Tensor* vv;
  at::Tensor vb;  // the task's values [K, Dv]
  double* rows;
  acc_t* out;
  int64_t Hq, Q, Dv, group;

  void begin(const QueryBlock& t) {
    vb = (*vv)[t.b][t.h / group];
    obuf.narrow(0, 0, t.bq).zero_();
    std::fill(state.begin(), state.end(), AttnRow{});
  }
  void block(const QueryBlock& t, const at::Tensor& z, int64_t j0, int64_t kn) {
    at::Tensor o = obuf.narrow(0, 0, t.bq);
    acc_t* zp = z.data_ptr<acc_t>();
    acc_t* op = o.data_ptr<acc_t>();
    for (int64_t i = 0; i < t.bq; ++i) attend_block<acc_t>(state[i], zp + i * kn, kn, op + i * Dv, Dv);
    at::addmm_out(o, o, z, vb.narrow(0, j0, kn), /*beta=*/1, /*alpha=*/1);
  }
  void end(const QueryBlock& t) {
    const acc_t* op = obuf.data_ptr<acc_t>();
    for (int64_t i = 0; i < t.bq; ++i) {
      const AttnRow& r = state[i];
      const int64_t row = ((t.b * Hq + t.h) * Q) + t.i0 + i;
      double total = 0.0;  // sum of the output weights, at shift om
      if (r.s.n > 0) total = std::exp(r.s.z0 - r.om) + (r.s.l > 0.0 ? r.s.l * std::exp(r.s.m - r.om) : 0.0);
      const acc_t inv = r.s.n == 0 ? acc_t(0) : static_cast<acc_t>(1.0 / total);
      for (int64_t d = 0; d < Dv; ++d) out[row * Dv + d] = op[i * Dv + d] * inv;
      k::finalize(r.s, rows + row * k::kRowFields);
    }
  }
};

template <typename acc_t>
void attention_rows_typed(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
                          const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows, at::Tensor& out) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor q = query.to(acc).contiguous();
  const at::Tensor kk = key.to(acc).contiguous();
  const at::Tensor vv = value.to(acc).contiguous();
  const int64_t Dv = vv.size(3), group = q.size(1) / kk.size(1);
  double* rows_p = rows.data_ptr<double>();
  acc_t* out_p = out.data_ptr<acc_t>();
  stream_logit_blocks<acc_t>(q, kk, scale, mask, is_causal, q.size(3) + Dv, [&](int64_t bq_max) {
    return AttentionWorker<acc_t>{std::vector<AttnRow>(bq_max), at::empty({bq_max, Dv}, q.options()), &vv, {},
                                  rows_p, out_p, q.size(1), q.size(2), Dv, group};
  });
}

inline void attention_rows(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
                           const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows, at::Tensor& out) {
  if (query.scalar_type() == at::kDouble)
    return attention_rows_typed<double>(query, key, value, scale, mask, is_causal, rows, out);
  return attention_rows_typed<float>(query, key, value, scale, mask, is_causal, rows, out);
}

}  // namespace CPU_CAPABILITY
}  // namespace headprune::cpu
