// The block-streaming loop shared by the QK and fused attention kernels: queries are cut into
// blocks of query_block(Q) rows, keys into blocks of kBlockK; each block of scaled, masked
// logits is formed once by a GEMM into a per-thread buffer and handed to the kernel's worker.
// Memory: one logits block per thread, never O(Q * K) (a float mask of another type is read per block).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include "vec_math.h"

namespace headprune::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
namespace k = headprune::kernels;

constexpr int64_t kBlockK = 512;

// Queries per block: as ATen's CPU flash attention, 256 for long sequences (larger GEMMs),
// 64 otherwise (more blocks to share among threads).
inline int64_t query_block(int64_t Q) { return Q >= 768 ? 256 : 64; }

// Largest logit (NaN once seen) and number of visible keys of z[start, kn).
template <typename acc_t>
std::pair<acc_t, int64_t> block_max_count(const acc_t* z, int64_t start, int64_t kn) {
  using Vec = Vectorized<acc_t>;
  const Vec vmask(static_cast<acc_t>(k::kMaskedLogit));
  const Vec vone(acc_t(1));
  Vec vmax(-std::numeric_limits<acc_t>::infinity()), vcnt(acc_t(0));
  int64_t j = start;
  for (; j + Vec::size() <= kn; j += Vec::size()) {
    Vec x = Vec::loadu(z + j);
    vmax = at::vec::maximum(vmax, x);  // propagates NaN
    vcnt = vcnt + (vone - x.le(vmask));
  }
  acc_t bmax = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  int64_t cnt = static_cast<int64_t>(at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vcnt));
  for (int64_t t = j; t < kn; ++t) {
    if (k::is_visible(z[t])) ++cnt;
    if (z[t] != z[t] || z[t] > bmax) bmax = z[t];  // keeps a NaN once seen
  }
  return {bmax, cnt};
}

// Streams one block of logits z[0, kn) of a row into its state. Masked keys hold values
// <= kMaskedLogit; z is scratch and may be modified.

// z[i, j] += m[i * smq + j * smk] over the [bq, kn] block, the mask's values converted to acc_t
// as Tensor.to would (vectorised where the types agree and the keys are contiguous).
template <typename acc_t, typename mask_t>
void add_mask(acc_t* z, int64_t ldz, int64_t bq, int64_t kn, const mask_t* mp, int64_t smq, int64_t smk) {
  using Vec = Vectorized<acc_t>;
  for (int64_t i = 0; i < bq; ++i) {
    acc_t* zr = z + i * ldz;
    const mask_t* mr = mp + i * smq;
    int64_t j = 0;
    if constexpr (std::is_same_v<acc_t, mask_t>) {
      if (smk == 1)
        for (; j + Vec::size() <= kn; j += Vec::size()) (Vec::loadu(zr + j) + Vec::loadu(mr + j)).store(zr + j);
    }
    for (; j < kn; ++j) zr[j] += static_cast<acc_t>(mr[j * smk]);
  }
}

template <typename acc_t>
void mask_block(acc_t* z, int64_t ldz, int64_t bq, int64_t kn, int64_t i0, int64_t j0, const std::optional<at::Tensor>& mask,
                int64_t b, int64_t h, bool causal, int64_t offset) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    const int64_t smq = m.stride(2), smk = m.stride(3);
    const int64_t base = b * m.stride(0) + h * m.stride(1) + i0 * smq + j0 * smk;
    if (m.scalar_type() == at::kBool) {
      const bool* mp = m.const_data_ptr<bool>() + base;
      for (int64_t i = 0; i < bq; ++i)
        for (int64_t j = 0; j < kn; ++j)
          if (!mp[i * smq + j * smk]) z[i * ldz + j] = ninf;
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "mask_block", [&] {
        add_mask(z, ldz, bq, kn, m.const_data_ptr<scalar_t>() + base, smq, smk);
      });
    }
  }
  if (causal) {
    for (int64_t i = 0; i < bq; ++i) {
      const int64_t first_hidden = std::max<int64_t>(0, i0 + i + offset + 1 - j0);
      for (int64_t j = first_hidden; j < kn; ++j) z[i * ldz + j] = ninf;
    }
  }
}

