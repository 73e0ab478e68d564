// CUDA kernels of loldu (docs/method.md §2-§4); torch-free: CUDA runtime headers only.
//
// The panel LU runs one thread block per matrix over a column-major (r, d) copy of W[:, :r]:
// per step a block-wide argmax picks the pivot, the two rows swap across the r columns, and the
// multipliers and the rank-1 update of the remaining panel are written in coalesced passes.
// The pivot rows are then solved column-parallel: one thread per column of W, r^2/2 FMAs each.
#include "kernels.h"

#include <algorithm>
#include <cfloat>

namespace loldu {
namespace cuda {
namespace {

constexpr int kPanelThreads = 512;
constexpr int kWarps = kPanelThreads / 32;

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T v) { return static_cast<A>(v); }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename A>
__device__ __forceinline__ A eps();
template <>
__device__ __forceinline__ float eps<float>() { return FLT_EPSILON; }
template <>
__device__ __forceinline__ double eps<double>() { return DBL_EPSILON; }

__device__ void set_status(LduStatus* s, int code, int step, int64_t row, int64_t col, double value, double tol) {
  if (atomicCAS(&s->code, 0, code) == 0) {
    s->step = step;
    s->row = row;
    s->col = col;
    s->value = value;
    s->tol = tol;
  }
}

// Block-wide argmax of (value, index), ties to the smaller index (as LAPACK's i?amax).
template <typename A>
__device__ void block_argmax(A& v, int64_t& idx, A* s_val, int64_t* s_idx) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    A ov = __shfl_down_sync(0xffffffffu, v, off);
    int64_t oi = __shfl_down_sync(0xffffffffu, idx, off);
    if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
  }
  if (lane == 0) { s_val[warp] = v; s_idx[warp] = idx; }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? s_val[lane] : A(-1);
    idx = lane < kWarps ? s_idx[lane] : INT64_MAX;
    for (int off = 16; off > 0; off >>= 1) {
      A ov = __shfl_down_sync(0xffffffffu, v, off);
      int64_t oi = __shfl_down_sync(0xffffffffu, idx, off);
      if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
    if (lane == 0) { s_val[0] = v; s_idx[0] = idx; }
  }
  __syncthreads();
  v = s_val[0];
  idx = s_idx[0];
  __syncthreads();
}

template <typename T, typename A>
__global__ void __launch_bounds__(kPanelThreads) panel_kernel(Mat3<T> W, int64_t r, int mode, const int64_t* forced,
                                                              A* panel, int64_t* perm, int64_t* pos, LduStatus* status) {
  __shared__ A s_val[kWarps];
  __shared__ int64_t s_idx[kWarps];
  const int64_t b = blockIdx.x, d = W.d;
  const T* w = W.data + b * W.sb;
  A* P = panel + b * r * d;
  perm += b * d;
  pos += b * d;
  status += b;
  if (forced) forced += b * r;

  // Gather W[:, :r] column-major, find its largest magnitude and the first non-finite entry.
  A amax = 0;
  int64_t bad = INT64_MAX;
  for (int64_t e = threadIdx.x; e < d * r; e += blockDim.x) {
    const int64_t i = e % d, j = e / d;
    A v = to_acc<A>(w[i * W.sd + j * W.sk]);
    if (!isfinite(v)) bad = min(bad, i * r + j);
    else amax = max(amax, fabs(v));
    P[e] = v;
  }
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) { perm[i] = i; pos[i] = i; }
  {
    int64_t first_bad = bad;
    int64_t ignored = 0;
    block_argmax(amax, ignored, s_val, s_idx);
    A zero = 0;
    block_argmax(zero, first_bad, s_val, s_idx);  // all values tie: the smallest index wins
    if (first_bad != INT64_MAX) {
      if (threadIdx.x == 0) set_status(status, 2, 0, first_bad / r, first_bad % r, 0.0, 0.0);
      return;
    }
  }
  const A tol = static_cast<A>(d) * eps<A>() * amax;

  for (int64_t j = 0; j < r; ++j) {
    int64_t p = j;
    if (mode == kPartial) {
      A v = -1;
      int64_t idx = INT64_MAX;
      for (int64_t i = j + threadIdx.x; i < d; i += blockDim.x) {
        A a = fabs(P[j * d + i]);
        if (a > v || (a == v && i < idx)) { v = a; idx = i; }
      }
      block_argmax(v, idx, s_val, s_idx);
      p = idx;
    } else if (mode == kGiven) {
      p = pos[forced[j]];
      __syncthreads();  // every thread has read pos before thread 0 updates it below
    }
    if (p != j) {
      for (int64_t c = threadIdx.x; c < r; c += blockDim.x) {
        A t = P[c * d + j];
        P[c * d + j] = P[c * d + p];
        P[c * d + p] = t;
      }
      if (threadIdx.x == 0) {
        int64_t a = perm[j], bb = perm[p];
        perm[j] = bb; perm[p] = a;
        pos[bb] = j; pos[a] = p;
      }
    }
    __syncthreads();
    const A piv = P[j * d + j];
    if (!(fabs(piv) > tol)) {
      if (threadIdx.x == 0) set_status(status, 1, static_cast<int>(j), 0, 0, static_cast<double>(piv), static_cast<double>(tol));
      return;
    }
    const A inv = A(1) / piv;
    for (int64_t i = j + 1 + threadIdx.x; i < d; i += blockDim.x) P[j * d + i] *= inv;
    __syncthreads();
    const int64_t rows = d - j - 1, cols = r - j - 1;
    for (int64_t e = threadIdx.x; e < rows * cols; e += blockDim.x) {
      const int64_t i = j + 1 + e % rows, c = j + 1 + e / rows;
      P[c * d + i] -= P[j * d + i] * P[c * d + j];
    }
    __syncthreads();
  }
}

