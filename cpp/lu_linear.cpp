// The full-rank LoLDU layer on its packed LU (Shi et al., arXiv 2410.13618; docs/method.md): at r = m =
// min(d, k), W0[perm] = L U exactly, with L unit lower-trapezoidal (d, m) strictly below the diagonal of
// the packed (d, k) array and U = diag(D) Ũ (m, k) on and above it (LAPACK's getrf layout), and the
// adapted weight is W(c)[perm] = L diag(1 + c / D) U.
//
//   forward   u = x U^T (n, m); yP = (u * (1 + c / D)) L^T; y[:, perm] = yP (+ bias)
//   backward  h = g[:, perm] L; grad_c = sum_rows(h * u) / D; grad_x = (h * (1 + c / D)) U
//
// Each product with a triangle halves it recursively: each half's off-diagonal block is one GEMM on a
// view of the packed array (addmm_ into a view of the result), and only the diagonal blocks of at most
// kBlock x kBlock are masked into small copies. So a product costs about half of a full (n, d, k) GEMM's
// flops, its GEMMs are wide, and nothing of size (d, k) is allocated. ATen's GEMMs make the code
// device-generic: on CUDA the same views go to cuBLAS.
// fp16 runs in fp32 (u = x U^T may leave fp16's range): each block of the packed array is converted as
// it is used, so the temporaries stay (kBlock, k) or (d, kBlock) there too.
#include "ldu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>
#include <tuple>

namespace loldu {
namespace {

// The largest diagonal block the recursion stops at (masked into a dense copy). Measured as the CPU
// time of one step (forward + input gradient, n = 2048, 1 thread, 2-core AMD EPYC shared with other
// jobs) at 768 x 768 over the base layer's step: 64 gave 1.42-1.57x, 128 1.55-1.65x, 256 1.68x, 32 and
// 96 1.72-1.80x (smaller leaves run more, narrower GEMMs; larger ones waste more of their zero half).
constexpr int64_t kBlock = 64;

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// LU (d, k), perm (d,) int64, D and c (m,) in the working dtype of `dt`, all on `device`.
template <typename Shapes>
void check_factor_args(const char* op, const at::Tensor& LU, const at::Tensor& perm, const at::Tensor& D,
                       const at::Tensor& c, at::ScalarType dt, c10::Device device, Shapes&& all) {
  TORCH_CHECK_VALUE(LU.dim() == 2 && perm.dim() == 1 && D.dim() == 1 && c.dim() == 1, op,
                    ": expected LU (d, k), perm (d,), D (m,), c (m,); got ", all());
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  TORCH_CHECK_VALUE(perm.size(0) == d && D.size(0) == m && c.size(0) == m && m >= 1, op, ": LU (", d, ", ", k,
                    ") needs perm (", d, ",), D (", m, ",) and c (", m, ",) with m = min(d, k); got ", all());
  for (const at::Tensor* t : {&LU, &perm, &D, &c}) {
    TORCH_CHECK_VALUE(t->device() == device, op, ": all tensors must be on ", device, ", found one on ",
                      t->device(), "; shapes: ", all());
  }
  TORCH_CHECK_VALUE(is_supported_float(dt), op, ": x must be float64, float32, float16 or bfloat16, got ",
                    py_dtype(dt), "; shapes: ", all());
  TORCH_CHECK_VALUE(LU.scalar_type() == dt, op, ": LU is ", py_dtype(LU.scalar_type()), " but x is ", py_dtype(dt),
                    " (LU is kept in the compute dtype); shapes: ", all());
  TORCH_CHECK_VALUE(perm.scalar_type() == at::kLong, op, ": perm must be torch.int64, got ",
                    py_dtype(perm.scalar_type()), "; shapes: ", all());
  const auto acc = working_dtype(dt);
  TORCH_CHECK_VALUE(D.scalar_type() == acc && c.scalar_type() == acc, op, ": D and c must be ", py_dtype(acc),
                    " for x of ", py_dtype(dt), ", got ", py_dtype(D.scalar_type()), " and ", py_dtype(c.scalar_type()),
                    "; shapes: ", all());
}

// out[:, j] = Y[:, idx[j]] for (n, d) Y. On the CPU a plain row-by-row gather (ATen's index_select along
// the inner dim was ~3x slower than a GEMM-sized pass: ~4 ms for (2048, 768) fp32 on one core).
at::Tensor permute_columns(const at::Tensor& Y, const at::Tensor& idx) {
  if (!Y.is_cpu()) return Y.index_select(1, idx);
  at::Tensor Yc = Y.contiguous(), ic = idx.contiguous();
  at::Tensor out = at::empty_like(Yc);
  const int64_t n = Yc.size(0), d = Yc.size(1);
  const int64_t* ip = ic.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Yc.scalar_type(), "loldu_permute_columns", [&] {
    const scalar_t* src = Yc.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, d)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* s = src + i * d;
        scalar_t* o = dst + i * d;
        for (int64_t j = 0; j < d; ++j) o[j] = s[ip[j]];
      }
    });
  });
  return out;
}

