// Device code of the CUDA entropy row kernels (launched by entropy_kernel.cu). Torch-free:
// raw pointers and scalar_t / acc_t templates over kernels/online_entropy.h, so the kernels
// read on their own and build against the CUDA runtime alone.
//
// probs rows: one warp per row. Math in acc_t (float for f16/bf16/f32), partial sums
//   flushed into float64 every kFlush keys as on the CPU; a row whose rest is subnormal is
//   summed again in float64 (kernels::probs_rest_is_tiny).
// qk rows: one fused flash-style kernel. A block owns kBlockQ query rows of one (b, h) and
//   walks the key tiles of kBlockK keys (stopping at the causal diagonal); head dims are
//   staged kChunkD at a time, so any head_dim works and shared memory stays under 48 KiB.
//   Each tile of logits lives only in shared memory and is streamed into per-row online
//   state (first visible logit apart, then max / sum exp / sum exp * (z - max)) exactly
//   like push_block of the CPU kernel; the Q x K probabilities are never materialised.
//   Plain FMA, no tensor cores: f16/bf16 are widened to float when staged.
#pragma once

#include <cstdint>
#include <limits>

#include "../../kernels/online_entropy.h"

namespace headprune::cuda {

namespace k = headprune::kernels;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

HP_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
HP_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

// Max that keeps a NaN from either side (fmax would drop it, and NaN must reach H).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// Warp all-reductions. The result is lane 0's, so every lane holds bitwise the same value and
// control flow that depends on it stays warp-uniform.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return __shfl_sync(kFullMask, v, 0);
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = nan_max(v, __shfl_xor_sync(kFullMask, v, o));
  return __shfl_sync(kFullMask, v, 0);
}

// ----------------------------------------------------------------------------- probs rows

constexpr int kProbsWarps = 8;     // rows per block
constexpr int64_t kFlush = headprune::kFlushKeys;  // keys per float partial sum, as on the CPU

// One warp per row r of probs [B, H, Q, K] (strided): rows[r] = {H, n, p_first, H_rest}.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kProbsWarps * kWarp)
    probs_rows_kernel(const scalar_t* __restrict__ probs, int64_t n_rows, int64_t H, int64_t Q, int64_t K,
                      int64_t sb, int64_t sh, int64_t sq, int64_t sk, double eps, double* __restrict__ rows) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kProbsWarps + threadIdx.x / kWarp;
  if (r >= n_rows) return;  // the whole warp leaves together
  const int64_t q = r % Q, h = (r / Q) % H, b = r / (Q * H);
  const scalar_t* p = probs + b * sb + h * sh + q * sq;
  double* out = rows + r * k::kRowFields;

  // First non-zero entry (NaN counts as non-zero): a min-index reduction by ballot.
  int64_t j0 = K;
  for (int64_t base = 0; base < K; base += kWarp) {
    const int64_t j = base + lane;
    const unsigned nz = __ballot_sync(kFullMask, j < K && static_cast<acc_t>(p[j * sk]) != acc_t(0));
    if (nz != 0) {
      j0 = base + __ffs(nz) - 1;
      break;
    }
  }
  if (j0 == K) {
    if (lane == 0) k::finalize_probs(0.0, 0.0, 0.0, 0, eps, out);
    return;
  }

  // The entries after it, formula as written: a = sum p log(p + eps), s = sum p (zeros add
  // nothing, also for eps = 0); any negative entry marks the row.
  const acc_t eps_t = static_cast<acc_t>(eps);
  double a = 0.0, s = 0.0;
  long long n = 0;
  int negative = 0;
  for (int64_t c0 = j0 + 1; c0 < K; c0 += kFlush) {
    const int64_t c1 = min64(K, c0 + kFlush);
    acc_t fa = 0, fs = 0;
    int fn = 0;
    for (int64_t j = c0 + lane; j < c1; j += kWarp) {
      const acc_t x = static_cast<acc_t>(p[j * sk]);
      if (x != acc_t(0)) {  // NaN included: it must reach H
        fa += x * dev_log(x + eps_t);
        fs += x;
        ++fn;
        negative |= x < acc_t(0);
      }
    }
    a += static_cast<double>(fa);
    s += static_cast<double>(fs);
    n += fn;
  }
  a = warp_sum(a);
  s = warp_sum(s);
  n = warp_sum(n);
  negative = warp_sum(negative);
  const double p0 = static_cast<double>(static_cast<acc_t>(p[j0 * sk]));
  if (negative != 0 || p0 < 0.0) {
    if (lane == 0) k::mark_negative_probs(out);
    return;
  }
  int e = 0;
  if (k::probs_rest_is_tiny<acc_t>(s, n)) {  // warp-uniform: every lane holds lane 0's sums
    // Subnormal entries: the rest again in float64, in units of 2^e (the largest entry's
    // exponent), as the CPU's probs_rest_exact.
    double top = 0.0;
    for (int64_t j = j0 + 1 + lane; j < K; j += kWarp) {
      top = fmax(top, static_cast<double>(static_cast<acc_t>(p[j * sk])));
    }
    e = ilogb(warp_max(top));
    a = 0.0;
    s = 0.0;
    for (int64_t j = j0 + 1 + lane; j < K; j += kWarp) {
      const double x = static_cast<double>(static_cast<acc_t>(p[j * sk]));
      if (x == 0.0) continue;
      const double scaled = ldexp(x, -e);
      a += scaled * log(x + eps);
      s += scaled;
    }
    a = warp_sum(a);
    s = warp_sum(s);
  }
  if (lane == 0) k::finalize_probs(p0, a, s, 1 + n, eps, out, e);
}