// The [bq, kn] block of scaled, masked logits of the queries qv against keys [j0, j0 + kn)
// of kv, formed in buf (row stride kn).
template <typename acc_t>
at::Tensor logits_block(const at::Tensor& buf, const at::Tensor& qv, const at::Tensor& kv, int64_t j0, int64_t kn,
                        double scale, const std::optional<at::Tensor>& mask, int64_t i0, int64_t b, int64_t h,
                        bool is_causal, int64_t offset) {
  const int64_t bq = qv.size(0);
  at::Tensor z = buf.narrow(0, 0, bq * kn).view({bq, kn});
  at::addmm_out(z, z, qv, kv.narrow(0, j0, kn).t(), /*beta=*/0, /*alpha=*/scale);
  mask_block<acc_t>(z.data_ptr<acc_t>(), kn, bq, kn, i0, j0, mask, b, h, is_causal, offset);
  return z;
}


// One task of the loop: batch b, query head h, queries [i0, i0 + bq).
struct QueryBlock {
  int64_t b, h, i0, bq;
};

// Runs the kernel over every (batch, head, query block) in parallel. make_worker(bq_max) builds
// one worker per thread; for each task the loop calls worker.begin(t), then worker.block(t, z,
// j0, kn) with the [bq, kn] logits against keys [j0, j0 + kn) (z: contiguous, row stride kn,
// scratch the worker may overwrite), then worker.end(t). q [B, Hq, Q, D] and kk [B, Hkv, K, D]
// are contiguous in acc_t; flops_per_key sizes the parallel grain (D, or D + Dv with a value
// product).
template <typename acc_t, typename MakeWorker>
void stream_logit_blocks(const at::Tensor& q, const at::Tensor& kk, double scale, const std::optional<at::Tensor>& mask,
                         bool is_causal, int64_t flops_per_key, MakeWorker make_worker) {
  const int64_t B = q.size(0), Hq = q.size(1), Q = q.size(2);
  const int64_t Hkv = kk.size(1), K = kk.size(2), group = Hq / Hkv;
  const int64_t offset = K - Q;  // causal: row i sees keys j <= i + offset
  const int64_t bq_max = query_block(Q);
  const int64_t nqb = (Q + bq_max - 1) / bq_max;
  // Small problems run inline: opening a parallel region costs more than they do.
  // (at least 1: no division by zero where Q or K is 0)
  const int64_t task_flops = std::max<int64_t>(1, 2 * std::min(bq_max, Q) * K * std::max<int64_t>(flops_per_key, 1));
  const int64_t grain = std::max<int64_t>(1, (1 << 21) / task_flops);
  // The caller's thread-local state (grad mode, below autograd) on every thread of the region:
  // torch's parallel_for does not carry it, and the GEMMs below would otherwise see inputs that
  // require grad on the other threads.
  const at::ThreadLocalState tls;
  at::parallel_for(0, B * Hq * nqb, grain, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(tls);
    at::Tensor buf = at::empty({bq_max * kBlockK}, q.options());
    auto worker = make_worker(bq_max);
    for (int64_t task = begin; task < end; ++task) {
      QueryBlock t{task / (nqb * Hq), (task / nqb) % Hq, (task % nqb) * bq_max, 0};
      t.bq = std::min(bq_max, Q - t.i0);
      const at::Tensor qv = q[t.b][t.h].narrow(0, t.i0, t.bq);
      const at::Tensor kv = kk[t.b][t.h / group];
      worker.begin(t);
      const int64_t j_end = is_causal ? std::min(K, t.i0 + t.bq + offset) : K;
      for (int64_t j0 = 0; j0 < j_end; j0 += kBlockK) {
        const int64_t kn = std::min(kBlockK, j_end - j0);
        worker.block(t, logits_block<acc_t>(buf, qv, kv, j0, kn, scale, mask, t.i0, t.b, t.h, is_causal, offset), j0, kn);
      }
      worker.end(t);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace headprune::cpu
