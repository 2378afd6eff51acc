// The transformer block's memory-bound steps, fused, for sm_90 (forward and backward; fp32 arithmetic, one rounding to
// the output dtype): eager ATen spends several kernels and fp32 round trips on each (ATen's RMSNorm kernels are built
// for wide rows; RoPE alone is eight elementwise kernels and a cat, and their backward as many).
//   rmsnorm:   y = x·r, r = (mean x² + eps)^-½ over rows of C, x fp32 or bf16, y in another dtype (the cast fused in).
//   rope_norm: the qkv projection's output [B,T,(H+2G)·D] → q, k rotated (RoPE, halves) then RMS-normed per head,
//              and v copied, each [B,T,heads,D]: one pass instead of narrow/rope/cat/norm and three zero-filled grads.
//   relu2:     h = max(u, 0)².
// One warp a row (a head of D or a row of C), so any T and any row count. Plain C ABI: kernels/ext.cpp owns tensors,
// checks, autograd and the stream.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdint>

namespace {
using bf16 = __nv_bfloat16;
constexpr int NT = 256;  // threads a block: 8 warps, 8 rows
constexpr int WARPS = NT / 32;
constexpr unsigned FULL = 0xffffffffu;

__device__ inline float to_f(float x) { return x; }
__device__ inline float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_f(float x);
template <> __device__ inline float from_f<float>(float x) { return x; }
template <> __device__ inline bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }  // round to nearest even, as torch

__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
  return x;
}

__device__ inline int64_t warp_row() { return static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32; }

// ---- rmsnorm over rows of c; rstd [n] kept for the backward.
template <typename TI, typename TO> __global__ void __launch_bounds__(NT) rmsnorm_fwd(const TI* x, TO* y, float* rstd, int64_t n, int c, float eps) {
  const int64_t row = warp_row();
  if (row >= n) return;
  const int lane = threadIdx.x % 32;
  const TI* xr = x + row * c;
  float ss = 0.f;
  for (int j = lane; j < c; j += 32) ss += to_f(xr[j]) * to_f(xr[j]);
  const float r = rsqrtf(warp_sum(ss) / c + eps);
  for (int j = lane; j < c; j += 32) y[row * c + j] = from_f<TO>(to_f(xr[j]) * r);
  if (lane == 0) rstd[row] = r;
}

// dx = r·(dy − ŷ·mean(dy·ŷ)), ŷ = x·r
template <typename TI, typename TO> __global__ void __launch_bounds__(NT) rmsnorm_bwd(const TI* x, const TO* dy, const float* rstd, TI* dx, int64_t n, int c) {
  const int64_t row = warp_row();
  if (row >= n) return;
  const int lane = threadIdx.x % 32;
  const float r = rstd[row];
  const TI* xr = x + row * c;
  const TO* gr = dy + row * c;
  float dot = 0.f;
  for (int j = lane; j < c; j += 32) dot += to_f(gr[j]) * to_f(xr[j]) * r;
  dot = warp_sum(dot) / c;
  for (int j = lane; j < c; j += 32) dx[row * c + j] = from_f<TI>(r * (to_f(gr[j]) - to_f(xr[j]) * r * dot));
}

// ---- rope_norm. qkv [B·T rows of (H+2G)·D]; a warp takes one head slot s of one row: s < H is q head s, then G k heads
// (rotated and normed), then G v heads (copied). Position of row i: pos + i mod T. cos, sin [*, D/2] fp32.
template <typename T> struct Heads {
  T *q, *k, *v;  // [rows, H|G|G, D]
  int h, g, d;
  __device__ T* out(int64_t row, int s) const {
    return s < h ? q + (row * h + s) * d : s < h + g ? k + (row * g + s - h) * d : v + (row * g + s - h - g) * d;
  }
};

