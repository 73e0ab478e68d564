// The fused LoLDU linear op in its two exact forms (docs/method.md §3, §4, §7), device-generic
// over ATen GEMMs.
//
// Delta form (no (d, k) temporary):
//  * forward:  y = addmm(b, x, W0^T)             (bias in the GEMM epilogue)
//              t = x U^T                          (n, r), returned for the backward to reuse
//              y.addmm_(t, (PL diag c)^T)         (accumulate into y in the GEMM epilogue, beta=1)
//    The scale by c is folded into the (d, r) factor (d*r multiplies instead of n*r, no (n, r)
//    pass) and the low-rank product accumulates straight into y: no (n, d) temporary.
//  * backward: h = g PL; grad_c[j] = sum_rows t[:, j] h[:, j] in one fused pass (our kernel,
//    fp32/fp64 accumulator, no (n, r) product temporary); grad_x = g W0, then
//    grad_x.addmm_(h, diag(c) U) with c folded into the (r, k) factor. t comes from the forward.
//  * per-row c (n, r) (mixed-adapter batches): the scale goes on t and h instead.
// Dense form (shared c only):
//  * forward:  W = W0 + PL diag(c) U (d, k), returned for the backward; y = addmm(b, x, W^T).
//  * backward: grad_x = g W; grad_c = diag(PL^T (g^T x) U^T), evaluated as colsum(PL ⊙ (G U^T))
//    with G = g^T x, or as colsum((g PL) ⊙ (x U^T)), whichever the cost model finds cheaper.
//  On CPU, when U is upper trapezoidal (as ldu returns it), the products with U skip its zero
//  triangle in column blocks: at full rank the build and G U^T cost about half of 2 d k r.
// "auto" picks the form per call by the cost model of form_cost.h (generated from
// python/loldu/form_cost.py, which the pure-PyTorch reference runs too).
#include "loldu/loldu.h"
#include "cuda_glue.h"
#include "form_cost.h"
#include "ldu_common.h"

#include <ATen/OpMathType.h>

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
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

enum class Form { Auto, Delta, Dense };

Form parse_form(c10::string_view form, const char* op) {
  if (form == "auto") return Form::Auto;
  if (form == "delta") return Form::Delta;
  if (form == "dense") return Form::Dense;
  TORCH_CHECK_VALUE(false, op, ": form must be 'auto', 'delta' or 'dense', got '", std::string(form), "'");
}

// A resolved form: what the forward kernel and the backward accept.
Form parse_resolved_form(c10::string_view form, const char* op) {
  const Form f = parse_form(form, op);
  TORCH_CHECK_VALUE(f != Form::Auto, op, ": form must be 'delta' or 'dense' here ('auto' is resolved by "
                    "loldu::adapter_linear), got 'auto'");
  return f;
}

// -- U's zero triangle -------------------------------------------------------------------------
// Column block [j0, j0 + w) of U (r, k) whose nonzero entries all lie in rows [0, lim).
struct UBlock {
  int64_t j0, w, lim;
};

// Whether U's strictly lower triangle is exactly zero (read on CPU only: a device would have to
// synchronize). Stops at the first nonzero, so an unstructured U costs next to nothing.
bool upper_trapezoidal(const at::Tensor& U) {
  if (!U.is_cpu()) return false;
  bool upper = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, U.scalar_type(), "loldu_upper_trapezoidal", [&] {
    const scalar_t* p = U.const_data_ptr<scalar_t>();
    const int64_t s0 = U.stride(0), s1 = U.stride(1), r = U.size(0), k = U.size(1);
    for (int64_t i = 1; i < r && upper; ++i)
      for (int64_t j = 0; j < std::min(i, k); ++j)
        if (p[i * s0 + j * s1] != scalar_t(0)) {
          upper = false;
          break;
        }
  });
  return upper;
}

// The column blocks the products with U run over. An upper trapezoidal U (U[i, j] == 0 for j < i)
// splits into blocks of the leading r columns, block [j0, j1) needing rows < j1 only, and one block
// for the columns from r on; any other U is one block of all its rows. The cost model's r_u
// (form_cost.h: upper_rank) averages exactly these blocks. Each op call finds U's structure where it
// first multiplies by U: the scan reads at most r (r - 1) / 2 entries against the d k r flops it
// halves, which is cheaper than carrying a flag from the forward through the autograd formula.
std::vector<UBlock> u_blocks(const at::Tensor& U) {
  const int64_t r = U.size(0), k = U.size(1);
  if (!upper_trapezoidal(U)) return {{0, k, r}};
  std::vector<UBlock> out;
  const int64_t m = std::min(r, k);
  for (int64_t j0 = 0; j0 < m; j0 += form_cost::U_BLOCK) {
    const int64_t w = std::min(form_cost::U_BLOCK, m - j0);
    out.push_back({j0, w, std::min(r, j0 + w)});
  }
  if (k > m) out.push_back({m, k - m, r});
  return out;
}