// -------------------------------------------------------------------------------- qk rows

// Tile shapes. Static shared memory: float 20.4 KiB, double 40.8 KiB (under the 48 KiB limit).
template <typename acc_t>
struct QkTile {
  static constexpr int kThreads = 256;
  static constexpr int kWarps = kThreads / kWarp;
  static constexpr int kBlockQ = 32;                             // query rows per block
  static constexpr int kBlockK = 64;                             // keys per tile
  static constexpr int kChunkD = 32;                             // head dims staged at a time
  // Logits: thread (ti, tj) computes rows ti + kTi * r and keys tj + kTj * c of the tile.
  static constexpr int kTi = 16, kTj = kThreads / kTi;
  static constexpr int kMicroQ = kBlockQ / kTi, kMicroK = kBlockK / kTj;
  // Row updates: warp w owns rows w + kWarps * r; lane L reads keys L + kWarp * c.
  static constexpr int kRowsPerWarp = kBlockQ / kWarps;
  static_assert(kBlockQ % kTi == 0 && kBlockK % kTj == 0 && kBlockQ % kWarps == 0 && kBlockK % kWarp == 0);
};

template <typename scalar_t, typename acc_t>
struct QkArgs {
  const scalar_t* query;  // contiguous [B, Hq, Q, D]
  const scalar_t* key;    // contiguous [B, Hkv, K, D]
  const bool* mask_bool;  // [B, Hq, Q, K] with strides mask_stride (True = attend), or null
  const acc_t* mask_add;  // same layout, additive, or null
  int64_t mask_stride[4];
  int64_t Hq, Hkv, Q, K, D;
  acc_t scale;
  bool causal;
  double* rows;  // contiguous [B, Hq, Q, 4]
};