// o += X B^T (transposed) or X B (not), B = the packed array's block [r0, r0 + nr) x [c0, c0 + nc). In the
// compute dtype B is a view and this is one GEMM; otherwise (fp16) B is converted kBlock rows at a time.
void addmm_block(at::Tensor o, const at::Tensor& X, const at::Tensor& LU, int64_t r0, int64_t nr, int64_t c0,
                 int64_t nc, bool transposed, at::ScalarType cd) {
  at::Tensor B = LU.narrow(0, r0, nr).narrow(1, c0, nc);
  if (LU.scalar_type() == cd) {
    o.addmm_(X, transposed ? B.t() : B);
    return;
  }
  for (int64_t q = 0; q < nr; q += kBlock) {
    const int64_t w = std::min(kBlock, nr - q);
    at::Tensor Bq = B.narrow(0, q, w).to(cd);
    if (transposed) o.narrow(1, q, w).addmm_(X, Bq.t());
    else o.addmm_(X.narrow(1, q, w), Bq);
  }
}

// The four products with a triangle of the packed array: o (n, w) = X (n, w) op(T), T its (w, w) diagonal
// block at [p, p + w): T^T of the upper triangle (UpperT, x U^T), T^T of the unit lower one (LowerT, s L^T),
// T (Lower, g L), T (Upper, h U).
enum class Tri { UpperT, LowerT, Lower, Upper };

// Recursive halving: o's halves are the halves' own triangles (recursion) plus one GEMM with the
// off-diagonal block, so the GEMMs are as large as the triangle allows (w/2, w/4, ... wide) and only
// the kBlock-wide leaves are masked copies, whose zero half costs the only wasted flops.
void tri_mm(at::Tensor o, const at::Tensor& X, const at::Tensor& LU, int64_t p, int64_t w, Tri kind,
            at::ScalarType cd) {
  if (w <= kBlock) {
    at::Tensor T = LU.narrow(0, p, w).narrow(1, p, w).to(cd);
    const bool upper = kind == Tri::UpperT || kind == Tri::Upper;
    if (upper) {
      T = T.triu();
    } else {
      T = T.tril(-1);
      T.diagonal().fill_(1);
    }
    at::mm_out(o, X, kind == Tri::UpperT || kind == Tri::LowerT ? T.t() : T);
    return;
  }
  const int64_t h = (w / 2 + kBlock - 1) / kBlock * kBlock, g = w - h;
  at::Tensor o1 = o.narrow(1, 0, h), o2 = o.narrow(1, h, g);
  at::Tensor X1 = X.narrow(1, 0, h), X2 = X.narrow(1, h, g);
  switch (kind) {
    case Tri::UpperT:  // [o1 o2] = [X1 X2] [T11 T12; 0 T22]^T
      tri_mm(o1, X1, LU, p, h, kind, cd);
      addmm_block(o1, X2, LU, p, h, p + h, g, /*transposed=*/true, cd);
      tri_mm(o2, X2, LU, p + h, g, kind, cd);
      break;
    case Tri::LowerT:  // [o1 o2] = [X1 X2] [T11 0; T21 T22]^T
      tri_mm(o1, X1, LU, p, h, kind, cd);
      tri_mm(o2, X2, LU, p + h, g, kind, cd);
      addmm_block(o2, X1, LU, p + h, g, p, h, /*transposed=*/true, cd);
      break;
    case Tri::Lower:  // [o1 o2] = [X1 X2] [T11 0; T21 T22]
      tri_mm(o1, X1, LU, p, h, kind, cd);
      addmm_block(o1, X2, LU, p + h, g, p, h, /*transposed=*/false, cd);
      tri_mm(o2, X2, LU, p + h, g, kind, cd);
      break;
    case Tri::Upper:  // [o1 o2] = [X1 X2] [T11 T12; 0 T22]
      tri_mm(o1, X1, LU, p, h, kind, cd);
      tri_mm(o2, X2, LU, p + h, g, kind, cd);
      addmm_block(o2, X1, LU, p, h, p + h, g, /*transposed=*/false, cd);
      break;
  }
}

