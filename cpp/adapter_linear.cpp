// The fused LoLDU linear op (docs/method.md §3, §4), device-generic over ATen GEMMs.
//
// What is fused where:
//  * forward:  y = addmm(b, x, W0^T)             (bias in the GEMM epilogue)
//              t = x U^T                          (n, r)
//              y.addmm_(t, (PL diag c)^T)         (accumulate into y in the GEMM epilogue, beta=1)
//    The scale by c is folded into the (d, r) factor (d*r multiplies instead of n*r, no (n, r)
//    pass) and the low-rank product accumulates straight into y: no (n, d) temporary.
//  * backward: h = g PL; grad_c[j] = sum_rows t[:, j] h[:, j] in one fused pass (our kernel,
//    fp32/fp64 accumulator, no (n, r) product temporary); grad_x = g W0, then
//    grad_x.addmm_(h, diag(c) U) with c folded into the (r, k) factor.
//  * per-row c (n, r) (mixed-adapter batches): the scale goes on t and h instead.
// t is recomputed from x in backward: the only saved activation is x. No (d, k) temporary.
#include "loldu/loldu.h"
#include "cuda_glue.h"
#include "ldu_common.h"

#include <ATen/OpMathType.h>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <vector>

namespace loldu {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_adapter_args(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& PL,
                        const at::Tensor& U, const at::Tensor& c) {
  // Built only when a check fails (TORCH_CHECK evaluates its message lazily).
  auto all = [&] {
    return "x " + shape_of(x) + ", weight " + shape_of(weight) + ", PL " + shape_of(PL) + ", U " + shape_of(U) +
           ", c " + shape_of(c);
  };
  TORCH_CHECK_VALUE(weight.dim() == 2 && PL.dim() == 2 && U.dim() == 2 && x.dim() >= 1,
                    "loldu.adapter_linear: expected x (..., k), weight (d, k), PL (d, r), U (r, k); got ", all());
  const int64_t d = weight.size(0), k = weight.size(1), r = PL.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == k, "loldu.adapter_linear: x has ", x.size(-1),
                    " features but weight expects k=", k, "; got ", all());
  TORCH_CHECK_VALUE(PL.size(0) == d && U.size(0) == r && U.size(1) == k && r >= 1,
                    "loldu.adapter_linear: inconsistent rank or shapes, expected PL (", d, ", r), U (r, ",
                    k, "); got ", all());
  const bool shared = c.dim() == 1 && c.size(0) == r;
  bool per_row = c.dim() == x.dim() && c.size(-1) == r;
  for (int64_t i = 0; per_row && i + 1 < x.dim(); ++i) per_row = c.size(i) == x.size(i);
  TORCH_CHECK_VALUE(shared || per_row, "loldu.adapter_linear: c must be (r,) = (", r,
                    ",) or x's leading shape + (r,); got ", all());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d, "loldu.adapter_linear: bias must be (",
                      d, ",), got ", shape_of(*bias));
  }
  for (const at::Tensor* t : {&weight, &PL, &U, &c}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "loldu.adapter_linear: all tensors must be on ",
                      x.device(), ", found one on ", t->device(), "; shapes: ", all());
  }
  if (bias) TORCH_CHECK_VALUE(bias->device() == x.device(), "loldu.adapter_linear: bias on ", bias->device(),
                              " but x on ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(is_supported_float(dt), "loldu.adapter_linear: x must be float64, float32, float16 or bfloat16, got ",
                    py_dtype(dt), "; shapes: ", all());
  if (bias) TORCH_CHECK_VALUE(bias->scalar_type() == dt, "loldu.adapter_linear: bias is ",
                              py_dtype(bias->scalar_type()), " but x is ", py_dtype(dt), "; shapes: ", all());
  for (const at::Tensor* t : {&weight, &PL, &U}) {
    TORCH_CHECK_VALUE(t->scalar_type() == dt, "loldu.adapter_linear: x is ", py_dtype(dt),
                      " but weight/PL/U are ", py_dtype(weight.scalar_type()), "/", py_dtype(PL.scalar_type()), "/",
                      py_dtype(U.scalar_type()), " (cast them, or use torch.autocast); shapes: ", all());
  }
  TORCH_CHECK_VALUE(c.scalar_type() == dt || c.scalar_type() == at::kFloat,
                    "loldu.adapter_linear: c must be ", py_dtype(dt), " or float32, got ", py_dtype(c.scalar_type()));
}

