// Row statistics of attention probabilities [B, H, Q, K] with the formula as written,
// -sum p log(p + eps): one streaming pass per row, partial sums flushed into float64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace headprune::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
namespace k = headprune::kernels;

// Vector partial sums are flushed into float64 every kFlushKeys keys (schema.h).
constexpr int64_t kFlush = headprune::kFlushKeys;

// Adds x log(max(x + eps, tiny)) to va, x to vs and 1 per non-zero x to vn; ORs the bits of x
// into vbits, whose sign bits then flag a possibly negative entry (or -0, or a NaN) in one
// instruction, where a minimum costs three.
template <typename acc_t>
inline void probs_step(const Vectorized<acc_t>& x, const Vectorized<acc_t>& veps, const Vectorized<acc_t>& vtiny,
                       Vectorized<acc_t>& va, Vectorized<acc_t>& vs, Vectorized<acc_t>& vn, Vectorized<acc_t>& vbits) {
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
    vbits = vbits | x;
    return;
  }
#endif
  va = at::vec::fmadd(x, fast_log(at::vec::maximum(x + veps, vtiny)), va);
  vs = vs + x;
  vn = vn + x.ne(Vectorized<acc_t>(acc_t(0)));
  vbits = vbits | x;
}

// Whether p[begin, K) holds a negative entry: the exact test behind a set sign bit.
template <typename scalar_t, typename acc_t>
bool has_negative(const scalar_t* p, int64_t begin, int64_t K) {
  for (int64_t j = begin; j < K; ++j) {
    if (static_cast<acc_t>(p[j]) < acc_t(0)) return true;
  }
  return false;
}

// The exact sums of a row's rest p[begin, K) (see kernels::probs_rest_is_tiny), in float64
// and in units of 2^e, e the exponent of the largest entry (so subnormal entries become normal
// numbers): a = sum p log(p + eps), s = sum p.
template <typename scalar_t, typename acc_t>
void probs_rest_exact(const scalar_t* p, int64_t begin, int64_t K, double eps, double& a, double& s, int& e) {
  auto value = [&](int64_t j) { return static_cast<double>(static_cast<acc_t>(p[j])); };
  double top = 0.0;
  for (int64_t j = begin; j < K; ++j) top = std::max(top, value(j));
  e = std::ilogb(top);
  a = 0.0;
  s = 0.0;
  for (int64_t j = begin; j < K; ++j) {
    const double x = value(j);
    if (x == 0.0) continue;
    const double scaled = std::ldexp(x, -e);
    a += scaled * std::log(x + eps);
    s += scaled;
  }
}

// One contiguous row of probabilities (acc_t, or bf16 / fp16 widened to float): writes
// {H, n, p_first, H_rest}, or marks the row as holding a negative probability.
template <typename scalar_t, typename acc_t>
void probs_row(const scalar_t* p, int64_t K, double eps, double* out) {
  using Vec = Vectorized<acc_t>;
  int64_t j0 = 0;
  while (j0 < K && static_cast<acc_t>(p[j0]) == acc_t(0)) ++j0;
  if (j0 == K) {
    k::finalize_probs(0.0, 0.0, 0.0, 0, eps, out);
    return;
  }
  const double p0 = static_cast<double>(static_cast<acc_t>(p[j0]));
  if (p0 < 0.0) return k::mark_negative_probs(out);
  const Vec veps(static_cast<acc_t>(eps));
  // 0 * log(0 + eps) must be 0 also for eps == 0 (the limit), not 0 * -inf = NaN.
  const Vec vtiny(std::numeric_limits<acc_t>::min());
  double a = 0.0, s = 0.0, nz = 0.0;
  bool sign = false;
  for (int64_t c0 = j0 + 1; c0 < K; c0 += kFlush) {
    const int64_t c1 = std::min(K, c0 + kFlush);
    Vec va(acc_t(0)), vs(acc_t(0)), vn(acc_t(0)), vbits(acc_t(0));
    int64_t j = c0;
    for (; j + Vec::size() <= c1; j += Vec::size()) {
      prefetch(reinterpret_cast<const char*>(p + j) + kPrefetchBytes);
      probs_step(load_row<scalar_t, acc_t>(p + j), veps, vtiny, va, vs, vn, vbits);
    }
    if (j < c1) {  // a zero-padded tail adds nothing
      probs_step(load_row<scalar_t, acc_t>(p + j, c1 - j), veps, vtiny, va, vs, vn, vbits);
    }
    auto hsum = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, v); };
    a += hsum(va);
    s += hsum(vs);
    nz += hsum(vn);
    sign |= std::signbit(at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x | y; }, vbits));
  }
  if (sign && has_negative<scalar_t, acc_t>(p, j0 + 1, K)) return k::mark_negative_probs(out);
  const int64_t n_rest = static_cast<int64_t>(nz);
  int e = 0;
  if (k::probs_rest_is_tiny<acc_t>(s, n_rest)) probs_rest_exact<scalar_t, acc_t>(p, j0 + 1, K, eps, a, s, e);
  k::finalize_probs(p0, a, s, 1 + n_rest, eps, out, e);
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

}  // namespace CPU_CAPABILITY
}  // namespace headprune::cpu