// out (rows, r) = G (rows, k) U^T, block by block over U's nonzero region.
at::Tensor mm_ut(const at::Tensor& G, const at::Tensor& U, const std::vector<UBlock>& blocks) {
  at::Tensor out = at::zeros({G.size(0), U.size(0)}, G.options());
  for (const auto& b : blocks) {
    at::Tensor o = out.narrow(1, 0, b.lim);
    o.addmm_(G.narrow(1, b.j0, b.w), U.narrow(0, 0, b.lim).narrow(1, b.j0, b.w).t());
  }
  return out;
}

// W = W0 + PL diag(c) U in x's dtype (the dense form's weight), block by block over U's nonzero region.
// W is laid out as W0 (a transposed W0 gives a transposed W), so x W^T is the very GEMM x W0^T is,
// and c = 0 gives the base layer's output bit for bit in either form.
at::Tensor dense_weight(const at::Tensor& weight, const at::Tensor& PL, const at::Tensor& U, const at::Tensor& c,
                        const std::vector<UBlock>& blocks) {
  at::Tensor W = at::empty_like(weight);
  at::Tensor PLc = PL * c.to(PL.scalar_type()).unsqueeze(0);
  for (const auto& b : blocks) {
    at::Tensor out = W.narrow(1, b.j0, b.w);
    at::addmm_out(out, weight.narrow(1, b.j0, b.w), PLc.narrow(1, 0, b.lim), U.narrow(0, 0, b.lim).narrow(1, b.j0, b.w));
  }
  return W;
}

}  // namespace

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

// -- form="auto": the cost model of form_cost.h (docs/method.md §7) on ATen's dtypes and devices --
namespace {

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();

double element_bytes(at::ScalarType dtype) {
  return dtype == at::kDouble ? 8.0 : (dtype == at::kHalf || dtype == at::kBFloat16 ? 2.0 : 4.0);
}

int64_t concrete(const c10::SymInt& v) { return v.guard_int(__FILE__, __LINE__); }

}  // namespace

int64_t adapter_dense_min_rows(int64_t d, int64_t k, int64_t r, at::ScalarType dtype, c10::DeviceType device,
                               bool need_grad_x, bool need_grad_c) {
  const double n = form_cost::dense_min_rows(d, k, r, device == c10::DeviceType::CUDA, device == c10::DeviceType::CPU,
                                             element_bytes(dtype), need_grad_x, need_grad_c);
  return n == form_cost::NEVER ? kNever : static_cast<int64_t>(n);
}

std::string adapter_form(int64_t n, int64_t d, int64_t k, int64_t r, at::ScalarType dtype, c10::DeviceType device,
                         bool need_grad_x, bool need_grad_c) {
  return n >= adapter_dense_min_rows(d, k, r, dtype, device, need_grad_x, need_grad_c) ? "dense" : "delta";
}

std::string resolve_adapter_form(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& PL,
                                 const at::Tensor& c, c10::string_view form) {
  const Form f = parse_form(form, "loldu.adapter_linear");
  // Per-row c would need one W per row: the dense form is defined for a shared c only.
  if (f == Form::Delta || c.dim() != 1) return "delta";
  if (f == Form::Dense) return "dense";
  if (weight.dim() != 2 || PL.dim() != 2 || x.dim() < 1) return "delta";  // the kernel's checks will report it
  const bool grad = at::GradMode::is_enabled();
  const auto device = x.device().type();
  auto dtype = x.scalar_type();
  if (at::autocast::is_autocast_available(device) && at::autocast::is_autocast_enabled(device)) {
    dtype = at::autocast::get_autocast_dtype(device);
  }
  const int64_t d = concrete(weight.sym_size(0)), k = concrete(weight.sym_size(1)), r = concrete(PL.sym_size(1));
  const int64_t min_rows = adapter_dense_min_rows(d, k, r, dtype, device, grad && x.requires_grad(),
                                                  grad && c.requires_grad());
  if (min_rows == kNever || k == 0 || min_rows > kNever / k) return "delta";
  // Guards on the inequality only, so a graph compiled with dynamic n stays valid on its side.
  return x.sym_numel().sym_ge(c10::SymInt(k * min_rows)).guard_bool(__FILE__, __LINE__) ? "dense" : "delta";
}