// Streams one tile of logits z[0, kBlockK) of a row into its state, like push_block of the CPU
// kernel: the first visible key goes to z0, the later ones to (m, l, t). Masked keys hold
// values <= kMaskedLogit. Called by all 32 lanes with the same state.
template <typename acc_t, int kBlockK>
__device__ __forceinline__ void push_tile(k::RowState& s, const acc_t* z, int lane) {
  int start = 0;  // first key of the tile that goes to (m, l, t)
  if (s.n == 0) {
    start = kBlockK;
    for (int c = 0; c < kBlockK / kWarp; ++c) {
      const unsigned vis = __ballot_sync(kFullMask, k::is_visible(z[c * kWarp + lane]));
      if (vis != 0) {
        start = c * kWarp + __ffs(vis) - 1;
        break;
      }
    }
    if (start == kBlockK) return;
    s.z0 = static_cast<double>(z[start]);
    s.n = 1;
    ++start;
  }
  int cnt = 0;
  acc_t zmax = -std::numeric_limits<acc_t>::infinity();
  for (int j = lane; j < kBlockK; j += kWarp) {
    if (j < start) continue;
    cnt += k::is_visible(z[j]) ? 1 : 0;
    zmax = nan_max(zmax, z[j]);
  }
  cnt = warp_sum(cnt);
  zmax = warp_max(zmax);
  s.n += cnt;
  if (cnt == 0) return;
  if (!(static_cast<double>(zmax) <= s.m)) k::rescale(s, static_cast<double>(zmax));  // NaN too
  const acc_t m = static_cast<acc_t>(s.m);
  const acc_t x_min = static_cast<acc_t>(k::kExpFloor);
  acc_t l = 0, t = 0;
  for (int j = lane; j < kBlockK; j += kWarp) {
    if (j < start) continue;
    acc_t x = z[j] - m;
    if (x < x_min) x = x_min;  // masked keys: exp(x_min) == 0 and 0 * x_min == 0; NaN stays
    const acc_t e = dev_exp(x);
    l += e;
    t += e * x;
  }
  s.l += static_cast<double>(warp_sum(l));
  s.t += static_cast<double>(warp_sum(t));
}