template <typename T>
__global__ void __launch_bounds__(NT) rope_norm_fwd(const T* qkv, Heads<T> o, const float* cos, const float* sin, float* rstd, int64_t rows, int t, int pos, float eps) {
  const int slots = o.h + 2 * o.g, d = o.d, half = d / 2;
  const int64_t w = warp_row();
  if (w >= rows * slots) return;
  const int64_t row = w / slots;
  const int s = static_cast<int>(w % slots), lane = threadIdx.x % 32;
  const T* x = qkv + row * slots * d + static_cast<int64_t>(s) * d;
  T* y = o.out(row, s);
  if (s >= o.h + o.g) {
    for (int j = lane; j < d; j += 32) y[j] = x[j];
    return;
  }
  const int64_t p = pos + row % t;
  float ss = 0.f;
  for (int j = lane; j < half; j += 32) {  // a lane rotates the pairs (j, j + D/2)
    const float x1 = to_f(x[j]), x2 = to_f(x[j + half]), c = cos[p * half + j], sn = sin[p * half + j];
    const float a = x1 * c + x2 * sn, b = -x1 * sn + x2 * c;
    ss += a * a + b * b;
  }
  const float r = rsqrtf(warp_sum(ss) / d + eps);
  for (int j = lane; j < half; j += 32) {
    const float x1 = to_f(x[j]), x2 = to_f(x[j + half]), c = cos[p * half + j], sn = sin[p * half + j];
    y[j] = from_f<T>((x1 * c + x2 * sn) * r);
    y[j + half] = from_f<T>((-x1 * sn + x2 * c) * r);
  }
  if (lane == 0) rstd[row * (o.h + o.g) + s] = r;
}

// dqkv [rows, (H+2G)·D] from dq, dk, dv (any strides for B, T and heads: SDPA's gradients come as [B,heads,T,D] views)
template <typename T> struct Grads {
  const T *q, *k, *v;
  int64_t sq[3], sk[3], sv[3];  // strides (elements) of b, t, head; D is contiguous
  __device__ const T* in(int64_t row, int s, int h, int g, int t) const {
    const int64_t b = row / t, i = row % t;
    return s < h ? q + b * sq[0] + i * sq[1] + s * sq[2] : s < h + g ? k + b * sk[0] + i * sk[1] + (s - h) * sk[2] : v + b * sv[0] + i * sv[1] + (s - h - g) * sv[2];
  }
};

template <typename T>
__global__ void __launch_bounds__(NT) rope_norm_bwd(const T* qkv, Grads<T> gi, const float* cos, const float* sin, const float* rstd, T* dqkv, int64_t rows,
                                                     int h, int g, int d, int t, int pos) {
  const int slots = h + 2 * g, half = d / 2;
  const int64_t w = warp_row();
  if (w >= rows * slots) return;
  const int64_t row = w / slots;
  const int s = static_cast<int>(w % slots), lane = threadIdx.x % 32;
  const T* gy = gi.in(row, s, h, g, t);
  T* dx = dqkv + row * slots * d + static_cast<int64_t>(s) * d;
  if (s >= h + g) {
    for (int j = lane; j < d; j += 32) dx[j] = gy[j];
    return;
  }
  const T* x = qkv + row * slots * d + static_cast<int64_t>(s) * d;
  const int64_t p = pos + row % t;
  const float r = rstd[row * (h + g) + s];
  float dot = 0.f;  // Σ dy·ŷ, ŷ the normed rotation
  for (int j = lane; j < half; j += 32) {
    const float x1 = to_f(x[j]), x2 = to_f(x[j + half]), c = cos[p * half + j], sn = sin[p * half + j];
    dot += to_f(gy[j]) * (x1 * c + x2 * sn) * r + to_f(gy[j + half]) * (-x1 * sn + x2 * c) * r;
  }
  dot = warp_sum(dot) / d;
  for (int j = lane; j < half; j += 32) {
    const float x1 = to_f(x[j]), x2 = to_f(x[j + half]), c = cos[p * half + j], sn = sin[p * half + j];
    const float da = r * (to_f(gy[j]) - (x1 * c + x2 * sn) * r * dot), db = r * (to_f(gy[j + half]) - (-x1 * sn + x2 * c) * r * dot);
    dx[j] = from_f<T>(da * c - db * sn);  // the rotation's transpose
    dx[j + half] = from_f<T>(da * sn + db * c);
  }
}

