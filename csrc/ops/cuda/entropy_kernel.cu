// CUDA backend of the entropy ops: launches the row kernels of entropy_rows.cuh, which write
// {H, n, p_first, H_rest} per attention row with the semantics of the CPU kernels
// (cpu/entropy_rows_impl.h), and registers the ops for the CUDA dispatch key.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../common.h"
#include "../entropy_ops.h"
#include "entropy_rows.cuh"

namespace headprune::cuda {
namespace {

template <typename scalar_t>
void launch_probs_rows(const at::Tensor& probs, double eps, at::Tensor& rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = probs.size(0), H = probs.size(1), Q = probs.size(2), K = probs.size(3);
  const int64_t n_rows = B * H * Q;
  if (n_rows == 0) return;
  const int64_t blocks = ceil_div(n_rows, kProbsWarps);
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "probs: too many rows (", n_rows, ")");
  probs_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kProbsWarps * kWarp, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
      probs.const_data_ptr<scalar_t>(), n_rows, H, Q, K, probs.stride(0), probs.stride(1), probs.stride(2),
      probs.stride(3), eps, rows.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_qk_rows(const at::Tensor& query, const at::Tensor& key, double scale,
                    const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using T = QkTile<acc_t>;
  const at::Tensor q = query.contiguous();
  const at::Tensor kk = key.contiguous();
  QkArgs<scalar_t, acc_t> a{};
  a.query = q.const_data_ptr<scalar_t>();
  a.key = kk.const_data_ptr<scalar_t>();
  if (mask.has_value()) {
    const at::Tensor& m = *mask;  // already expanded to [B, Hq, Q, K] by expand_attn_mask
    if (m.scalar_type() == at::kBool) {
      a.mask_bool = m.const_data_ptr<bool>();
    } else {
      TORCH_CHECK(m.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "attn_mask: expected ",
                  ops::dtype_name(c10::CppTypeToScalarType<acc_t>::value), ", got ",
                  ops::dtype_name(m.scalar_type()));
      a.mask_add = m.const_data_ptr<acc_t>();
    }
    for (int d = 0; d < 4; ++d) a.mask_stride[d] = m.stride(d);
  }
  const int64_t B = q.size(0);
  a.Hq = q.size(1);
  a.Q = q.size(2);
  a.D = q.size(3);
  a.Hkv = kk.size(1);
  a.K = kk.size(2);
  a.scale = static_cast<acc_t>(scale);
  a.causal = is_causal;
  a.rows = rows.data_ptr<double>();
  if (B * a.Hq * a.Q == 0) return;
  const int64_t blocks = B * a.Hq * ceil_div(a.Q, T::kBlockQ);
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "query: too many rows (", B * a.Hq * a.Q, ")");
  qk_rows_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(blocks), T::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaBackend {
  static void probs_rows(const at::Tensor& probs, double eps, at::Tensor& rows) {
    const c10::cuda::CUDAGuard guard(probs.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "probs_rows_cuda",
                                    [&] { launch_probs_rows<scalar_t>(probs, eps, rows); });
  }
  static void qk_rows(const at::Tensor& query, const at::Tensor& key, double scale,
                      const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows) {
    const c10::cuda::CUDAGuard guard(query.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qk_rows_cuda",
                                    [&] { launch_qk_rows<scalar_t>(query, key, scale, mask, is_causal, rows); });
  }
  // The device's own attention, then the statistics kernel: SDPA on CUDA is already a fused
  // kernel, so the statistics cost one more pass over the logits (see the qk op).
  static at::Tensor attention_rows(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   double scale, const std::optional<at::Tensor>& attn_mask,
                                   const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows) {
    qk_rows(query, key, scale, mask, is_causal, rows);
    const c10::cuda::CUDAGuard guard(query.device());
    std::optional<at::Tensor> m = attn_mask;
    if (m.has_value() && m->scalar_type() != at::kBool && m->scalar_type() != query.scalar_type()) {
      if (query.scalar_type() == at::kHalf) {
        // A wide mask's values below float16's range would round to -inf there, masking keys
        // the statistics (which read the mask in float32) count as visible: only values at or
        // below kMaskedLogit mask a key; the rest clamp to float16's lowest finite value.
        const double lowest = static_cast<double>(std::numeric_limits<c10::Half>::lowest());
        m = at::where(m->le(static_cast<double>(headprune::kMaskedLogit)),
                      at::scalar_tensor(-std::numeric_limits<double>::infinity(), m->options()),
                      m->clamp_min(lowest));
      }
      m = m->to(query.scalar_type());
    }
    const int64_t Q = query.size(2), K = key.size(2);
    bool sdpa_causal = is_causal;
    if (is_causal && (m.has_value() || Q != K)) {
      // SDPA aligns is_causal top-left; these ops align the last query with the last key.
      const at::Tensor visible = at::ones({Q, K}, query.options().dtype(at::kBool)).tril(K - Q);
      if (!m.has_value()) m = visible;
      else if (m->scalar_type() == at::kBool) m = m->logical_and(visible);
      else m = m->masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
      sdpa_causal = false;
    }
    at::Tensor out = at::scaled_dot_product_attention(query, key, value, m, 0.0, sdpa_causal, scale,
                                                      /*enable_gqa=*/key.size(1) != query.size(1));
    return out.masked_fill(rows.select(-1, 1).eq(0).unsqueeze(-1), 0);  // rows with no visible key
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(headprune, CUDA, m) { ops::EntropyOps<CudaBackend>::register_impls(m); }

}  // namespace headprune::cuda
