// Every schema of the headprune library, in one reviewed place. Backends register their
// kernels in ops/cpu and ops/cuda; a CPU-only build simply does not compile ops/cuda.
//
// Conventions: entropies in nats; accumulators are float64 (counts int64) and are only added
// to; ops ending in `_` mutate the arguments annotated (a!) and return nothing, except
// attention_stats_accumulate_, which returns the attention output it computed. The entropy
// ops are not differentiable: under grad mode they refuse a tensor that requires grad.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>

#include "common.h"

TORCH_LIBRARY(headprune, m) {
  // probs [B, H, Q, K] (f16/bf16/f32/f64, any strides, >= 0): adds, per head, the sum over
  // valid query rows of -sum_k p log(p + eps) into sums [H] (f64) and the number of valid rows
  // into counts [H] (i64). query_mask [B, Q] bool excludes padded rows; all-zero rows are
  // skipped. One pass over probs, per-row math in f32 (f64 for f64), row sums in f64; rows
  // whose entries after the first are subnormal are summed again in f64. eps: finite, >= 0,
  // within the range of the math's type.
  m.def("entropy_from_probs_accumulate_(Tensor(a!) sums, Tensor(b!) counts, Tensor probs, "
        "Tensor? query_mask=None, float eps=1e-8) -> ()");

  // Same rows; adds all six statistics into stats [H, 6] (f64): count, sum H, sum H^2,
  // sum H/log(n) (n visible keys, rows with n >= 2), sum of the first non-zero entry's mass,
  // sum of the entropy renormalised over the entries after it.
  m.def("entropy_stats_from_probs_accumulate_(Tensor(a!) stats, Tensor probs, "
        "Tensor? query_mask=None, float eps=1e-8) -> ()");

  // query [B, Hq, Q, D], key [B, Hkv, K, D] (Hq % Hkv == 0), same float dtype: the entropy of
  // softmax(q k^T * scale + attn_mask) per row, streamed over key blocks with a running max,
  // sum of exp and sum of exp * logit (f32 math for f16/bf16/f32, f64 for f64; f64 per-row
  // state; scale must lie within the range of the math's type). attn_mask: bool (True =
  // attend) or additive float, broadcastable to [B, Hq, Q, K]; additive values <= -1e37 mask
  // a key. is_causal: row i sees keys j <= i + K - Q. Rows with no visible key are skipped.
  // Extra memory: one logits block per thread plus O(B * Hq * Q), never O(Q * K) on CPU (a float
  // attn_mask of another type than the math's is read block by block; on CUDA it is converted whole).
  m.def("entropy_from_qk_accumulate_(Tensor(a!) sums, Tensor(b!) counts, Tensor query, Tensor key, "
        "float scale, Tensor? attn_mask=None, bool is_causal=False, Tensor? query_mask=None) -> ()");

  // The six statistics of the rows above (count, sum, sum_sq, sum_norm, sum_first, sum_rest),
  // with "first" = the row's first visible key, all from the same streaming pass.
  m.def("entropy_stats_from_qk_accumulate_(Tensor(a!) stats, Tensor query, Tensor key, float scale, "
        "Tensor? attn_mask=None, bool is_causal=False, Tensor? query_mask=None) -> ()");

  // The attention output softmax(q k^T * scale + attn_mask) @ value ([B, Hq, Q, Dv], query's
  // dtype; value [B, Hkv, K, Dv]) computed together with the six statistics of its rows,
  // which are added into stats [Hq, 6] as by entropy_stats_from_qk_accumulate_: one pass over
  // the logits instead of an attention call followed by the statistics op. Rows with no
  // visible key get a zero output. CPU: one fused streaming kernel (float32 exponentials
  // with about 2e-6 relative error, as ATen's CPU flash attention; float64 for float64).
  // CUDA: the device's scaled_dot_product_attention followed by the statistics kernel.
  m.def("attention_stats_accumulate_(Tensor(a!) stats, Tensor query, Tensor key, Tensor value, float scale, "
        "Tensor? attn_mask=None, bool is_causal=False, Tensor? query_mask=None) -> Tensor");

  // In place: x's slice of head h along dim (x.size(dim) == num_heads * head_dim, heads
  // outermost) is multiplied by mask[h] (0/1 or real gates, cast to x's dtype). x is never
  // reallocated; differentiable in x and mask; refuses a leaf that requires grad while grad
  // mode is on. Written with ATen ops (one broadcast mul_ on a view), so every backend and
  // autograd get it from CompositeImplicitAutograd.
  m.def("apply_head_mask_(Tensor(a!) x, Tensor mask, int head_dim, int dim) -> ()");
}