// Logits of the tile [i0, i0 + bq) x [j0, j0 + kn) into zs, with attn_mask and the causal
// limit applied; entries outside the tile are -inf (masked). Ends with __syncthreads().
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void logits_tile(const QkArgs<scalar_t, acc_t>& a, const scalar_t* qp, const scalar_t* kp,
                                            int64_t b, int64_t h, int64_t i0, int bq, int64_t j0, int kn,
                                            acc_t (*qs)[QkTile<acc_t>::kChunkD + 1],
                                            acc_t (*ks)[QkTile<acc_t>::kChunkD + 1],
                                            acc_t (*zs)[QkTile<acc_t>::kBlockK]) {
  using T = QkTile<acc_t>;
  const int ti = threadIdx.x / T::kTj, tj = threadIdx.x % T::kTj;
  acc_t acc[T::kMicroQ][T::kMicroK];
#pragma unroll
  for (int r = 0; r < T::kMicroQ; ++r)
#pragma unroll
    for (int c = 0; c < T::kMicroK; ++c) acc[r][c] = acc_t(0);

  for (int64_t d0 = 0; d0 < a.D; d0 += T::kChunkD) {
    const int dn = static_cast<int>(min64(T::kChunkD, a.D - d0));
    // Zero padding past bq / kn / dn adds 0 to the dot products that are kept.
    for (int e = threadIdx.x; e < T::kBlockQ * T::kChunkD; e += T::kThreads) {
      const int i = e / T::kChunkD, d = e % T::kChunkD;
      qs[i][d] = (i < bq && d < dn) ? static_cast<acc_t>(qp[(i0 + i) * a.D + d0 + d]) : acc_t(0);
    }
    for (int e = threadIdx.x; e < T::kBlockK * T::kChunkD; e += T::kThreads) {
      const int j = e / T::kChunkD, d = e % T::kChunkD;
      ks[j][d] = (j < kn && d < dn) ? static_cast<acc_t>(kp[(j0 + j) * a.D + d0 + d]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int d = 0; d < T::kChunkD; ++d) {
      acc_t qv[T::kMicroQ], kv[T::kMicroK];
#pragma unroll
      for (int r = 0; r < T::kMicroQ; ++r) qv[r] = qs[ti + T::kTi * r][d];
#pragma unroll
      for (int c = 0; c < T::kMicroK; ++c) kv[c] = ks[tj + T::kTj * c][d];
#pragma unroll
      for (int r = 0; r < T::kMicroQ; ++r)
#pragma unroll
        for (int c = 0; c < T::kMicroK; ++c) acc[r][c] += qv[r] * kv[c];
    }
    __syncthreads();
  }

  const int64_t offset = a.K - a.Q;  // causal: row i sees keys j <= i + offset
  const int64_t* sm = a.mask_stride;
#pragma unroll
  for (int r = 0; r < T::kMicroQ; ++r) {
#pragma unroll
    for (int c = 0; c < T::kMicroK; ++c) {
      const int i = ti + T::kTi * r, j = tj + T::kTj * c;
      acc_t z = -std::numeric_limits<acc_t>::infinity();
      if (i < bq && j < kn) {
        const int64_t gi = i0 + i, gj = j0 + j;
        z = acc[r][c] * a.scale;
        const int64_t mo = b * sm[0] + h * sm[1] + gi * sm[2] + gj * sm[3];
        if (a.mask_bool != nullptr && !a.mask_bool[mo]) z = -std::numeric_limits<acc_t>::infinity();
        if (a.mask_add != nullptr) z += a.mask_add[mo];
        if (a.causal && gj > gi + offset) z = -std::numeric_limits<acc_t>::infinity();
      }
      zs[i][j] = z;
    }
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(QkTile<acc_t>::kThreads) qk_rows_kernel(const QkArgs<scalar_t, acc_t> a) {
  using T = QkTile<acc_t>;
  __shared__ acc_t qs[T::kBlockQ][T::kChunkD + 1];  // +1: no bank conflicts down a column
  __shared__ acc_t ks[T::kBlockK][T::kChunkD + 1];
  __shared__ acc_t zs[T::kBlockQ][T::kBlockK];

  const int64_t n_qblocks = ceil_div(a.Q, T::kBlockQ);
  const int64_t task = blockIdx.x;
  const int64_t qb = task % n_qblocks, h = (task / n_qblocks) % a.Hq, b = task / (n_qblocks * a.Hq);
  const int64_t i0 = qb * T::kBlockQ;
  const int bq = static_cast<int>(min64(T::kBlockQ, a.Q - i0));
  const scalar_t* qp = a.query + (b * a.Hq + h) * a.Q * a.D;
  const scalar_t* kp = a.key + (b * a.Hkv + h / (a.Hq / a.Hkv)) * a.K * a.D;  // GQA
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  k::RowState st[T::kRowsPerWarp];  // replicated in the 32 lanes of the owning warp
  // Key tiles entirely past the diagonal of the block's last row are skipped.
  const int64_t j_end = a.causal ? min64(a.K, i0 + bq + a.K - a.Q) : a.K;
  for (int64_t j0 = 0; j0 < j_end; j0 += T::kBlockK) {
    const int kn = static_cast<int>(min64(T::kBlockK, j_end - j0));
    logits_tile<scalar_t, acc_t>(a, qp, kp, b, h, i0, bq, j0, kn, qs, ks, zs);
#pragma unroll
    for (int r = 0; r < T::kRowsPerWarp; ++r) push_tile<acc_t, T::kBlockK>(st[r], zs[warp + T::kWarps * r], lane);
    __syncthreads();  // zs is rewritten by the next tile
  }
#pragma unroll
  for (int r = 0; r < T::kRowsPerWarp; ++r) {
    const int i = warp + T::kWarps * r;
    if (lane == 0 && i < bq) k::finalize(st[r], a.rows + ((b * a.Hq + h) * a.Q + i0 + i) * k::kRowFields);
  }
}

}  // namespace headprune::cuda
