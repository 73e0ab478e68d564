// Registers the loldu ops with the dispatcher (one schema each, one kernel per device key),
// the autocast kernels, and, in Python builds, the pybind11 module loldu._C.
#include "loldu/loldu.h"
#include "cuda_glue.h"
#include "ldu_common.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>
#endif

namespace loldu {

#ifndef LOLDU_WITH_CUDA
LduResult ldu_cuda(const at::Tensor&, int64_t, PivotMode, const at::Tensor&, const std::string& shape) {
  TORCH_CHECK(false, "loldu.ldu: this build of loldu has no CUDA support (W of shape ", shape, ")");
}
void column_dot_cuda(const at::Tensor&, const at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "loldu.adapter_linear: this build of loldu has no CUDA support");
}
std::string build_flavor() { return "cpu"; }
#else
std::string build_flavor() { return "cuda"; }
#endif

namespace {

using LduTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

LduTuple ldu_op(const at::Tensor& W, int64_t rank, c10::string_view pivoting) {
  auto r = ldu(W, rank, std::string(pivoting));
  return {r.PL, r.D, r.U, r.pivots};
}

LduTuple ldu_from_pivots_op(const at::Tensor& W, const at::Tensor& pivots) {
  auto r = ldu_from_pivots(W, pivots);
  return {r.PL, r.D, r.U, r.pivots};
}

std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_y, const at::Tensor& x,
                                               const at::Tensor& weight, const at::Tensor& PL,
                                               const at::Tensor& U, const at::Tensor& c, bool need_grad_x) {
  auto [gx, gc] = adapter_linear_backward(grad_y, x, weight, PL, U, c, need_grad_x);
  if (!gx.defined()) gx = at::empty({0}, x.options());
  return {gx, gc};
}

// Under autocast the matmuls run in the autocast dtype (fp32 accumulation inside the GEMMs)
// while c, and so the trainable coefficients, stay fp32.
template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor adapter_linear_autocast(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& PL,
                                   const at::Tensor& U, const at::Tensor& c) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loldu::adapter_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  const auto dt = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dt, t, device); };
  std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(cast(*bias)) : std::nullopt;
  return op.call(cast(x), cast(weight), b, cast(PL), cast(U), c.to(at::kFloat));
}

}  // namespace
}  // namespace loldu

TORCH_LIBRARY(loldu, m) {
  m.def("ldu(Tensor W, int rank, str pivoting='partial') -> (Tensor PL, Tensor D, Tensor U, Tensor pivots)");
  m.def("ldu_from_pivots(Tensor W, Tensor pivots) -> (Tensor PL, Tensor D, Tensor U, Tensor pivots)");
  m.def("adapter_linear(Tensor x, Tensor weight, Tensor? bias, Tensor PL, Tensor U, Tensor c) -> Tensor");
  m.def("adapter_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor PL, Tensor U, Tensor c, "
        "bool need_grad_x) -> (Tensor grad_x, Tensor grad_c)");
  // Pure ATen composition: autograd and meta come for free.
  m.def("delta_weight(Tensor PL, Tensor U, Tensor c) -> Tensor",
        torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, &loldu::delta_weight));
}

TORCH_LIBRARY_IMPL(loldu, CPU, m) {
  m.impl("ldu", &loldu::ldu_op);
  m.impl("ldu_from_pivots", &loldu::ldu_from_pivots_op);
  m.impl("adapter_linear", &loldu::adapter_linear);
  m.impl("adapter_linear_backward", &loldu::backward_op);
}

TORCH_LIBRARY_IMPL(loldu, CUDA, m) {
  m.impl("ldu", &loldu::ldu_op);
  m.impl("ldu_from_pivots", &loldu::ldu_from_pivots_op);
  m.impl("adapter_linear", &loldu::adapter_linear);
  m.impl("adapter_linear_backward", &loldu::backward_op);
}

TORCH_LIBRARY_IMPL(loldu, AutocastCPU, m) {
  m.impl("adapter_linear", &loldu::adapter_linear_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(loldu, AutocastCUDA, m) {
  m.impl("adapter_linear", &loldu::adapter_linear_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

#ifdef TORCH_EXTENSION_NAME
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "loldu C++ extension: the ops live in torch.ops.loldu; this module reports the build.";
  m.def("build_flavor", &loldu::build_flavor, "'cpu' or 'cuda': which kernels this build carries");
}
#endif
