// Vectorised CPU row kernels. Included once per instruction set by isa/rows_*.cpp with
// CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and CPU_CAPABILITY_<ISA> defined, which selects
// ATen's Vectorized<T> width and puts everything in its own namespace (no ODR clashes).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../../kernels/online_entropy.h"
#include "entropy_rows.h"

namespace headprune::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
namespace k = headprune::kernels;

// Vector partial sums are flushed into float64 this often, so long rows (K = 32k and more)
// keep float64-level accuracy while the inner loop stays in the input's float type.
constexpr int64_t kFlush = 2048;

// ----------------------------------------------------------------------------- probs rows

// Inline float log for the probs kernel, whose cost is its logarithm. NaN and +inf pass
// through; inputs here are >= FLT_MIN.
//
// AVX-512: x = m * 2^e with m in [0.75, 1.5) (getexp/getmant). The top five mantissa bits of
// m pick one of 32 centres c (c = 1 on the two intervals beside 1, so log(m) keeps its
// relative accuracy as m -> 1); a two-register permute fetches 1/c and -log(1/c), and
// log(m) = -log(1/c) + log1p(r), r = m/c - 1, |r| < 1/32, by the series to r^5 (error
// < r^6/6 < 2e-10). Checked against log in float64 over every 7th float in [1e-30, 4]:
// 1.4e-7 relative at most (about one float rounding).
// AVX2: m in [sqrt(1/2), sqrt(2)) from the bit fields, then log(m) = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| <= 0.2, by its odd series to s^9 (series error < 1e-8; with the
// Newton-refined reciprocal < 2e-7 relative).
#if defined(CPU_CAPABILITY_AVX512)
struct LogTable {
  alignas(64) float inv[32];
  alignas(64) float neg_log_inv[32];
  LogTable() {
    for (int i = 0; i < 32; ++i) {
      // i < 16: m = 1 + f, f in [i/32, (i+1)/32); i >= 16: m = (1 + f) / 2, f >= 1/2.
      double c = i < 16 ? 1.0 + (i + 0.5) / 32.0 : (32.5 + i) / 64.0;
      if (i == 0 || i == 31) c = 1.0;
      inv[i] = static_cast<float>(1.0 / c);
      neg_log_inv[i] = static_cast<float>(-std::log(static_cast<double>(inv[i])));
    }
  }
};
// Built when the library loads (one per instruction-set translation unit), so the hot loop
// reads it without a function-local static's guard.
static const LogTable kLogTable;
#elif defined(CPU_CAPABILITY_AVX2)
// 1 / d for d in [1.7, 2.5]: the hardware estimate (12 bits) and one Newton step (error
// squared: < 1e-7 relative), a third of the cost of a division.
inline Vectorized<float> reciprocal(const Vectorized<float>& d) {
  const Vectorized<float> r(_mm256_rcp_ps(d));
  return r * at::vec::fnmadd(d, r, Vectorized<float>(2.0f));
}
#endif