// ---- relu2, elementwise over n
template <typename T> __global__ void __launch_bounds__(NT) relu2_fwd(const T* u, T* h, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(NT) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * NT) {
    const float a = fmaxf(to_f(u[i]), 0.f);
    h[i] = from_f<T>(a * a);
  }
}

template <typename T> __global__ void __launch_bounds__(NT) relu2_bwd(const T* u, const T* dh, T* du, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(NT) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * NT) {
    du[i] = from_f<T>(2.f * fmaxf(to_f(u[i]), 0.f) * to_f(dh[i]));
  }
}

unsigned blocks_for_warps(int64_t warps) { return static_cast<unsigned>((warps + WARPS - 1) / WARPS); }
unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + NT - 1) / NT, 132 * 16)); }  // grid-stride beyond 16 blocks an SM
}  // namespace

// Each returns a cudaError_t. Pointers are on the current device; rows, heads and d as the kernels above describe.
// bf16 flags: x/in (first) and y/out (second) dtypes, else fp32.
extern "C" int tg_rmsnorm_fwd(const void* x, void* y, float* rstd, int64_t n, int c, float eps, int x_bf16, int y_bf16, cudaStream_t st) {
  const unsigned nb = blocks_for_warps(n);
  if (!x_bf16 && y_bf16) rmsnorm_fwd<float, bf16><<<nb, NT, 0, st>>>(static_cast<const float*>(x), static_cast<bf16*>(y), rstd, n, c, eps);
  else if (!x_bf16) rmsnorm_fwd<float, float><<<nb, NT, 0, st>>>(static_cast<const float*>(x), static_cast<float*>(y), rstd, n, c, eps);
  else if (y_bf16) rmsnorm_fwd<bf16, bf16><<<nb, NT, 0, st>>>(static_cast<const bf16*>(x), static_cast<bf16*>(y), rstd, n, c, eps);
  else rmsnorm_fwd<bf16, float><<<nb, NT, 0, st>>>(static_cast<const bf16*>(x), static_cast<float*>(y), rstd, n, c, eps);
  return cudaGetLastError();
}

extern "C" int tg_rmsnorm_bwd(const void* x, const void* dy, const float* rstd, void* dx, int64_t n, int c, int x_bf16, int y_bf16, cudaStream_t st) {
  const unsigned nb = blocks_for_warps(n);
  if (!x_bf16 && y_bf16) rmsnorm_bwd<float, bf16><<<nb, NT, 0, st>>>(static_cast<const float*>(x), static_cast<const bf16*>(dy), rstd, static_cast<float*>(dx), n, c);
  else if (!x_bf16) rmsnorm_bwd<float, float><<<nb, NT, 0, st>>>(static_cast<const float*>(x), static_cast<const float*>(dy), rstd, static_cast<float*>(dx), n, c);
  else if (y_bf16) rmsnorm_bwd<bf16, bf16><<<nb, NT, 0, st>>>(static_cast<const bf16*>(x), static_cast<const bf16*>(dy), rstd, static_cast<bf16*>(dx), n, c);
  else rmsnorm_bwd<bf16, float><<<nb, NT, 0, st>>>(static_cast<const bf16*>(x), static_cast<const float*>(dy), rstd, static_cast<bf16*>(dx), n, c);
  return cudaGetLastError();
}

// qkv [rows = B·T, (h+2g)·d] → q [rows, h, d], k and v [rows, g, d]; rstd [rows, h+g]; positions pos + (row mod t).
extern "C" int tg_rope_norm_fwd(const void* qkv, void* q, void* k, void* v, const float* cos, const float* sin, float* rstd, int64_t rows, int h, int g, int d,
                                int t, int pos, float eps, int bf16_, cudaStream_t st) {
  const unsigned nb = blocks_for_warps(rows * (h + 2 * g));
  if (bf16_)
    rope_norm_fwd<bf16><<<nb, NT, 0, st>>>(static_cast<const bf16*>(qkv), Heads<bf16>{static_cast<bf16*>(q), static_cast<bf16*>(k), static_cast<bf16*>(v), h, g, d},
                                           cos, sin, rstd, rows, t, pos, eps);
  else
    rope_norm_fwd<float><<<nb, NT, 0, st>>>(static_cast<const float*>(qkv), Heads<float>{static_cast<float*>(q), static_cast<float*>(k), static_cast<float*>(v), h, g, d},
                                            cos, sin, rstd, rows, t, pos, eps);
  return cudaGetLastError();
}