template <typename T, typename A>
__global__ void pl_kernel(int64_t B, int64_t d, int64_t r, const A* panel, const int64_t* perm, A* PL, A* D,
                          int64_t* pivots, const LduStatus* status) {
  const int64_t total = B * d * r;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = e / (d * r), rem = e % (d * r), j = rem / d, i = rem % d;
    if (status[b].code != 0) continue;
    const A* P = panel + b * r * d;
    const A v = j < i ? P[j * d + i] : (j == i ? A(1) : A(0));
    PL[b * d * r + perm[b * d + i] * r + j] = v;
    if (i == j) {
      D[b * r + j] = P[j * d + j];
      pivots[b * r + j] = perm[b * d + j];
    }
  }
}

// One thread per column c of U: the U11 block from the panel, the rest by forward substitution
// against L11 on the pivot rows of W, then the division by D.
template <typename T, typename A>
__global__ void rows_kernel(Mat3<T> W, int64_t r, const A* panel, const int64_t* perm, A* U, LduStatus* status) {
  const int64_t b = blockIdx.y, d = W.d, k = W.k;
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= k || status[b].code != 0) return;
  const A* P = panel + b * r * d;
  const int64_t* pm = perm + b * d;
  A* Ub = U + b * r * k;
  const T* w = W.data + b * W.sb;
  if (c < r) {
    for (int64_t i = 0; i < r; ++i)
      Ub[i * k + c] = c < i ? A(0) : (c == i ? A(1) : P[c * d + i] / P[i * d + i]);
    return;
  }
  for (int64_t i = 0; i < r; ++i) {
    A v = to_acc<A>(w[pm[i] * W.sd + c * W.sk]);
    if (!isfinite(v)) {
      set_status(status + b, 3, 0, pm[i], c, 0.0, 0.0);
      return;
    }
    for (int64_t p = 0; p < i; ++p) v -= P[p * d + i] * Ub[p * k + c];
    Ub[i * k + c] = v;
  }
  for (int64_t i = 0; i < r; ++i) Ub[i * k + c] /= P[i * d + i];
}

template <typename T, typename A>
__global__ void column_dot_kernel(const T* t, const T* h, int64_t n, int64_t r, A* out) {
  __shared__ A s[8][33];
  const int64_t j = blockIdx.x * 32 + threadIdx.x;
  A acc = 0;
  if (j < r)
    for (int64_t i = blockIdx.y * 8 + threadIdx.y; i < n; i += (int64_t)gridDim.y * 8)
      acc += to_acc<A>(t[i * r + j]) * to_acc<A>(h[i * r + j]);
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < r) {
    for (int y = 1; y < 8; ++y) acc += s[y][threadIdx.x];
    atomicAdd(out + j, acc);
  }
}

}  // namespace

template <typename T, typename A>
cudaError_t ldu_panel(Mat3<T> W, int64_t r, int mode, const int64_t* forced, A* panel, int64_t* perm,
                      int64_t* pos, LduStatus* status, cudaStream_t stream) {
  panel_kernel<T, A><<<static_cast<unsigned>(W.B), kPanelThreads, 0, stream>>>(W, r, mode, forced, panel, perm, pos, status);
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t ldu_outputs(Mat3<T> W, int64_t r, const A* panel, const int64_t* perm, A* PL, A* D, A* U,
                        int64_t* pivots, LduStatus* status, cudaStream_t stream) {
  const int64_t total = W.B * W.d * r;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
  pl_kernel<T, A><<<blocks, 256, 0, stream>>>(W.B, W.d, r, panel, perm, PL, D, pivots, status);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dim3 grid(static_cast<unsigned>((W.k + 127) / 128), static_cast<unsigned>(W.B));
  rows_kernel<T, A><<<grid, 128, 0, stream>>>(W, r, panel, perm, U, status);
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t column_dot(const T* t, const T* h, int64_t n, int64_t r, A* out, cudaStream_t stream) {
  dim3 block(32, 8);
  dim3 grid(static_cast<unsigned>((r + 31) / 32), static_cast<unsigned>(std::min<int64_t>((n + 63) / 64, 1024)));
  if (n == 0 || r == 0) return cudaSuccess;
  column_dot_kernel<T, A><<<grid, block, 0, stream>>>(t, h, n, r, out);
  return cudaGetLastError();
}

#define LOLDU_INSTANTIATE(T, A)                                                                           \
  template cudaError_t ldu_panel<T, A>(Mat3<T>, int64_t, int, const int64_t*, A*, int64_t*, int64_t*,    \
                                       LduStatus*, cudaStream_t);                                        \
  template cudaError_t ldu_outputs<T, A>(Mat3<T>, int64_t, const A*, const int64_t*, A*, A*, A*,         \
                                         int64_t*, LduStatus*, cudaStream_t);                            \
  template cudaError_t column_dot<T, A>(const T*, const T*, int64_t, int64_t, A*, cudaStream_t);

LOLDU_INSTANTIATE(double, double)
LOLDU_INSTANTIATE(float, float)
LOLDU_INSTANTIATE(__half, float)
LOLDU_INSTANTIATE(__nv_bfloat16, float)

}  // namespace cuda
}  // namespace loldu