template <typename acc_t>
inline Vectorized<acc_t> fast_log(const Vectorized<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const LogTable& t = kLogTable;
    const __m512 xv = x;
    const __m512 m = _mm512_getmant_ps(xv, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
    const __m512 e = _mm512_getexp_ps(_mm512_mul_ps(xv, _mm512_set1_ps(1.0f / 0.75f)));
    const __m512i idx = _mm512_srli_epi32(_mm512_castps_si512(m), 18);  // permutes use 5 bits
    const __m512 inv = _mm512_permutex2var_ps(_mm512_load_ps(t.inv), idx, _mm512_load_ps(t.inv + 16));
    const __m512 nli = _mm512_permutex2var_ps(_mm512_load_ps(t.neg_log_inv), idx,
                                              _mm512_load_ps(t.neg_log_inv + 16));
    const __m512 r = _mm512_fmsub_ps(m, inv, _mm512_set1_ps(1.0f));
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.2f), _mm512_set1_ps(-0.25f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 3.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(-0.5f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    return Vectorized<float>(_mm512_add_ps(_mm512_fmadd_ps(e, _mm512_set1_ps(0.6931471805599453f), nli), p));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = Vectorized<float>;
    const __m256 xv = x;
    const __m256i bits = _mm256_castps_si256(xv);
    __m256i ei = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
    __m256 m = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
    const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
    ei = _mm256_sub_epi32(ei, _mm256_castps_si256(big));  // big lanes are all ones (-1): e += 1
    const V one(1.0f);
    const V mv(m);
    const V s = (mv - one) * reciprocal(mv + one);
    const V s2 = s * s;
    V p(1.0f / 9.0f);
    p = at::vec::fmadd(p, s2, V(1.0f / 7.0f));
    p = at::vec::fmadd(p, s2, V(1.0f / 5.0f));
    p = at::vec::fmadd(p, s2, V(1.0f / 3.0f));
    p = at::vec::fmadd(p, s2, one);
    const V r = at::vec::fmadd(V(_mm256_cvtepi32_ps(ei)), V(0.6931471805599453f), V(2.0f) * s * p);
    const __m256 special = _mm256_or_ps(_mm256_cmp_ps(xv, xv, _CMP_UNORD_Q),
                                        _mm256_cmp_ps(xv, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
    return V(_mm256_blendv_ps(r, xv, special));
  }
#endif
  return x.log();
}

// Rows are streamed once from memory (often L3, past L2): a software prefetch this far
// ahead keeps the loads in flight while the logarithms are computed (a standalone copy of
// this loop over a (1, 12, 1024) tensor went from 8.5 to 5.0 ms on one AVX-512 thread: the
// hardware prefetcher alone left it waiting).
constexpr int64_t kPrefetchBytes = 2048;

inline void prefetch(const void* address) {
#if defined(_MSC_VER)
  _mm_prefetch(static_cast<const char*>(address), _MM_HINT_T0);
#else
  __builtin_prefetch(address);
#endif
}

// Adds x log(max(x + eps, tiny)) to va, x to vs and 1 per non-zero x to vn.
template <typename acc_t>
inline void probs_step(const Vectorized<acc_t>& x, const Vectorized<acc_t>& veps, const Vectorized<acc_t>& vtiny,
                       Vectorized<acc_t>& va, Vectorized<acc_t>& vs, Vectorized<acc_t>& vn) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    // max_ps returns its second operand when either is NaN, so NaN still propagates; the
    // count is a masked add. Four instructions fewer than the generic forms.
    const __m512 xv = x;
    const __m512 y = _mm512_max_ps(vtiny, _mm512_add_ps(xv, veps));
    va = Vectorized<float>(_mm512_fmadd_ps(xv, fast_log<float>(Vectorized<float>(y)), va));
    vs = Vectorized<float>(_mm512_add_ps(vs, xv));
    const __mmask16 nonzero = _mm512_cmp_ps_mask(xv, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    vn = Vectorized<float>(_mm512_mask_add_ps(vn, nonzero, vn, _mm512_set1_ps(1.0f)));
    return;
  }
#endif
  va = at::vec::fmadd(x, fast_log(at::vec::maximum(x + veps, vtiny)), va);
  vs = vs + x;
  vn = vn + x.ne(Vectorized<acc_t>(acc_t(0)));
}

// Vec::size() values of a contiguous row from p (n of them, the rest zero, when n is given),
// widened to acc_t: bf16 / fp16 rows are converted in registers, not through a buffer.
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> load_row(const scalar_t* p, int64_t n = Vectorized<acc_t>::size()) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    Vec v;
    if (n == Vec::size()) {
      at::vec::load_to_float<scalar_t>(p, v);
    } else {
      scalar_t tail[Vec::size()] = {};
      std::copy(p, p + n, tail);
      at::vec::load_to_float<scalar_t>(tail, v);
    }
    return v;
  }
}

// One contiguous row of probabilities (acc_t, or bf16 / fp16 widened to float): writes
// {H, n, p_first, H_rest}.
template <typename scalar_t, typename acc_t>
void probs_row(const scalar_t* p, int64_t K, double eps, double* out) {
  using Vec = Vectorized<acc_t>;
  int64_t j0 = 0;
  while (j0 < K && static_cast<acc_t>(p[j0]) == acc_t(0)) ++j0;
  if (j0 == K) {
    k::finalize_probs(0.0, 0.0, 0.0, 0, eps, out);
    return;
  }
  const Vec veps(static_cast<acc_t>(eps));
  // 0 * log(0 + eps) must be 0 also for eps == 0 (the limit), not 0 * -inf = NaN.
  const Vec vtiny(std::numeric_limits<acc_t>::min());
  double a = 0.0, s = 0.0, nz = 0.0;
  for (int64_t c0 = j0 + 1; c0 < K; c0 += kFlush) {
    const int64_t c1 = std::min(K, c0 + kFlush);
    Vec va(acc_t(0)), vs(acc_t(0)), vn(acc_t(0));
    int64_t j = c0;
    for (; j + Vec::size() <= c1; j += Vec::size()) {
      prefetch(reinterpret_cast<const char*>(p + j) + kPrefetchBytes);
      probs_step(load_row<scalar_t, acc_t>(p + j), veps, vtiny, va, vs, vn);
    }
    if (j < c1) probs_step(load_row<scalar_t, acc_t>(p + j, c1 - j), veps, vtiny, va, vs, vn);  // zero tail adds nothing
    auto hsum = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, v); };
    a += hsum(va);
    s += hsum(vs);
    nz += hsum(vn);
  }
  k::finalize_probs(static_cast<double>(static_cast<acc_t>(p[j0])), a, s, 1 + static_cast<int64_t>(nz), eps, out);
}