// dq, dk, dv with strides (b, t, head) as 3 int64 each → dqkv [rows, (h+2g)·d].
extern "C" int tg_rope_norm_bwd(const void* qkv, const void* dq, const void* dk, const void* dv, const int64_t* strides, const float* cos, const float* sin,
                                const float* rstd, void* dqkv, int64_t rows, int h, int g, int d, int t, int pos, int bf16_, cudaStream_t st) {
  const unsigned nb = blocks_for_warps(rows * (h + 2 * g));
  auto launch = [&](auto zero) {
    using T = decltype(zero);
    Grads<T> gi{static_cast<const T*>(dq), static_cast<const T*>(dk), static_cast<const T*>(dv), {}, {}, {}};
    for (int i = 0; i < 3; ++i) gi.sq[i] = strides[i], gi.sk[i] = strides[3 + i], gi.sv[i] = strides[6 + i];
    rope_norm_bwd<T><<<nb, NT, 0, st>>>(static_cast<const T*>(qkv), gi, cos, sin, rstd, static_cast<T*>(dqkv), rows, h, g, d, t, pos);
  };
  if (bf16_) launch(bf16{}); else launch(0.f);
  return cudaGetLastError();
}

extern "C" int tg_relu2_fwd(const void* u, void* h, int64_t n, int bf16_, cudaStream_t st) {
  if (bf16_) relu2_fwd<bf16><<<blocks_for(n), NT, 0, st>>>(static_cast<const bf16*>(u), static_cast<bf16*>(h), n);
  else relu2_fwd<float><<<blocks_for(n), NT, 0, st>>>(static_cast<const float*>(u), static_cast<float*>(h), n);
  return cudaGetLastError();
}

extern "C" int tg_relu2_bwd(const void* u, const void* dh, void* du, int64_t n, int bf16_, cudaStream_t st) {
  if (bf16_) relu2_bwd<bf16><<<blocks_for(n), NT, 0, st>>>(static_cast<const bf16*>(u), static_cast<const bf16*>(dh), static_cast<bf16*>(du), n);
  else relu2_bwd<float><<<blocks_for(n), NT, 0, st>>>(static_cast<const float*>(u), static_cast<const float*>(dh), static_cast<float*>(du), n);
  return cudaGetLastError();
}