// u (n, m) = X (n, k) U^T: the (m, m) triangle, then U's columns from m on (k > d) as one GEMM.
at::Tensor mul_upper_t(const at::Tensor& X, const at::Tensor& LU, at::ScalarType cd) {
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  at::Tensor out = at::empty({X.size(0), m}, X.options());
  tri_mm(out, X.narrow(1, 0, m), LU, 0, m, Tri::UpperT, cd);
  if (k > m) addmm_block(out, X.narrow(1, m, k - m), LU, 0, m, m, k - m, /*transposed=*/true, cd);
  return out;
}

// out (n, d) = S (n, m) L^T: the unit (m, m) triangle, then L's rows from m on (d > k) as one GEMM.
at::Tensor mul_lower_t(const at::Tensor& S, const at::Tensor& LU, at::ScalarType cd) {
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  at::Tensor out = at::empty({S.size(0), d}, S.options());
  tri_mm(out.narrow(1, 0, m), S, LU, 0, m, Tri::LowerT, cd);
  if (d > m) {
    at::Tensor o = out.narrow(1, m, d - m).zero_();
    addmm_block(o, S, LU, m, d - m, 0, m, /*transposed=*/true, cd);
  }
  return out;
}

// out (n, m) = G (n, d) L: the unit triangle, plus G's columns from m on times L's rows from m on.
at::Tensor mul_lower(const at::Tensor& G, const at::Tensor& LU, at::ScalarType cd) {
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  at::Tensor out = at::empty({G.size(0), m}, G.options());
  tri_mm(out, G.narrow(1, 0, m), LU, 0, m, Tri::Lower, cd);
  if (d > m) addmm_block(out, G.narrow(1, m, d - m), LU, m, d - m, 0, m, /*transposed=*/false, cd);
  return out;
}

