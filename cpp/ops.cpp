// Registers the loldu ops with the dispatcher (one schema each, one kernel per device key),
// the autocast kernels, and, in Python builds, the pybind11 module loldu._C.
#include "loldu/loldu.h"
#include "cuda_glue.h"
#include "ldu_common.h"
#include "op_schemas.h"

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
bool lu_trmm_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, int) { return false; }
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
                                               const at::Tensor& U, const at::Tensor& c, bool need_grad_x,
                                               bool need_grad_c, c10::string_view form,
                                               const std::optional<at::Tensor>& saved) {
  auto [gx, gc] = adapter_linear_backward(grad_y, x, weight, PL, U, c, need_grad_x, need_grad_c, form, saved);
  if (!gx.defined()) gx = at::empty({0}, x.options());
  if (!gc.defined()) gc = at::empty({0}, c.options());
  return {gx, gc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lu_packed_op(const at::Tensor& W) { return lu_packed(W); }

using ForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, c10::string_view);

c10::TypedOperatorHandle<ForwardFn>& forward_handle() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("loldu::adapter_linear_forward", "").typed<ForwardFn>();
  return op;
}

// The public op decomposes (CompositeImplicitAutograd) into adapter_linear_forward, whose autograd
// formula (registered from Python) keeps the second output for the backward. It runs above
// autograd, so "auto" sees whether a backward will follow.
at::Tensor adapter_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& PL, const at::Tensor& U, const at::Tensor& c, c10::string_view form) {
  const std::string resolved = resolve_adapter_form(x, weight, PL, c, form);
  return std::get<0>(forward_handle().call(x, weight, bias, PL, U, c, resolved));
}

// Under autocast the matmuls run in the autocast dtype (fp32 accumulation inside the GEMMs)
// while c, and so the trainable coefficients, stay fp32.
template <c10::DeviceType device, c10::DispatchKey key>
std::tuple<at::Tensor, at::Tensor> adapter_linear_autocast(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, const at::Tensor& PL,
                                                           const at::Tensor& U, const at::Tensor& c,
                                                           c10::string_view form) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dt = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dt, t, device); };
  std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(cast(*bias)) : std::nullopt;
  return forward_handle().call(cast(x), cast(weight), b, cast(PL), cast(U), c.to(at::kFloat), form);
}

}  // namespace
}  // namespace loldu

// The schemas come from op_schemas.h (generated from python/loldu/op_schemas.py, which the
// pure-PyTorch reference declares the same ops from).
TORCH_LIBRARY(loldu, m) {
  for (const char* schema : loldu::kOpSchemas) m.def(schema);
}

// The public op decomposes into adapter_linear_forward; delta_weight is a pure ATen composition:
// autograd and meta come for free.
TORCH_LIBRARY_IMPL(loldu, CompositeImplicitAutograd, m) {
  m.impl("adapter_linear", &loldu::adapter_linear_op);
  m.impl("delta_weight", &loldu::delta_weight);
}

TORCH_LIBRARY_IMPL(loldu, CPU, m) {
  m.impl("ldu", &loldu::ldu_op);
  m.impl("lu_packed", &loldu::lu_packed_op);
  m.impl("lu_linear_forward", &loldu::lu_linear_forward);
  m.impl("lu_linear_backward", &loldu::lu_linear_backward);
  m.impl("ldu_from_pivots", &loldu::ldu_from_pivots_op);
  m.impl("adapter_linear_forward", &loldu::adapter_linear_forward);
  m.impl("adapter_linear_backward", &loldu::backward_op);
}

TORCH_LIBRARY_IMPL(loldu, CUDA, m) {
  m.impl("ldu", &loldu::ldu_op);
  m.impl("lu_packed", &loldu::lu_packed_op);
  m.impl("lu_linear_forward", &loldu::lu_linear_forward);
  m.impl("lu_linear_backward", &loldu::lu_linear_backward);
  m.impl("ldu_from_pivots", &loldu::ldu_from_pivots_op);
  m.impl("adapter_linear_forward", &loldu::adapter_linear_forward);
  m.impl("adapter_linear_backward", &loldu::backward_op);
}

TORCH_LIBRARY_IMPL(loldu, AutocastCPU, m) {
  m.impl("adapter_linear_forward", &loldu::adapter_linear_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(loldu, AutocastCUDA, m) {
  m.impl("adapter_linear_forward", &loldu::adapter_linear_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

#ifdef TORCH_EXTENSION_NAME
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "loldu C++ extension: the ops live in torch.ops.loldu; this module reports the build.";
  m.def("build_flavor", &loldu::build_flavor, "'cpu' or 'cuda': which kernels this build carries");
  m.def(
      "dense_min_rows",
      [](int64_t d, int64_t k, int64_t r, const std::string& dtype, const std::string& device, bool need_grad_x,
         bool need_grad_c) {
        const at::ScalarType dt = dtype == "torch.float64" ? at::kDouble
                                  : dtype == "torch.float16" ? at::kHalf
                                  : dtype == "torch.bfloat16" ? at::kBFloat16 : at::kFloat;
        const auto dev = device == "cuda" ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
        return loldu::adapter_dense_min_rows(d, k, r, dt, dev, need_grad_x, need_grad_c);
      },
      "The C++ cost model behind form='auto' (loldu::adapter_dense_min_rows), for comparison with Python's");
}
#endif