std::tuple<at::Tensor, at::Tensor> adapter_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias, const at::Tensor& PL,
                                                          const at::Tensor& U, const at::Tensor& c,
                                                          c10::string_view form) {
  check_adapter_args(x, weight, bias, PL, U, c);
  const Form f = parse_resolved_form(form, "loldu.adapter_linear_forward");
  const int64_t d = weight.size(0), k = weight.size(1), r = PL.size(1);
  at::Tensor x2 = x.reshape({-1, k});
  auto out_shape = x.sizes().vec();
  out_shape.back() = d;
  if (f == Form::Dense) {
    TORCH_CHECK_VALUE(c.dim() == 1, "loldu.adapter_linear_forward: the dense form needs one c (r,) for all rows, "
                      "got c ", shape_of(c), " (per-row c runs the delta form)");
    at::Tensor W = dense_weight(weight, PL, U, c, u_blocks(U));
    at::Tensor y = bias ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());
    return {y.view(out_shape), W};
  }
  at::Tensor y = bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor t = at::mm(x2, U.t());
  if (c.dim() == 1) {
    y.addmm_(t, (PL * c.to(PL.scalar_type()).unsqueeze(0)).t());
  } else {
    y.addmm_(t * c.reshape({-1, r}).to(t.scalar_type()), PL.t());
  }
  return {y.view(out_shape), t};
}

at::Tensor adapter_linear(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& PL,
                          const at::Tensor& U, const at::Tensor& c, c10::string_view form) {
  return std::get<0>(adapter_linear_forward(x, weight, bias, PL, U, c, resolve_adapter_form(x, weight, PL, c, form)));
}

std::tuple<at::Tensor, at::Tensor> adapter_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& PL,
    const at::Tensor& U, const at::Tensor& c, bool need_grad_x, bool need_grad_c, c10::string_view form,
    const std::optional<at::Tensor>& saved) {
  check_adapter_args(x, weight, std::nullopt, PL, U, c);
  const Form f = parse_resolved_form(form, "loldu.adapter_linear_backward");
  const int64_t d = weight.size(0), k = weight.size(1), r = PL.size(1);
  TORCH_CHECK_VALUE(grad_y.size(-1) == d && grad_y.numel() / d == x.numel() / k,
                    "loldu.adapter_linear_backward: grad_y ", grad_y.sizes(), " does not match x ", x.sizes(),
                    " and weight ", weight.sizes());
  const int64_t n = x.numel() / k;
  at::Tensor g2 = grad_y.reshape({-1, d}).to(x.scalar_type());
  at::Tensor x2 = x.reshape({-1, k});
  at::Tensor cx = c.to(x.scalar_type());
  auto check_saved = [&](std::initializer_list<int64_t> shape, const char* what) {
    TORCH_CHECK_VALUE(saved->sizes() == c10::IntArrayRef(shape) && saved->scalar_type() == x.scalar_type() &&
                          saved->device() == x.device(),
                      "loldu.adapter_linear_backward: saved must be ", what, " ", c10::IntArrayRef(shape), " of ",
                      py_dtype(x.scalar_type()), ", got ", saved->sizes(), " of ", py_dtype(saved->scalar_type()));
  };
  at::Tensor grad_x, grad_c;
  if (f == Form::Dense) {
    TORCH_CHECK_VALUE(c.dim() == 1, "loldu.adapter_linear_backward: the dense form needs one c (r,) for all rows, "
                      "got c ", shape_of(c));
    std::optional<std::vector<UBlock>> blocks;  // U's structure, found where it is first needed
    auto U_blocks = [&]() -> const std::vector<UBlock>& {
      if (!blocks) blocks = u_blocks(U);
      return *blocks;
    };
    if (need_grad_x) {
      if (saved) check_saved({d, k}, "the dense weight W");
      at::Tensor W = saved ? *saved : dense_weight(weight, PL, U, c, U_blocks());
      grad_x = at::mm(g2, W).view(x.sizes());
    }
    if (need_grad_c) {
      const auto device = x.device().type();
      if (form_cost::grad_c_through_g(n, d, k, r, device == c10::DeviceType::CUDA, device == c10::DeviceType::CPU,
                                      element_bytes(x.scalar_type()))) {
        at::Tensor G = at::mm(g2.t(), x2);  // (d, k)
        grad_c = column_dot(PL, mm_ut(G, U, U_blocks()));
      } else {
        grad_c = column_dot(at::mm(x2, U.t()), at::mm(g2, PL));
      }
      grad_c = grad_c.to(c.scalar_type());
    }
    return {grad_x, grad_c};
  }
  if (saved) check_saved({n, r}, "t = x U^T");
  if (!need_grad_x && !need_grad_c) return {grad_x, grad_c};
  at::Tensor h = at::mm(g2, PL);  // (n, r)
  if (need_grad_c) {
    at::Tensor t = saved ? *saved : at::mm(x2, U.t());  // (n, r)
    grad_c = c.dim() == 1 ? column_dot(t, h).to(c.scalar_type()) : t.mul(h).to(c.scalar_type()).view(c.sizes());
  }
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