template <typename scalar_t, typename acc_t>
void probs_rows_typed(const at::Tensor& probs, double eps, at::Tensor& rows) {
  const int64_t B = probs.size(0), H = probs.size(1), Q = probs.size(2), K = probs.size(3);
  const int64_t sb = probs.stride(0), sh = probs.stride(1), sq = probs.stride(2), sk = probs.stride(3);
  const scalar_t* base = probs.const_data_ptr<scalar_t>();
  double* out = rows.data_ptr<double>();
  const bool direct = sk == 1;  // contiguous rows are read in place (bf16 / fp16 widened in registers)
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
  at::parallel_for(0, B * H * Q, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(direct ? 0 : K);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t q = r % Q, h = (r / Q) % H, b = r / (Q * H);
      const scalar_t* row = base + b * sb + h * sh + q * sq;
      if (direct) {
        probs_row<scalar_t, acc_t>(row, K, eps, out + r * k::kRowFields);
      } else {  // a strided row gathered into a K-sized buffer, never a probs-sized copy
        for (int64_t j = 0; j < K; ++j) buf[j] = static_cast<acc_t>(row[j * sk]);
        probs_row<acc_t, acc_t>(buf.data(), K, eps, out + r * k::kRowFields);
      }
    }
  });
}

inline void probs_rows(const at::Tensor& probs, double eps, at::Tensor& rows) {
  switch (probs.scalar_type()) {
    case at::kDouble: return probs_rows_typed<double, double>(probs, eps, rows);
    case at::kFloat: return probs_rows_typed<float, float>(probs, eps, rows);
    case at::kHalf: return probs_rows_typed<at::Half, float>(probs, eps, rows);
    case at::kBFloat16: return probs_rows_typed<at::BFloat16, float>(probs, eps, rows);
    default: TORCH_CHECK(false, "probs: unsupported dtype ", probs.scalar_type());
  }
}

// -------------------------------------------------------------------------------- qk rows

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
      using Vec = Vectorized<acc_t>;
      const acc_t* mp = m.const_data_ptr<acc_t>() + base;
      for (int64_t i = 0; i < bq; ++i) {
        acc_t* zr = z + i * ldz;
        const acc_t* mr = mp + i * smq;
        int64_t j = 0;
        if (smk == 1)
          for (; j + Vec::size() <= kn; j += Vec::size()) (Vec::loadu(zr + j) + Vec::loadu(mr + j)).store(zr + j);
        for (; j < kn; ++j) zr[j] += mr[j * smk];
      }
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

template <typename acc_t>
void qk_rows_typed(const at::Tensor& query, const at::Tensor& key, double scale, const std::optional<at::Tensor>& mask,
                   bool is_causal, at::Tensor& rows) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  // Half/bfloat16 inputs are widened once (O(inputs)); logits are formed in acc_t.
  const at::Tensor q = query.to(acc).contiguous();
  const at::Tensor kk = key.to(acc).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t Hkv = kk.size(1), K = kk.size(2), group = Hq / Hkv;
  const int64_t offset = K - Q;  // causal: row i sees keys j <= i + offset
  const int64_t bq_max = query_block(Q);
  const int64_t nqb = (Q + bq_max - 1) / bq_max;
  double* out = rows.data_ptr<double>();
  // Small problems run inline: opening a parallel region costs more than they do.
  const int64_t task_flops = 2 * std::min(bq_max, Q) * K * std::max<int64_t>(D, 1);
  const int64_t grain = std::max<int64_t>(1, (1 << 21) / task_flops);
  at::parallel_for(0, B * Hq * nqb, grain, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({bq_max * kBlockK}, q.options());
    std::vector<k::RowState> state(bq_max);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb, h = (task / nqb) % Hq, b = task / (nqb * Hq);
      const int64_t i0 = qb * bq_max, bq = std::min(bq_max, Q - i0);
      const at::Tensor qv = q[b][h].narrow(0, i0, bq);
      const at::Tensor kv = kk[b][h / group];
      std::fill(state.begin(), state.end(), k::RowState{});
      const int64_t j_end = is_causal ? std::min(K, i0 + bq + offset) : K;
      for (int64_t j0 = 0; j0 < j_end; j0 += kBlockK) {
        const int64_t kn = std::min(kBlockK, j_end - j0);
        acc_t* zp = logits_block<acc_t>(buf, qv, kv, j0, kn, scale, mask, i0, b, h, is_causal, offset).template data_ptr<acc_t>();
        for (int64_t i = 0; i < bq; ++i) push_block<acc_t>(state[i], zp + i * kn, kn);
      }
      for (int64_t i = 0; i < bq; ++i)
        k::finalize(state[i], out + (((b * Hq + h) * Q) + i0 + i) * k::kRowFields);
    }
  });
}

