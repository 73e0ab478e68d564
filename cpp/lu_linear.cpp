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
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <sstream>
#include <tuple>
#include <utility>
#include <vector>

namespace loldu {
namespace {

// The largest diagonal block the recursion stops at (masked into a dense copy). Measured as the CPU
// time of one step (forward + input gradient, n = 2048, 1 thread, 2-core AMD EPYC shared with other
// jobs) at 768 x 768 over the base layer's step: 64 gave 1.42-1.57x, 128 1.55-1.65x, 256 1.68x, 32 and
// 96 1.72-1.80x (smaller leaves run more, narrower GEMMs; larger ones waste more of their zero half).
// Those runs multiplied the leaves with ATen's GEMM; the AVX-512 leaf kernel below is written for 64.
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

// out[:, j] = Y[:, idx[j]] (+ bias[j]) for (n, d) Y. On the CPU a plain row-by-row gather (ATen's
// index_select along the inner dim was ~3x slower than a GEMM-sized pass: ~4 ms for (2048, 768) fp32 on
// one core), with the bias added in the same pass; in_place (Y contiguous and ours to overwrite) permutes
// each row through a copy of it instead of allocating a second (n, d) array, whose fresh pages the
// system would fault in again on every call.
at::Tensor permute_columns(const at::Tensor& Y, const at::Tensor& idx, const std::optional<at::Tensor>& bias = {},
                           bool in_place = false) {
  if (!Y.is_cpu()) {
    at::Tensor out = Y.index_select(1, idx);
    return bias ? out.add_(*bias) : out;
  }
  at::Tensor Yc = Y.contiguous(), ic = idx.contiguous();
  in_place = in_place && Yc.is_same(Y);
  at::Tensor out = in_place ? Yc : at::empty_like(Yc);
  at::Tensor b = bias ? bias->to(Yc.scalar_type()).contiguous() : at::Tensor();
  const int64_t n = Yc.size(0), d = Yc.size(1);
  const int64_t* ip = ic.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Yc.scalar_type(), "loldu_permute_columns", [&] {
    const scalar_t* src = Yc.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, d)), [&](int64_t i0, int64_t i1) {
      std::vector<scalar_t> row(in_place ? d : 0);
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* s = src + i * d;
        if (in_place) {
          std::copy(s, s + d, row.begin());
          s = row.data();
        }
        scalar_t* o = dst + i * d;
        if (bp) {
          for (int64_t j = 0; j < d; ++j) o[j] = s[ip[j]] + bp[j];
        } else {
          for (int64_t j = 0; j < d; ++j) o[j] = s[ip[j]];
        }
      }
    });
  });
  return out;
}

// o += X B^T (transposed) or X B (not), B = the packed array's block [r0, r0 + nr) x [c0, c0 + nc); with
// accumulate false o is overwritten instead. In the compute dtype B is a view and this is one GEMM;
// otherwise (fp16) B is converted kBlock rows at a time.
void addmm_block(at::Tensor o, const at::Tensor& X, const at::Tensor& LU, int64_t r0, int64_t nr, int64_t c0,
                 int64_t nc, bool transposed, at::ScalarType cd, bool accumulate = true) {
  at::Tensor B = LU.narrow(0, r0, nr).narrow(1, c0, nc);
  if (LU.scalar_type() == cd) {
    if (accumulate) o.addmm_(X, transposed ? B.t() : B);
    else at::mm_out(o, X, transposed ? B.t() : B);
    return;
  }
  if (!accumulate && !transposed) o.zero_();
  for (int64_t q = 0; q < nr; q += kBlock) {
    const int64_t w = std::min(kBlock, nr - q);
    at::Tensor Bq = B.narrow(0, q, w).to(cd);
    if (transposed) {
      at::Tensor oq = o.narrow(1, q, w);
      if (accumulate) oq.addmm_(X, Bq.t());
      else at::mm_out(oq, X, Bq.t());
    } else {
      o.addmm_(X.narrow(1, q, w), Bq);
    }
  }
}

// The four products with a triangle of the packed array: o (n, w) = X (n, w) op(T), T its (w, w) diagonal
// block at [p, p + w): T^T of the upper triangle (UpperT, x U^T), T^T of the unit lower one (LowerT, s L^T),
// T (Lower, g L), T (Upper, h U). The values are lu_trmm_cuda's kind codes.
enum class Tri { UpperT = 0, LowerT = 1, Lower = 2, Upper = 3 };

bool is_upper(Tri kind) { return kind == Tri::UpperT || kind == Tri::Upper; }
bool is_transposed(Tri kind) { return kind == Tri::UpperT || kind == Tri::LowerT; }