// grad_c[j] = sum_i t[i, j] * h[i, j], accumulated in fp32 (fp64 for fp64), one pass.
at::Tensor column_dot(const at::Tensor& t, const at::Tensor& h) {
  const int64_t n = t.size(0), r = t.size(1);
  const auto acc = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({r}, t.options().dtype(acc));
  at::Tensor tc = t.contiguous(), hc = h.contiguous();
  if (t.is_cuda()) {
    column_dot_cuda(tc, hc, out);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "loldu_column_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tp = tc.const_data_ptr<scalar_t>();
    const scalar_t* hp = hc.const_data_ptr<scalar_t>();
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n * r / 32768));
    std::vector<acc_t> partial(chunks * r, acc_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        acc_t* acc_row = partial.data() + ch * r;
        const int64_t i0 = n * ch / chunks, i1 = n * (ch + 1) / chunks;
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t* ti = tp + i * r;
          const scalar_t* hi = hp + i * r;
          for (int64_t j = 0; j < r; ++j) acc_row[j] += static_cast<acc_t>(ti[j]) * static_cast<acc_t>(hi[j]);
        }
      }
    });
    auto* o = out.data_ptr<acc_t>();
    for (int64_t ch = 0; ch < chunks; ++ch)
      for (int64_t j = 0; j < r; ++j) o[j] += partial[ch * r + j];
  });
  return out;
}

}  // namespace

at::Tensor adapter_linear(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& PL,
                          const at::Tensor& U, const at::Tensor& c) {
  check_adapter_args(x, weight, bias, PL, U, c);
  const int64_t d = weight.size(0), k = weight.size(1), r = PL.size(1);
  at::Tensor x2 = x.reshape({-1, k});
  at::Tensor y = bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor t = at::mm(x2, U.t());
  if (c.dim() == 1) {
    y.addmm_(t, (PL * c.to(PL.scalar_type()).unsqueeze(0)).t());
  } else {
    y.addmm_(t.mul_(c.reshape({-1, r}).to(t.scalar_type())), PL.t());
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = d;
  return y.view(out_shape);
}

std::tuple<at::Tensor, at::Tensor> adapter_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& PL,
    const at::Tensor& U, const at::Tensor& c, bool need_grad_x) {
  check_adapter_args(x, weight, std::nullopt, PL, U, c);
  const int64_t d = weight.size(0), k = weight.size(1), r = PL.size(1);
  TORCH_CHECK_VALUE(grad_y.size(-1) == d && grad_y.numel() / d == x.numel() / k,
                    "loldu.adapter_linear_backward: grad_y ", grad_y.sizes(), " does not match x ", x.sizes(),
                    " and weight ", weight.sizes());
  at::Tensor g2 = grad_y.reshape({-1, d}).to(x.scalar_type());
  at::Tensor x2 = x.reshape({-1, k});
  at::Tensor h = at::mm(g2, PL);   // (n, r)
  at::Tensor t = at::mm(x2, U.t());  // (n, r), recomputed instead of saved
  at::Tensor grad_c;
  at::Tensor cx = c.to(x.scalar_type());
  if (c.dim() == 1) {
    grad_c = column_dot(t, h).to(c.scalar_type());
  } else {
    grad_c = t.mul(h).to(c.scalar_type()).view(c.sizes());
  }
  at::Tensor grad_x;
  if (need_grad_x) {
    grad_x = at::mm(g2, weight);
    if (c.dim() == 1) {
      grad_x.addmm_(h, U * cx.unsqueeze(1));
    } else {
      grad_x.addmm_(h.mul_(cx.reshape({-1, r})), U);
    }
    grad_x = grad_x.view(x.sizes());
  }
  return {grad_x, grad_c};
}

at::Tensor delta_weight(const at::Tensor& PL, const at::Tensor& U, const at::Tensor& c) {
  TORCH_CHECK_VALUE(PL.dim() == 2 && U.dim() == 2 && c.dim() == 1 && PL.size(1) == U.size(0) &&
                        c.size(0) == U.size(0),
                    "loldu.delta_weight: expected PL (d, r), U (r, k), c (r,); got PL ", PL.sizes(),
                    ", U ", U.sizes(), ", c ", c.sizes());
  const auto acc = PL.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::mm(PL.to(acc) * c.to(acc).unsqueeze(0), U.to(acc));
}

}  // namespace loldu
