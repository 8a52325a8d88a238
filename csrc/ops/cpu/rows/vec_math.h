// Vectorised float math of the CPU row kernels: the inline logarithm of the probs kernel, the
// exponential of the fused attention, software prefetch and widening row loads. Part of the
// row kernels compiled once per instruction set (see ../entropy_rows_impl.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../../../kernels/online_entropy.h"

namespace headprune::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
namespace k = headprune::kernels;

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
// The centres' tables, constants so that no code of this translation unit (compiled for
// AVX-512 and FMA) runs when the library loads: a CPU without them only ever calls the other
// instruction sets' kernels. i < 16: m = 1 + f, f in [i/32, (i+1)/32), c = 1 + (i + 1/2)/32;
// i >= 16: m = (1 + f)/2, f >= 1/2, c = (32.5 + i)/64; c = 1 for i = 0 and 31.
// inv[i] = float(1/c), neg_log_inv[i] = float(-log(double(inv[i]))) (exact float literals).
struct LogTable {
  alignas(64) float inv[32];
  alignas(64) float neg_log_inv[32];
};
inline constexpr LogTable kLogTable = {
    {1.0f, 0.9552238583564758f, 0.9275362491607666f, 0.9014084339141846f,
     0.8767123222351074f, 0.8533333539962769f, 0.8311688303947449f, 0.8101266026496887f,
     0.790123462677002f, 0.7710843086242676f, 0.7529411911964417f, 0.7356321811676025f,
     0.7191011309623718f, 0.7032967209815979f, 0.6881720423698425f, 0.6736842393875122f,
     1.3195875883102417f, 1.2929292917251587f, 1.2673267126083374f, 1.2427184581756592f,
     1.2190476655960083f, 1.1962616443634033f, 1.174311876296997f, 1.1531531810760498f,
     1.1327433586120605f, 1.1130434274673462f, 1.0940171480178833f, 1.0756303071975708f,
     1.0578511953353882f, 1.0406503677368164f, 1.0240000486373901f, 1.0f},
    {0.0f, 0.045809559524059296f, 0.0752234011888504f, 0.1037968099117279f,
     0.13157635927200317f, 0.15860500931739807f, 0.18492233753204346f, 0.2105647474527359f,
     0.23556606471538544f, 0.25995755195617676f, 0.2837681472301483f, 0.3070250451564789f,
     0.3297532796859741f, 0.3519763946533203f, 0.37371641397476196f, 0.39499375224113464f,
     -0.2773192524909973f, -0.25691041350364685f, -0.23690973222255707f, -0.21730127930641174f,
     -0.19806994497776031f, -0.1792013943195343f, -0.1606823354959488f, -0.14250008761882782f,
     -0.12464243918657303f, -0.10709808766841888f, -0.08985637873411179f, -0.07290682196617126f,
     -0.05623967573046684f, -0.039845872670412064f, -0.023716574534773827f, 0.0f}};
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
    // x = m 2^e: getexp gives the exponent of x's mantissa in [1, 2), one more where m is that
    // mantissa halved (m < 1). (getexp of x * 4/3 overflows from x = 0.75 FLT_MAX on.)
    const __m512 e1 = _mm512_getexp_ps(xv);
    const __m512 e = _mm512_mask_add_ps(e1, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ), e1,
                                        _mm512_set1_ps(1.0f));
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


template <typename acc_t>
inline Vectorized<acc_t> fast_exp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) return x.exp_u20();  // as ATen's CPU flash attention
  return x.exp();
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

}  // namespace CPU_CAPABILITY
}  // namespace headprune::cpu