// ---- taumode: per row x (a head of q or k, D values) E = xᵀLx / (xᵀx + ε) and λ = E/(E + τ), in fp32; backward
// dx = dλ·τ/(E+τ)² · ((L + Lᵀ)x − 2E·x)/(xᵀx + ε). L (forward) or L + Lᵀ (backward), [D, D] fp32, sits in shared
// memory, read along rows by consecutive lanes (no bank conflicts); a warp takes a row of x and keeps it there too.
// x is [B, heads, T, D] with any strides but D's (q and k are transposed views of [B, T, heads, D]).
namespace {
struct Rows {
  int64_t sb, sh, st;  // element strides of b, head, t
  int heads, t;
  __device__ int64_t at(int64_t r) const { return (r / (int64_t(heads) * t)) * sb + ((r / t) % heads) * sh + (r % t) * st; }
};

template <typename T>
__global__ void __launch_bounds__(NT) lambda_fwd(const T* x, Rows rw, const float* lap, float* e_out, float* lam_out, int64_t rows, int d, float eps, float tau) {
  extern __shared__ float sm[];  // L [d·d], then a row of d for each warp
  for (int i = threadIdx.x; i < d * d; i += NT) sm[i] = lap[i];
  __syncthreads();
  const int64_t r = warp_row();
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  float* xs = sm + d * d + (threadIdx.x / 32) * d;
  const T* xr = x + rw.at(r);
  float xx = 0.f;
  for (int j = lane; j < d; j += 32) {
    const float v = to_f(xr[j]);
    xs[j] = v;
    xx += v * v;
  }
  __syncwarp();
  float xlx = 0.f;  // Σ_j (Σ_i x_i L_ij) x_j, a lane's j
  for (int j = lane; j < d; j += 32) {
    float y = 0.f;
    for (int i = 0; i < d; ++i) y += xs[i] * sm[i * d + j];
    xlx += y * xs[j];
  }
  const float e = warp_sum(xlx) / (warp_sum(xx) + eps);
  if (lane == 0) e_out[r] = e, lam_out[r] = e / (e + tau);
}

template <typename T>
__global__ void __launch_bounds__(NT) lambda_bwd(const T* x, Rows rw, const float* lap_sym, const float* e_in, const float* dlam, T* dx, int64_t rows, int d, float eps,
                                                 float tau) {
  extern __shared__ float sm[];
  for (int i = threadIdx.x; i < d * d; i += NT) sm[i] = lap_sym[i];
  __syncthreads();
  const int64_t r = warp_row();
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  float* xs = sm + d * d + (threadIdx.x / 32) * d;
  const T* xr = x + rw.at(r);
  float xx = 0.f;
  for (int j = lane; j < d; j += 32) {
    const float v = to_f(xr[j]);
    xs[j] = v;
    xx += v * v;
  }
  __syncwarp();
  const float den = warp_sum(xx) + eps, e = e_in[r], g = dlam[r] * tau / ((e + tau) * (e + tau)) / den;
  for (int j = lane; j < d; j += 32) {
    float s = 0.f;  // ((L + Lᵀ)x)_j
    for (int i = 0; i < d; ++i) s += xs[i] * sm[i * d + j];
    dx[r * d + j] = from_f<T>(g * (s - 2.f * e * xs[j]));  // dx is [B, heads, T, D] contiguous
  }
}
}  // namespace

// x rows as described by (sb, sh, st, heads, t); e, lam [rows] fp32 out. lap [d, d] fp32. Returns a cudaError_t.
extern "C" int tg_lambda_fwd(const void* x, int64_t sb, int64_t sh, int64_t st, int heads, int t, const float* lap, float* e, float* lam, int64_t rows, int d,
                             float eps, float tau, int bf16_, cudaStream_t s) {
  const Rows rw{sb, sh, st, heads, t};
  const size_t smem = sizeof(float) * (d * d + WARPS * d);  // 66 KB at d = 128: past the 48 KB default
  cudaFuncSetAttribute(lambda_fwd<bf16>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  cudaFuncSetAttribute(lambda_fwd<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (bf16_) lambda_fwd<bf16><<<blocks_for_warps(rows), NT, smem, s>>>(static_cast<const bf16*>(x), rw, lap, e, lam, rows, d, eps, tau);
  else lambda_fwd<float><<<blocks_for_warps(rows), NT, smem, s>>>(static_cast<const float*>(x), rw, lap, e, lam, rows, d, eps, tau);
  return cudaGetLastError();
}

// dx [rows, d] (contiguous, x's dtype) from dlam [rows] fp32; lap_sym = L + Lᵀ.
extern "C" int tg_lambda_bwd(const void* x, int64_t sb, int64_t sh, int64_t st, int heads, int t, const float* lap_sym, const float* e, const float* dlam, void* dx,
                             int64_t rows, int d, float eps, float tau, int bf16_, cudaStream_t s) {
  const Rows rw{sb, sh, st, heads, t};
  const size_t smem = sizeof(float) * (d * d + WARPS * d);
  cudaFuncSetAttribute(lambda_bwd<bf16>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  cudaFuncSetAttribute(lambda_bwd<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (bf16_) lambda_bwd<bf16><<<blocks_for_warps(rows), NT, smem, s>>>(static_cast<const bf16*>(x), rw, lap_sym, e, dlam, static_cast<bf16*>(dx), rows, d, eps, tau);
  else lambda_bwd<float><<<blocks_for_warps(rows), NT, smem, s>>>(static_cast<const float*>(x), rw, lap_sym, e, dlam, static_cast<float*>(dx), rows, d, eps, tau);
  return cudaGetLastError();
}
