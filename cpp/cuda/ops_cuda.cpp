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

#include <vector>

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

}  // namespace loldu
