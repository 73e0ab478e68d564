// Torch glue of the CUDA kernels (compiled only in CUDA builds): allocates workspaces and outputs,
// launches the torch-free kernels of kernels.cu on the current stream, turns their status into
// the same loldu errors the CPU path raises.
#include "../cuda_glue.h"
#include "../ldu_common.h"
#include "kernels.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <vector>

// cuBLAS comes with the CUDA toolkit, or with the nvidia-cublas wheel that a pip-installed torch pulls
// in (whose headers are not on torch's extension include path). Without its headers the triangular
// products of lu_linear run on ATen's GEMMs (lu_trmm_cuda declines, see lu_linear.cpp).
#if __has_include(<cublas_v2.h>)
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <cublas_v2.h>
#define LOLDU_HAVE_CUBLAS 1
#endif

// Template arguments carry commas, so the call is parenthesised before it reaches the macro.
#define LOLDU_CUDA_CALL(...) C10_CUDA_CHECK((__VA_ARGS__))

namespace loldu {
namespace {

template <typename T>
cuda::Mat3<T> mat3(const at::Tensor& W, const T* data) {
  return {data, W.size(0), W.size(1), W.size(2), W.stride(0), W.stride(1), W.stride(2)};
}

template <typename T, typename A>
void run_ldu(const at::Tensor& W3, const T* data, int64_t r, int mode, const at::Tensor& forced, LduResult& out,
             at::Tensor& status) {
  const int64_t B = W3.size(0), d = W3.size(1);
  auto opts = W3.options();
  at::Tensor panel = at::empty({B, r, d}, opts.dtype(c10::CppTypeToScalarType<A>::value));
  at::Tensor perm = at::empty({B, d}, opts.dtype(at::kLong));
  at::Tensor pos = at::empty({B, d}, opts.dtype(at::kLong));
  auto* st = reinterpret_cast<cuda::LduStatus*>(status.data_ptr<uint8_t>());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto W = mat3<T>(W3, data);
  LOLDU_CUDA_CALL(cuda::ldu_panel<T, A>(W, r, mode, forced.defined() ? forced.const_data_ptr<int64_t>() : nullptr,
                                       panel.data_ptr<A>(), perm.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), st,
                                       stream));
  LOLDU_CUDA_CALL(cuda::ldu_outputs<T, A>(W, r, panel.const_data_ptr<A>(), perm.const_data_ptr<int64_t>(),
                                         out.PL.data_ptr<A>(), out.D.data_ptr<A>(), out.U.data_ptr<A>(),
                                         out.pivots.data_ptr<int64_t>(), st, stream));
}

}  // namespace

LduResult ldu_cuda(const at::Tensor& W3, int64_t r, PivotMode mode, const at::Tensor& forced3,
                   const std::string& shape) {
  c10::cuda::CUDAGuard guard(W3.device());
  const int64_t B = W3.size(0), d = W3.size(1), k = W3.size(2);
  const auto acc = working_dtype(W3.scalar_type());
  auto opts = W3.options().dtype(acc);
  LduResult out{at::zeros({B, d, r}, opts), at::empty({B, r}, opts), at::empty({B, r, k}, opts),
                at::empty({B, r}, opts.dtype(at::kLong))};
  at::Tensor status = at::zeros({B * static_cast<int64_t>(sizeof(cuda::LduStatus))}, W3.options().dtype(at::kByte));
  at::Tensor forced = forced3.defined() ? forced3.to(W3.device()) : at::Tensor();
  const int m = mode == PivotMode::Partial ? cuda::kPartial : (mode == PivotMode::None ? cuda::kNone : cuda::kGiven);
  switch (W3.scalar_type()) {
    case at::kDouble:
      run_ldu<double, double>(W3, W3.const_data_ptr<double>(), r, m, forced, out, status);
      break;
    case at::kFloat:
      run_ldu<float, float>(W3, W3.const_data_ptr<float>(), r, m, forced, out, status);
      break;
    case at::kHalf:
      run_ldu<__half, float>(W3, reinterpret_cast<const __half*>(W3.const_data_ptr<at::Half>()), r, m, forced, out, status);
      break;
    case at::kBFloat16:
      run_ldu<__nv_bfloat16, float>(W3, reinterpret_cast<const __nv_bfloat16*>(W3.const_data_ptr<at::BFloat16>()), r, m,
                                    forced, out, status);
      break;
    default:
      TORCH_CHECK_VALUE(false, "loldu.ldu: unsupported dtype ", W3.scalar_type(), " for W of shape ", shape);
  }
  // One synchronization: the per-matrix status decides between results and an error.
  at::Tensor host = status.cpu();
  const auto* st = reinterpret_cast<const cuda::LduStatus*>(host.const_data_ptr<uint8_t>());
  for (int64_t b = 0; b < B; ++b) {
    LduContext ctx{shape, r, B > 1 ? b : -1};
    if (st[b].code == 1) ctx.fail_pivot(st[b].step, st[b].value, st[b].tol);
    if (st[b].code == 2) ctx.fail_nonfinite("panel W[:, :r]", st[b].row, st[b].col);
    if (st[b].code == 3) ctx.fail_nonfinite("pivot row", st[b].row, st[b].col);
  }
  return out;
}