// A leaf: o (n, w) = X (n, w) B for a dense row-major (w, kBlock) B (columns from w on zero), w <= kBlock.
// ATen's GEMM on such a narrow, short product ran at about half its speed on wide ones (MKL, 2-core AMD
// EPYC, n = 2048: the 64-wide leaves took a quarter of a step), so on AVX-512 fp32 the CPU runs its own
// kernel: R rows of o in R x 4 vector accumulators while B (16 KiB) streams from L1. A compiler-vectorized
// loop of the same shape spilled its accumulators and ran slower than the GEMM.
#if defined(__GNUC__) && defined(__x86_64__)
#define LOLDU_LEAF_KERNEL 1
static_assert(kBlock == 64, "the leaf kernel holds a row of 64 floats in four AVX-512 registers");

// Rows p in [p0, p1) of B, whose nonzeros lie in the 16-wide column chunks [Q0, Q1): R rows of o gain
// x[:, p] B[p, Q0 * 16 : Q1 * 16].
template <int R, int Q0, int Q1>
__attribute__((target("avx512f"), always_inline)) inline void leaf_steps(__m512 (&acc)[R][4], const float* x,
                                                                        int64_t ldx, const float* B, int64_t p0,
                                                                        int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    __m512 b[4];
#pragma GCC unroll 4
    for (int q = Q0; q < Q1; ++q) b[q] = _mm512_loadu_ps(B + p * kBlock + 16 * q);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + p]);
#pragma GCC unroll 4
      for (int q = Q0; q < Q1; ++q) acc[r][q] = _mm512_fmadd_ps(xv, b[q], acc[r][q]);
    }
  }
}

// R rows of o = X B, B triangular: `lower` (B[p, j] = 0 for j > p) or upper (0 for j < p). The rows p of
// B in the s-th 16-row band have nonzeros in chunks [0, s] (lower) or [s, 4) (upper) only, so the zero
// half of the leaf is skipped 16 x 16 at a time (5/8 of the full product's FMAs remain).
template <int R>
__attribute__((target("avx512f"), always_inline)) inline void leaf_rows_avx512(float* o, int64_t ldo, const float* x,
                                                                              int64_t ldx, const float* B, int64_t w,
                                                                              bool lower) {
  __m512 acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  auto band = [&](int64_t s) { return std::make_pair(std::min(w, 16 * s), std::min(w, 16 * s + 16)); };
  const auto [a0, a1] = band(0);
  const auto [b0, b1] = band(1);
  const auto [c0, c1] = band(2);
  const auto [d0, d1] = band(3);
  if (lower) {
    leaf_steps<R, 0, 1>(acc, x, ldx, B, a0, a1);
    leaf_steps<R, 0, 2>(acc, x, ldx, B, b0, b1);
    leaf_steps<R, 0, 3>(acc, x, ldx, B, c0, c1);
    leaf_steps<R, 0, 4>(acc, x, ldx, B, d0, d1);
  } else {
    leaf_steps<R, 0, 4>(acc, x, ldx, B, a0, a1);
    leaf_steps<R, 1, 4>(acc, x, ldx, B, b0, b1);
    leaf_steps<R, 2, 4>(acc, x, ldx, B, c0, c1);
    leaf_steps<R, 3, 4>(acc, x, ldx, B, d0, d1);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) {
      const int64_t lanes = std::min<int64_t>(16, std::max<int64_t>(0, w - 16 * q));
      _mm512_mask_storeu_ps(o + r * ldo + 16 * q, static_cast<__mmask16>((1u << lanes) - 1u), acc[r][q]);
    }
  }
}

__attribute__((target("avx512f"))) void leaf_rows(float* o, int64_t ldo, const float* x, int64_t ldx, const float* B,
                                                  int64_t w, bool lower, int64_t rows) {
  int64_t i = 0;
  for (; i + 6 <= rows; i += 6) leaf_rows_avx512<6>(o + i * ldo, ldo, x + i * ldx, ldx, B, w, lower);
  for (; i < rows; ++i) leaf_rows_avx512<1>(o + i * ldo, ldo, x + i * ldx, ldx, B, w, lower);
}

bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}
#else
bool have_avx512() { return false; }
#endif

