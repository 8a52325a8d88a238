// Torch-free math of the streaming entropy reducers, shared by the CPU and CUDA kernels.
//
// A softmax row p_j = exp(z_j) / sum_k exp(z_k) has entropy
//   H = logsumexp(z) - E_p[z] = log(l) - t / l,
// with l = sum_j e^{z_j - m} and t = sum_j e^{z_j - m} (z_j - m) for any shift m (we keep
// m = running max). Keeping t relative to m, instead of sum e^{z-m} z, avoids the
// cancellation of two large numbers when logits are large and the row is peaked.
//
// The first visible key of each row (the usual "attention sink") is tracked apart from the
// rest, so the statistics over the remaining keys come from the same pass without
// subtracting a dominant term.
#pragma once

#include <cmath>
#include <cstdint>

#include "headprune/schema.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HP_HD __host__ __device__ __forceinline__
#else
#define HP_HD inline
#endif

namespace headprune::kernels {

using headprune::kMaskedLogit;
using headprune::kRowFields;

// Floor for z - m before exp: exp(-1e4) is exactly 0 in float, and e * x stays 0 instead of
// 0 * -inf = NaN for masked keys.
constexpr float kExpFloor = -1e4f;

HP_HD bool is_visible(float z) { return !(z <= kMaskedLogit); }  // NaN is "visible": it must surface
HP_HD bool is_visible(double z) { return !(z <= static_cast<double>(kMaskedLogit)); }

// Running state of one row. (m, l, t) cover the visible keys after the first one.
struct RowState {
  double m = -INFINITY;
  double l = 0.0;
  double t = 0.0;
  double z0 = 0.0;  // logit of the first visible key
  int64_t n = 0;    // visible keys so far (first included)
};

// Moves (l, t) from shift m to shift m_new >= m.
HP_HD void rescale(RowState& s, double m_new) {
  if (s.l > 0.0) {
    double d = s.m - m_new;
    double a = exp(d);
    s.t = a * (s.t + s.l * d);
    s.l *= a;
  }
  s.m = m_new;
}

// Adds the contribution of one scalar logit z (already known visible, not the first key).
HP_HD void push(RowState& s, double z) {
  if (!(z <= s.m)) rescale(s, z);  // also taken by NaN, which then poisons the row
  double x = z - s.m;
  double e = exp(x);
  s.l += e;
  s.t += e * x;
}

// Merges another partial state (same row, disjoint keys, neither holding the first key).
// NaN in either side survives into the result.
HP_HD void merge_rest(RowState& a, const RowState& b) {
  a.n += b.n;
  if (b.l == 0.0) return;
  double m = (a.m >= b.m) ? a.m : b.m;
  RowState bb = b;
  rescale(a, m);
  rescale(bb, m);
  a.l += bb.l;
  a.t += bb.t;
}

// Final per-row values, out[RowField]: {H, n, p_first, H_rest}; n == 0 marks a row with no
// visible key, which the reducers skip.
HP_HD void finalize(const RowState& s, double* out) {
  if (s.n == 0) {
    out[0] = 0.0; out[1] = 0.0; out[2] = 0.0; out[3] = 0.0;
    return;
  }
  const bool has_rest = !(s.l == 0.0);  // NaN counts as present
  double m = (has_rest && !(s.m <= s.z0)) ? s.m : s.z0;
  double e0 = exp(s.z0 - m);
  double a = has_rest ? exp(s.m - m) : 0.0;
  double L = a * s.l + e0;
  double T = (has_rest ? a * (s.t + s.l * (s.m - m)) : 0.0) + e0 * (s.z0 - m);
  out[0] = log(L) - T / L;
  out[1] = static_cast<double>(s.n);
  out[2] = e0 / L;
  out[3] = has_rest ? log(s.l) - s.t / s.l : 0.0;
}

// Row statistics from probabilities, with the formula as written: H = -sum p log(p + eps).
// a = sum p log(p + eps) and s = sum p over the keys after the first non-zero one, both given
// in units of 2^rest_exp (0 for the kernels' plain sums; see probs_rest_is_tiny);
// p0 = first non-zero probability; n = non-zero entries (0 for an all-zero row).
HP_HD void finalize_probs(double p0, double a_rest, double s_rest, int64_t n, double eps, double* out,
                          int rest_exp = 0) {
  if (n == 0) {
    out[0] = 0.0; out[1] = 0.0; out[2] = 0.0; out[3] = 0.0;
    return;
  }
  out[0] = -(ldexp(a_rest, rest_exp) + p0 * log(p0 + eps));
  out[1] = static_cast<double>(n);
  out[2] = p0;
  out[3] = (n >= 2 && s_rest > 0.0) ? log(s_rest) + rest_exp * 0.6931471805599453 - a_rest / s_rest : 0.0;
}

// A row holding a negative probability: n = -1, which the ops refuse before accumulating.
HP_HD void mark_negative_probs(double* out) {
  out[0] = 0.0; out[1] = -1.0; out[2] = 0.0; out[3] = 0.0;
}

// The fast sums of a row's rest (float math in acc_t, p + eps floored at the smallest normal
// acc_t before the log) are exact to acc_t's rounding except for subnormal entries, whose
// products p log(p + eps) keep only a few bits: an error of at most tiny/e per entry (tiny =
// the smallest normal acc_t). It only matters when the rest's mass is that small, so rows
// whose rest mass s is below n_rest * tiny * 2^26 (float) or * 2^55 (double) are summed again
// exactly, in float64 scaled by a power of two; for every other row the subnormal entries
// move the rest entropy by less than 1e-8 nats.
template <typename acc_t>
HP_HD bool probs_rest_is_tiny(double s_rest, int64_t n_rest) {
  const double below = sizeof(acc_t) == sizeof(double) ? 0x1p-967 : 0x1p-100;
  return n_rest > 0 && s_rest < static_cast<double>(n_rest) * below;
}

}  // namespace headprune::kernels
