// Fused soft-capped cross-entropy for sm_90 over logits z [N, V] (bf16 or fp32, row-major) and targets y [N]:
// t = cap·tanh(z/cap) in fp32, loss_n = log Σ_j exp(t_nj) − t_ny and, when asked, in place of z the gradient of
// scale·Σ_n loss_n: (softmax(t) − onehot(y))·(1 − (t/cap)²)·scale, rounded to z's dtype. One block a row: a first read
// sums exp(t − cap) (t ≤ cap, so no running max is needed and no term overflows), a block reduction gives the row's
// log-sum-exp, a second read (mostly from L2: the row was just read) writes the gradient. The step is bound by the
// special-function unit (two exponentials and a reciprocal an element a read), so tanh and exp take its fast forms:
// tanh(x) = 1 − 2/(e^2x + 1) with __expf and __fdividef (absolute error ~1e-7, so t's is ~1e-6) and __expf for
// exp(t − ·) (relative error ~2e-6 over t's range), against accurate tanhf/expf at twice the instructions. The ATen
// path this replaces makes several fp32 [N, V] tensors; this one touches z alone. A target outside [0, V) gives its row
// a NaN loss and gradient (a host-side check would read y back and sync the stream at every call). Plain C ABI:
// kernels/ext.cpp owns the tensors, the checks and the stream.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>
#include "launchers.h"

namespace {
using bf16 = __nv_bfloat16;

constexpr int NT = 1024;  // threads a block (a row); big blocks keep fewer rows in flight, so the second read finds L2
constexpr int WARPS = NT / 32;
constexpr unsigned FULL = 0xffffffffu;
static_assert(WARPS <= 32, "one warp reduces the warps' partials");

template <typename T> constexpr int VEC = 16 / sizeof(T);  // elements in 16 bytes

__device__ inline float tanh_fast(float x) { return 1.f - __fdividef(2.f, __expf(2.f * x) + 1.f); }  // ±1 beyond expf's range

__device__ inline float to_f(float x) { return x; }
__device__ inline float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_f(float x);
template <> __device__ inline float from_f<float>(float x) { return x; }
template <> __device__ inline bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }  // round to nearest even, as torch

template <int K> using Count = std::integral_constant<int, K>;

// Calls f(j, x, Count<k>) over this thread's share of a row of n elements: x holds k = 1 or VEC consecutive elements
// from index j as fp32. Scalars up to the first 16-byte boundary (rows of odd V start anywhere), 16-byte vectors, then
// scalars. With WRITE, x goes back to the row.
template <bool WRITE, typename T, typename F> __device__ void visit_row(T* row, int n, F f) {
  constexpr int K = VEC<T>;
  const int head = min(n, static_cast<int>((16 - reinterpret_cast<std::uintptr_t>(row) % 16) % 16 / sizeof(T)));
  const int body = (n - head) / K;
  auto scalar = [&](int j) {
    float x = to_f(row[j]);
    f(j, &x, Count<1>{});
    if constexpr (WRITE) row[j] = from_f<T>(x);
  };
  for (int j = threadIdx.x; j < head; j += NT) scalar(j);
  uint4* vrow = reinterpret_cast<uint4*>(row + head);
  for (int i = threadIdx.x; i < body; i += NT) {
    alignas(16) T e[K];
    *reinterpret_cast<uint4*>(e) = vrow[i];
    float x[K];
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = to_f(e[k]);
    f(head + i * K, x, Count<K>{});
    if constexpr (WRITE) {
#pragma unroll
      for (int k = 0; k < K; ++k) e[k] = from_f<T>(x[k]);
      vrow[i] = *reinterpret_cast<const uint4*>(e);
    }
  }
  for (int j = head + body * K + threadIdx.x; j < n; j += NT) scalar(j);
}

// The row's Σ from every thread's part: shuffles within warps, then every warp adds the warps' partials itself, so
// that all threads have the result after one barrier.
__device__ float block_sum(float s) {
  __shared__ float ws[WARPS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(FULL, s, o);
  if (lane == 0) ws[warp] = s;
  __syncthreads();
  s = lane < WARPS ? ws[lane] : 0.f;
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(FULL, s, o);
  return s;
}

// One block a row. Grid (N).
template <typename T>
__global__ void __launch_bounds__(NT) softcap_ce(T* __restrict__ z, const int64_t* __restrict__ y, float* __restrict__ loss,
                                                 int v, float cap, float scale, int grad) {
  const int64_t n = blockIdx.x, target = y[n];
  const bool ok = 0 <= target && target < v;
  T* row = z + n * v;
  const float inv = 1.f / cap;  // the plain path divides by cap; the product with the reciprocal is within an ulp
  // t_y before the gradient pass overwrites z; thread 0 alone writes the loss
  const float ty = threadIdx.x == 0 && ok ? cap * tanh_fast(to_f(row[target]) * inv) : 0.f;
  float s = 0.f;
  visit_row<false>(row, v, [&](int, float* x, auto count) {
    constexpr int K = decltype(count)::value;
#pragma unroll
    for (int k = 0; k < K; ++k) s += __expf(cap * tanh_fast(x[k] * inv) - cap);
  });
  float lse = cap + logf(block_sum(s));  // every thread: a barrier inside
  if (!ok) lse = NAN;
  if (threadIdx.x == 0) loss[n] = lse - ty;
  if (!grad) return;
  visit_row<true>(row, v, [&](int j, float* x, auto count) {
    constexpr int K = decltype(count)::value;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float u = tanh_fast(x[k] * inv), p = __expf(cap * u - lse);
      x[k] = (j + k == target ? p - 1.f : p) * (1.f - u * u) * scale;  // the plain path's order: (p − onehot)·(1 − u²)
    }
  });
}
}  // namespace

// Per-row losses loss [n] (fp32) of logits z [n, v] (bf16 with is_bf16, else fp32; contiguous on the current device)
// against targets y [n] (int64), softcap cap; with grad, z becomes d(scale·Σ loss)/dz. 1 ≤ n, v < 2³¹. Returns a
// cudaError_t.
extern "C" int tg_softcap_ce_launch(void* z, const int64_t* y, float* loss, int n, int v, float cap, float scale, int grad, int is_bf16,
                                    cudaStream_t stream) {
  if (is_bf16)
    softcap_ce<bf16><<<n, NT, 0, stream>>>(static_cast<bf16*>(z), y, loss, v, cap, scale, grad);
  else
    softcap_ce<float><<<n, NT, 0, stream>>>(static_cast<float*>(z), y, loss, v, cap, scale, grad);
  return cudaGetLastError();
}