// out (n, k) = H (n, m) U: the triangle, then U's columns from m on (k > d) as one GEMM.
at::Tensor mul_upper(const at::Tensor& H, const at::Tensor& LU, at::ScalarType cd) {
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  at::Tensor out = at::empty({H.size(0), k}, H.options());
  tri_mm(out.narrow(1, 0, m), H, LU, 0, m, Tri::Upper, cd);
  if (k > m) {
    at::Tensor o = out.narrow(1, m, k - m).zero_();
    addmm_block(o, H, LU, 0, m, m, k - m, /*transposed=*/false, cd);
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lu_linear_forward(const at::Tensor& x, const at::Tensor& LU, const at::Tensor& perm,
                                                     const at::Tensor& D, const at::Tensor& c,
                                                     const std::optional<at::Tensor>& bias) {
  auto all = [&] {
    return "x " + shape_of(x) + ", LU " + shape_of(LU) + ", perm " + shape_of(perm) + ", D " + shape_of(D) +
           ", c " + shape_of(c);
  };
  TORCH_CHECK_VALUE(x.dim() >= 1 && LU.dim() == 2 && x.size(-1) == LU.size(-1),
                    "loldu.lu_linear: x (..., k) must match LU (d, k); got ", all());
  check_factor_args("loldu.lu_linear", LU, perm, D, c, x.scalar_type(), x.device(), all);
  const int64_t d = LU.size(0), k = LU.size(1);
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d && bias->scalar_type() == x.scalar_type() &&
                          bias->device() == x.device(),
                      "loldu.lu_linear: bias must be (", d, ",) of ", py_dtype(x.scalar_type()), " on ", x.device(),
                      ", got ", shape_of(*bias), " of ", py_dtype(bias->scalar_type()), " on ", bias->device());
  }
  const auto cd = compute_dtype(x.scalar_type());
  at::Tensor x2 = x.reshape({-1, k}).to(cd);
  at::Tensor u = mul_upper_t(x2, LU, cd);
  at::Tensor yP = mul_lower_t(u * (c / D + 1).to(cd), LU, cd);
  // y[:, perm[i]] = yP[:, i], i.e. y = yP[:, perm^-1].
  at::Tensor inv = at::empty_like(perm).scatter_(0, perm, at::arange(d, perm.options()));
  at::Tensor y = permute_columns(yP, inv);
  if (bias) y.add_(*bias);
  auto out_shape = x.sizes().vec();
  out_shape.back() = d;
  return {y.to(x.scalar_type()).view(out_shape), u};
}

std::tuple<at::Tensor, at::Tensor> lu_linear_backward(const at::Tensor& grad_y, const at::Tensor& u,
                                                      const at::Tensor& LU, const at::Tensor& perm,
                                                      const at::Tensor& D, const at::Tensor& c, bool need_grad_x,
                                                      bool need_grad_c) {
  auto all = [&] {
    return "grad_y " + shape_of(grad_y) + ", u " + shape_of(u) + ", LU " + shape_of(LU) + ", perm " +
           shape_of(perm) + ", D " + shape_of(D) + ", c " + shape_of(c);
  };
  const char* op = "loldu.lu_linear_backward";
  TORCH_CHECK_VALUE(grad_y.dim() >= 1 && LU.dim() == 2 && grad_y.size(-1) == LU.size(0), op,
                    ": grad_y (..., d) must match LU (d, k); got ", all());
  check_factor_args(op, LU, perm, D, c, grad_y.scalar_type(), grad_y.device(), all);
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k), n = grad_y.numel() / d;
  const auto cd = compute_dtype(grad_y.scalar_type());
  TORCH_CHECK_VALUE(u.dim() == 2 && u.size(0) == n && u.size(1) == m && u.scalar_type() == cd &&
                        u.device() == grad_y.device(),
                    op, ": u must be (", n, ", ", m, ") of ", py_dtype(cd),
                    " (x U^T as the forward returned it), got ", shape_of(u), " of ", py_dtype(u.scalar_type()),
                    "; shapes: ", all());
  at::Tensor grad_x = at::empty({0}, grad_y.options()), grad_c = at::empty({0}, c.options());
  if (!need_grad_x && !need_grad_c) return {grad_x, grad_c};
  at::Tensor h = mul_lower(permute_columns(grad_y.reshape({-1, d}).to(cd), perm), LU, cd);
  if (need_grad_c) grad_c = column_dot(u, h).to(c.scalar_type()).div_(D);
  if (need_grad_x) {
    auto shape = grad_y.sizes().vec();
    shape.back() = k;
    grad_x = mul_upper(h.mul_((c / D + 1).to(cd)), LU, cd).to(grad_y.scalar_type()).view(shape);
  }
  return {grad_x, grad_c};
}

}  // namespace loldu
