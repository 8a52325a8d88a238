// headprune::apply_head_mask_: exact in place scaling of head slices, autograd, bad inputs.
#include <headprune/headprune.h>

#include <ATen/core/grad_mode.h>

#include "check.h"

namespace {

// x * mask[h] on the slice of head h along dim, built independently of the op.
at::Tensor expected_masked(const at::Tensor& x, const at::Tensor& mask, int64_t head_dim, int64_t dim) {
  std::vector<int64_t> shape(x.dim(), 1);
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  shape[d] = x.size(d);
  return x * mask.to(x.scalar_type()).repeat_interleave(head_dim).view(shape);
}

}  // namespace

HP_TEST(output_projection_columns_exact) {
  at::manual_seed(20);
  // o_proj.weight [hidden, H * head_dim]: heads along dim 1.
  at::Tensor w = at::randn({24, 4 * 6});
  const at::Tensor mask = at::tensor({1.0f, 0.0f, 0.5f, 1.0f});
  const at::Tensor expected = expected_masked(w, mask, 6, 1);
  const void* data = w.data_ptr();
  headprune::apply_head_mask_(w, mask, 6, 1);
  HP_CHECK(w.data_ptr() == data);  // in place
  HP_CHECK_EQUAL(w, expected);
  HP_CHECK(w.narrow(1, 6, 6).eq(0).all().item<bool>());
}

HP_TEST(query_projection_rows_negative_dim_bool_mask) {
  at::manual_seed(21);
  at::Tensor w = at::randn({3 * 5, 7}, at::kDouble);  // q_proj.weight [H * head_dim, hidden]
  const at::Tensor mask = at::tensor({1, 0, 1}).to(at::kBool);
  const at::Tensor expected = expected_masked(w, mask, 5, 0);
  headprune::apply_head_mask_(w, mask, 5, -2);
  HP_CHECK_EQUAL(w, expected);
}

HP_TEST(non_contiguous_view_and_half) {
  at::manual_seed(22);
  at::Tensor base = at::randn({8, 2 * 4}).to(at::kHalf);
  at::Tensor view = base.t();  // [H * head_dim, 8], heads along dim 0, not contiguous
  const at::Tensor mask = at::tensor({0.5f, 1.0f});
  const at::Tensor expected = expected_masked(view, mask, 4, 0);
  headprune::apply_head_mask_(view, mask, 4, 0);
  HP_CHECK_EQUAL(base.t(), expected);  // the base tensor was written through the view
}

HP_TEST(differentiable_in_x_and_mask) {
  at::manual_seed(23);
  const at::Tensor w = at::randn({4, 2 * 3}).requires_grad_(true);
  const at::Tensor mask = at::tensor({1.0f, 0.25f}).requires_grad_(true);
  at::Tensor y = w * 2;  // not a leaf
  headprune::apply_head_mask_(y, mask, 3, 1);
  y.sum().backward();
  HP_CHECK_EQUAL(w.grad(), expected_masked(at::full({4, 6}, 2.0f), mask.detach(), 3, 1));
  const at::Tensor per_head = (w.detach() * 2).view({4, 2, 3}).sum(at::IntArrayRef{0, 2});
  HP_CHECK_CLOSE(mask.grad(), per_head, 1e-6, 1e-6);
}

HP_TEST(parameter_needs_no_grad_mode) {
  at::Tensor w = at::randn({2, 4}).requires_grad_(true);
  const at::Tensor mask = at::tensor({0.0f, 1.0f});
  HP_CHECK_THROWS(headprune::apply_head_mask_(w, mask, 2, 1), "x: is a leaf");
  {
    at::NoGradGuard no_grad;
    headprune::apply_head_mask_(w, mask, 2, 1);
  }
  HP_CHECK(w.narrow(1, 0, 2).eq(0).all().item<bool>());
}

HP_TEST(bad_inputs_name_the_argument) {
  at::Tensor x = at::randn({4, 6});
  const at::Tensor mask = at::ones({3});
  HP_CHECK_THROWS(headprune::apply_head_mask_(x, at::ones({3, 1}), 2, 1), "mask");
  HP_CHECK_THROWS(headprune::apply_head_mask_(x, at::ones({3}, at::kInt), 2, 1), "mask");
  HP_CHECK_THROWS(headprune::apply_head_mask_(x, mask, 0, 1), "head_dim");
  HP_CHECK_THROWS(headprune::apply_head_mask_(x, mask, 2, 2), "dim");
  HP_CHECK_THROWS(headprune::apply_head_mask_(x, mask, 3, 1), "x: size");
  at::Tensor ints = at::ones({4, 6}, at::kLong);
  HP_CHECK_THROWS(headprune::apply_head_mask_(ints, mask, 2, 1), "x");
}

int main(int argc, char** argv) { return hp_test::run_all(argc, argv); }
