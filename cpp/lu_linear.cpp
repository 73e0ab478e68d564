// The full-rank LoLDU layer on its packed LU (Shi et al., arXiv 2410.13618; docs/method.md): at r = m =
// min(d, k), W0[perm] = L U exactly, with L unit lower-trapezoidal (d, m) strictly below the diagonal of
// the packed (d, k) array and U = diag(D) Ũ (m, k) on and above it (LAPACK's getrf layout), and the
// adapted weight is W(c)[perm] = L diag(1 + c / D) U.
//
//   forward   u = x U^T (n, m); yP = (u * (1 + c / D)) L^T; y[:, perm] = yP (+ bias)
//   backward  h = g[:, perm] L; grad_c = sum_rows(h * u) / D; grad_x = (h * (1 + c / D)) U
//
// Each product with a triangle runs in blocks of kBlock rows or columns of the packed array: the
// off-diagonal part of a block is one GEMM on a view of the packed array (addmm_ into a view of the
// result), the kBlock x kBlock diagonal block is masked into a small copy. So a product costs about half
// of a full (n, d, k) GEMM's flops and nothing of size (d, k) is allocated. ATen's GEMMs make the code
// device-generic: on CUDA the same views go to cuBLAS.
// fp16 runs in fp32 (u = x U^T may leave fp16's range): each block of the packed array is converted as
// it is used, so the temporaries stay (kBlock, k) or (d, kBlock).
#include "ldu_common.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>
#include <tuple>

namespace loldu {
namespace {

// Rows or columns of the packed array per block. Measured on a 2-core AMD EPYC at 768 x 768 and
// 768 x 3072 (fp32, n = 2048, 1 and 2 threads): 128 was the fastest of 64, 128, 192 and 256 by a few
// percent over 256 and ~10% over 64 (smaller blocks run narrower GEMMs, larger ones waste more of the
// diagonal block's flops on its zero half).
constexpr int64_t kBlock = 128;

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

// The packed array's block [r0, r0 + nr) x [c0, c0 + nc) in the compute dtype (a view unless converted).
at::Tensor block(const at::Tensor& LU, int64_t r0, int64_t nr, int64_t c0, int64_t nc, at::ScalarType cd) {
  return LU.narrow(0, r0, nr).narrow(1, c0, nc).to(cd);
}

// out (n, m) = X (n, k) U^T: column block [i0, i1) of out = X[:, i0:i1] triu(A_ii)^T + X[:, i1:] A[i0:i1, i1:]^T.
at::Tensor mul_upper_t(const at::Tensor& X, const at::Tensor& LU, at::ScalarType cd) {
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  at::Tensor out = at::empty({X.size(0), m}, X.options());
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t w = std::min(kBlock, m - i0), i1 = i0 + w;
    at::Tensor o = out.narrow(1, i0, w);
    at::mm_out(o, X.narrow(1, i0, w), block(LU, i0, w, i0, w, cd).triu().t());
    if (i1 < k) o.addmm_(X.narrow(1, i1, k - i1), block(LU, i0, w, i1, k - i1, cd).t());
  }
  return out;
}

// out (n, d) = S (n, m) L^T: column block [i0, i1) of out = S[:, :i0] A[i0:i1, :i0]^T + S[:, i0:i1] unit_tril(A_ii)^T;
// the rows of L from m on (d > k) are one GEMM.
at::Tensor mul_lower_t(const at::Tensor& S, const at::Tensor& LU, at::ScalarType cd) {
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  at::Tensor out = at::empty({S.size(0), d}, S.options());
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t w = std::min(kBlock, m - i0);
    at::Tensor o = out.narrow(1, i0, w);
    at::Tensor tri = block(LU, i0, w, i0, w, cd).tril(-1);
    tri.diagonal().fill_(1);
    at::mm_out(o, S.narrow(1, i0, w), tri.t());
    if (i0 > 0) o.addmm_(S.narrow(1, 0, i0), block(LU, i0, w, 0, i0, cd).t());
  }
  if (d > m) {
    at::Tensor o = out.narrow(1, m, d - m);
    at::mm_out(o, S, block(LU, m, d - m, 0, m, cd).t());
  }
  return out;
}

// out (n, m) = G (n, d) L: column block [j0, j1) of out = G[:, j0:j1] unit_tril(A_jj) + G[:, j1:] A[j1:, j0:j1].
at::Tensor mul_lower(const at::Tensor& G, const at::Tensor& LU, at::ScalarType cd) {
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  at::Tensor out = at::empty({G.size(0), m}, G.options());
  for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
    const int64_t w = std::min(kBlock, m - j0), j1 = j0 + w;
    at::Tensor o = out.narrow(1, j0, w);
    at::Tensor tri = block(LU, j0, w, j0, w, cd).tril(-1);
    tri.diagonal().fill_(1);
    at::mm_out(o, G.narrow(1, j0, w), tri);
    if (j1 < d) o.addmm_(G.narrow(1, j1, d - j1), block(LU, j1, d - j1, j0, w, cd));
  }
  return out;
}

// out (n, k) = H (n, m) U: column block [j0, j1) of out = H[:, :j0] A[:j0, j0:j1] + H[:, j0:j1] triu(A_jj);
// the columns of U from m on (k > d) are one GEMM.
at::Tensor mul_upper(const at::Tensor& H, const at::Tensor& LU, at::ScalarType cd) {
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  at::Tensor out = at::empty({H.size(0), k}, H.options());
  for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
    const int64_t w = std::min(kBlock, m - j0);
    at::Tensor o = out.narrow(1, j0, w);
    at::mm_out(o, H.narrow(1, j0, w), block(LU, j0, w, j0, w, cd).triu());
    if (j0 > 0) o.addmm_(H.narrow(1, 0, j0), block(LU, 0, j0, j0, w, cd));
  }
  if (k > m) {
    at::Tensor o = out.narrow(1, m, k - m);
    at::mm_out(o, H, block(LU, 0, m, m, k - m, cd));
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
  at::Tensor y = yP.index_select(1, inv);
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
  at::Tensor h = mul_lower(grad_y.reshape({-1, d}).to(cd).index_select(1, perm), LU, cd);
  if (need_grad_c) grad_c = column_dot(u, h).to(c.scalar_type()).div_(D);
  if (need_grad_x) {
    auto shape = grad_y.sizes().vec();
    shape.back() = k;
    grad_x = mul_upper(h.mul_((c / D + 1).to(cd)), LU, cd).to(grad_y.scalar_type()).view(shape);
  }
  return {grad_x, grad_c};
}

}  // namespace loldu