void column_dot_cuda(const at::Tensor& t, const at::Tensor& h, at::Tensor& out) {
  c10::cuda::CUDAGuard guard(t.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = t.size(0), r = t.size(1);
  switch (t.scalar_type()) {
    case at::kDouble:
      LOLDU_CUDA_CALL(cuda::column_dot<double, double>(t.const_data_ptr<double>(), h.const_data_ptr<double>(), n, r,
                                                      out.data_ptr<double>(), stream));
      break;
    case at::kFloat:
      LOLDU_CUDA_CALL(cuda::column_dot<float, float>(t.const_data_ptr<float>(), h.const_data_ptr<float>(), n, r,
                                                    out.data_ptr<float>(), stream));
      break;
    case at::kHalf:
      LOLDU_CUDA_CALL(cuda::column_dot<__half, float>(reinterpret_cast<const __half*>(t.const_data_ptr<at::Half>()),
                                                     reinterpret_cast<const __half*>(h.const_data_ptr<at::Half>()), n,
                                                     r, out.data_ptr<float>(), stream));
      break;
    case at::kBFloat16:
      LOLDU_CUDA_CALL(cuda::column_dot<__nv_bfloat16, float>(
          reinterpret_cast<const __nv_bfloat16*>(t.const_data_ptr<at::BFloat16>()),
          reinterpret_cast<const __nv_bfloat16*>(h.const_data_ptr<at::BFloat16>()), n, r, out.data_ptr<float>(),
          stream));
      break;
    default:
      TORCH_CHECK_VALUE(false, "loldu.adapter_linear: unsupported dtype ", t.scalar_type());
  }
}

bool lu_trmm_cuda(const at::Tensor& o, const at::Tensor& X, const at::Tensor& T, int kind) {
#ifndef LOLDU_HAVE_CUBLAS
  (void)o, (void)X, (void)T, (void)kind;
  return false;
#else
  const auto dt = T.scalar_type();
  if ((dt != at::kFloat && dt != at::kDouble) || X.scalar_type() != dt || o.scalar_type() != dt) return false;
  if (o.stride(1) != 1 || X.stride(1) != 1 || T.stride(1) != 1) return false;
  const int64_t n = X.size(0), w = T.size(0);
  for (int64_t v : {n, w, T.stride(0), X.stride(0), o.stride(0)})
    if (v > INT_MAX) return false;  // cuBLAS's 32-bit sizes: ATen's GEMMs take it
  if (n == 0 || w == 0) return true;
  c10::cuda::CUDAGuard guard(o.device());
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  // cuBLAS is column-major: a row-major (rows, cols) view with row stride s is, to cuBLAS, its transpose
  // with leading dimension s. So o = X op(T) is o^T = op(T)^T X^T, a product from the left with
  // A = T^T (T's own storage): lower when T is upper, unit upper when T is the unit lower triangle.
  // kind: 0 o = X T^T (T upper), 1 o = X T^T (T unit lower), 2 o = X T (T unit lower), 3 o = X T (T upper).
  const bool t_upper = kind == 0 || kind == 3;
  const cublasFillMode_t uplo = t_upper ? CUBLAS_FILL_MODE_LOWER : CUBLAS_FILL_MODE_UPPER;
  const cublasOperation_t op = kind == 0 || kind == 1 ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasDiagType_t diag = t_upper ? CUBLAS_DIAG_NON_UNIT : CUBLAS_DIAG_UNIT;
  const int m_ = static_cast<int>(w), n_ = static_cast<int>(n);
  const int lda = static_cast<int>(T.stride(0)), ldb = static_cast<int>(X.stride(0)), ldc = static_cast<int>(o.stride(0));
  if (dt == at::kFloat) {
    const float one = 1.0f;
    TORCH_CUDABLAS_CHECK(cublasStrmm(handle, CUBLAS_SIDE_LEFT, uplo, op, diag, m_, n_, &one, T.const_data_ptr<float>(),
                                     lda, X.const_data_ptr<float>(), ldb, o.data_ptr<float>(), ldc));
  } else {
    const double one = 1.0;
    TORCH_CUDABLAS_CHECK(cublasDtrmm(handle, CUBLAS_SIDE_LEFT, uplo, op, diag, m_, n_, &one,
                                     T.const_data_ptr<double>(), lda, X.const_data_ptr<double>(), ldb,
                                     o.data_ptr<double>(), ldc));
  }
  return true;
#endif
}

}  // namespace loldu