inline void qk_rows(const at::Tensor& query, const at::Tensor& key, double scale, const std::optional<at::Tensor>& mask,
                    bool is_causal, at::Tensor& rows) {
  if (query.scalar_type() == at::kDouble) return qk_rows_typed<double>(query, key, scale, mask, is_causal, rows);
  return qk_rows_typed<float>(query, key, scale, mask, is_causal, rows);
}

// ------------------------------------------------------------------------ attention rows

template <typename acc_t>
inline Vectorized<acc_t> fast_exp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) return x.exp_u20();  // as ATen's CPU flash attention
  return x.exp();
}

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

template <typename acc_t>
void attention_rows_typed(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
                          const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows, at::Tensor& out) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor q = query.to(acc).contiguous();
  const at::Tensor kk = key.to(acc).contiguous();
  const at::Tensor vv = value.to(acc).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t Hkv = kk.size(1), K = kk.size(2), Dv = vv.size(3), group = Hq / Hkv;
  const int64_t offset = K - Q;
  const int64_t bq_max = query_block(Q);
  const int64_t nqb = (Q + bq_max - 1) / bq_max;
  double* rows_p = rows.data_ptr<double>();
  acc_t* out_p = out.data_ptr<acc_t>();
  const int64_t task_flops = 2 * std::min(bq_max, Q) * K * std::max<int64_t>(D + Dv, 1);
  const int64_t grain = std::max<int64_t>(1, (1 << 21) / task_flops);
  at::parallel_for(0, B * Hq * nqb, grain, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({bq_max * kBlockK}, q.options());
    at::Tensor obuf = at::empty({bq_max, Dv}, q.options());
    std::vector<AttnRow> state(bq_max);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb, h = (task / nqb) % Hq, b = task / (nqb * Hq);
      const int64_t i0 = qb * bq_max, bq = std::min(bq_max, Q - i0);
      const at::Tensor qv = q[b][h].narrow(0, i0, bq);
      const at::Tensor kv = kk[b][h / group];
      const at::Tensor vb = vv[b][h / group];
      at::Tensor o = obuf.narrow(0, 0, bq);
      o.zero_();
      acc_t* op = o.data_ptr<acc_t>();
      std::fill(state.begin(), state.end(), AttnRow{});
      const int64_t j_end = is_causal ? std::min(K, i0 + bq + offset) : K;
      for (int64_t j0 = 0; j0 < j_end; j0 += kBlockK) {
        const int64_t kn = std::min(kBlockK, j_end - j0);
        at::Tensor z = logits_block<acc_t>(buf, qv, kv, j0, kn, scale, mask, i0, b, h, is_causal, offset);
        acc_t* zp = z.data_ptr<acc_t>();
        for (int64_t i = 0; i < bq; ++i) attend_block<acc_t>(state[i], zp + i * kn, kn, op + i * Dv, Dv);
        at::addmm_out(o, o, z, vb.narrow(0, j0, kn), /*beta=*/1, /*alpha=*/1);
      }
      for (int64_t i = 0; i < bq; ++i) {
        const AttnRow& r = state[i];
        acc_t* dst = out_p + (((b * Hq + h) * Q) + i0 + i) * Dv;
        double total = 0.0;  // sum of the output weights, at shift om
        if (r.s.n > 0) total = std::exp(r.s.z0 - r.om) + (r.s.l > 0.0 ? r.s.l * std::exp(r.s.m - r.om) : 0.0);
        const acc_t inv = r.s.n == 0 ? acc_t(0) : static_cast<acc_t>(1.0 / total);
        for (int64_t d = 0; d < Dv; ++d) dst[d] = op[i * Dv + d] * inv;
        k::finalize(r.s, rows_p + (((b * Hq + h) * Q) + i0 + i) * k::kRowFields);
      }
    }
  });
}

inline void attention_rows(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
                           const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows, at::Tensor& out) {
  if (query.scalar_type() == at::kDouble)
    return attention_rows_typed<double>(query, key, value, scale, mask, is_causal, rows, out);
  return attention_rows_typed<float>(query, key, value, scale, mask, is_causal, rows, out);
}

inline RowKernels make_row_kernels() {
#define HP_STR2(x) #x
#define HP_STR(x) HP_STR2(x)
  return RowKernels{&probs_rows, &qk_rows, &attention_rows, HP_STR(CPU_CAPABILITY)};
#undef HP_STR
#undef HP_STR2
}

}  // namespace CPU_CAPABILITY
}  // namespace headprune::cpu
