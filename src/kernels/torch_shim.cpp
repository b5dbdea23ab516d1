// libtorch's own convolution and batch-norm backward kernels, for convlab's `tch` backend.
//
// The `tch` crate that burn-tch 0.22.1 pins (0.22.0) and its C API (torch-sys 0.22.0) expose
// neither `at::convolution_backward` nor `at::native_batch_norm_backward`, the two kernels
// PyTorch's autograd calls for a convolution and a batch norm. Without them Burn computes the
// weight gradient as a second convolution with the batch as channels and the batch-norm gradient
// as a chain of elementwise ops, both slower on libtorch. This file is compiled by build.rs
// against the libtorch that torch-sys found (only with `--features tch`).
//
// Tensors cross the boundary as `at::Tensor*`, which is what tch's `C_tensor*` points to: inputs
// are borrowed, outputs are `new at::Tensor` owned by the caller (tch frees them on drop).
// C++ exceptions never cross into Rust: each function returns NULL on success or a malloc'd
// message, freed with `convlab_free_message`.

#include <ATen/ATen.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {

char *message(const char *what) {
  const size_t n = std::strlen(what) + 1;
  char *copy = static_cast<char *>(std::malloc(n));
  if (copy != nullptr) {
    std::memcpy(copy, what, n);
  }
  return copy;
}

at::Tensor *boxed(bool wanted, const at::Tensor &t) {
  return wanted ? new at::Tensor(t) : nullptr;
}

}  // namespace

extern "C" {

// Gradients of `conv2d(x, w, bias, stride, padding)` (no groups, no dilation) given `dy`:
// out[0] = dx, out[1] = dw, out[2] = db, each only where `mask` asks (NULL otherwise).
char *convlab_conv2d_backward(const at::Tensor *dy, const at::Tensor *x, const at::Tensor *w,
                              const int64_t *stride, const int64_t *padding, const bool *mask,
                              at::Tensor **out) {
  try {
    const std::array<bool, 3> m{mask[0], mask[1], mask[2]};
    const std::vector<int64_t> bias_sizes{w->size(0)};
    auto grads = at::convolution_backward(
        *dy, *x, *w, m[2] ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(),
        at::IntArrayRef(stride, 2), at::IntArrayRef(padding, 2), {1, 1}, false, {0, 0}, 1, m);
    out[0] = boxed(m[0], std::get<0>(grads));
    out[1] = boxed(m[1], std::get<1>(grads));
    out[2] = boxed(m[2], std::get<2>(grads));
    return nullptr;
  } catch (const std::exception &e) {
    return message(e.what());
  }
}

// Gradients of training-mode batch norm with batch statistics `mean` and `invstd` (as returned
// by `at::native_batch_norm`): out[0] = dx, out[1] = dgamma, out[2] = dbeta where `mask` asks.
char *convlab_batch_norm_backward(const at::Tensor *dy, const at::Tensor *x,
                                  const at::Tensor *gamma, const at::Tensor *mean,
                                  const at::Tensor *invstd, double eps, const bool *mask,
                                  at::Tensor **out) {
  try {
    const std::array<bool, 3> m{mask[0], mask[1], mask[2]};
    auto grads = at::native_batch_norm_backward(*dy, *x, *gamma, std::nullopt, std::nullopt,
                                                *mean, *invstd, true, eps, m);
    out[0] = boxed(m[0], std::get<0>(grads));
    out[1] = boxed(m[1], std::get<1>(grads));
    out[2] = boxed(m[2], std::get<2>(grads));
    return nullptr;
  } catch (const std::exception &e) {
    return message(e.what());
  }
}

void convlab_free_message(char *m) { std::free(m); }

}  // extern "C"