// o = X op(T) for a leaf (w <= kBlock): op(T) masked into a small dense copy, then the CPU loop above
// (fp32/fp64) or one GEMM (bf16, CUDA without cuBLAS).
void tri_leaf(at::Tensor o, const at::Tensor& X, const at::Tensor& LU, int64_t p, int64_t w, Tri kind,
              at::ScalarType cd) {
  at::Tensor T = LU.narrow(0, p, w).narrow(1, p, w).to(cd);
  if (is_upper(kind)) {
    T = T.triu();
  } else {
    T = T.tril(-1);
    T.diagonal().fill_(1);
  }
  const at::Tensor B = is_transposed(kind) ? T.t() : T;
  const bool own_loop = o.is_cpu() && cd == at::kFloat && have_avx512() && o.stride(1) == 1 &&
                        X.stride(1) == 1;
  if (!own_loop) {
    at::mm_out(o, X, B);
    return;
  }
  at::Tensor Bp = at::zeros({w, kBlock}, B.options());
  Bp.narrow(1, 0, w).copy_(B);
  const int64_t n = X.size(0), ldo = o.stride(0), ldx = X.stride(0);
  // B = op(T) is lower (zero right of its diagonal) for U^T and for L, upper for L^T and for U.
  const bool lower_b = kind == Tri::UpperT || kind == Tri::Lower;
#ifdef LOLDU_LEAF_KERNEL
  float* op = o.data_ptr<float>();
  const float* xp = X.const_data_ptr<float>();
  const float* bp = Bp.const_data_ptr<float>();
  at::parallel_for(0, n, 240, [&](int64_t i0, int64_t i1) {
    leaf_rows(op + i0 * ldo, ldo, xp + i0 * ldx, ldx, bp, w, lower_b, i1 - i0);
  });
#endif
}

// Recursive halving: o's halves are the halves' own triangles (recursion) plus one GEMM with the
// off-diagonal block, so the GEMMs are as large as the triangle allows (w/2, w/4, ... wide) and only
// the kBlock-wide leaves are masked copies, whose zero half costs the only wasted flops. On CUDA one
// cuBLAS trmm takes the whole triangle where it can.
void tri_mm(at::Tensor o, const at::Tensor& X, const at::Tensor& LU, int64_t p, int64_t w, Tri kind,
            at::ScalarType cd) {
  if (LU.is_cuda() && lu_trmm_cuda(o, X, LU.narrow(0, p, w).narrow(1, p, w), static_cast<int>(kind))) return;
  if (w <= kBlock) {
    tri_leaf(o, X, LU, p, w, kind, cd);
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

// X op(T) for the whole trapezoid of the packed (d, k) array, m = min(d, k): UpperT u = x U^T (n, m) from
// x (n, k); LowerT s L^T (n, d) from s (n, m); Lower g L (n, m) from g (n, d); Upper h U (n, k) from
// h (n, m). The (m, m) triangle by tri_mm, the rest of the trapezoid (U's columns from m on when k > d,
// L's rows from m on when d > k) by one GEMM: accumulated into the result where X is the wider side
// (UpperT, Lower), written beside the triangle's columns where the result is (LowerT, Upper).
at::Tensor tri_product(const at::Tensor& X, const at::Tensor& LU, Tri kind, at::ScalarType cd) {
  const int64_t d = LU.size(0), k = LU.size(1), m = std::min(d, k);
  const bool upper = is_upper(kind), wide_input = kind == Tri::UpperT || kind == Tri::Lower;
  const int64_t rest = upper ? k - m : d - m;
  const int64_t r0 = upper ? 0 : m, nr = upper ? m : rest, c0 = upper ? m : 0, nc = upper ? rest : m;
  at::Tensor out = at::empty({X.size(0), wide_input ? m : m + rest}, X.options());
  tri_mm(out.narrow(1, 0, m), X.narrow(1, 0, m), LU, 0, m, kind, cd);
  if (rest > 0) {
    if (wide_input) addmm_block(out, X.narrow(1, m, rest), LU, r0, nr, c0, nc, is_transposed(kind), cd);
    else addmm_block(out.narrow(1, m, rest), X, LU, r0, nr, c0, nc, is_transposed(kind), cd, false);
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
  at::Tensor u = tri_product(x2, LU, Tri::UpperT, cd);
  at::Tensor yP = tri_product(u * (c / D + 1).to(cd), LU, Tri::LowerT, cd);
  // y[:, perm[i]] = yP[:, i], i.e. y = yP[:, perm^-1].
  at::Tensor inv = at::empty_like(perm).scatter_(0, perm, at::arange(d, perm.options()));
  at::Tensor y = permute_columns(yP, inv, bias, /*in_place=*/true);
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
  at::Tensor h = tri_product(permute_columns(grad_y.reshape({-1, d}).to(cd), perm), LU, Tri::Lower, cd);
  if (need_grad_c) grad_c = column_dot(u, h).to(c.scalar_type()).div_(D);
  if (need_grad_x) {
    auto shape = grad_y.sizes().vec();
    shape.back() = k;
    grad_x = tri_product(h.mul_((c / D + 1).to(cd)), LU, Tri::Upper, cd).to(grad_y.scalar_type()).view(shape);
  }
  return {grad_x, grad_c};
}

}  // namespace loldu