namespace headprune::ops {
namespace {

void apply_head_mask_impl(at::Tensor& x, const at::Tensor& mask, int64_t head_dim, int64_t dim) {
  check_defined(x, "x");
  check_defined(mask, "mask");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x: expected a floating tensor, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected at least one dimension, got a 0-D tensor");
  check_writable(x, "x");
  TORCH_CHECK_VALUE(at::has_internal_overlap(x) != at::MemOverlap::Yes,
                    "x: expected a tensor whose elements do not share memory, got an expanded view");
  TORCH_CHECK_VALUE(mask.dim() == 1 && mask.size(0) >= 1, "mask: expected a 1-D tensor [num_heads], got shape ",
                    mask.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(mask.scalar_type()) || mask.scalar_type() == at::kBool,
                   "mask: expected a floating or bool tensor, got ", dtype_name(mask.scalar_type()));
  TORCH_CHECK_VALUE(mask.device() == x.device(), "mask: expected device ", x.device(), ", got ", mask.device());
  TORCH_CHECK_VALUE(head_dim >= 1, "head_dim: expected >= 1, got ", head_dim);
  TORCH_CHECK_INDEX(dim >= -x.dim() && dim < x.dim(), "dim: expected in [", -x.dim(), ", ", x.dim() - 1, "], got ",
                    dim);
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  const int64_t heads = mask.size(0);
  TORCH_CHECK_VALUE(x.size(d) % heads == 0 && x.size(d) / heads == head_dim, "x: size ", x.size(d), " along dim ",
                    d, " does not equal num_heads * head_dim = ", heads, " * ", head_dim);  // no product: it can wrap
  // Read in eager calls only: a traced call (fake, functional or meta tensors) has no values.
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool || mask.is_meta() || at::isTensorSubclassLike(mask) ||
                        at::isfinite(mask).all().item<bool>(),
                    "mask: expected finite gates, got NaN or infinite values");
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && x.requires_grad() && x.is_leaf()),
                    "x: is a leaf tensor that requires grad (a parameter?); apply the mask under torch.no_grad() "
                    "(C++: at::NoGradGuard)");
  std::vector<int64_t> gate_shape(x.dim() + 1, 1);
  gate_shape[d] = heads;
  x.unflatten(d, {heads, head_dim}).mul_(mask.to(x.scalar_type()).view(gate_shape));
}

// Autograd kernel of the entropy ops, which are not differentiable (their results are sums
// added into float64 accumulators; the attention output has no backward either). Under grad
// mode a tensor argument that requires grad is refused by name before anything runs, rather
// than ATen failing inside the kernel ("addmm(): functions with out=... arguments don't
// support automatic differentiation") or the attention output silently losing its gradient.
// Otherwise the op runs below autograd, so the ATen calls inside the kernels record nothing.
// A tensor carrying a forward-mode tangent (torch.autograd.forward_ad, torch.func.jvp) is
// refused whatever the grad mode: below autograd its tangent would be dropped without a word.
void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (!v.isTensor() || !v.toTensor().defined()) continue;
    const at::Tensor& t = v.toTensor();
    TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && t.requires_grad()), args[i].name(), ": requires grad; ",
                      op.schema().name(), " is not differentiable: call it under torch.no_grad() or on detached ",
                      "tensors");
    TORCH_CHECK_VALUE(!t._fw_grad(/*level=*/0).defined(), args[i].name(), ": carries a forward-mode tangent; ",
                      op.schema().name(), " is not differentiable: call it on the primal (unpack_dual) instead");
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

constexpr std::array<const char*, 5> kEntropyOps{
    "attention_stats_accumulate_", "entropy_from_probs_accumulate_", "entropy_stats_from_probs_accumulate_",
    "entropy_from_qk_accumulate_", "entropy_stats_from_qk_accumulate_"};

}  // namespace

TORCH_LIBRARY_IMPL(headprune, CompositeImplicitAutograd, m) { m.impl("apply_head_mask_", &apply_head_mask_impl); }

TORCH_LIBRARY_IMPL(headprune, Autograd, m) {
  for (const char* name : kEntropyOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
}

}  // namespace headprune::ops
